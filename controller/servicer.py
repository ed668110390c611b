"""ControllerService: converts messages and calls the round loop; nothing else."""

import asyncio

from grpc import aio

from controller.round_loop import Finished, RoundEvent, RoundLoop
from controller.state_store import StateStore
from controller.text import TextCodec
from eesd.errors import InvalidArgument
from eesd.params import GenerationParams, PolicyParams, StopConditions, check_prompt_size, check_session_id
from eesd_proto.eesd.v1 import controller_pb2, controller_pb2_grpc
from serving import convert, logs
from serving.metrics import RequestTimes, controller_metrics

FINISH_REASONS = {
    "length": controller_pb2.FINISH_REASON_LENGTH,
    "eos": controller_pb2.FINISH_REASON_EOS,
    "cancelled": controller_pb2.FINISH_REASON_CANCELLED,
    "stop": controller_pb2.FINISH_REASON_STOP,
}
SESSION_STATES = {
    "active": controller_pb2.SESSION_STATE_ACTIVE,
    "finished": controller_pb2.SESSION_STATE_FINISHED,
    "cancelled": controller_pb2.SESSION_STATE_CANCELLED,
    "failed": controller_pb2.SESSION_STATE_FAILED,
}


def speculation_to_proto(stats: dict) -> controller_pb2.SpeculationStats | None:
    """A session's speculation statistics (GenerationStats.speculation, as its record keeps them)."""
    if not stats:  # a session still running: its record gets them when it ends
        return None
    rounds = stats["rounds"]
    return controller_pb2.SpeculationStats(
        rounds=rounds,
        drafted=stats["drafted"],
        accepted=stats["accepted"],
        mean_accepted_tokens=stats["generated"] / rounds if rounds else 0.0,
        k_histogram={int(k): n for k, n in stats["k_histogram"].items()},
        policy=stats["policy"],
    )


class ControllerServicer(controller_pb2_grpc.ControllerServiceServicer):
    def __init__(
        self,
        loop: RoundLoop,
        store: StateStore,
        codec: TextCodec | None,
        default_policy: PolicyParams,
        max_new_tokens_limit: int,
        max_prompt_tokens: int,
    ):
        self.loop, self.store, self.codec = loop, store, codec
        self.default_policy = default_policy
        self.max_new_tokens_limit, self.max_prompt_tokens = max_new_tokens_limit, max_prompt_tokens

    async def _prompt(self, request: controller_pb2.GenerateRequest) -> list[int]:
        """The prompt's ids; its size is checked first, so the work done on it is bounded by the limit."""
        field = request.WhichOneof("prompt") or "prompt_ids"
        if field == "prompt_text":
            if self.codec is None:
                raise InvalidArgument(field, "the controller has no tokenizer (--model-dir); send prompt_ids")
            check_prompt_size(field, len(request.prompt_text), self.max_prompt_tokens, characters=True)
            # Off the event loop: tokenizing grows with the text, and other streams must not wait for it.
            ids = await asyncio.to_thread(self.codec.encode, request.prompt_text)
        else:
            ids = request.prompt_ids.ids
        check_prompt_size(field, len(ids), self.max_prompt_tokens)
        return list(ids)

    async def Generate(self, request: controller_pb2.GenerateRequest, context: aio.ServicerContext):
        if request.max_new_tokens > self.max_new_tokens_limit:
            raise InvalidArgument("max_new_tokens", f"must be <= {self.max_new_tokens_limit}")
        policy = convert.policy_from_proto(request.policy, self.default_policy)
        params = GenerationParams(
            request.max_new_tokens,
            convert.sampling_from_proto(request.sampling),
            policy,
            stop_on_eos=not request.ignore_eos,
            stop=StopConditions(tuple(request.stop), tuple(request.stop_token_ids)),
            top_logprobs=convert.top_logprobs_from_proto(request),
        )
        if request.session_id:
            check_session_id(request.session_id)
        prompt, times = await self._prompt(request), RequestTimes()
        # The access line (serving.logs) reports what the call got to, however it ends; never the prompt itself.
        logs.access_fields().update(
            prompt_tokens=len(prompt), max_new_tokens=params.max_new_tokens, policy=policy.name, request=times
        )
        events = self.loop.generate(prompt, params, request.session_id, request.received_tokens)
        async for event in controller_metrics().track(events, times):
            if isinstance(event, RoundEvent):
                yield controller_pb2.GenerateResponse(
                    session_id=event.session_id,
                    chunk=controller_pb2.GenerationChunk(
                        round=event.round_index,
                        token_ids=event.tokens,
                        text=event.text,
                        stats=convert.round_stats_to_proto(event.stats, event.transport_ms, event.controller_ms),
                        logprobs=convert.logprobs_to_proto(event.logprobs),
                    ),
                )
            else:
                yield controller_pb2.GenerateResponse(
                    session_id=event.session_id, summary=self._summary(event, policy.name)
                )

    def _summary(self, event: Finished, policy: str) -> controller_pb2.GenerationSummary:
        s = event.stats
        speculation = speculation_to_proto(s.speculation(policy))
        return controller_pb2.GenerationSummary(
            finish_reason=FINISH_REASONS[event.finish_reason],
            usage=controller_pb2.Usage(prompt_tokens=event.prompt_tokens, completion_tokens=s.generated),
            speculation=speculation,
            time_split=controller_pb2.TimeSplit(
                draft_ms=s.draft_s * 1e3,
                verify_ms=s.verify_s * 1e3,
                transport_ms=event.transport_ms,
                controller_ms=event.controller_ms,
                total_ms=s.elapsed_s * 1e3,
            ),
        )

    async def Cancel(self, request: controller_pb2.CancelRequest, context: aio.ServicerContext):
        check_session_id(request.session_id)
        await self.store.cancel(request.session_id)
        self.loop.cancel_local(request.session_id)
        record = await self.store.get_session(request.session_id)
        return controller_pb2.CancelResponse(session_id=request.session_id, state=SESSION_STATES[record.status])

    async def GetSession(self, request: controller_pb2.GetSessionRequest, context: aio.ServicerContext):
        check_session_id(request.session_id)
        record = await self.store.get_session(request.session_id)
        return controller_pb2.GetSessionResponse(
            session=controller_pb2.Session(
                session_id=record.session_id,
                state=SESSION_STATES[record.status],
                finish_reason=FINISH_REASONS.get(record.finish_reason, controller_pb2.FINISH_REASON_UNSPECIFIED),
                usage=controller_pb2.Usage(prompt_tokens=record.prompt_length, completion_tokens=len(record.generated)),
                speculation=speculation_to_proto(record.stats),
                drafter_id=record.drafter,
                verifier_id=record.verifier,
                committed_token_ids=record.committed if request.include_token_ids else [],
                error=convert.session_error_to_proto(record.error_code, record.error_message),
            )
        )
