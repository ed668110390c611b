"""Preallocated KV caches with rollback by position, and the per-session cache table of a node.

gpt-fast style: keys and values live in buffers sized for the context; `length` says how many
positions are valid. Appending writes in place; rollback moves the pointer, so it is exact and O(1).
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch

from eesd.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted, RollbackError


class KVCache:
    """Implements the `update(key, value, layer_idx)` call that transformers attention layers make."""

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
        capacity: int = 256,
        max_capacity: int = 1 << 20,
    ):
        self.max_capacity = max_capacity
        shape = (num_layers, 1, num_kv_heads, min(capacity, max_capacity), head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.length = 0  # positions valid in every layer
        self._step = 0  # positions written by the forward pass in progress

    @property
    def capacity(self) -> int:
        return self.keys.shape[3]

    def begin(self, num_tokens: int) -> None:
        """Called before a forward pass over `num_tokens` new positions."""
        end = self.length + num_tokens
        if end > self.max_capacity:
            raise ResourceExhausted(f"context of {end} tokens exceeds the model's {self.max_capacity}")
        if end > self.capacity:
            self._grow(min(max(end, 2 * self.capacity), self.max_capacity))
        self._step = num_tokens

    def update(
        self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *_args, **_kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """key, value: (1, kv_heads, q, head_dim) for the new positions; returns all valid positions.

        The signature is transformers' `Cache.update(key, value, layer_idx, ...)`: releases pass extra
        arguments that a position-pointer cache does not need (`cache_kwargs` up to 5.23, `kwargs` since
        5.24), so anything after `layer_idx` is accepted and ignored.
        """
        end = self.length + key.shape[2]
        self.keys[layer_idx, :, :, self.length : end] = key
        self.values[layer_idx, :, :, self.length : end] = value
        return self.keys[layer_idx, :, :, :end], self.values[layer_idx, :, :, :end]

    def commit(self) -> None:
        """Called after every layer has written the forward pass's positions."""
        self.length += self._step
        self._step = 0

    def crop(self, length: int) -> None:
        """Roll back to the first `length` positions; refuses to 'grow' into positions never written."""
        if not 0 <= length <= self.length:
            raise RollbackError(f"cannot crop a cache of length {self.length} to {length}")
        self.length = length

    def _grow(self, capacity: int) -> None:
        for name in ("keys", "values"):
            old = getattr(self, name)
            new = old.new_zeros((*old.shape[:3], capacity, old.shape[4]))
            new[:, :, :, : self.length] = old[:, :, :, : self.length]
            setattr(self, name, new)


class CacheBehind(FailedPrecondition):
    """The node's cache covers fewer committed tokens than the request's base length."""

    def __init__(self, session_id: str, cache_length: int, base_length: int):
        super().__init__(
            f"session {session_id!r}: cache holds {cache_length} tokens, request base is "
            f"{base_length}; resend with base_length={cache_length}"
        )
        self.cache_length = cache_length


@dataclass
class SessionCaches:
    """The KV caches a node keeps per session: soft state, rebuilt from committed tokens when lost."""

    new_cache: Callable[[], KVCache]
    max_sessions: int = 256

    def __post_init__(self) -> None:
        self._caches: dict[str, KVCache] = {}

    def __len__(self) -> int:
        return len(self._caches)

    def open(self, session_id: str) -> KVCache:
        """Opens (or resets) a session's cache."""
        if not session_id:
            raise InvalidArgument("session_id", "must be non-empty")
        if session_id not in self._caches and len(self._caches) >= self.max_sessions:
            raise ResourceExhausted(f"node holds its maximum of {self.max_sessions} sessions")
        self._caches[session_id] = self.new_cache()
        return self._caches[session_id]

    def close(self, session_id: str) -> None:
        self._caches.pop(session_id, None)

    def get(self, session_id: str) -> KVCache:
        if session_id not in self._caches:
            raise NotFound(f"session {session_id!r} is not open on this node")
        return self._caches[session_id]

    def at_base(self, session_id: str, base_length: int, pending: list[int]) -> KVCache:
        """The session's cache rolled back to `base_length`, ready to take `pending` tokens.

        A session this node never saw (or lost) is opened empty and must be sent from base 0.
        """
        if not pending:
            raise InvalidArgument("pending_tokens", "must hold at least the last committed token")
        if base_length < 0:
            raise InvalidArgument("base_length", f"must be >= 0, got {base_length}")
        cache = self._caches.get(session_id) or self.open(session_id)
        if cache.length < base_length:
            raise CacheBehind(session_id, cache.length, base_length)
        cache.crop(base_length)
        return cache
