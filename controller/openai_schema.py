"""The OpenAI API's requests and responses as pydantic models (the subset EESD Serve serves: completions,
chat completions, models), with vLLM's extensions that the same clients send (top_k, stop_token_ids,
ignore_eos) and EESD's own (the draft policy; the speculation statistics in responses).

Fields that would change the output distribution in a way the verifier does not compute (penalties,
logit_bias, suffix, tools, a JSON response_format), or ask for what is not computed (the prompt's log
probabilities), are accepted only at their neutral value and refused otherwise, naming the field: never
silently ignored. Log probabilities (`logprobs`, `top_logprobs`) are the
verifier's (eesd/logprobs.py), in OpenAI's shapes: a completion's `tokens` / `token_logprobs` /
`top_logprobs` / `text_offset`, a chat completion's `content[]` of `token` / `logprob` / `bytes` /
`top_logprobs`."""

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from eesd.params import MAX_TOP_LOGPROBS

# Lengths of client-supplied text kept in check before any work (the prompt itself is bounded by the
# controller's prompt limit).
MAX_N = 16


class _Request(BaseModel):
    # Unknown fields are ignored (clients send more than any server reads); known ones are checked strictly.
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Request):
    include_usage: bool = False


class _Sampling(_Request):
    """What completions and chat completions share."""

    model: str
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0.0)] | None = None  # None: 1.0, OpenAI's default
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    top_k: int | None = None  # vLLM: -1 or 0 is no top-k filter
    seed: Annotated[int, Field(ge=0, lt=2**63)] | None = None
    n: Annotated[int, Field(ge=1, le=MAX_N)] = 1
    stop: str | list[str] | None = None
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = None
    ignore_eos: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    # Neutral values only (see the module's doc).
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # vLLM's: the prompt's log probabilities (refused: not served) and the token ids of prompt and output
    # alongside the text (`prompt_token_ids` once per choice, `token_ids` of each chunk).
    prompt_logprobs: int | None = None
    return_token_ids: bool = False
    # EESD: the draft-length policy and its largest block (the server's defaults when unset).
    policy: str | None = None
    k_max: Annotated[int, Field(ge=0, le=64)] | None = None

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class CompletionRequest(_Sampling):
    # A text, token ids, or a batch of either: each prompt gets n choices.
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: Annotated[int, Field(ge=1)] | None = 16  # OpenAI's default for completions
    echo: bool = False
    # The generated tokens' log probabilities and this many most likely tokens at each position (OpenAI
    # allows 5; vLLM, and EESD, 20).
    logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    suffix: str | None = None
    best_of: int | None = None


class ChatMessage(_Request):
    role: str
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None


class ChatCompletionRequest(_Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None  # needs logprobs: true
    tools: list[dict[str, Any]] | None = None
    response_format: dict[str, Any] | None = None
    # vLLM's: whether the template ends with the assistant's turn opened, and extra template variables.
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None


# Responses.


def _asked_for() -> Any:
    """An extension field only a request that asks for it gets (absent, not null, in the others)."""
    return Field(default=None, exclude_if=lambda value: value is None)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class Speculation(BaseModel):
    """EESD's extension: how the request's tokens were made, over all its choices."""

    rounds: int
    drafted: int
    accepted: int
    mean_accepted_tokens: float  # tau: tokens committed per round, the recovered or bonus token included
    policy: str


class CompletionLogprobs(BaseModel):
    """A completion choice's log probabilities (the legacy format), one entry per generated token."""

    tokens: list[str]
    token_logprobs: list[float | None]
    # The sampled token and the `logprobs` most likely ones at each position: up to logprobs + 1 entries.
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]  # where each token's text begins in the choice's text


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    # vLLM's, with return_token_ids: the tokens of the choice (of the chunk, streaming) and of its prompt.
    token_ids: list[int] | None = _asked_for()
    prompt_token_ids: list[int] | None = _asked_for()


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    speculation: Speculation | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None  # the token's UTF-8 bytes (a token may hold part of a character)


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]  # the `top_logprobs` most likely tokens at the position, most likely first


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None
    refusal: list[TokenLogprob] | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None
    token_ids: list[int] | None = _asked_for()  # vLLM's, with return_token_ids


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    speculation: Speculation | None = None
    prompt_token_ids: list[int] | None = _asked_for()  # vLLM's, with return_token_ids


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: Delta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None
    token_ids: list[int] | None = _asked_for()  # vLLM's, with return_token_ids: the chunk's


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    speculation: Speculation | None = None
    prompt_token_ids: list[int] | None = _asked_for()  # vLLM's, with return_token_ids: in each choice's first chunk


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "eesd"
    max_model_len: int | None = None
    # vLLM's: what the model was loaded as (vllm bench serve takes its tokenizer from it) and a base model.
    root: str | None = None
    parent: str | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody
