"""The OpenAI-compatible HTTP API of the controller: /v1/completions, /v1/chat/completions (server-sent events
when streaming), /v1/models and /health, an ASGI app (Starlette) served by uvicorn in the controller's own
process and event loop, on its own port (`http_port`).

It is a second front end over the same core as the gRPC servicer (controller/servicer.py): each choice
is one `RoundLoop.generate` session (stored, admitted, routed, resumable by its id like any other), so
every guarantee of the round loop (lossless output, stop conditions applied before commit, admission and
its limits) holds here too. This module only converts: requests to GenerationParams, round events to
response chunks, domain errors (eesd/errors.py) to OpenAI error objects with their HTTP status
(`http_error`, the one place that maps them).

Every request is watched as every RPC is (serving.observability.observed, through the `_Observed` middleware):
its status and time in the metrics (eesd:http_requests_total, eesd:http_request_duration_seconds), a SERVER
span under the request's W3C `traceparent` header when tracing is on, and an access line in `eesd.access` with
the fields of a gRPC Generate; each choice's session also feeds the vllm: request metrics.

Log probabilities (`logprobs` of a completion, `logprobs` / `top_logprobs` of a chat completion) are the
verifier's, carried by the round events (eesd/logprobs.py: the target distribution p, never the drafter's),
computed only when asked; each token's text and bytes come from the controller's tokenizer
(controller.text.TokenPieces). Not served: log probabilities of the prompt (`echo` with `logprobs`, vLLM's
`prompt_logprobs`),
penalties and logit_bias (they would change the distribution the verifier samples from), tools and JSON
response formats.
"""

import asyncio
import contextlib
import json
import logging
import ssl
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from pydantic import BaseModel, ValidationError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from controller.chat_template import ChatTemplate
from controller.openai_schema import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChoiceLogprobs,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    Delta,
    ErrorBody,
    ErrorResponse,
    ModelCard,
    ModelList,
    Speculation,
    TokenLogprob,
    TopLogprob,
    Usage,
    _Sampling,
)
from controller.round_loop import Finished, RoundEvent, RoundLoop
from controller.text import TextCodec, TextStream, TokenPieces
from eesd.errors import (
    Aborted,
    AlreadyExists,
    EesdError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from eesd.params import (
    NO_LOGPROBS,
    GenerationParams,
    PolicyParams,
    SamplingParams,
    StopConditions,
    check_prompt_size,
)
from serving import logs
from serving.calls import HTTP_CLIENT_GONE, HttpCall
from serving.config import SecurityConfig
from serving.metrics import RequestTimes, controller_metrics
from serving.observability import observed

log = logging.getLogger(__name__)

# finish reasons of the round loop -> OpenAI's ("abort": vLLM's, for a session cancelled through gRPC)
FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length", "cancelled": "abort"}
# Field names of the core -> the HTTP API's, in error messages.
FIELD_NAMES = {"max_new_tokens": "max_tokens", "stop_token_ids": "stop_token_ids"}
RETRY_AFTER_S = "1"


class BadRequest(InvalidArgument):
    """An HTTP-level refusal of a field (the same 400 as a domain InvalidArgument)."""


class ModelNotFound(NotFound):
    def __init__(self, name: str):
        super().__init__(f"The model `{name}` does not exist.")


class BodyTooLarge(EesdError):
    status = "RESOURCE_EXHAUSTED"


def http_error(error: BaseException, prompt_field: str = "prompt") -> tuple[int, ErrorBody]:
    """The HTTP status and OpenAI error object of an error: the one mapping from the domain errors. Fields
    of the core (prompt_ids, max_new_tokens) are named as the request named them."""
    if isinstance(error, InvalidArgument):  # AlreadyExists too: ids are the server's here, so not expected
        param = FIELD_NAMES.get(error.field, prompt_field if error.field in ("prompt_ids", "prompt_text") else None)
        param = param or error.field
        message = str(error)
        if param != error.field and message.startswith(f"{error.field}:"):
            message = f"{param}:{message[len(error.field) + 1 :]}"
        status = 409 if isinstance(error, AlreadyExists) else 400
        return status, ErrorBody(message=message, type="invalid_request_error", param=param)
    if isinstance(error, Unauthenticated):
        return 401, ErrorBody(message=str(error), type="authentication_error", code="invalid_api_key")
    if isinstance(error, ModelNotFound):
        return 404, ErrorBody(message=str(error), type="invalid_request_error", param="model", code="model_not_found")
    if isinstance(error, NotFound):
        return 404, ErrorBody(message=str(error), type="not_found_error")
    if isinstance(error, BodyTooLarge):
        return 413, ErrorBody(message=str(error), type="invalid_request_error")
    if isinstance(error, ResourceExhausted):  # admission refused: no KV room in time, or too many sessions
        return 429, ErrorBody(message=str(error), type="rate_limit_error", code="resource_exhausted")
    if isinstance(error, Unavailable | FailedPrecondition):  # no verifier reachable, or none serves this model
        return 503, ErrorBody(message=str(error), type="service_unavailable_error", code="unavailable")
    if isinstance(error, Aborted):
        return 409, ErrorBody(message=str(error), type="conflict_error", code="aborted")
    if isinstance(error, EesdError):
        return 500, ErrorBody(message=str(error), type="server_error")
    return 500, ErrorBody(message="internal error", type="server_error")


def error_response(error: BaseException, prompt_field: str = "prompt") -> JSONResponse:
    status, body = http_error(error, prompt_field)
    if status == 500 and not isinstance(error, EesdError):
        log.error("HTTP request failed", exc_info=error)
    headers = {"Retry-After": RETRY_AFTER_S} if status in (429, 503) else None
    return JSONResponse(ErrorResponse(error=body).model_dump(), status_code=status, headers=headers)


@dataclass(frozen=True)
class _Logprob:
    """One generated token's log probability as a response shows it: its text and bytes, and the same for
    the most likely tokens at its position."""

    token: str
    logprob: float
    bytes: list[int] | None
    top: list[tuple[str, float, list[int] | None]]


@dataclass
class _Choice:
    """One session of a request: its place among the choices, its prompt and parameters."""

    index: int
    prompt_index: int
    prompt: list[int]
    params: GenerationParams
    session_id: str
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    finished: Finished | None = None
    pieces: TokenPieces | None = None  # when the request asked for log probabilities
    times: RequestTimes = field(default_factory=RequestTimes)  # its metrics and access-line fields
    logprobs: list[_Logprob] = field(default_factory=list)
    offset: int = 0  # where the next token's text begins in the choice's text (text_offset)

    def add_logprobs(self, event: RoundEvent) -> list[_Logprob]:
        """The log probabilities of `event`'s tokens, as responses show them (recorded in the choice too)."""
        if self.pieces is None or event.logprobs is None:
            return []
        out = []
        for lp in event.logprobs:
            top = []
            for token, value in lp.top:
                text = self.pieces.text(token)
                top.append((text, value, self.pieces.bytes(token, text)))
            text = self.pieces.text(lp.token)
            out.append(_Logprob(text, lp.logprob, self.pieces.bytes(lp.token, text), top))
            self.pieces.advance(lp.token)
        self.logprobs += out
        return out


def _completion_logprobs(logprobs: list[_Logprob], offset: int) -> CompletionLogprobs:
    """The legacy format; `offset`: where the first token's text begins in the choice's text."""
    offsets = []
    for lp in logprobs:
        offsets.append(offset)
        offset += len(lp.token)
    return CompletionLogprobs(
        tokens=[lp.token for lp in logprobs],
        token_logprobs=[lp.logprob for lp in logprobs],
        # The sampled token first, then the most likely ones (as OpenAI and vLLM: up to logprobs + 1 entries).
        top_logprobs=[{lp.token: lp.logprob} | {t: v for t, v, _ in lp.top if t != lp.token} for lp in logprobs],
        text_offset=offsets,
    )


def _chat_logprobs(logprobs: list[_Logprob]) -> ChoiceLogprobs:
    return ChoiceLogprobs(
        content=[
            TokenLogprob(
                token=lp.token,
                logprob=lp.logprob,
                bytes=lp.bytes,
                top_logprobs=[TopLogprob(token=t, logprob=v, bytes=b) for t, v, b in lp.top],
            )
            for lp in logprobs
        ]
    )


class _Fanout:
    """The events of several sessions at once, in arrival order, as (choice index, event). Closing it
    cancels the sessions still running (the round loop then ends them as its client's stream ended)."""

    def __init__(self, streams: dict[int, AsyncIterator]):
        self._queue: asyncio.Queue = asyncio.Queue()
        self._open = len(streams)
        self._tasks = [asyncio.ensure_future(self._pump(i, s)) for i, s in streams.items()]

    async def _pump(self, index: int, stream: AsyncIterator) -> None:
        try:
            async with contextlib.aclosing(stream) as events:
                async for event in events:
                    self._queue.put_nowait((index, event, None))
        except asyncio.CancelledError:
            raise
        except Exception as error:  # noqa: BLE001 - handed to the consumer
            self._queue.put_nowait((index, None, error))
            return
        self._queue.put_nowait((index, None, None))

    async def events(self) -> AsyncIterator[tuple[int, RoundEvent | Finished]]:
        while self._open:
            index, event, error = await self._queue.get()
            if error is not None:
                raise error
            if event is None:
                self._open -= 1
                continue
            yield index, event

    async def aclose(self) -> None:
        for task in self._tasks:
            task.cancel()  # synchronously first: an await below may itself be cancelled
        await asyncio.gather(*self._tasks, return_exceptions=True)


@dataclass(frozen=True)
class _Sessions:
    """The sessions of one request as its access line shows them: one choice with the fields of a gRPC
    Generate, several summed under the request's id."""

    request_id: str
    times: list[RequestTimes]

    def access_fields(self) -> dict[str, Any]:
        if len(self.times) == 1:
            return self.times[0].access_fields()
        each = [t.access_fields() for t in self.times]
        fields: dict[str, Any] = {"session": self.request_id, "choices": len(each)}
        for key in ("rounds", "streamed_tokens", "generated_tokens", "drafted", "accepted"):
            fields[key] = sum(f.get(key, 0) for f in each)
        if ttft := [f["ttft_ms"] for f in each if "ttft_ms" in f]:
            fields["ttft_ms"] = min(ttft)
        return fields


class _Observed:
    """ASGI middleware: every request is watched as every RPC is (serving.observability.observed: metrics, a
    SERVER span under its `traceparent` header, the access line), with the status of its response; 499 when
    the client hung up before the response ended (a stream cut short)."""

    def __init__(self, app: ASGIApp, routes: Iterable[str]):
        self.app, self.routes = app, frozenset(routes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status, ended, gone = 500, False, False  # 500 until a response starts: an error escaped the app

        async def receiving() -> Message:
            nonlocal gone
            message = await receive()
            gone = gone or (message["type"] == "http.disconnect" and not ended)
            return message

        async def sending(message: Message) -> None:
            nonlocal status, ended, gone
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                ended = True
            try:
                await send(message)
            except OSError:  # ASGI 2.4 servers tell a client that hung up this way
                gone = True
                raise

        with observed(HttpCall.of(scope, self.routes)) as call:
            try:
                await self.app(scope, receiving, sending)
            finally:
                call.status = HTTP_CLIENT_GONE if gone and not ended else status


def _usage(choices: list[_Choice]) -> Usage:
    prompts = {c.prompt_index: len(c.prompt) for c in choices}  # each prompt counted once, as OpenAI does
    completion = sum(c.finished.stats.generated if c.finished else len(c.tokens) for c in choices)
    prompt = sum(prompts.values())
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def _speculation(choices: list[_Choice]) -> Speculation | None:
    done = [c.finished for c in choices if c.finished is not None]
    if not done:
        return None
    rounds = sum(f.stats.rounds for f in done)
    generated = sum(f.stats.generated for f in done)
    return Speculation(
        rounds=rounds,
        drafted=sum(f.stats.drafted for f in done),
        accepted=sum(f.stats.accepted for f in done),
        mean_accepted_tokens=generated / rounds if rounds else 0.0,
        policy=choices[0].params.policy.name,
    )


def _sse(payload: BaseModel | dict) -> str:
    data = payload.model_dump_json() if isinstance(payload, BaseModel) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n"


def _content(message, index: int) -> str:
    """A message's text: a string, or its text parts joined by newlines (as vLLM joins them)."""
    content = message.content
    if content is None or isinstance(content, str):
        return content or ""
    texts = []
    for part in content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise BadRequest(f"messages.{index}.content", "only text content parts are served")
        texts.append(part["text"])
    return "\n".join(texts)


class OpenAIFrontEnd:
    """The HTTP API over a RoundLoop (see the module's doc). `tokens`: the controller's client tokens
    (serving.security.Tokens; None: no auth), checked the same way as on gRPC."""

    def __init__(
        self,
        loop: RoundLoop,
        codec: TextCodec | None,
        chat_template: ChatTemplate | None,
        model_name: str,
        default_policy: PolicyParams,
        max_new_tokens_limit: int,
        max_prompt_tokens: int,
        max_request_bytes: int,
        context: int | None = None,
        tokens=None,
        track: Callable[[AsyncIterator, RequestTimes], AsyncIterator] | None = None,
    ):
        self.loop, self.codec, self.chat_template = loop, codec, chat_template
        self.model_name, self.default_policy = model_name, default_policy
        self.max_new_tokens_limit, self.max_prompt_tokens = max_new_tokens_limit, max_prompt_tokens
        self.max_request_bytes, self.context, self.tokens = max_request_bytes, context, tokens
        self.track = track or (lambda events, times: controller_metrics().track(events, times))
        self.created = int(time.time())
        self.ready = False  # /health: 503 until the controller is SERVING, and again while it drains

    def app(self) -> Starlette:
        async def not_found(request: Request, error: HTTPException) -> Response:
            kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
            body = ErrorBody(message=f"{request.method} {request.url.path}: {error.detail}", type=kind)
            return JSONResponse(ErrorResponse(error=body).model_dump(), status_code=error.status_code)

        routes = [
            Route("/v1/completions", self._guarded(self.completions, "prompt"), methods=["POST"]),
            Route("/v1/chat/completions", self._guarded(self.chat_completions, "messages"), methods=["POST"]),
            Route("/v1/models", self._guarded(self.models, "prompt"), methods=["GET"]),
            Route("/health", self.health, methods=["GET"]),
        ]
        return Starlette(
            routes=routes,
            exception_handlers={HTTPException: not_found},
            middleware=[Middleware(_Observed, routes=[r.path for r in routes])],
        )

    def _guarded(self, handler: Callable[[Request], Awaitable[Response]], prompt_field: str):
        """`handler` behind the bearer-token check, its errors as OpenAI error objects."""

        async def endpoint(request: Request) -> Response:
            try:
                self._authenticate(request)
                return await handler(request)
            except Exception as error:  # noqa: BLE001 - every error becomes an error object
                return error_response(error, prompt_field)

        return endpoint

    def _authenticate(self, request: Request) -> None:
        if not self.tokens:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        # Tokens.accepts compares in constant time against every accepted token, as the gRPC interceptor does.
        if scheme.lower() != "bearer" or not self.tokens.accepts(token.strip()):
            raise Unauthenticated("missing or wrong bearer token in the Authorization header")

    async def health(self, request: Request) -> Response:
        if self.ready:
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "not ready"}, status_code=503)

    async def models(self, request: Request) -> Response:
        # root: the served name, never a path of the controller's (a hub id's served name is the id itself).
        card = ModelCard(id=self.model_name, created=self.created, max_model_len=self.context, root=self.model_name)
        return JSONResponse(ModelList(data=[card]).model_dump())

    async def _body(self, request: Request, model: type[_Sampling]) -> _Sampling:
        """The request's JSON body as `model`, read only up to the request size limit."""
        size, chunks = 0, []
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_request_bytes:
                raise BodyTooLarge(f"request body over {self.max_request_bytes} bytes")
            chunks.append(chunk)
        try:
            parsed = model.model_validate_json(b"".join(chunks))
        except ValidationError as error:
            first = error.errors()[0]
            where = ".".join(str(part) for part in first["loc"]) or "body"
            raise BadRequest(where, first["msg"]) from None
        if parsed.model != self.model_name:
            raise ModelNotFound(parsed.model)
        return parsed

    def _refuse_unsupported(self, req: _Sampling) -> None:
        if req.prompt_logprobs is not None:
            raise BadRequest("prompt_logprobs", "log probabilities of the prompt are not served")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(req, name) not in (None, 0, 0.0):
                raise BadRequest(name, "only 0 is served (a penalty would change the model's distribution)")
        if req.repetition_penalty not in (None, 1, 1.0):
            raise BadRequest("repetition_penalty", "only 1 is served (a penalty would change the model's distribution)")
        if req.logit_bias:
            raise BadRequest("logit_bias", "not served (it would change the model's distribution)")
        if req.top_k is not None and req.top_k < -1:
            raise BadRequest("top_k", f"must be -1 or 0 (no filter) or positive, got {req.top_k}")

    def _max_tokens(self, asked: int | None, prompt_length: int) -> int:
        if asked is not None:
            if asked > self.max_new_tokens_limit:
                raise BadRequest("max_tokens", f"must be <= {self.max_new_tokens_limit}")
            return asked
        room = self.context - prompt_length if self.context is not None else self.max_new_tokens_limit
        return max(1, min(self.max_new_tokens_limit, room))  # a prompt over the context is refused by the loop

    def _params(self, req: _Sampling, max_tokens: int, index: int, top_logprobs: int) -> GenerationParams:
        default = self.default_policy
        if req.policy is None:
            policy = PolicyParams(default.name, default.k_max if req.k_max is None else req.k_max, default.options)
        else:
            policy = PolicyParams(req.policy, default.k_max if req.k_max is None else req.k_max)
        seed = None if req.seed is None else (req.seed + index) % 2**63  # n choices: n independent draws
        sampling = SamplingParams(
            1.0 if req.temperature is None else req.temperature,
            0 if req.top_k in (None, -1) else req.top_k,
            1.0 if req.top_p is None else req.top_p,
            seed,
        )
        stop = StopConditions(req.stop_strings(), tuple(req.stop_token_ids or ()))
        return GenerationParams(
            max_tokens, sampling, policy, stop_on_eos=not req.ignore_eos, stop=stop, top_logprobs=top_logprobs
        )

    async def _encode(self, text: str, field_name: str, special_tokens: bool = True) -> list[int]:
        if self.codec is None:
            raise BadRequest(field_name, "the controller has no tokenizer (--model-dir): send token ids")
        check_prompt_size(field_name, len(text), self.max_prompt_tokens, characters=True)
        # Off the event loop: tokenizing grows with the text, and other streams must not wait for it.
        ids = await asyncio.to_thread(self.codec.encode, text, special_tokens)
        check_prompt_size(field_name, len(ids), self.max_prompt_tokens)
        return ids

    def _choices(
        self, req: _Sampling, prompts: list[list[int]], max_tokens: int | None, request_id: str, top_logprobs: int
    ):
        """One choice per (prompt, n); `top_logprobs`: the log probabilities each asks for (NO_LOGPROBS: none)."""
        choices = []
        for p, prompt in enumerate(prompts):
            budget = self._max_tokens(max_tokens, len(prompt))
            for j in range(req.n):
                index = p * req.n + j
                params = self._params(req, budget, j, top_logprobs)
                pieces = TokenPieces(self.codec, prompt) if top_logprobs != NO_LOGPROBS else None
                choices.append(_Choice(index, p, prompt, params, f"{request_id}-{index}", pieces=pieces))
        # The access line (serving.logs) reports what the sessions got to, however they end; never the prompt.
        logs.access_fields().update(
            prompt_tokens=sum(map(len, prompts)),
            max_new_tokens=max(c.params.max_new_tokens for c in choices),
            policy=choices[0].params.policy.name,
            request=_Sessions(request_id, [c.times for c in choices]),
        )
        return choices

    async def completions(self, request: Request) -> Response:
        req = await self._body(request, CompletionRequest)
        self._refuse_unsupported(req)
        if req.logprobs is not None and req.echo:
            raise BadRequest("echo", "log probabilities of the prompt (echo with logprobs) are not served")
        if req.suffix:
            raise BadRequest("suffix", "not served")
        if req.best_of not in (None, req.n):
            raise BadRequest("best_of", "only best_of = n is served")
        if not req.prompt:
            raise BadRequest("prompt", "prompt is empty")
        if isinstance(req.prompt, str):
            texts = [req.prompt]
        elif req.prompt and all(isinstance(p, str) for p in req.prompt):
            texts = list(req.prompt)
        else:
            texts = None
        if texts is not None:
            prompts = [await self._encode(t, "prompt") for t in texts]
        else:
            prompts = [req.prompt] if not req.prompt or isinstance(req.prompt[0], int) else list(req.prompt)
            for ids in prompts:
                check_prompt_size("prompt", len(ids), self.max_prompt_tokens)
        if len(prompts) * req.n > 64:
            raise BadRequest("prompt", "at most 64 choices (prompts x n) per request")
        request_id = f"cmpl-{uuid.uuid4().hex}"
        top_logprobs = NO_LOGPROBS if req.logprobs is None else req.logprobs
        choices = self._choices(req, prompts, req.max_tokens, request_id, top_logprobs)
        echo = [texts[c.prompt_index] if texts else self._decode(c.prompt) for c in choices] if req.echo else None
        prompted: set[int] = set()  # choices whose prompt ids went out (return_token_ids: in their first chunk)

        def chunk(
            choice: _Choice,
            text: str,
            finish: str | None,
            logprobs: list[_Logprob] | None = None,
            tokens: list[int] | None = None,
        ) -> Completion:
            listed = None
            if logprobs:
                listed = _completion_logprobs(logprobs, choice.offset)
                choice.offset += sum(len(lp.token) for lp in logprobs)
            prompt_ids = None
            if req.return_token_ids and choice.index not in prompted:
                prompt_ids = choice.prompt
                prompted.add(choice.index)
            part = CompletionChoice(
                index=choice.index,
                text=text,
                finish_reason=finish,
                logprobs=listed,
                token_ids=tokens,
                prompt_token_ids=prompt_ids,
            )
            return Completion(id=request_id, created=int(time.time()), model=self.model_name, choices=[part])

        if req.stream:
            no_tokens = [] if req.return_token_ids else None
            prologue = [chunk(c, echo[c.index], None, tokens=no_tokens) for c in choices] if echo else []
            return await self._stream(req, choices, request_id, prologue, chunk, completion_chunks=True)
        await self._run(choices)
        out = [
            CompletionChoice(
                index=c.index,
                text=(echo[c.index] if echo else "") + c.text,
                finish_reason=FINISH_REASONS.get(c.finished.finish_reason),
                logprobs=None if c.pieces is None else _completion_logprobs(c.logprobs, 0),
                token_ids=c.tokens if req.return_token_ids else None,
                prompt_token_ids=c.prompt if req.return_token_ids else None,
            )
            for c in choices
        ]
        body = Completion(
            id=request_id,
            created=int(time.time()),
            model=self.model_name,
            choices=out,
            usage=_usage(choices),
            speculation=_speculation(choices),
        )
        return JSONResponse(body.model_dump())

    def _decode(self, ids: list[int]) -> str:
        return TextStream(self.codec).push(ids) if self.codec is not None else ""

    async def chat_completions(self, request: Request) -> Response:
        req = await self._body(request, ChatCompletionRequest)
        self._refuse_unsupported(req)
        if req.top_logprobs and not req.logprobs:
            raise BadRequest("top_logprobs", "needs logprobs: true")
        if req.tools:
            raise BadRequest("tools", "tool calling is not served")
        if req.response_format and req.response_format.get("type", "text") != "text":
            raise BadRequest("response_format", "only the text format is served")
        if self.chat_template is None:
            raise BadRequest(
                "messages",
                f"the model {self.model_name!r} has no chat template (tokenizer_config.json's chat_template); "
                "send a prompt to /v1/completions instead",
            )
        if self.codec is None:
            raise BadRequest("messages", "the controller has no tokenizer (--model-dir)")
        messages = [{"role": m.role, "content": _content(m, i)} for i, m in enumerate(req.messages)]
        for i, m in enumerate(req.messages):
            if m.name is not None:
                messages[i]["name"] = m.name
        check_prompt_size("messages", sum(len(m["content"]) for m in messages), self.max_prompt_tokens, characters=True)
        variables = {
            k: v
            for k, v in (req.chat_template_kwargs or {}).items()
            if k not in ("messages", "add_generation_prompt", "tools", "documents")
        }
        text = await asyncio.to_thread(self.chat_template.render, messages, req.add_generation_prompt, **variables)
        prompt = await self._encode(text, "messages", special_tokens=False)  # the template has them already
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        top_logprobs = (req.top_logprobs or 0) if req.logprobs else NO_LOGPROBS
        choices = self._choices(req, [prompt], req.max_completion_tokens or req.max_tokens, request_id, top_logprobs)

        def chunk(
            choice: _Choice,
            text: str | None,
            finish: str | None,
            logprobs: list[_Logprob] | None = None,
            tokens: list[int] | None = None,
            role: bool = False,
        ) -> ChatCompletionChunk:
            delta = Delta(role="assistant" if role else None, content=text)
            listed = _chat_logprobs(logprobs) if logprobs else None
            part = ChatChunkChoice(
                index=choice.index, delta=delta, finish_reason=finish, logprobs=listed, token_ids=tokens
            )
            prompt_ids = choice.prompt if role and req.return_token_ids else None  # in each choice's first chunk
            return ChatCompletionChunk(
                id=request_id,
                created=int(time.time()),
                model=self.model_name,
                choices=[part],
                prompt_token_ids=prompt_ids,
            )

        if req.stream:
            no_tokens = [] if req.return_token_ids else None
            prologue = [chunk(c, "", None, tokens=no_tokens, role=True) for c in choices]
            return await self._stream(req, choices, request_id, prologue, chunk, completion_chunks=False)
        await self._run(choices)
        out = [
            ChatChoice(
                index=c.index,
                message=AssistantMessage(content=c.text),
                finish_reason=FINISH_REASONS.get(c.finished.finish_reason),
                logprobs=None if c.pieces is None else _chat_logprobs(c.logprobs),
                token_ids=c.tokens if req.return_token_ids else None,
            )
            for c in choices
        ]
        body = ChatCompletion(
            id=request_id,
            created=int(time.time()),
            model=self.model_name,
            choices=out,
            usage=_usage(choices),
            speculation=_speculation(choices),
            prompt_token_ids=prompt if req.return_token_ids else None,
        )
        return JSONResponse(body.model_dump())

    def _fanout(self, choices: list[_Choice]) -> _Fanout:
        return _Fanout(
            {c.index: self.track(self.loop.generate(c.prompt, c.params, c.session_id), c.times) for c in choices}
        )

    @staticmethod
    def _take(choice: _Choice, event: RoundEvent | Finished) -> tuple[str, list[_Logprob], list[int]]:
        """Records `event` in its choice; the text and tokens it adds, and its tokens' log probabilities if
        asked."""
        logprobs, tokens = [], []
        if isinstance(event, RoundEvent):
            tokens = list(event.tokens)
            choice.tokens += tokens
            logprobs = choice.add_logprobs(event)
        else:
            choice.finished = event
        choice.text += event.text
        return event.text, logprobs, tokens

    async def _run(self, choices: list[_Choice]) -> None:
        """Runs every choice's session to its end (the first error ends them all)."""
        fanout = self._fanout(choices)
        try:
            async for index, event in fanout.events():
                self._take(choices[index], event)
        finally:
            await fanout.aclose()

    async def _stream(self, req, choices, request_id, prologue, chunk, completion_chunks: bool) -> Response:
        """A streaming response. Every session has run its first round (or failed) before the response
        starts, so admission's refusals (429, 503) and bad fields (400) are statuses, not events."""
        fanout = self._fanout(choices)
        events = fanout.events()
        first: list[tuple[int, RoundEvent | Finished]] = []
        started: set[int] = set()
        try:
            while len(started) < len(choices):
                index, event = await anext(events)
                first.append((index, event))
                started.add(index)
        except BaseException:
            await fanout.aclose()
            raise
        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        def pieces(index: int, event: RoundEvent | Finished) -> list[str]:
            choice = choices[index]
            text, logprobs, tokens = self._take(choice, event)
            ids, no_ids = (tokens, []) if req.return_token_ids else (None, None)
            # A round whose text is held back (it may begin a stop string) still sends its log probabilities
            # and, when asked, its token ids.
            out = [_sse(chunk(choice, text, None, logprobs, ids))] if text or logprobs or ids else []
            if isinstance(event, Finished):
                finish = FINISH_REASONS.get(event.finish_reason)
                out.append(_sse(chunk(choice, "" if completion_chunks else None, finish, None, no_ids)))
            return out

        async def body() -> AsyncIterator[str]:
            try:
                for message in prologue:
                    yield _sse(message)
                for index, event in first:
                    for piece in pieces(index, event):
                        yield piece
                async for index, event in events:
                    for piece in pieces(index, event):
                        yield piece
                if include_usage:
                    final = {
                        "id": request_id,
                        "object": "text_completion" if completion_chunks else "chat.completion.chunk",
                        "created": int(time.time()),
                        "model": self.model_name,
                        "choices": [],
                        "usage": _usage(choices).model_dump(),
                        "speculation": (s.model_dump() if (s := _speculation(choices)) else None),
                    }
                    yield _sse(final)
            except Exception as error:  # noqa: BLE001 - after the status line: an error event
                _, error_body = http_error(error)
                if not isinstance(error, EesdError):
                    log.error("HTTP stream failed", exc_info=error)
                yield _sse(ErrorResponse(error=error_body))
            finally:
                await fanout.aclose()
            yield "data: [DONE]\n\n"

        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(body(), media_type="text/event-stream", headers=headers)


class _Uvicorn(uvicorn.Server):
    """uvicorn without its own signal handling: the controller's SIGTERM handler (serving.server) stops it."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


class HttpServer:
    """The front end's uvicorn server on the controller's event loop."""

    def __init__(
        self, front: OpenAIFrontEnd, host: str, port: int, grace_s: float, security: SecurityConfig | None = None
    ):
        """With `security`'s TLS settings the port serves HTTPS with the gRPC port's certificate (and asks for
        client certificates signed by its CA with tls_client_auth); read at start, not reloaded."""
        tls = {}
        if security is not None and security.tls:
            tls = {"ssl_certfile": security.tls_cert_file, "ssl_keyfile": security.tls_key_file}
            if security.tls_ca_file:
                tls["ssl_ca_certs"] = security.tls_ca_file
            if security.tls_client_auth:
                tls["ssl_cert_reqs"] = ssl.CERT_REQUIRED
        config = uvicorn.Config(
            front.app(),
            host=host,
            port=port,
            lifespan="off",
            log_config=None,
            access_log=False,
            server_header=False,
            timeout_graceful_shutdown=max(1, int(grace_s)),
            **tls,
        )
        self.front, self.server = front, _Uvicorn(config)
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        """Listening on return; a port it cannot bind fails here (uvicorn exits the process)."""
        self._task = asyncio.ensure_future(self.server.serve())
        while not self.server.started:
            if self._task.done():
                self._task.result()
                raise RuntimeError("the HTTP server stopped while starting")
            await asyncio.sleep(0.02)
        log.info("OpenAI-compatible HTTP API on port %d", self.server.config.port)

    def begin_stop(self) -> None:
        """Stops taking requests (health says 503); streams in flight get the grace period to finish."""
        self.front.ready = False
        self.server.should_exit = True

    async def stop(self) -> None:
        self.begin_stop()
        if self._task is not None:
            await self._task
