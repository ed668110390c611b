"""A node's KV memory: one preallocated pool of key/value slots that sessions reserve and release.

The pool holds keys and values of shape (layers, kv_heads, kv_tokens, head_dim), cut into blocks of
`block_size` token slots. A session reserves, when it opens, the blocks for every position it may
write (prompt + max new tokens, bounded by the model's context): a pool that cannot hold the
reservation refuses it with ResourceExhausted, and an admitted session never runs out of memory
mid-stream. Nothing is reallocated or moved afterwards. `length` says how many of a session's
positions are valid; a forward pass writes its new positions in place, and rollback moves `length`
back, which is exact and O(1).

Blocks rather than one region per session, so fragmentation never refuses a reservation and data
never moves (a node opens and closes sessions between passes, while other sessions' caches stay put). The
allocator hands out consecutive blocks when it can: such a session's keys are a view of the pool that
attention reads in place, while scattered blocks are gathered on every read. Measured with 1 thread,
attention of one token over 300 cached positions: 12.7 us as a view vs 26.5 us gathered (64 wide,
2 kv heads), 29 vs 113 us (512 wide, 4 kv heads).
"""

import logging
import math
import time
from collections.abc import Callable, Iterator

import torch

from eesd.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted, RollbackError
from eesd.params import check_session_key, shown

log = logging.getLogger(__name__)


class KVCache:
    """A session's share of a pool. Implements the `update(key, value, layer_idx)` call that
    transformers attention layers make."""

    def __init__(self, pool: "KVPool", blocks: list[int]):
        self.pool = pool
        self.blocks = blocks
        size = pool.block_size
        # Pool slot of each position the session reserved.
        self.table = (torch.tensor(blocks)[:, None] * size + torch.arange(size)).flatten().to(pool.keys.device)
        self.capacity = min(len(blocks) * size, pool.max_context)  # positions it may hold
        consecutive = blocks == list(range(blocks[0], blocks[0] + len(blocks)))
        self._first_slot = blocks[0] * size if consecutive else None
        self.length = 0  # positions valid in every layer
        self._step = 0  # positions written by the forward pass in progress
        self.last_used = time.monotonic()  # the idle sweep closes caches nobody used for long

    def slots(self, start: int, end: int) -> slice | torch.Tensor:
        """Pool slots of positions [start, end): a slice when the blocks are consecutive, so that
        indexing the pool with it gives a view instead of a gather."""
        if self._first_slot is None:
            return self.table[start:end]
        return slice(self._first_slot + start, self._first_slot + end)

    def begin(self, num_tokens: int) -> None:
        """Called before a forward pass over `num_tokens` new positions."""
        self.last_used = time.monotonic()
        end = self.length + num_tokens
        if end > self.capacity:
            raise ResourceExhausted(
                f"a context of {end} tokens exceeds the session's reservation of {self.capacity} "
                f"(the model's context is {self.pool.max_context})"
            )
        self._step = num_tokens

    def update(
        self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *_args, **_kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """key, value: (1, kv_heads, q, head_dim) for the new positions; returns all valid positions,
        (1, kv_heads, length + q, head_dim) each.

        The signature is transformers' `Cache.update(key, value, layer_idx, ...)`: releases pass extra
        arguments that a position-pointer cache does not need (`cache_kwargs` up to 5.23, `kwargs` since
        5.24), so anything after `layer_idx` is accepted and ignored.
        """
        end = self.length + key.shape[2]
        keys, values = self.pool.layer_keys[layer_idx], self.pool.layer_values[layer_idx]
        keys[:, self.slots(self.length, end)] = key[0]
        values[:, self.slots(self.length, end)] = value[0]
        valid = self.slots(0, end)
        return keys[None, :, valid], values[None, :, valid]

    def commit(self) -> None:
        """Called after every layer has written the forward pass's positions."""
        self.length += self._step
        self._step = 0

    def crop(self, length: int) -> None:
        """Roll back to the first `length` positions; refuses to 'grow' into positions never written."""
        if not 0 <= length <= self.length:
            raise RollbackError(f"cannot crop a cache of length {self.length} to {length}")
        self.length = length


class CacheBehind(FailedPrecondition):
    """The node's cache covers fewer committed tokens than the request's base length."""

    def __init__(self, key: str, cache_length: int, base_length: int):
        super().__init__(
            f"session {shown(key)!r}: cache holds {cache_length} tokens, request base is "
            f"{base_length}; resend with base_length={cache_length}"
        )
        self.cache_length = cache_length


class KVPool:
    """The KV caches a node keeps per session, in one pool: soft state, rebuilt from committed tokens
    when lost. Sessions are named by key: the session id, scoped by its owner token on a served node
    (eesd.params.session_key)."""

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        kv_tokens: int,
        max_context: int,
        max_sessions: int = 256,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        block_size: int = 16,
    ):
        if kv_tokens < 1 or block_size < 1:
            raise InvalidArgument("kv_tokens", f"pool of {kv_tokens} tokens in blocks of {block_size}")
        num_blocks = math.ceil(kv_tokens / block_size)
        shape = (num_layers, num_kv_heads, num_blocks * block_size, head_dim)
        # Uninitialised: a position is read only after a pass wrote it, and on a CPU the pages are
        # committed as they are first written.
        self.keys = torch.empty(shape, dtype=dtype, device=device)
        self.values = torch.empty(shape, dtype=dtype, device=device)
        self.layer_keys, self.layer_values = self.keys.unbind(0), self.values.unbind(0)  # per layer, no op
        self.block_size = block_size
        self.max_context = max_context
        self.max_sessions = max_sessions
        self._free = list(range(num_blocks))  # sorted
        self._caches: dict[str, KVCache] = {}
        # Eviction under pressure (the serving node sets both): a new session may take the place of the
        # least recently used ones unused for `evict_idle_s` and not `in_use` (work queued or running). A
        # session its controller drives is used every round, so only abandoned ones (a controller that
        # died, calls made straight to the node) are evicted; one evicted by mistake is rebuilt from its
        # committed tokens by the round protocol (a cache mismatch, then a prefill).
        self.evict_idle_s = math.inf
        self.in_use: Callable[[str], bool] = lambda key: False
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._caches)

    def __iter__(self) -> Iterator[str]:
        """The keys of the open sessions (a copy: closing while iterating is fine)."""
        return iter(list(self._caches))

    @property
    def total_tokens(self) -> int:
        return self.keys.shape[2]

    @property
    def reserved_tokens(self) -> int:
        return self.total_tokens - len(self._free) * self.block_size

    def usage(self) -> float:
        """Fraction of the pool reserved by sessions (vLLM's kv_cache_usage_perc)."""
        return self.reserved_tokens / self.total_tokens

    def open(self, key: str, tokens: int | None = None) -> KVCache:
        """Opens (or resets) a session's cache, reserving `tokens` positions (default and at most the
        model's context)."""
        check_session_key(key)
        if tokens is not None and tokens < 1:
            raise InvalidArgument("tokens", f"must be >= 1, got {tokens}")
        self.close(key)
        needed = math.ceil(min(self.max_context if tokens is None else tokens, self.max_context) / self.block_size)
        self._make_room(needed)
        if len(self._caches) >= self.max_sessions:
            raise ResourceExhausted(f"node holds its maximum of {self.max_sessions} sessions")
        if needed > len(self._free):
            raise ResourceExhausted(
                f"KV pool has {len(self._free) * self.block_size} of {self.total_tokens} tokens free; "
                f"session {shown(key)!r} needs {needed * self.block_size}"
            )
        self._caches[key] = KVCache(self, self._take(needed))
        return self._caches[key]

    def close(self, key: str) -> None:
        cache = self._caches.pop(key, None)
        if cache is not None:
            self._free = sorted(self._free + cache.blocks)

    def close_idle(self, idle_s: float) -> list[str]:
        """Closes the sessions whose caches no pass used for `idle_s` seconds (a controller that died, or a
        client that walked away, leaves them behind); returns their ids. A driven session feeds tokens
        every round, so it is never idle that long."""
        cutoff = time.monotonic() - idle_s
        idle = [key for key, cache in self._caches.items() if cache.last_used < cutoff]
        for key in idle:
            self.close(key)
        return idle

    def _make_room(self, blocks: int) -> None:
        """Evicts the least recently used evictable sessions until a new one of `blocks` blocks fits; none
        when evicting them all would not be enough."""
        free, room = len(self._free), self.max_sessions - len(self._caches)
        if room >= 1 and free >= blocks:
            return
        cutoff = time.monotonic() - self.evict_idle_s
        idle = [key for key, cache in self._caches.items() if cache.last_used < cutoff and not self.in_use(key)]
        if room + len(idle) < 1 or free + sum(len(self._caches[key].blocks) for key in idle) < blocks:
            return
        for key in sorted(idle, key=lambda key: self._caches[key].last_used):
            self.close(key)
            self.evicted += 1
            log.info("evicted session %r (least recently used) for a new one", shown(key))
            if len(self._caches) < self.max_sessions and len(self._free) >= blocks:
                return

    def get(self, key: str) -> KVCache:
        if key not in self._caches:
            raise NotFound(f"session {shown(key)!r} is not open on this node")
        return self._caches[key]

    def at_base(self, key: str, base_length: int, pending: list[int]) -> KVCache:
        """The session's cache rolled back to `base_length`, ready to take `pending` tokens.

        A session this node never saw (or lost) is opened empty and must be sent from base 0.
        """
        if not pending:
            raise InvalidArgument("pending_tokens", "must hold at least the last committed token")
        if base_length < 0:
            raise InvalidArgument("base_length", f"must be >= 0, got {base_length}")
        cache = self._caches.get(key) or self.open(key)
        if cache.length < base_length:
            raise CacheBehind(key, cache.length, base_length)
        cache.crop(base_length)
        return cache

    def _take(self, count: int) -> list[int]:
        """The first run of `count` consecutive free blocks, else the `count` lowest free blocks."""
        free = self._free
        runs = (free[i : i + count] for i in range(len(free) - count + 1) if free[i + count - 1] - free[i] == count - 1)
        taken = next(runs, free[:count])
        kept = set(free) - set(taken)
        self._free = [b for b in free if b in kept]
        return taken
