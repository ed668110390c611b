"""RoundLoop through state-store outages, with in-process fakes: a store that stops answering, loses a
commit's reply, forgets sessions or goes back to an older copy of them. Sessions wait for the store within
`store_wait_s`, write back what it lost, stop with UNAVAILABLE past the budget, and their end reaches the
store once it answers again, at the point the client saw. Routing counts the other controllers' load."""

import asyncio
import copy
import time

import pytest

from controller.discovery import make_discovery
from controller.nodes import RoundOutcome
from controller.patience import StorePatience, StoreUnavailable
from controller.round_loop import Finished, RoundEvent, RoundLoop
from controller.routing import Router
from controller.state_store import MemoryStateStore, SessionRecord, StaleRecord
from eesd.errors import Unavailable
from eesd.params import GenerationParams, PolicyParams
from eesd.rounds import Verdict

PROMPT = [3, 4, 5]
ROUNDS = 12


def token(round_index: int) -> int:
    return 100 + round_index


REFERENCE = [token(r) for r in range(ROUNDS)]


class FakeNodes:
    """A verifier that commits token(round) per round (verifier-only decoding)."""

    async def verify(self, verifier, request):
        length = request.base_length + len(request.pending)
        verdict = Verdict(request.session_id, request.round_index, 0, token(request.round_index), length)
        return RoundOutcome(request.draft, verdict, None, 0.0, 1.0, 0.0)

    async def open_session(self, *args):
        return 0

    async def close_session(self, *args):
        pass


class FlakyStore(MemoryStateStore):
    """A MemoryStateStore that can stop answering (`down`), or apply a commit and lose its reply."""

    def __init__(self):
        super().__init__()
        self.down = False
        self.lose_commit_replies = False  # commits apply, then the caller hears UNAVAILABLE
        self.calls: list[str] = []

    def _gate(self, name: str) -> None:
        self.calls.append(name)
        if self.down:
            raise Unavailable("redis at 127.0.0.1:1 is unreachable: Connection refused")

    async def create_session(self, record, token=""):
        self._gate("create_session")
        return await super().create_session(record, token)

    async def restore_session(self, record):
        self._gate("restore_session")
        return await super().restore_session(record)

    async def commit_round(self, session_id, round_index, tokens, policy_state, epoch=0):
        self._gate("commit_round")
        result = await super().commit_round(session_id, round_index, tokens, policy_state, epoch)
        if self.lose_commit_replies:
            self.down = True
            raise Unavailable("redis at 127.0.0.1:1 is unreachable: Timeout reading from socket")
        return result

    async def set_route(self, session_id, drafter, verifier, epoch=None):
        self._gate("set_route")
        return await super().set_route(session_id, drafter, verifier, epoch)

    async def finish(self, session_id, status, finish_reason, at=None):
        self._gate("finish")
        return await super().finish(session_id, status, finish_reason, at)

    async def fail(self, session_id, code, message, at=None):
        self._gate("fail")
        return await super().fail(session_id, code, message, at)

    def wipe(self) -> None:
        """Redis restarted without persistence."""
        with self._lock:
            self._sessions.clear()


def make_loop(store, store_wait_s: float = 5.0) -> RoundLoop:
    router = Router(make_discovery("static", ""), make_discovery("static", "v0:1"))
    return RoundLoop(store, router, FakeNodes(), frozenset(), vocab_size=256, store_wait_s=store_wait_s)


PARAMS = GenerationParams(ROUNDS, policy=PolicyParams(name="off", k_max=0), stop_on_eos=False)


async def drive(loop: RoundLoop, session_id: str, after_round=None) -> tuple[list[int], list]:
    """Streams a session; after_round(r) runs after the client got round r's tokens."""
    tokens, events = [], []
    async for event in loop.generate(PROMPT, PARAMS, session_id):
        events.append(event)
        if isinstance(event, RoundEvent):
            tokens += event.tokens
            if after_round is not None:
                after_round(event.round_index)
    return tokens, events


async def until(condition, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


def test_a_round_waits_for_the_store_and_the_session_finishes():
    async def scenario():
        store = FlakyStore()
        loop = make_loop(store)

        def outage(round_index):
            if round_index == 3:
                store.down = True
                asyncio.get_running_loop().call_later(0.6, setattr, store, "down", False)

        start = time.monotonic()
        tokens, events = await drive(loop, "s1", outage)
        await loop.aclose()
        return tokens, events, await store.get_session("s1"), time.monotonic() - start, store.calls

    tokens, events, record, elapsed, calls = asyncio.run(scenario())
    assert tokens == REFERENCE
    assert isinstance(events[-1], Finished) and events[-1].finish_reason == "length"
    assert (record.status, record.committed, record.next_round) == ("finished", PROMPT + REFERENCE, ROUNDS)
    assert elapsed >= 0.6 and calls.count("commit_round") > ROUNDS  # it retried


def test_past_the_budget_the_session_stops_unavailable_and_its_failure_lands_when_the_store_returns():
    """The last commit applied but its reply was lost: the client never got those tokens, so the failure,
    written once the store answers, takes the commit back. The store holds exactly what the client got."""

    async def scenario():
        store = FlakyStore()
        loop = make_loop(store, store_wait_s=0.3)
        got = []

        def lose_next_reply(round_index):
            if round_index == 4:
                store.lose_commit_replies = True  # round 5's commit applies, its reply is lost

        with pytest.raises(StoreUnavailable) as raised:
            got, _ = await drive(loop, "s1", lose_next_reply)
        assert loop.patience.pending_ends == ["s1"]
        assert (await MemoryStateStore.get_session(store, "s1")).next_round == 6  # one round the client lacks
        store.lose_commit_replies = store.down = False
        await until(lambda: not loop.patience.pending_ends)
        await loop.aclose()
        return raised.value, await store.get_session("s1")

    error, record = asyncio.run(scenario())
    assert error.status == "UNAVAILABLE" and "state store unreachable for 0.3 s" in str(error)
    assert record.status == "failed" and record.error_code == "UNAVAILABLE"
    assert record.committed == PROMPT + REFERENCE[:5] and record.next_round == 5


def test_a_store_that_lost_the_session_gets_it_back_from_the_controller():
    async def scenario():
        store = FlakyStore()
        loop = make_loop(store)

        def restart_empty(round_index):
            if round_index in (2, 7):
                store.wipe()

        tokens, _ = await drive(loop, "s1", restart_empty)
        await loop.aclose()
        return tokens, await store.get_session("s1"), store.calls

    tokens, record, calls = asyncio.run(scenario())
    assert tokens == REFERENCE
    assert (record.status, record.committed, record.next_round) == ("finished", PROMPT + REFERENCE, ROUNDS)
    assert calls.count("restore_session") == 2


def test_a_store_that_went_back_to_an_older_copy_is_brought_forward():
    """An AOF that lost its last second, or a failover to a lagging replica: the record is rounds behind."""

    async def scenario():
        store = FlakyStore()
        loop = make_loop(store)
        saved = {}

        def go_back(round_index):
            if round_index == 2:
                saved["old"] = copy.deepcopy(store._sessions["s1"])
            if round_index == 6:
                store._sessions["s1"] = saved["old"]

        tokens, _ = await drive(loop, "s1", go_back)
        await loop.aclose()
        return tokens, await store.get_session("s1")

    tokens, record = asyncio.run(scenario())
    assert tokens == REFERENCE
    assert (record.status, record.committed, record.next_round) == ("finished", PROMPT + REFERENCE, ROUNDS)


def test_a_session_that_ends_while_the_store_is_down_is_ended_when_it_returns():
    """The last round committed; the finish write meets a dead store: the client still gets its summary,
    and the record says finished once the store answers (it does not stay active)."""

    async def scenario():
        store = FlakyStore()
        loop = make_loop(store)

        def outage(round_index):
            if round_index == ROUNDS - 1:
                store.down = True

        tokens, events = await drive(loop, "s1", outage)
        assert (await MemoryStateStore.get_session(store, "s1")).status == "active"
        store.down = False
        await until(lambda: not loop.patience.pending_ends)
        await loop.aclose()
        return tokens, events, await store.get_session("s1")

    tokens, events, record = asyncio.run(scenario())
    assert tokens == REFERENCE and isinstance(events[-1], Finished)
    assert (record.status, record.finish_reason, record.committed) == ("finished", "length", PROMPT + REFERENCE)


def test_an_end_written_after_another_controller_took_the_session_over_is_dropped(caplog):
    """A controller stopped (SIGSTOP) past its client's keepalive runs again after the client resumed the
    session on another controller: its client's stream is gone, so it writes the session's end in the
    background, under its old epoch. The store refuses it (ABORTED); that is the new driver's session, and
    the write is dropped with a warning, not left as an exception in a task nobody awaits (found by
    loadtest.faults, controller-hang)."""

    async def scenario():
        store = MemoryStateStore()
        record = SessionRecord("s1", PROMPT + [7], len(PROMPT), 1, {}, {"seed": 1}, "", "v", owner="a" * 32)
        await store.create_session(record, "create")
        stale = await store.get_session("s1")
        await store.take_over("s1", "b" * 32)  # the client resumed it on another controller
        patience = StorePatience(store, wait_s=1.0, end_retry_s=5.0)
        patience.end_later("s1", lambda: store.fail("s1", "CANCELLED", "stream ended", stale), stale)
        (write,) = patience._pending
        await asyncio.wait([write], timeout=5)
        return write.exception(), await store.get_session("s1")

    with caplog.at_level("WARNING", logger="controller.patience"):
        error, record = asyncio.run(scenario())
    assert error is None
    assert (record.status, record.epoch) == ("active", 1)  # the new driver's session, untouched
    assert "was taken over by another controller" in caplog.text


def test_a_create_whose_reply_was_lost_is_recognised_on_retry():
    class LosesCreateReply(FlakyStore):
        async def create_session(self, record, token=""):
            first = not self.calls
            await super().create_session(record, token)
            if first:
                raise Unavailable("redis at 127.0.0.1:1 is unreachable: Timeout reading from socket")

    async def scenario():
        store = LosesCreateReply()
        tokens, _ = await drive(make_loop(store), "s1")
        return tokens, store.calls, await store.get_session("s1")

    tokens, calls, record = asyncio.run(scenario())
    assert tokens == REFERENCE and calls[:2] == ["create_session", "create_session"]
    assert record.status == "finished"


def test_patience_gives_up_at_its_budget_and_not_on_other_errors():
    async def scenario():
        calls = []

        async def down():
            calls.append(time.monotonic())
            raise Unavailable("down")

        patience = StorePatience(MemoryStateStore(), wait_s=0.4)
        start = time.monotonic()
        with pytest.raises(StoreUnavailable):
            await patience.call(down)
        elapsed = time.monotonic() - start

        async def stale():
            raise StaleRecord("behind")

        with pytest.raises(StaleRecord):  # no record to restore from: not the patience's to repair
            await patience.call(stale)
        return elapsed, len(calls)

    elapsed, tries = asyncio.run(scenario())
    assert 0.4 <= elapsed < 1.5 and 3 <= tries <= 12


def test_routing_counts_the_sessions_of_other_controllers():
    async def scenario():
        store = MemoryStateStore()
        for i in range(3):  # another controller's sessions, all on v0
            await store.create_session(SessionRecord(f"other{i}", [1], 1, 0, {}, {}, "", "v0:1"))
        router = Router(make_discovery("static", ""), make_discovery("static", "v0:1,v1:1"))
        assert router.pick_verifier() == "v0:1"  # alone, v0 sorts first
        for i in range(2):  # two of this controller's own, on v1, stored too
            router.acquire("v1:1")
            await store.create_session(SessionRecord(f"own{i}", [1], 1, 0, {}, {}, "", "v1:1"))
        task = asyncio.ensure_future(router.share_load(store, every_s=0.01))
        await until(lambda: router.others)
        task.cancel()
        return router.others, router.pick_verifier(), router.total_load("v0:1"), router.total_load("v1:1")

    others, picked, v0, v1 = asyncio.run(scenario())
    assert others == {"v0:1": 3} and (v0, v1) == (3, 2) and picked == "v1:1"
