"""The controller's state store: the hard state of every session (committed tokens, policy state).

KV caches on drafters and verifiers are soft state; what lives here is what a session cannot lose. One
interface (`StateStore`), two implementations run by the same tests:

- `RedisStateStore(url)`: production, redis.asyncio. Standalone Redis (the scripts build route keys from
  the session's contents, which Redis Cluster would refuse).
- `MemoryStateStore()`: the embedded default for a single machine; same semantics, TTL included.

`open_state_store(url)` picks one by scheme: ``memory://``, ``redis://``/``rediss://`` (TLS)/``unix://``,
or ``redis+sentinel://[[user]:password@]host:port[,host:port...]/service_name[/db]`` (``rediss+sentinel://``
for TLS to the sentinels and the master), a highly available Redis found through its sentinels with
redis-py's `redis.asyncio.sentinel.Sentinel`. The URL's password authenticates to Redis and, unless the
query says ``?sentinel_auth=no``, to the sentinels too (the Bitnami chart's default). A CA file for
``rediss`` URLs is the `ca_file` argument (the controller's ``--redis-ca-file``).

Outages: every call raises `Unavailable` while Redis cannot be reached (a connection error, a timeout,
``LOADING`` after a restart, a read-only replica after a failover). Waiting for it to come back is the
caller's job (the controller's round loop, `controller/patience.py`); every write is safe to repeat for
that: create carries a token the caller may choose, commits are guarded by the round number, and the end
of a session carries the round it ends at.

Redis layout, every key under `prefix` (default ``eesd:``):

- ``session:<id>``   hash, one per session, expires after `session_ttl_s` without a write. Fields:
  ``prompt_length``, ``next_round``, ``policy`` and ``params`` (JSON), ``drafter``, ``verifier``,
  ``status``, ``finish_reason``, ``error_code`` and ``error_message`` (a failed session's gRPC status name
  and message), ``created_at``, ``updated_at`` (unix seconds), and the retry tokens
  ``create_token`` and ``end_token`` that make create and cancel safe to retry.
- ``committed:<id>``  string, the committed tokens packed as little-endian uint32; a commit
  APPENDs to it (O(new tokens); rewriting a hash field instead costs O(context): measured 0.5 ms at 32k
  tokens and 3.8 ms at 128k, against a flat ~0.16 ms here). Same TTL as the hash, refreshed together.
- ``route:<address>`` sorted set of the active sessions pinned to a node, scored by their expiry (Redis
  server time, ms), so that expired sessions drop out of `count_routes`.
- ``nodes``          set of addresses that have a ``route:`` set.
- ``posterior:<model key>``  hash of floats, the global posterior, added to with HINCRBYFLOAT; no TTL.
- ``merge:<token>``  marks a posterior merge as applied for 5 minutes, so a retried merge adds once.

`commit_round` is one Lua script: a single round trip that appends the tokens, replaces the policy
state, advances `next_round` and refreshes the TTL only when the round number is the expected one.

A controller holds every active session's state in memory, so Redis losing it (a restart without
persistence, an AOF that lost its last second, a failover to a lagging replica) is repaired from there:
`commit_round` on a missing record raises `NotFound`, on a record behind the round `StaleRecord`, and
`restore_session` writes the controller's record back (only over a missing, or an active and older,
record). Ending a session at a point (`at`, the record as the client saw it) also takes back a commit
applied whose reply never came (see `_END`): Redis never keeps a round the client did not get.
"""

from __future__ import annotations

import asyncio
import copy
import json
import math
import struct
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import parse_qs, unquote, urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import MasterDownError, ReadOnlyError
from redis.exceptions import TimeoutError as RedisTimeoutError

from eesd.errors import Aborted, AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, Unavailable
from eesd.params import check_session_id, check_session_key

ACTIVE, FINISHED, CANCELLED, FAILED = "active", "finished", "cancelled", "failed"
STATUSES = (ACTIVE, FINISHED, CANCELLED, FAILED)
ERROR_MESSAGE_CHARS = 1024  # a failed session's stored message is cut here: messages can echo client input
DEFAULT_SESSION_TTL_S = 3600.0
DEFAULT_PREFIX = "eesd:"
REDIS_SCHEMES = ("redis://", "rediss://", "unix://")
SENTINEL_SCHEMES = ("redis+sentinel://", "rediss+sentinel://")
DEFAULT_SENTINEL_PORT = 26379
MEMORY_SCHEME = "memory://"
_MAX_TOKEN = 2**32 - 1
# What an unreachable Redis raises, after redis-py's own retries: mapped to Unavailable. ConnectionError
# covers BusyLoadingError (LOADING: a restarted Redis reads its AOF) and MasterNotFoundError (no sentinel
# knows a master); ReadOnlyError and MasterDownError come from a replica during a failover.
_REDIS_DOWN = (RedisConnectionError, RedisTimeoutError, TimeoutError, OSError, ReadOnlyError, MasterDownError)


class StaleRecord(FailedPrecondition):
    """The stored session is behind the caller: Redis lost writes the caller saw applied (an AOF restart
    that lost its last second, a failover to a replica that lagged). The caller restores its own record."""


@dataclass
class SessionRecord:
    session_id: str
    committed: list[int]  # prompt + generated tokens
    prompt_length: int
    next_round: int  # rounds applied so far; the next round number expected
    policy_state: dict[str, float]  # flat map of floats
    params: dict  # JSON-able request params, opaque to the store
    drafter: str = ""  # address of the pinned drafter ("" = none)
    verifier: str = ""
    status: str = ACTIVE  # active | finished | cancelled | failed
    finish_reason: str = ""
    error_code: str = ""  # failed sessions: the grpc.StatusCode name the session stopped with
    error_message: str = ""
    created_at: float = 0.0  # unix seconds; the store fills 0.0 in at creation
    updated_at: float = 0.0
    # The driving controller: its node owner token (eesd.params.session_key) and its epoch, which a
    # controller that takes the session over bumps; commits, route changes and ends of another epoch are
    # refused (Aborted), so two controllers never drive one session.
    owner: str = ""
    epoch: int = 0
    # The speculation statistics of its rounds (GenerationStats.speculation), written when it ends, so that
    # GetSession answers the same on every controller replica.
    stats: dict = field(default_factory=dict)

    @property
    def generated(self) -> list[int]:
        return self.committed[self.prompt_length :]


@dataclass(frozen=True)
class CommitResult:
    applied: bool  # False when this round was already applied (a retry): nothing changed
    committed_length: int
    next_round: int


class StateStore(Protocol):
    async def create_session(self, record: SessionRecord, token: str = "") -> None: ...
    async def restore_session(self, record: SessionRecord) -> bool: ...
    async def get_session(self, session_id: str) -> SessionRecord: ...
    async def commit_round(
        self, session_id: str, round_index: int, tokens: list[int], policy_state: dict[str, float], epoch: int = 0
    ) -> CommitResult: ...
    async def set_route(self, session_id: str, drafter: str, verifier: str, epoch: int | None = None) -> None: ...
    async def take_over(self, session_id: str, owner: str) -> SessionRecord: ...
    async def finish(
        self, session_id: str, status: str, finish_reason: str, at: SessionRecord | None = None
    ) -> None: ...
    async def fail(self, session_id: str, code: str, message: str, at: SessionRecord | None = None) -> None: ...
    async def cancel(self, session_id: str) -> bool: ...
    async def delete_session(self, session_id: str) -> None: ...
    async def count_routes(self, written_within_s: float | None = None) -> dict[str, int]: ...
    async def merge_global_posterior(self, model_key: str, delta: dict[str, float]) -> None: ...
    async def global_posterior(self, model_key: str) -> dict[str, float]: ...
    async def ping(self) -> float: ...
    async def close(self) -> None: ...


def open_state_store(
    url: str, session_ttl_s: float = DEFAULT_SESSION_TTL_S, max_connections: int = 256, ca_file: str = ""
) -> MemoryStateStore | RedisStateStore:
    """The store a URL names; connects lazily (``await store.ping()`` checks the connection).
    `max_connections` bounds a Redis store's connection pool; `ca_file` verifies a TLS Redis."""
    if not isinstance(url, str):
        raise InvalidArgument("redis_url", f"expected a URL string, got {type(url).__name__}")
    if url.startswith(MEMORY_SCHEME):
        return MemoryStateStore(session_ttl_s)
    if url.startswith(REDIS_SCHEMES + SENTINEL_SCHEMES):
        return RedisStateStore(url, session_ttl_s, max_connections=max_connections, ca_file=ca_file)
    raise InvalidArgument(
        "redis_url", f"{_redact(url)!r}: expected memory://, redis://, rediss://, unix:// or redis+sentinel://"
    )


# -- validation shared by both stores ------------------------------------------------------------------


def _check_session_id(session_id: str) -> None:
    check_session_id(session_id)


def _check_tokens(name: str, tokens: list[int]) -> list[int]:
    out = list(tokens)
    for t in out:
        if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t <= _MAX_TOKEN:
            raise InvalidArgument(name, f"token ids must be ints in [0, 2**32), got {t!r}")
    return out


def _check_floats(name: str, values: dict[str, float], finite: bool = False) -> dict[str, float]:
    out: dict[str, float] = {}
    for key, value in values.items():
        if not isinstance(key, str) or isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InvalidArgument(name, f"expected a flat map of str -> float, got {key!r}: {value!r}")
        if finite and not math.isfinite(value):
            raise InvalidArgument(name, f"{key!r} is not finite")
        out[key] = float(value)
    return out


def _check_round(round_index: int) -> None:
    if not isinstance(round_index, int) or isinstance(round_index, bool) or round_index < 0:
        raise InvalidArgument("round_index", f"must be an int >= 0, got {round_index!r}")


def _check_record(record: SessionRecord) -> SessionRecord:
    """A validated deep copy of `record`."""
    _check_session_id(record.session_id)
    rec = copy.deepcopy(record)
    rec.committed = _check_tokens("committed", rec.committed)
    if not isinstance(rec.prompt_length, int) or not 0 <= rec.prompt_length <= len(rec.committed):
        raise InvalidArgument("prompt_length", f"must be in [0, {len(rec.committed)}], got {rec.prompt_length!r}")
    _check_round(rec.next_round)
    if not isinstance(rec.epoch, int) or not 0 <= rec.epoch <= _MAX_TOKEN:
        raise InvalidArgument("epoch", f"must be in [0, {_MAX_TOKEN}], got {rec.epoch!r}")
    if rec.owner:
        check_session_key(f"{rec.session_id}/{rec.owner}")
    rec.policy_state = _check_floats("policy_state", rec.policy_state)
    if rec.status not in STATUSES:
        raise InvalidArgument("status", f"must be one of {STATUSES}, got {rec.status!r}")
    try:
        json.dumps(rec.params)
    except (TypeError, ValueError) as e:
        raise InvalidArgument("params", f"not JSON-able: {e}") from e
    return rec


def _check_end_status(status: str) -> None:
    if status not in (FINISHED, CANCELLED):
        raise InvalidArgument("status", f"must be {FINISHED!r} or {CANCELLED!r}, got {status!r}")


def _route_addresses(drafter: str, verifier: str) -> set[str]:
    return {a for a in (drafter, verifier) if a}


def _check_at(session_id: str, at: SessionRecord | None) -> SessionRecord | None:
    if at is not None and at.session_id != session_id:
        raise InvalidArgument("at", f"is a record of session {at.session_id!r}, not {session_id!r}")
    return at


def _behind(session_id: str, stored: int | None, at: int) -> StaleRecord:
    where = "" if stored is None else f" at round {stored}"
    return StaleRecord(f"session {session_id!r} is stored{where}, behind its controller's round {at}")


def _ahead(session_id: str, stored: int | None, at: int) -> FailedPrecondition:
    where = "" if stored is None else f" at round {stored}"
    return FailedPrecondition(
        f"session {session_id!r} is stored{where}, past round {at} + 1: another controller drives it"
    )


def _taken_over(session_id: str) -> Aborted:
    return Aborted(f"session {session_id!r} was taken over by another controller (a client resumed it there)")


RESUMABLE = (ACTIVE, FAILED)  # a session that did not finish and was not cancelled can be taken over


# -- in memory -----------------------------------------------------------------------------------------


class MemoryStateStore:
    """Embedded store for one controller process. Every method does its work under one lock without
    awaiting in between, so each call is atomic for all tasks and threads. Expiry is measured by `clock`
    (monotonic seconds; inject a fake one in tests): on access, and for sessions nobody reads again, by a
    sweep that creating a session runs at most once per `PURGE_EVERY_S`, so memory stays bounded."""

    PURGE_EVERY_S = 60.0

    def __init__(
        self,
        session_ttl_s: float = DEFAULT_SESSION_TTL_S,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ):
        self.session_ttl_s = float(session_ttl_s)
        self._clock = clock
        self._wall = wall_clock
        self._lock = threading.Lock()
        self._sessions: dict[str, tuple[SessionRecord, float]] = {}  # id -> (record, deadline)
        self._create_tokens: dict[str, str] = {}  # id -> the token it was created with
        self._posteriors: dict[str, dict[str, float]] = {}
        self._next_purge = clock() + min(self.session_ttl_s, self.PURGE_EVERY_S)

    async def __aenter__(self) -> MemoryStateStore:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _live(self, session_id: str) -> SessionRecord:
        """The stored record (not a copy); NotFound if absent or expired. Caller holds the lock."""
        entry = self._sessions.get(session_id)
        if entry is not None and self._clock() >= entry[1]:
            del self._sessions[session_id]
            self._create_tokens.pop(session_id, None)
            entry = None
        if entry is None:
            raise NotFound(f"session {session_id!r} not found")
        return entry[0]

    def _touch(self, rec: SessionRecord) -> None:
        rec.updated_at = self._wall()
        self._sessions[rec.session_id] = (rec, self._clock() + self.session_ttl_s)

    def _purge(self) -> None:
        """Drops every expired session; caller holds the lock."""
        now = self._clock()
        if now < self._next_purge:
            return
        self._next_purge = now + min(self.session_ttl_s, self.PURGE_EVERY_S)
        for session_id in [sid for sid, (_, deadline) in self._sessions.items() if now >= deadline]:
            del self._sessions[session_id]
            self._create_tokens.pop(session_id, None)

    async def create_session(self, record: SessionRecord, token: str = "") -> None:
        """Creates the session; AlreadyExists if its id is taken, unless by a create with this same
        non-empty `token` (a retry of this create)."""
        rec = _check_record(record)
        with self._lock:
            self._purge()
            try:
                self._live(rec.session_id)
            except NotFound:
                pass
            else:
                if token and self._create_tokens.get(rec.session_id) == token:
                    return
                raise AlreadyExists("session_id", f"session {rec.session_id!r} already exists")
            rec.created_at = rec.created_at or self._wall()
            self._touch(rec)
            self._create_tokens[rec.session_id] = token

    async def restore_session(self, record: SessionRecord) -> bool:
        """Writes `record` (an active session's state as its controller holds it) when the stored one is
        missing, or active and at an earlier round; True when written, False when left alone (the stored
        session has ended, or is at this round or later)."""
        rec = _check_record(record)
        with self._lock:
            try:
                stored = self._live(rec.session_id)
            except NotFound:
                pass
            else:
                if stored.status != ACTIVE or stored.epoch > rec.epoch or stored.next_round >= rec.next_round:
                    return False
                rec.created_at = stored.created_at
            rec.created_at = rec.created_at or self._wall()
            self._touch(rec)
            return True

    async def get_session(self, session_id: str) -> SessionRecord:
        _check_session_id(session_id)
        with self._lock:
            return copy.deepcopy(self._live(session_id))

    async def commit_round(
        self, session_id: str, round_index: int, tokens: list[int], policy_state: dict[str, float], epoch: int = 0
    ) -> CommitResult:
        _check_session_id(session_id)
        _check_round(round_index)
        tokens = _check_tokens("tokens", tokens)
        policy_state = _check_floats("policy_state", policy_state)
        with self._lock:
            rec = self._live(session_id)
            if rec.epoch != epoch:
                raise _taken_over(session_id)
            if round_index < rec.next_round:
                return CommitResult(False, len(rec.committed), rec.next_round)
            if rec.status != ACTIVE:
                raise FailedPrecondition(f"session {session_id!r} is {rec.status}")
            if round_index > rec.next_round:
                raise _behind(session_id, rec.next_round, round_index)
            rec.committed.extend(tokens)
            rec.policy_state = policy_state
            rec.next_round += 1
            self._touch(rec)
            return CommitResult(True, len(rec.committed), rec.next_round)

    async def set_route(self, session_id: str, drafter: str, verifier: str, epoch: int | None = None) -> None:
        """Pins the session's nodes; with `epoch`, only while that epoch drives it."""
        _check_session_id(session_id)
        with self._lock:
            rec = self._live(session_id)
            if epoch is not None and rec.epoch != epoch:
                raise _taken_over(session_id)
            rec.drafter, rec.verifier = drafter, verifier
            self._touch(rec)

    async def take_over(self, session_id: str, owner: str) -> SessionRecord:
        """Makes the caller the session's driver: a resumable session (active or failed) becomes active
        under a new epoch and `owner`; a finished or cancelled one is returned as it is."""
        _check_session_id(session_id)
        with self._lock:
            rec = self._live(session_id)
            if rec.status in RESUMABLE:
                rec.epoch, rec.owner, rec.status = rec.epoch + 1, owner, ACTIVE
                rec.finish_reason = rec.error_code = rec.error_message = ""
                self._touch(rec)
            return copy.deepcopy(rec)

    def _end(
        self,
        session_id: str,
        status: str,
        finish_reason: str,
        code: str = "",
        message: str = "",
        at: SessionRecord | None = None,
    ) -> bool:
        with self._lock:
            rec = self._live(session_id)
            if rec.status != ACTIVE:
                return False
            if at is not None:  # see _END
                if rec.epoch != at.epoch:
                    raise _taken_over(session_id)
                if rec.next_round < at.next_round:
                    raise _behind(session_id, rec.next_round, at.next_round)
                if rec.next_round > at.next_round + 1:
                    raise _ahead(session_id, rec.next_round, at.next_round)
                if rec.next_round == at.next_round + 1:
                    del rec.committed[len(at.committed) :]
                    rec.next_round, rec.policy_state = at.next_round, dict(at.policy_state)
                rec.stats = copy.deepcopy(at.stats)
            rec.status, rec.finish_reason = status, finish_reason
            rec.error_code, rec.error_message = code, message[:ERROR_MESSAGE_CHARS]
            self._touch(rec)
            return True

    async def finish(self, session_id: str, status: str, finish_reason: str, at: SessionRecord | None = None) -> None:
        _check_session_id(session_id)
        _check_end_status(status)
        self._end(session_id, status, finish_reason, at=_check_at(session_id, at))

    async def fail(self, session_id: str, code: str, message: str, at: SessionRecord | None = None) -> None:
        _check_session_id(session_id)
        self._end(session_id, FAILED, "error", code, message, _check_at(session_id, at))

    async def cancel(self, session_id: str) -> bool:
        _check_session_id(session_id)
        return self._end(session_id, CANCELLED, "cancelled")

    async def delete_session(self, session_id: str) -> None:
        _check_session_id(session_id)
        with self._lock:
            self._sessions.pop(session_id, None)
            self._create_tokens.pop(session_id, None)

    async def count_routes(self, written_within_s: float | None = None) -> dict[str, int]:
        counts: dict[str, int] = {}
        with self._lock:
            now = self._clock()
            for sid, (rec, deadline) in list(self._sessions.items()):
                if now >= deadline:
                    del self._sessions[sid]
                    self._create_tokens.pop(sid, None)
                elif written_within_s is not None and deadline - self.session_ttl_s < now - written_within_s:
                    continue
                elif rec.status == ACTIVE:
                    for addr in _route_addresses(rec.drafter, rec.verifier):
                        counts[addr] = counts.get(addr, 0) + 1
        return counts

    async def merge_global_posterior(self, model_key: str, delta: dict[str, float]) -> None:
        delta = _check_floats("delta", delta, finite=True)
        with self._lock:
            post = self._posteriors.setdefault(model_key, {})
            for key, value in delta.items():
                post[key] = post.get(key, 0.0) + value

    async def global_posterior(self, model_key: str) -> dict[str, float]:
        with self._lock:
            return dict(self._posteriors.get(model_key, {}))

    async def ping(self) -> float:
        return 0.0

    async def close(self) -> None:
        pass


# -- Redis -----------------------------------------------------------------------------------------------

# Helpers prepended to every script. Route sets are scored by the session's expiry in Redis server time.
_LUA_LIB = """
local function expiry_ms(ttl_ms)
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ttl_ms)
end
local function index_routes(prefix, sid, drafter, verifier, score, flag)
  for _, addr in ipairs({drafter, verifier}) do
    if addr and addr ~= '' then
      if flag then redis.call('ZADD', prefix .. 'route:' .. addr, flag, score, sid)
      else
        redis.call('ZADD', prefix .. 'route:' .. addr, score, sid)
        redis.call('SADD', prefix .. 'nodes', addr)
      end
    end
  end
end
local function unindex_routes(prefix, sid, drafter, verifier)
  for _, addr in ipairs({drafter, verifier}) do
    if addr and addr ~= '' then redis.call('ZREM', prefix .. 'route:' .. addr, sid) end
  end
end
"""

# Every session script gets KEYS: session hash, committed tokens.
# ARGV: create token, ttl ms, prefix, sid, packed tokens, field/value pairs... -> 1 created, 0 exists.
_CREATE = """
local key = KEYS[1]
if redis.call('EXISTS', key) == 1 then
  if redis.call('HGET', key, 'create_token') == ARGV[1] then return 1 end
  return 0
end
redis.call('HSET', key, 'create_token', ARGV[1], unpack(ARGV, 6))
redis.call('SET', KEYS[2], ARGV[5], 'PX', ARGV[2])
redis.call('PEXPIRE', key, ARGV[2])
local v = redis.call('HMGET', key, 'status', 'drafter', 'verifier')
if v[1] == 'active' then index_routes(ARGV[3], ARGV[4], v[2], v[3], expiry_ms(ARGV[2]), nil) end
return 1
"""

# ARGV: ttl ms, prefix, sid, packed tokens, next round, epoch, field/value pairs... -> 1 written, 0 left
# alone. Writes the controller's record over a missing one, or over an active one of its epoch or an
# older one at an earlier round (Redis lost writes); an ended record, one another controller took over, or
# one at this round or later, stays. The create token survives.
_RESTORE = """
local key = KEYS[1]
local v = redis.call('HMGET', key, 'status', 'next_round', 'drafter', 'verifier', 'create_token', 'created_at', 'epoch')
if v[1] then
  if v[1] ~= 'active' or tonumber(v[7] or 0) > tonumber(ARGV[6]) or tonumber(v[2]) >= tonumber(ARGV[5]) then
    return 0
  end
  unindex_routes(ARGV[2], ARGV[3], v[3], v[4])
  redis.call('DEL', key)
end
redis.call('HSET', key, unpack(ARGV, 7))
if v[5] then redis.call('HSET', key, 'create_token', v[5], 'created_at', v[6]) end
redis.call('SET', KEYS[2], ARGV[4], 'PX', ARGV[1])
redis.call('PEXPIRE', key, ARGV[1])
local r = redis.call('HMGET', key, 'drafter', 'verifier')
index_routes(ARGV[2], ARGV[3], r[1], r[2], expiry_ms(ARGV[1]), nil)
return 1
"""

# ARGV: round, packed tokens, policy JSON, ttl ms, updated_at, prefix, sid, epoch.
# -> {code, committed length, next round}; code 1 applied, 0 already applied, -1 missing, -2 ahead, -3 ended,
# -5 another epoch drives the session.
_COMMIT = """
local key = KEYS[1]
local v = redis.call('HMGET', key, 'next_round', 'status', 'drafter', 'verifier', 'epoch')
if not v[1] then return {-1, 0, 0} end
if tonumber(v[5] or 0) ~= tonumber(ARGV[8]) then return {-5, 0, 0} end
local nr = tonumber(v[1])
local r = tonumber(ARGV[1])
if r < nr then return {0, redis.call('STRLEN', KEYS[2]) / 4, nr} end
if v[2] ~= 'active' then return {-3, redis.call('STRLEN', KEYS[2]) / 4, nr} end
if r > nr then return {-2, redis.call('STRLEN', KEYS[2]) / 4, nr} end
local len = redis.call('APPEND', KEYS[2], ARGV[2]) / 4
redis.call('HSET', key, 'next_round', nr + 1, 'policy', ARGV[3], 'updated_at', ARGV[5])
redis.call('PEXPIRE', key, ARGV[4])
redis.call('PEXPIRE', KEYS[2], ARGV[4])
index_routes(ARGV[6], ARGV[7], v[3], v[4], expiry_ms(ARGV[4]), 'XX')
return {1, len, nr + 1}
"""

# -> {hash as a flat list, packed tokens}; all from one snapshot.
_GET = """
return {redis.call('HGETALL', KEYS[1]), redis.call('GET', KEYS[2])}
"""

# ARGV: drafter, verifier, ttl ms, updated_at, prefix, sid, epoch ('' for any). -> 1, -1 missing, -5 another
# epoch drives the session.
_SET_ROUTE = """
local key = KEYS[1]
local v = redis.call('HMGET', key, 'status', 'drafter', 'verifier', 'epoch')
if not v[1] then return -1 end
if ARGV[7] ~= '' and tonumber(v[4] or 0) ~= tonumber(ARGV[7]) then return -5 end
unindex_routes(ARGV[5], ARGV[6], v[2], v[3])
redis.call('HSET', key, 'drafter', ARGV[1], 'verifier', ARGV[2], 'updated_at', ARGV[4])
redis.call('PEXPIRE', key, ARGV[3])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
if v[1] == 'active' then index_routes(ARGV[5], ARGV[6], ARGV[1], ARGV[2], expiry_ms(ARGV[3]), nil) end
return 1
"""

# ARGV: status, reason, ttl ms, updated_at, prefix, sid, end token, error code, error message, and the
# point the session ends at ('' for none): next round, committed length, policy JSON, epoch, stats JSON.
# -> 1 ended now (or by this same call, retried), 0 had already ended, -1 missing, -2 stored behind the
# point, -4 stored more than one round ahead of it (another controller drives the session), -5 another
# epoch drives it.
# One round ahead is a commit whose reply the controller never got, so the client never got its tokens
# either: it is taken back (tokens cut to the point's length, round and policy set back) as the session
# ends. Any copy of that commit still on its way is refused afterwards: the session is no longer active.
_END = """
local key = KEYS[1]
local v = redis.call('HMGET', key, 'status', 'drafter', 'verifier', 'end_token', 'next_round', 'epoch')
if not v[1] then return -1 end
if v[1] ~= 'active' then
  if v[4] == ARGV[7] then return 1 end
  return 0
end
if ARGV[10] ~= '' then
  if tonumber(v[6] or 0) ~= tonumber(ARGV[13]) then return -5 end
  local nr, at = tonumber(v[5]), tonumber(ARGV[10])
  if nr < at then return -2 end
  if nr > at + 1 then return -4 end
  if nr == at + 1 then
    local len = tonumber(ARGV[11]) * 4
    local kept = ''
    if len > 0 then kept = redis.call('GETRANGE', KEYS[2], 0, len - 1) end
    redis.call('SET', KEYS[2], kept)
    redis.call('HSET', key, 'next_round', at, 'policy', ARGV[12])
  end
  redis.call('HSET', key, 'stats', ARGV[14])
end
redis.call('HSET', key, 'status', ARGV[1], 'finish_reason', ARGV[2], 'updated_at', ARGV[4], 'end_token', ARGV[7],
  'error_code', ARGV[8], 'error_message', ARGV[9])
redis.call('PEXPIRE', key, ARGV[3])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
unindex_routes(ARGV[5], ARGV[6], v[2], v[3])
return 1
"""

# ARGV: owner, updated_at, ttl ms. -> {status, epoch}: a resumable (active or failed) session becomes active
# under the next epoch and this owner; a finished or cancelled one is left alone.
_TAKE_OVER = """
local key = KEYS[1]
local v = redis.call('HMGET', key, 'status', 'epoch')
if not v[1] then return {'', 0} end
if v[1] ~= 'active' and v[1] ~= 'failed' then return {v[1], tonumber(v[2] or 0)} end
local epoch = redis.call('HINCRBY', key, 'epoch', 1)
redis.call('HSET', key, 'owner', ARGV[1], 'status', 'active', 'finish_reason', '', 'error_code', '',
  'error_message', '', 'end_token', '', 'updated_at', ARGV[2])
redis.call('PEXPIRE', key, ARGV[3])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
return {'active', epoch}
"""

# ARGV: prefix, sid.
_DELETE = """
local v = redis.call('HMGET', KEYS[1], 'drafter', 'verifier')
unindex_routes(ARGV[1], ARGV[2], v[1], v[2])
return redis.call('DEL', KEYS[1], KEYS[2])
"""

# ARGV: prefix, and '' or ttl ms minus a window ms (count only sessions written within the window).
# -> flat list address, count (addresses with no live session are dropped).
_COUNT_ROUTES = """
local now = expiry_ms(0)
local out = {}
for _, addr in ipairs(redis.call('SMEMBERS', ARGV[1] .. 'nodes')) do
  local k = ARGV[1] .. 'route:' .. addr
  redis.call('ZREMRANGEBYSCORE', k, '-inf', now)
  local n = redis.call('ZCARD', k)
  if n == 0 then redis.call('SREM', ARGV[1] .. 'nodes', addr)
  else
    if ARGV[2] ~= '' then n = redis.call('ZCOUNT', k, now + tonumber(ARGV[2]), '+inf') end
    if n > 0 then table.insert(out, addr); table.insert(out, n) end
  end
end
return out
"""

# KEYS: posterior, merge marker. ARGV: field/delta pairs. -> 1 merged, 0 this merge was already applied.
_MERGE = """
if not redis.call('SET', KEYS[2], '1', 'NX', 'EX', 300) then return 0 end
for i = 1, #ARGV, 2 do redis.call('HINCRBYFLOAT', KEYS[1], ARGV[i], ARGV[i + 1]) end
return 1
"""


def _pack(tokens: list[int]) -> bytes:
    return struct.pack(f"<{len(tokens)}I", *tokens)


def _unpack(data: bytes) -> list[int]:
    return list(struct.unpack(f"<{len(data) // 4}I", data))


def _redact(url: str) -> str:
    """`url` without its password, for error messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))


class _BlockingSentinelPool(SentinelConnectionPool, aioredis.BlockingConnectionPool):
    """redis-py's sentinel pool (connections go to the master the sentinels name now, and move when a
    failover names another) that waits for a free connection like the plain URL's pool."""


@dataclass(frozen=True)
class SentinelUrl:
    """A parsed ``redis+sentinel://`` URL."""

    sentinels: list[tuple[str, int]]
    service_name: str
    db: int
    username: str | None
    password: str | None
    ssl: bool
    sentinel_auth: bool  # the sentinels take the URL's credentials too


def parse_sentinel_url(url: str) -> SentinelUrl:
    """``redis+sentinel://[[user]:password@]host[:port][,host[:port]...]/service_name[/db][?sentinel_auth=no]``;
    ``rediss+sentinel://`` speaks TLS to the sentinels and the master. Ports default to 26379."""
    parts = urlsplit(url)
    userinfo, _, hosts = parts.netloc.rpartition("@")
    username, password = None, None
    if userinfo:
        user, _, pw = userinfo.partition(":")
        username, password = (unquote(user) or None), (unquote(pw) or None)
    sentinels = []
    for item in hosts.split(","):
        host, port = item, DEFAULT_SENTINEL_PORT
        if item.startswith("["):  # [ipv6]:port
            host, _, rest = item[1:].partition("]")
            if rest:
                port = _port(rest.removeprefix(":"), url)
        elif item.count(":") == 1:
            host, text = item.split(":")
            port = _port(text, url)
        if not host:
            raise InvalidArgument("redis_url", f"{_redact(url)!r}: a sentinel address has no host")
        sentinels.append((host, port))
    path = [p for p in parts.path.split("/") if p]
    if not 1 <= len(path) <= 2:
        raise InvalidArgument("redis_url", f"{_redact(url)!r}: expected /service_name[/db] after the hosts")
    db = 0
    if len(path) == 2:
        if not path[1].isdigit():
            raise InvalidArgument("redis_url", f"{_redact(url)!r}: the db must be a number, got {path[1]!r}")
        db = int(path[1])
    query = parse_qs(parts.query)
    unknown = set(query) - {"sentinel_auth"}
    if unknown:
        raise InvalidArgument("redis_url", f"{_redact(url)!r}: unknown option(s) {sorted(unknown)}")
    sentinel_auth = query.get("sentinel_auth", ["yes"])[-1].lower() not in ("no", "false", "0")
    return SentinelUrl(sentinels, unquote(path[0]), db, username, password, url.startswith("rediss+"), sentinel_auth)


def _port(text: str, url: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise InvalidArgument("redis_url", f"{_redact(url)!r}: bad port {text!r}")
    return int(text)


class RedisStateStore:
    """The store in Redis. Redis-py retries a command on connection errors (`retries`, short backoff);
    every write is safe to retry: commits are guarded by the round number, create/cancel/merge carry a
    token. When Redis stays unreachable, methods raise `Unavailable`.

    `url`: ``redis://``, ``rediss://`` (TLS; `ca_file` names the CA that signed the server's certificate,
    else the system's CAs), ``unix://``, or ``redis+sentinel://`` / ``rediss+sentinel://`` (see
    `parse_sentinel_url`)."""

    def __init__(
        self,
        url: str,
        session_ttl_s: float = DEFAULT_SESSION_TTL_S,
        prefix: str = DEFAULT_PREFIX,
        connect_timeout_s: float = 2.0,
        command_timeout_s: float = 5.0,
        retries: int = 2,
        max_connections: int = 256,
        ca_file: str = "",
    ):
        if not isinstance(url, str) or not url.startswith(REDIS_SCHEMES + SENTINEL_SCHEMES):
            raise InvalidArgument(
                "redis_url", f"{_redact(str(url))!r}: expected redis://, rediss://, unix:// or redis+sentinel://"
            )
        if session_ttl_s <= 0:
            raise InvalidArgument("session_ttl_s", f"must be > 0, got {session_ttl_s!r}")
        self.session_ttl_s = float(session_ttl_s)
        self.prefix = prefix
        self._ttl_ms = max(1, int(self.session_ttl_s * 1000))
        if max_connections < 1:
            raise InvalidArgument("redis_max_connections", f"must be >= 1, got {max_connections!r}")
        tls = url.startswith(("rediss://", "rediss+sentinel://"))
        if ca_file and not tls:
            raise InvalidArgument("redis_ca_file", "a CA file verifies TLS: it needs a rediss:// URL")
        options: dict[str, Any] = {
            "socket_connect_timeout": connect_timeout_s,
            "socket_timeout": command_timeout_s,
            "retry": Retry(ExponentialBackoff(cap=0.2, base=0.01), retries),
            "decode_responses": False,
        }
        if ca_file:
            options["ssl_ca_certs"] = ca_file
        try:
            # A blocking pool: a burst of sessions beyond max_connections waits for a free connection
            # (up to the command timeout) instead of failing with "Too many connections".
            if url.startswith(SENTINEL_SCHEMES):
                pool = self._sentinel_pool(parse_sentinel_url(url), options, max_connections, command_timeout_s)
            else:
                pool = aioredis.BlockingConnectionPool.from_url(
                    url, max_connections=max_connections, timeout=command_timeout_s, **options
                )
            self._redis = aioredis.Redis(connection_pool=pool)
        except ValueError as e:
            raise InvalidArgument("redis_url", str(e)) from e
        self._url = _redact(url)
        lib = self._redis.register_script
        self._create, self._commit = lib(_LUA_LIB + _CREATE), lib(_LUA_LIB + _COMMIT)
        self._set_route, self._end = lib(_LUA_LIB + _SET_ROUTE), lib(_LUA_LIB + _END)
        self._delete, self._count_routes = lib(_LUA_LIB + _DELETE), lib(_LUA_LIB + _COUNT_ROUTES)
        self._merge, self._get = lib(_MERGE), lib(_GET)
        self._restore = lib(_LUA_LIB + _RESTORE)
        self._take_over = lib(_LUA_LIB + _TAKE_OVER)

    @staticmethod
    def _sentinel_pool(
        parsed: SentinelUrl, options: dict[str, Any], max_connections: int, wait_s: float
    ) -> _BlockingSentinelPool:
        """A pool over the master that the sentinels name (redis-py's `Sentinel`, asyncio flavour)."""
        auth = {"username": parsed.username, "password": parsed.password}
        tls = {"ssl": True, **({"ssl_ca_certs": options["ssl_ca_certs"]} if "ssl_ca_certs" in options else {})}
        sentinel_options = {
            "socket_connect_timeout": options["socket_connect_timeout"],
            "socket_timeout": options["socket_timeout"],
            **(auth if parsed.sentinel_auth else {}),
            **(tls if parsed.ssl else {}),
        }
        sentinel = Sentinel(parsed.sentinels, sentinel_kwargs=sentinel_options)
        return _BlockingSentinelPool(
            parsed.service_name,
            sentinel,
            max_connections=max_connections,
            timeout=wait_s,
            db=parsed.db,
            ssl=parsed.ssl,
            **auth,
            **options,
        )

    async def __aenter__(self) -> RedisStateStore:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _keys(self, session_id: str) -> list[str]:
        """The session's hash and its committed tokens."""
        return [f"{self.prefix}session:{session_id}", f"{self.prefix}committed:{session_id}"]

    async def _io(self, request: Awaitable[Any]) -> Any:
        try:
            return await request
        except _REDIS_DOWN as e:
            raise Unavailable(f"redis at {self._url} is unreachable: {e}") from e

    async def _call(self, script: Any, keys: list[str], args: list[Any]) -> Any:
        return await self._io(script(keys=keys, args=args))

    @staticmethod
    def _fields(rec: SessionRecord, now: float) -> list[Any]:
        """The session hash's fields as flat name/value pairs (create and restore)."""
        fields = {
            "prompt_length": rec.prompt_length,
            "next_round": rec.next_round,
            "policy": json.dumps(rec.policy_state),
            "params": json.dumps(rec.params),
            "drafter": rec.drafter,
            "verifier": rec.verifier,
            "status": rec.status,
            "finish_reason": rec.finish_reason,
            "error_code": rec.error_code,
            "error_message": rec.error_message,
            "created_at": repr(rec.created_at or now),
            "updated_at": repr(now),
            "owner": rec.owner,
            "epoch": rec.epoch,
            "stats": json.dumps(rec.stats),
        }
        return [x for pair in fields.items() for x in pair]

    async def create_session(self, record: SessionRecord, token: str = "") -> None:
        """Creates the session; AlreadyExists if its id is taken, unless by a create with this same
        `token` (a retry of this create: pass the same token to repeat a create whose reply was lost)."""
        rec = _check_record(record)
        args: list[Any] = [token or uuid.uuid4().hex, self._ttl_ms, self.prefix, rec.session_id, _pack(rec.committed)]
        if not await self._call(self._create, self._keys(rec.session_id), args + self._fields(rec, time.time())):
            raise AlreadyExists("session_id", f"session {rec.session_id!r} already exists")

    async def restore_session(self, record: SessionRecord) -> bool:
        """Writes `record` (an active session's state as its controller holds it) when the stored one is
        missing, or active and at an earlier round; True when written, False when left alone (the stored
        session has ended, or is at this round or later)."""
        rec = _check_record(record)
        args: list[Any] = [self._ttl_ms, self.prefix, rec.session_id, _pack(rec.committed), rec.next_round, rec.epoch]
        return await self._call(self._restore, self._keys(rec.session_id), args + self._fields(rec, time.time())) == 1

    async def get_session(self, session_id: str) -> SessionRecord:
        _check_session_id(session_id)
        flat, packed = await self._call(self._get, self._keys(session_id), [])
        if not flat:
            raise NotFound(f"session {session_id!r} not found")
        s = {flat[i].decode(): flat[i + 1] for i in range(0, len(flat), 2)}
        return SessionRecord(
            session_id=session_id,
            committed=_unpack(packed or b""),
            prompt_length=int(s["prompt_length"]),
            next_round=int(s["next_round"]),
            policy_state=json.loads(s["policy"]),
            params=json.loads(s["params"]),
            drafter=s["drafter"].decode(),
            verifier=s["verifier"].decode(),
            status=s["status"].decode(),
            finish_reason=s["finish_reason"].decode(),
            error_code=s.get("error_code", b"").decode(),
            error_message=s.get("error_message", b"").decode(),
            created_at=float(s["created_at"]),
            updated_at=float(s["updated_at"]),
            owner=s.get("owner", b"").decode(),
            epoch=int(s.get("epoch", 0)),
            stats=json.loads(s.get("stats", b"{}")),
        )

    async def commit_round(
        self, session_id: str, round_index: int, tokens: list[int], policy_state: dict[str, float], epoch: int = 0
    ) -> CommitResult:
        """Appends round `round_index`'s tokens, once: a retry of an applied round changes nothing. Aborted
        when another epoch than `epoch` drives the session."""
        _check_session_id(session_id)
        _check_round(round_index)
        packed = _pack(_check_tokens("tokens", tokens))
        policy = json.dumps(_check_floats("policy_state", policy_state))
        args = [round_index, packed, policy, self._ttl_ms, repr(time.time()), self.prefix, session_id, epoch]
        code, length, next_round = await self._call(self._commit, self._keys(session_id), args)
        if code == -5:
            raise _taken_over(session_id)
        if code == -1:
            raise NotFound(f"session {session_id!r} not found")
        if code == -2:
            raise _behind(session_id, int(next_round), round_index)
        if code == -3:
            raise FailedPrecondition(f"session {session_id!r} has ended")
        return CommitResult(applied=code == 1, committed_length=int(length), next_round=int(next_round))

    async def set_route(self, session_id: str, drafter: str, verifier: str, epoch: int | None = None) -> None:
        """Pins the session's nodes; with `epoch`, only while that epoch drives it."""
        _check_session_id(session_id)
        any_epoch = "" if epoch is None else epoch
        args = [drafter, verifier, self._ttl_ms, repr(time.time()), self.prefix, session_id, any_epoch]
        result = await self._call(self._set_route, self._keys(session_id), args)
        if result == -1:
            raise NotFound(f"session {session_id!r} not found")
        if result == -5:
            raise _taken_over(session_id)

    async def take_over(self, session_id: str, owner: str) -> SessionRecord:
        """Makes the caller the session's driver: a resumable session (active or failed) becomes active
        under a new epoch and `owner`; a finished or cancelled one is returned as it is."""
        _check_session_id(session_id)
        args = [owner, repr(time.time()), self._ttl_ms]
        status, epoch = await self._call(self._take_over, self._keys(session_id), args)
        if not status:
            raise NotFound(f"session {session_id!r} not found")
        record = await self.get_session(session_id)
        if status == b"active":  # ours, even if yet another controller took it over since: then we are refused
            record.epoch, record.owner = int(epoch), owner
        return record

    async def _end_session(
        self,
        session_id: str,
        status: str,
        finish_reason: str,
        code: str = "",
        message: str = "",
        at: SessionRecord | None = None,
    ) -> bool:
        args = [status, finish_reason, self._ttl_ms, repr(time.time()), self.prefix, session_id, uuid.uuid4().hex]
        args += [code, message[:ERROR_MESSAGE_CHARS]]
        if at is None:
            args += ["", "", "", "", ""]
        else:
            _check_round(at.next_round)
            policy = json.dumps(_check_floats("policy_state", at.policy_state))
            args += [at.next_round, len(at.committed), policy, at.epoch, json.dumps(at.stats)]
        result = await self._call(self._end, self._keys(session_id), args)
        if result == -5:
            raise _taken_over(session_id)
        if result == -1:
            raise NotFound(f"session {session_id!r} not found")
        if result == -2:
            raise _behind(session_id, None, at.next_round)
        if result == -4:
            raise _ahead(session_id, None, at.next_round)
        return result == 1

    async def finish(self, session_id: str, status: str, finish_reason: str, at: SessionRecord | None = None) -> None:
        """Ends an active session (a no-op on an ended one). With `at` (the session as its client saw it),
        a commit applied beyond that point, whose reply was lost, is taken back (see `_END`)."""
        _check_session_id(session_id)
        _check_end_status(status)
        await self._end_session(session_id, status, finish_reason, at=_check_at(session_id, at))

    async def fail(self, session_id: str, code: str, message: str, at: SessionRecord | None = None) -> None:
        """Ends an active session as failed with a gRPC status name and message; `at` as in `finish`."""
        _check_session_id(session_id)
        await self._end_session(session_id, FAILED, "error", code, message, _check_at(session_id, at))

    async def cancel(self, session_id: str) -> bool:
        _check_session_id(session_id)
        return await self._end_session(session_id, CANCELLED, "cancelled")

    async def delete_session(self, session_id: str) -> None:
        _check_session_id(session_id)
        await self._call(self._delete, self._keys(session_id), [self.prefix, session_id])

    async def count_routes(self, written_within_s: float | None = None) -> dict[str, int]:
        """Active sessions per node address, over every controller. With `written_within_s`, only those
        written (a commit, a route change) that recently: a session whose controller died stops counting
        then, not when its record expires."""
        window = "" if written_within_s is None else self._ttl_ms - int(written_within_s * 1000)
        flat = await self._call(self._count_routes, [], [self.prefix, window])
        return {flat[i].decode(): int(flat[i + 1]) for i in range(0, len(flat), 2)}

    async def merge_global_posterior(self, model_key: str, delta: dict[str, float]) -> None:
        delta = _check_floats("delta", delta, finite=True)
        if not delta:
            return
        args: list[Any] = []
        for name, value in delta.items():
            args += [name, repr(value)]
        keys = [f"{self.prefix}posterior:{model_key}", f"{self.prefix}merge:{uuid.uuid4().hex}"]
        await self._call(self._merge, keys, args)

    async def global_posterior(self, model_key: str) -> dict[str, float]:
        h = await self._io(self._redis.hgetall(f"{self.prefix}posterior:{model_key}"))
        return {k.decode(): float(v) for k, v in h.items()}

    async def ping(self) -> float:
        start = time.perf_counter()
        await self._io(self._redis.ping())
        return time.perf_counter() - start

    async def close(self) -> None:
        await self._redis.aclose(close_connection_pool=True)  # the pool was made here, not by Redis()


async def _bench_commits(url: str, n: int, context: int) -> None:
    """p50/p99 of `commit_round` (one round trip, one Lua script) with `context` committed tokens."""
    async with open_state_store(url) as store:
        sid = f"bench-{uuid.uuid4().hex}"
        await store.create_session(SessionRecord(sid, list(range(context)), context, 0, {"alpha": 1.0}, {}))
        times = []
        for r in range(n):
            start = time.perf_counter()
            await store.commit_round(sid, r, [1, 2, 3], {"alpha": 1.0 + r, "beta": 2.0})
            times.append(time.perf_counter() - start)
        await store.delete_session(sid)
        times.sort()
        p50, p99 = times[n // 2] * 1e3, times[int(n * 0.99)] * 1e3
        print(f"{url} context={context} n={n}: commit p50 {p50:.3f} ms, p99 {p99:.3f} ms")


if __name__ == "__main__":  # python -m controller.state_store redis://127.0.0.1:6379 [n] [context]
    import sys

    url, n, context = (sys.argv[1:] + ["memory://", "1000", "128"][len(sys.argv) - 1 :])[:3]
    asyncio.run(_bench_commits(url, int(n), int(context)))
