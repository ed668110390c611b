"""RoundLoop (the controller's core) with in-process fakes of the nodes: how a session that stops on an
error is recorded, and that cleanup it starts in the background is tracked until done."""

import asyncio

import pytest

from controller.discovery import make_discovery
from controller.nodes import RoundOutcome
from controller.round_loop import RoundLoop
from controller.routing import Router
from controller.servicer import ControllerServicer
from controller.state_store import MemoryStateStore
from eesd.errors import EesdError, InvalidArgument, NotFound, ResourceExhausted
from eesd.params import GenerationParams, PolicyParams
from eesd.rounds import Verdict
from eesd_proto.eesd.v1 import controller_pb2

PROMPT = [3, 4, 5]


class FakeNodes:
    """A verifier that commits token 7 per round, then raises `error` in round `fail_at`."""

    def __init__(self, error: Exception, fail_at: int = 2):
        self.error, self.fail_at = error, fail_at
        self.closed: list[tuple[str, str]] = []

    async def verify(self, verifier, request):
        if request.round_index == self.fail_at:
            raise self.error
        length = request.base_length + len(request.pending)
        verdict = Verdict(request.session_id, request.round_index, 0, 7, length)
        return RoundOutcome(request.draft, verdict, None, 0.0, 1.0, 0.0)

    async def open_session(self, role, address, session_id, owner, reserve_tokens):
        return 0

    async def close_session(self, role, address, session_id, owner):
        await asyncio.sleep(0.01)
        self.closed.append((role, session_id))


async def run_until_error(loop: RoundLoop, session_id: str) -> tuple[list[int], Exception]:
    params = GenerationParams(16, policy=PolicyParams(name="off", k_max=0), stop_on_eos=False)
    tokens = []
    with pytest.raises(Exception) as info:
        async for event in loop.generate(PROMPT, params, session_id):
            tokens += event.tokens
    return tokens, info.value


@pytest.mark.parametrize(
    ("error", "code", "message"),
    [
        (ResourceExhausted("context of 129 tokens exceeds the model's 128"), "RESOURCE_EXHAUSTED", None),
        (RuntimeError("CUDA error: device-side assert at 0x7f"), "INTERNAL", "internal error"),
    ],
)
def test_session_stopped_by_an_error_is_failed_with_its_status(error, code, message):
    async def scenario():
        store = MemoryStateStore()
        nodes = FakeNodes(error)
        router = Router(make_discovery("static", ""), make_discovery("static", "v0:1"))
        loop = RoundLoop(store, router, nodes, frozenset(), vocab_size=32)
        tokens, raised = await run_until_error(loop, "s1")
        await loop.aclose()  # the node cleanup started in the background has finished
        return await store.get_session("s1"), nodes, tokens, raised, router

    record, nodes, tokens, raised, router = asyncio.run(scenario())
    assert raised is error  # the client gets the error itself; the interceptor maps it to its status
    assert tokens == [7, 7]
    assert (record.status, record.finish_reason, record.error_code) == ("failed", "error", code)
    assert record.error_message == (message or str(error))  # no raw text of an unexpected error
    assert record.committed == PROMPT + [7, 7]
    assert nodes.closed == [("verifier", "s1")]
    assert router.load["v0:1"] == 0


class NoMetadata:
    def invocation_metadata(self):
        return ()


def test_get_session_of_a_failed_session_says_failed_with_status_and_message():
    async def scenario():
        store = MemoryStateStore()
        router = Router(make_discovery("static", ""), make_discovery("static", "v0:1"))
        loop = RoundLoop(store, router, FakeNodes(ResourceExhausted("context full")), frozenset(), vocab_size=32)
        await run_until_error(loop, "s1")
        servicer = ControllerServicer(loop, store, None, PolicyParams("off", 0), 64, 128)
        request = controller_pb2.GetSessionRequest(session_id="s1")
        session = (await servicer.GetSession(request, NoMetadata())).session
        await loop.aclose()  # the node cleanup started in the background has finished
        return session

    session = asyncio.run(scenario())
    assert session.state == controller_pb2.SESSION_STATE_FAILED
    assert (session.error.code, session.error.message) == (8, "context full")  # 8 = RESOURCE_EXHAUSTED
    assert session.usage.completion_tokens == 2


def test_failure_to_record_the_failure_keeps_the_first_error():
    class DownStore(MemoryStateStore):
        async def fail(self, session_id, code, message, at=None):
            raise EesdError("redis is down")

    async def scenario():
        loop = RoundLoop(
            DownStore(),
            Router(make_discovery("static", ""), make_discovery("static", "v0:1")),
            FakeNodes(ResourceExhausted("full")),
            frozenset(),
            vocab_size=32,
        )
        _, raised = await run_until_error(loop, "s1")
        await loop.aclose()
        return raised

    assert str(asyncio.run(scenario())) == "full"


def test_a_request_beyond_the_context_is_refused_before_anything_is_stored():
    async def scenario():
        store = MemoryStateStore()
        router = Router(make_discovery("static", ""), make_discovery("static", "v0:1"))
        loop = RoundLoop(store, router, FakeNodes(RuntimeError("unused"), fail_at=99), frozenset(), 32, context=20)
        params = GenerationParams(18, policy=PolicyParams("off", 0))  # 3 + 18 > 20
        with pytest.raises(InvalidArgument, match="max_new_tokens: must be <= 17"):
            async for _ in loop.generate(PROMPT, params, "s1"):
                pass
        with pytest.raises(NotFound):
            await store.get_session("s1")
        assert router.load["v0:1"] == 0

    asyncio.run(scenario())


def test_cancelling_a_session_this_controller_does_not_drive_leaves_no_trace():
    """A Cancel for an id that is not running here (finished, or on another controller) must not cancel
    a later session that reuses the id."""

    async def scenario():
        router = Router(make_discovery("static", ""), make_discovery("static", "v0:1"))
        loop = RoundLoop(MemoryStateStore(), router, FakeNodes(RuntimeError("unused"), fail_at=99), frozenset(), 32)
        loop.cancel_local("reused")
        params = GenerationParams(4, policy=PolicyParams("off", 0), stop_on_eos=False)
        events = [event async for event in loop.generate(PROMPT, params, "reused")]
        await loop.aclose()  # the node cleanup started in the background has finished
        return events

    events = asyncio.run(scenario())
    assert events[-1].finish_reason == "length" and sum(len(e.tokens) for e in events[:-1]) == 4


def test_sessions_beyond_the_controllers_limit_are_resource_exhausted_at_once():
    """A burst past max_sessions is refused before any work, not queued without bound; the slot is given
    back when a session ends."""

    async def scenario():
        router = Router(make_discovery("static", ""), make_discovery("static", "v0:1"))
        loop = RoundLoop(
            MemoryStateStore(), router, FakeNodes(RuntimeError("unused"), fail_at=99), frozenset(), 32, max_sessions=2
        )
        params = GenerationParams(3, policy=PolicyParams("off", 0), stop_on_eos=False)
        first, second = loop.generate(PROMPT, params, "a"), loop.generate(PROMPT, params, "b")
        await anext(first), await anext(second)  # both running
        with pytest.raises(ResourceExhausted, match="maximum of 2 sessions"):
            await anext(loop.generate(PROMPT, params, "c"))
        rest = [event async for event in first]
        last = [event async for event in loop.generate(PROMPT, params, "c")][-1]
        await second.aclose()
        await loop.aclose()  # the node cleanup started in the background has finished
        return rest[-1].finish_reason, last

    reason, last = asyncio.run(scenario())
    assert reason == "length" and last.finish_reason == "length"
