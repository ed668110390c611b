"""The state store: one suite, run against MemoryStateStore and against RedisStateStore on a real redis-server."""

from __future__ import annotations

import asyncio
import functools
import socket
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace

import pytest
import redis.asyncio as aioredis

from controller.state_store import (
    CommitResult,
    MemoryStateStore,
    RedisStateStore,
    SessionRecord,
    open_state_store,
)
from eesd.errors import Aborted, FailedPrecondition, InvalidArgument, NotFound, Unavailable

PROMPT = [5, 6, 7, 8]


def aio(fn: Callable[..., Awaitable[None]]) -> Callable[..., None]:
    """Run an async test body in a fresh event loop (fixtures keep working through functools.wraps)."""

    @functools.wraps(fn)
    def run(*args, **kwargs) -> None:
        asyncio.run(fn(*args, **kwargs))

    return run


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Backend:
    """Opens stores of one kind; `advance` lets time pass for them (a fake clock, or real sleep for Redis)."""

    name: str
    open: Callable[..., MemoryStateStore | RedisStateStore]
    advance: Callable[[float], Awaitable[None]]


@pytest.fixture(params=["memory", "redis"])
def backend(request) -> Backend:
    if request.param == "memory":
        clock = FakeClock()

        async def advance(seconds: float) -> None:
            clock.now += seconds

        return Backend("memory", lambda **kw: MemoryStateStore(clock=clock, **kw), advance)
    url = request.getfixturevalue("redis_server")
    prefix = f"test-{uuid.uuid4().hex[:8]}:"  # every test its own key space on the shared server
    return Backend("redis", lambda **kw: RedisStateStore(url, prefix=prefix, **kw), asyncio.sleep)


def record(session_id: str = "s1", drafter: str = "", verifier: str = "", **kw) -> SessionRecord:
    return SessionRecord(
        session_id=session_id,
        committed=list(PROMPT),
        prompt_length=len(PROMPT),
        next_round=0,
        policy_state={"alpha": 1.0, "beta": 1.0},
        params={"max_new_tokens": 16, "sampling": {"temperature": 0.0}, "policy": "beta-ts"},
        drafter=drafter,
        verifier=verifier,
        **kw,
    )


@aio
async def test_create_and_get(backend: Backend) -> None:
    async with backend.open() as store:
        await store.create_session(record(drafter="d0:50051", verifier="v0:50051"))
        got = await store.get_session("s1")
        assert got.committed == PROMPT and got.prompt_length == 4 and got.generated == []
        assert got.next_round == 0 and got.policy_state == {"alpha": 1.0, "beta": 1.0}
        assert got.params == {"max_new_tokens": 16, "sampling": {"temperature": 0.0}, "policy": "beta-ts"}
        assert (got.drafter, got.verifier, got.status, got.finish_reason) == ("d0:50051", "v0:50051", "active", "")
        assert got.created_at > 0 and got.updated_at >= got.created_at
        got.committed.append(99)  # a copy: the store is not changed through it
        assert (await store.get_session("s1")).committed == PROMPT
        with pytest.raises(InvalidArgument) as e:
            await store.create_session(record())
        assert e.value.field == "session_id"


@aio
async def test_commit_appends_tokens_and_replaces_policy_state(backend: Backend) -> None:
    async with backend.open() as store:
        await store.create_session(record())
        res = await store.commit_round("s1", 0, [10, 11, 12], {"alpha": 3.0, "beta": 1.0})
        assert res == CommitResult(applied=True, committed_length=7, next_round=1)
        res = await store.commit_round("s1", 1, [2**32 - 1], {"alpha": 3.0, "beta": 2.0, "extra": 0.25})
        assert res == CommitResult(applied=True, committed_length=8, next_round=2)
        got = await store.get_session("s1")
        assert got.committed == PROMPT + [10, 11, 12, 2**32 - 1] and got.generated == [10, 11, 12, 2**32 - 1]
        assert got.next_round == 2 and got.policy_state == {"alpha": 3.0, "beta": 2.0, "extra": 0.25}


@aio
async def test_retried_round_is_not_applied_twice(backend: Backend) -> None:
    async with backend.open() as store:
        await store.create_session(record())
        assert (await store.commit_round("s1", 0, [10, 11], {"alpha": 3.0})).applied
        retry = await store.commit_round("s1", 0, [10, 11], {"alpha": 99.0})
        assert retry == CommitResult(applied=False, committed_length=6, next_round=1)
        got = await store.get_session("s1")
        assert got.committed == PROMPT + [10, 11] and got.policy_state == {"alpha": 3.0}


@aio
async def test_concurrent_retries_apply_exactly_once(backend: Backend) -> None:
    async with backend.open() as store:
        await store.create_session(record())
        results = await asyncio.gather(*(store.commit_round("s1", 0, [1, 2, 3], {"n": float(i)}) for i in range(20)))
        applied = [r for r in results if r.applied]
        assert len(applied) == 1
        assert all(r.committed_length == 7 and r.next_round == 1 for r in results)
        got = await store.get_session("s1")
        assert got.committed == PROMPT + [1, 2, 3] and got.next_round == 1
        assert got.policy_state == {"n": float(results.index(applied[0]))}


@aio
async def test_future_round_is_refused(backend: Backend) -> None:
    async with backend.open() as store:
        await store.create_session(record())
        with pytest.raises(FailedPrecondition):
            await store.commit_round("s1", 1, [10], {})
        got = await store.get_session("s1")
        assert got.committed == PROMPT and got.next_round == 0


@pytest.mark.parametrize("end", ["finish", "cancel"])
@aio
async def test_commit_on_ended_session_is_refused(backend: Backend, end: str) -> None:
    async with backend.open() as store:
        await store.create_session(record())
        await store.commit_round("s1", 0, [10], {"alpha": 2.0})
        if end == "finish":
            await store.finish("s1", "finished", "eos")
        else:
            assert await store.cancel("s1") is True
            assert await store.cancel("s1") is False  # no longer active
            await store.finish("s1", "finished", "eos")  # the first end wins
        with pytest.raises(FailedPrecondition):
            await store.commit_round("s1", 1, [11], {})
        # a retry of a round applied before the end still answers "already applied"
        assert await store.commit_round("s1", 0, [10], {}) == CommitResult(False, 5, 1)
        got = await store.get_session("s1")
        assert got.committed == PROMPT + [10]
        expected = ("finished", "eos") if end == "finish" else ("cancelled", "cancelled")
        assert (got.status, got.finish_reason) == expected


@aio
async def test_failed_session_keeps_its_status_and_message(backend: Backend) -> None:
    async with backend.open() as store:
        await store.create_session(record())
        await store.commit_round("s1", 0, [10], {})
        await store.fail("s1", "RESOURCE_EXHAUSTED", "context full " + "x" * 5000)
        await store.finish("s1", "finished", "eos")  # the first end wins
        got = await store.get_session("s1")
        assert (got.status, got.finish_reason, got.error_code) == ("failed", "error", "RESOURCE_EXHAUSTED")
        assert got.error_message == ("context full " + "x" * 5000)[:1024]  # client text is bounded
        assert got.committed == PROMPT + [10]  # what was committed stays
        with pytest.raises(FailedPrecondition):
            await store.commit_round("s1", 1, [11], {})
        await store.create_session(record(session_id="s2"))
        await store.finish("s2", "finished", "eos")
        assert ((await store.get_session("s2")).error_code, (await store.get_session("s2")).error_message) == ("", "")


@aio
async def test_session_expires_after_idle_ttl_and_writes_refresh_it(backend: Backend) -> None:
    async with backend.open(session_ttl_s=1.0) as store:
        await store.create_session(record(drafter="d0:1", verifier="v0:1"))
        await backend.advance(0.5)
        await store.commit_round("s1", 0, [10], {})
        await backend.advance(0.6)  # 1.1 s after create, 0.6 s after the last write
        assert (await store.get_session("s1")).committed == PROMPT + [10]
        assert await store.count_routes() == {"d0:1": 1, "v0:1": 1}
        await backend.advance(1.1)
        with pytest.raises(NotFound):
            await store.get_session("s1")
        with pytest.raises(NotFound):
            await store.commit_round("s1", 1, [11], {})
        assert await store.count_routes() == {}
        await store.create_session(record())  # the id is free again


@aio
async def test_unknown_session_is_not_found(backend: Backend) -> None:
    async with backend.open() as store:
        for call in (
            lambda: store.get_session("nope"),
            lambda: store.commit_round("nope", 0, [1], {}),
            lambda: store.set_route("nope", "d", "v"),
            lambda: store.finish("nope", "finished", "eos"),
            lambda: store.cancel("nope"),
        ):
            with pytest.raises(NotFound):
                await call()
        await store.delete_session("nope")  # deleting is idempotent


@aio
async def test_delete_session(backend: Backend) -> None:
    async with backend.open() as store:
        await store.create_session(record(drafter="d0:1", verifier="v0:1"))
        await store.delete_session("s1")
        with pytest.raises(NotFound):
            await store.get_session("s1")
        assert await store.count_routes() == {}


@aio
async def test_bad_arguments_are_refused(backend: Backend) -> None:
    async with backend.open() as store:
        await store.create_session(record())
        bad = record("s2")
        bad.prompt_length = 9
        cases = [
            ("tokens", lambda: store.commit_round("s1", 0, [-1], {})),
            ("tokens", lambda: store.commit_round("s1", 0, [2**32], {})),
            ("round_index", lambda: store.commit_round("s1", -1, [1], {})),
            ("policy_state", lambda: store.commit_round("s1", 0, [1], {"a": "x"})),
            ("status", lambda: store.finish("s1", "active", "")),
            ("delta", lambda: store.merge_global_posterior("m", {"a": float("inf")})),
            ("session_id", lambda: store.get_session("")),
            ("prompt_length", lambda: store.create_session(bad)),
        ]
        for field, call in cases:
            with pytest.raises(InvalidArgument) as e:
                await call()
            assert e.value.field == field
        assert (await store.get_session("s1")).next_round == 0


@aio
async def test_count_routes(backend: Backend) -> None:
    async with backend.open() as store:
        await store.create_session(record("a", drafter="d0:1", verifier="v0:1"))
        await store.create_session(record("b", drafter="d0:1", verifier="v1:1"))
        await store.create_session(record("c"))
        await store.create_session(record("both", drafter="x:1", verifier="x:1"))  # counted once per node
        assert await store.count_routes() == {"d0:1": 2, "v0:1": 1, "v1:1": 1, "x:1": 1}
        await store.set_route("c", "d1:1", "v1:1")
        await store.set_route("a", "d1:1", "v0:1")  # moved off d0:1
        await store.delete_session("both")
        assert await store.count_routes() == {"d0:1": 1, "d1:1": 2, "v0:1": 1, "v1:1": 2}
        await store.finish("b", "finished", "length")
        assert await store.cancel("c") is True
        assert await store.count_routes() == {"d1:1": 1, "v0:1": 1}
        got = await store.get_session("a")
        assert (got.drafter, got.verifier) == ("d1:1", "v0:1")


@aio
async def test_global_posterior_merges_atomically(backend: Backend) -> None:
    async with backend.open() as store:
        assert await store.global_posterior("llama-n4") == {}
        await asyncio.gather(
            *(store.merge_global_posterior("llama-n4", {"alpha": 1.0, "beta": 0.5}) for _ in range(50))
        )
        await store.merge_global_posterior("qwen-n2", {"alpha": 2.0})
        assert await store.global_posterior("llama-n4") == {"alpha": 50.0, "beta": 25.0}
        assert await store.global_posterior("qwen-n2") == {"alpha": 2.0}


@aio
async def test_ping(backend: Backend) -> None:
    async with backend.open() as store:
        assert 0.0 <= await store.ping() < 5.0


@aio
async def test_two_stores_share_redis_state(redis_server: str) -> None:
    """Two controllers on one Redis: a round applied by one is a retry for the other."""
    prefix = f"test-{uuid.uuid4().hex[:8]}:"
    async with RedisStateStore(redis_server, prefix=prefix) as a, RedisStateStore(redis_server, prefix=prefix) as b:
        await a.create_session(record())
        results = await asyncio.gather(*(s.commit_round("s1", 0, [1], {}) for s in (a, b) * 5))
        assert sum(r.applied for r in results) == 1
        assert (await b.get_session("s1")).committed == PROMPT + [1]


@pytest.mark.parametrize("url", ["", "http://127.0.0.1:6379", "127.0.0.1:6379", "redis", "memory:"])
def test_bad_url_is_invalid_argument(url: str) -> None:
    with pytest.raises(InvalidArgument) as e:
        open_state_store(url)
    assert e.value.field == "redis_url"


def test_redis_errors_do_not_show_the_password() -> None:
    store = RedisStateStore("redis://user:s3cret@127.0.0.1:1/0")
    assert "s3cret" not in store._url and "127.0.0.1:1" in store._url


def test_open_state_store_picks_the_backend() -> None:
    assert isinstance(open_state_store("memory://"), MemoryStateStore)
    for url in ("redis://127.0.0.1:6379/0", "rediss://redis.example:6380", "unix:///run/redis.sock"):
        assert isinstance(open_state_store(url), RedisStateStore)


@aio
async def test_redis_down_is_unavailable() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    async with RedisStateStore(f"redis://127.0.0.1:{port}", connect_timeout_s=0.5) as store:
        for call in (
            store.ping,
            lambda: store.get_session("s1"),
            lambda: store.create_session(record()),
            lambda: store.commit_round("s1", 0, [1], {}),
            store.count_routes,
            lambda: store.merge_global_posterior("m", {"a": 1.0}),
            lambda: store.global_posterior("m"),
        ):
            with pytest.raises(Unavailable):
                await call()


@aio
async def test_redis_leaves_no_keys_behind(redis_server: str) -> None:
    """The session hash and its committed-tokens key go together, on delete and on expiry."""
    prefix = f"test-{uuid.uuid4().hex[:8]}:"
    raw = aioredis.from_url(redis_server)
    async with RedisStateStore(redis_server, prefix=prefix, session_ttl_s=0.3) as store:
        await store.create_session(record("gone", drafter="d:1", verifier="v:1"))
        await store.create_session(record("expires"))
        await store.commit_round("gone", 0, [1, 2], {})
        await store.commit_round("expires", 0, [1, 2], {})
        keys = {k.decode().removeprefix(prefix) for k in await raw.keys(f"{prefix}*")}
        sessions = {f"{kind}:{sid}" for kind in ("session", "committed") for sid in ("gone", "expires")}
        assert keys == sessions | {"route:d:1", "route:v:1", "nodes"}
        await store.delete_session("gone")
        await asyncio.sleep(0.5)
        assert await store.count_routes() == {}
        assert await raw.keys(f"{prefix}*") == []
    await raw.aclose()


@aio
async def test_memory_store_purges_sessions_nobody_reads_again() -> None:
    clock = FakeClock()
    store = MemoryStateStore(session_ttl_s=10.0, clock=clock)
    for i in range(50):
        await store.create_session(record(session_id=f"old{i}"))
    clock.now += 11.0  # every one has expired, and none is read again
    await store.create_session(record(session_id="new"))
    assert list(store._sessions) == ["new"]


@aio
async def test_a_burst_beyond_the_redis_pool_waits_for_connections(redis_server: str) -> None:
    """More concurrent calls than pooled connections queue for one instead of failing ("Too many
    connections" was UNAVAILABLE for every session past redis-py's default pool)."""
    async with RedisStateStore(redis_server, prefix=f"t{uuid.uuid4().hex}:", max_connections=2) as store:
        await asyncio.gather(*(store.create_session(record(session_id=f"burst{i}")) for i in range(60)))
        records = await asyncio.gather(*(store.get_session(f"burst{i}") for i in range(60)))
        assert [r.session_id for r in records] == [f"burst{i}" for i in range(60)]


OWNER_A, OWNER_B = "a" * 22, "b" * 22


@aio
async def test_take_over_bumps_the_epoch_and_refuses_the_previous_driver(backend: Backend) -> None:
    """Two controllers race on one session: the one that took it over last drives it; every write of the
    other (commit, route change, end) is refused with ABORTED, whatever its round."""
    async with backend.open() as store:
        await store.create_session(record(owner=OWNER_A, drafter="d0:1", verifier="v0:1"))
        await store.commit_round("s1", 0, [10], {"alpha": 2.0}, epoch=0)
        taken = await store.take_over("s1", OWNER_B)
        assert (taken.epoch, taken.owner, taken.status) == (1, OWNER_B, "active")
        assert taken.committed == PROMPT + [10] and taken.next_round == 1
        for stale in (
            store.commit_round("s1", 1, [11], {"alpha": 3.0}, epoch=0),
            store.commit_round("s1", 0, [10], {"alpha": 2.0}, epoch=0),  # a retry of an applied round too
            store.set_route("s1", "d1:1", "v1:1", epoch=0),
            store.finish("s1", "finished", "length", at=replace(taken, epoch=0)),
            store.fail("s1", "UNAVAILABLE", "gone", at=replace(taken, epoch=0)),
        ):
            with pytest.raises(Aborted):
                await stale
        assert (await store.commit_round("s1", 1, [11], {"alpha": 3.0}, epoch=1)).applied
        await store.set_route("s1", "d1:1", "v1:1", epoch=1)
        got = await store.get_session("s1")
        assert got.committed == PROMPT + [10, 11] and (got.drafter, got.verifier) == ("d1:1", "v1:1")
        assert not await store.restore_session(replace(got, epoch=0, next_round=5))  # no write back over it


@aio
async def test_take_over_resumes_failed_sessions_but_not_ended_ones(backend: Backend) -> None:
    async with backend.open() as store:
        for session_id in ("failed", "finished", "cancelled"):
            await store.create_session(record(session_id))
        await store.fail("failed", "UNAVAILABLE", "no verifier")
        await store.finish("finished", "finished", "eos")
        await store.cancel("cancelled")
        resumed = await store.take_over("failed", OWNER_A)
        assert (resumed.status, resumed.epoch, resumed.error_code, resumed.error_message) == ("active", 1, "", "")
        for session_id, status in (("finished", "finished"), ("cancelled", "cancelled")):
            left = await store.take_over(session_id, OWNER_A)
            assert (left.status, left.epoch, left.owner) == (status, 0, "")
        with pytest.raises(NotFound):
            await store.take_over("nobody", OWNER_A)


@aio
async def test_a_session_end_keeps_its_speculation_stats(backend: Backend) -> None:
    stats = {"policy": "beta-ts", "rounds": 3, "drafted": 7, "accepted": 5, "generated": 8, "k_histogram": {"3": 3}}
    async with backend.open() as store:
        await store.create_session(record())
        await store.commit_round("s1", 0, [10, 11], {"alpha": 2.0})
        at = await store.get_session("s1")
        assert at.stats == {}
        await store.finish("s1", "finished", "length", at=replace(at, stats=stats))
        assert (await store.get_session("s1")).stats == stats
