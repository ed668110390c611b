"""VerifierService: converts messages and calls eesd.verifier.Verifier; nothing else."""

import asyncio
import time

from grpc import aio

from eesd.errors import EesdError, InvalidArgument
from eesd.kv_cache import CacheBehind
from eesd_proto.eesd.v1 import common_pb2, verifier_pb2, verifier_pb2_grpc
from serving import convert, tracing
from serving.errors import status_of
from serving.node import ModelNode
from serving.session_rpcs import SessionRpcs

DRAIN = object()  # put in a stream's answer queue on SIGTERM: finish the rounds in flight, then end


class VerifierServicer(SessionRpcs, verifier_pb2_grpc.VerifierServiceServicer):
    messages, prefix, role = verifier_pb2, "VerifierService", common_pb2.NODE_ROLE_VERIFIER

    def __init__(self, node: ModelNode):
        self.node = node
        self._streams: dict[asyncio.Queue, set[asyncio.Task]] = {}  # open streams: answers -> rounds in flight

    def drain(self) -> None:
        """On SIGTERM: every VerifyStream ends once its rounds in flight are answered, so that the server
        stops as soon as no round is left instead of waiting out its grace period for the drafters'
        persistent streams. The drafters' next rounds go to another verifier."""
        for answers in self._streams:
            answers.put_nowait(DRAIN)

    async def Verify(self, request: verifier_pb2.VerifyRequest, context: aio.ServicerContext):
        return verifier_pb2.VerifyResponse(**await self._verify(request))

    async def VerifyStream(self, request_iterator, context: aio.ServicerContext):
        """One drafter's persistent stream: a hello each way, then one answer per round. Rounds are verified
        concurrently, so the rounds of the drafter's sessions join the same passes; answers go out as they
        are ready (the drafter matches them by session and round)."""
        first = await anext(aiter(request_iterator), None)
        if first is None or first.WhichOneof("kind") != "hello":
            raise InvalidArgument("hello", "the first message of a VerifyStream must be a hello")
        convert.identity_from_proto(first.hello.identity).check_pairs_with(self.node.model.identity)
        yield verifier_pb2.VerifyStreamResponse(
            hello=verifier_pb2.VerifyHello(
                identity=convert.identity_to_proto(self.node.model.identity),
                node_id=self.node.node_id,
                mode=verifier_pb2.VERIFY_MODE_RECOMPUTE,
            )
        )
        # Responses, then None (end), an exception (stream failed) or DRAIN.
        answers: asyncio.Queue = asyncio.Queue()
        rounds: set[asyncio.Task] = set()
        self._streams[answers] = rounds
        reader = asyncio.create_task(self._answer_all(request_iterator, answers, rounds))
        try:
            while (answer := await answers.get()) is not None:
                if answer is DRAIN:
                    await asyncio.gather(*rounds, return_exceptions=True)
                    while not answers.empty():
                        if isinstance(answer := answers.get_nowait(), verifier_pb2.VerifyStreamResponse):
                            yield answer
                    return
                if isinstance(answer, BaseException):
                    raise answer
                yield answer
        finally:
            del self._streams[answers]
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)

    async def _answer_all(self, request_iterator, answers: asyncio.Queue, rounds: set[asyncio.Task]) -> None:
        """Verifies every round of the stream as it arrives (holding them in `rounds`); puts each answer,
        then the end."""

        async def answer(request: verifier_pb2.VerifyRequest) -> None:
            try:
                response = verifier_pb2.VerifyStreamResponse(**await self._verify(request))
            except EesdError as error:  # one bad round must not end the stream other sessions share
                response = verifier_pb2.VerifyStreamResponse(
                    round_error=verifier_pb2.RoundError(
                        session_id=request.session_id,
                        owner=request.owner,
                        round=request.round,
                        base_length=request.base_length,
                        code=status_of(error).value[0],
                        message=str(error),
                    )
                )
            except Exception as error:  # a bug or a fault of the machine: the stream ends, mapped to INTERNAL
                response = error
            answers.put_nowait(response)

        try:
            async for message in request_iterator:
                task = asyncio.create_task(answer(message.verify_request))
                rounds.add(task)
                task.add_done_callback(rounds.discard)
            await asyncio.gather(*rounds)
            answers.put_nowait(None)
        except Exception as error:
            answers.put_nowait(error)
        finally:
            for task in rounds:
                task.cancel()

    async def _verify(self, request: verifier_pb2.VerifyRequest) -> dict:
        """{'verdict': ...} or {'cache_mismatch': ...}, the oneof both response messages share; with tracing on,
        a span of the round's trace (its parent: the request's traceparent, or the Verify call's span)."""
        if len(request.traceparent) > tracing.MAX_TRACE_HEADER_CHARS:
            raise InvalidArgument("traceparent", f"at most {tracing.MAX_TRACE_HEADER_CHARS} characters")
        attributes = {"eesd.session_id": request.session_id, "eesd.round": request.round}
        with tracing.span("eesd.verify", attributes, request.traceparent) as span:
            answer = await self._verify_round(request)
            if "verdict" in answer:
                tracing.annotate(span, **{"eesd.drafted": len(request.draft.token_ids)})
                tracing.annotate(span, **{"eesd.accepted": answer["verdict"].accepted})
            return answer

    async def _verify_round(self, request: verifier_pb2.VerifyRequest) -> dict:
        self._check_fits("pending_tokens", len(request.pending_token_ids) + len(request.draft.token_ids))
        draft, vocab = request.draft, self.node.model.config.vocab_size
        oversized = any(len(d.token_ids) > vocab or len(d.probs) > vocab for d in draft.q)
        if len(draft.q) > len(draft.token_ids) or oversized:
            raise InvalidArgument("draft.q", "at most one distribution over the vocabulary per draft token")
        verify_request = convert.verify_request_from_proto(request)
        start, cached = time.perf_counter(), self.node.cache_length(verify_request.key)
        tokens = len(verify_request.pending) + len(verify_request.draft.tokens)
        try:
            job = self.node.model.verify_job(verify_request)
            verdict = await self.node.run_job(job, "verify", verify_request.key, tokens)
        except CacheBehind as behind:
            return {"cache_mismatch": self._mismatch(request, behind)}
        verify_ms = (time.perf_counter() - start) * 1e3
        self.node.metrics.rollback(cached + tokens - verdict.cache_length)
        load = self.node.load_now()
        return {"verdict": convert.verdict_to_proto(verdict, verify_request, verify_ms, load)}
