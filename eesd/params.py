"""Request parameters, validated once at the edge so that the core can trust them."""

import math
import re
import secrets
from dataclasses import dataclass, field

from eesd.errors import InvalidArgument

POLICY_NAMES = ("beta-ts", "calibration-ts", "fixed", "heuristic", "threshold", "off")
# A sampled request's temperature: 0 (greedy) or in [MIN_TEMPERATURE, MAX_TEMPERATURE]. Below the minimum,
# logits / T overflow to inf and sampling breaks; above the maximum, p is uniform for any model.
MIN_TEMPERATURE, MAX_TEMPERATURE = 1e-2, 100.0
MAX_TOP_K = 1 << 20
# Session ids are client-chosen, logged and used as store keys: a bounded length and a safe alphabet.
SESSION_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def check_session_id(session_id: str) -> None:
    """Raises InvalidArgument naming `session_id` unless it is 1-128 of [A-Za-z0-9._:-] (echoing none of it)."""
    if not isinstance(session_id, str) or not SESSION_ID.fullmatch(session_id):
        length = len(session_id) if isinstance(session_id, str) else "?"
        raise InvalidArgument(
            "session_id", f"must be 1 to 128 characters of A-Z a-z 0-9 . _ : - (got {length} characters)"
        )


# The owner token of the controller that drives a session (node calls carry it): secret and random, so
# that a node can scope its sessions by it.
OWNER = re.compile(r"[A-Za-z0-9_-]{16,64}")


def new_owner() -> str:
    return secrets.token_urlsafe(16)  # 22 characters, 128 bits


def session_key(session_id: str, owner: str) -> str:
    """A node's name for a session: the id scoped by its owner token, so that a call without the token
    names another (new, empty) session and can neither read nor change this one. '/' is in neither
    alphabet, so keys of different (id, owner) pairs never collide."""
    return f"{session_id}/{owner}" if owner else session_id


def check_session_key(key: str) -> None:
    """Raises InvalidArgument naming `session_id` or `owner` unless `key` is a valid `session_key`."""
    session_id, _, owner = key.partition("/")
    check_session_id(session_id)
    if "/" in key and not OWNER.fullmatch(owner):
        raise InvalidArgument("owner", f"must be empty or 16 to 64 characters of A-Z a-z 0-9 _ - (got {len(owner)})")


def shown(key: str) -> str:
    """The session id of a node's session key, for messages: the owner token is the controller's secret."""
    return key.partition("/")[0]


@dataclass(frozen=True)
class SamplingParams:
    """How the target distribution p is formed; temperature 0 means greedy."""

    temperature: float = 0.0
    top_k: int = 0  # 0: no top-k filter
    top_p: float = 1.0  # 1.0: no nucleus filter
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def validate(self) -> None:
        t = self.temperature
        if not (t == 0.0 or (math.isfinite(t) and MIN_TEMPERATURE <= t <= MAX_TEMPERATURE)):
            raise InvalidArgument(
                "temperature", f"must be 0 (greedy) or in [{MIN_TEMPERATURE:g}, {MAX_TEMPERATURE:g}], got {t}"
            )
        if not 0 <= self.top_k <= MAX_TOP_K:
            raise InvalidArgument("top_k", f"must be in [0, {MAX_TOP_K}], got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:  # a NaN fails this too
            raise InvalidArgument("top_p", f"must be in (0, 1], got {self.top_p}")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise InvalidArgument("seed", f"must be in [0, 2^63), got {self.seed}")


@dataclass(frozen=True)
class PolicyParams:
    """Which draft policy runs and its knobs; unknown knobs are refused by the policy factory."""

    name: str = "beta-ts"
    k_max: int = 8
    options: dict[str, float] = field(default_factory=dict)

    def validate(self) -> None:
        if self.name not in POLICY_NAMES:
            raise InvalidArgument("policy", f"unknown policy {self.name!r}; expected one of {POLICY_NAMES}")
        if not 0 <= self.k_max <= 64:
            raise InvalidArgument("k_max", f"must be in [0, 64], got {self.k_max}")


# Log probabilities a request may ask for (GenerationParams.top_logprobs): NO_LOGPROBS asks for none, 0 for
# each generated token's own, n for it and the n most likely tokens at its position (vLLM's default bound).
NO_LOGPROBS, MAX_TOP_LOGPROBS = -1, 20


def check_top_logprobs(top_logprobs: int) -> None:
    if not isinstance(top_logprobs, int) or not NO_LOGPROBS <= top_logprobs <= MAX_TOP_LOGPROBS:
        raise InvalidArgument(
            "top_logprobs", f"must be unset (none), 0 or at most {MAX_TOP_LOGPROBS}, got {top_logprobs}"
        )


# Bounds of a request's stop conditions: every round scans its new text for each string.
MAX_STOP_STRINGS, MAX_STOP_CHARS, MAX_STOP_TOKEN_IDS = 16, 256, 64


@dataclass(frozen=True)
class StopConditions:
    """Where a session stops besides EOS and its token budget (finish reason "stop"). A stop token id ends
    it like EOS does: the token is the last one generated (`ignore_eos` does not turn these off). A stop
    string ends it at the token whose text completes the string; the text returned ends before it
    (eesd/stops.py). Both are applied where the tokens are committed, so the output up to the stop is the
    model's, unchanged."""

    strings: tuple[str, ...] = ()
    token_ids: tuple[int, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.strings or self.token_ids)

    def validate(self) -> None:
        if len(self.strings) > MAX_STOP_STRINGS:
            raise InvalidArgument("stop", f"at most {MAX_STOP_STRINGS} stop strings, got {len(self.strings)}")
        for s in self.strings:
            if not isinstance(s, str) or not 1 <= len(s) <= MAX_STOP_CHARS:
                raise InvalidArgument("stop", f"each stop string must be 1 to {MAX_STOP_CHARS} characters")
        if len(self.token_ids) > MAX_STOP_TOKEN_IDS:
            raise InvalidArgument(
                "stop_token_ids", f"at most {MAX_STOP_TOKEN_IDS} stop token ids, got {len(self.token_ids)}"
            )
        if any(not isinstance(t, int) or t < 0 for t in self.token_ids):
            raise InvalidArgument("stop_token_ids", "must be token ids (integers >= 0)")

    def stored(self) -> dict:
        """As a session's stored request keeps it (JSON-able)."""
        return {"strings": list(self.strings), "token_ids": list(self.token_ids)}


@dataclass(frozen=True)
class GenerationParams:
    max_new_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    policy: PolicyParams = field(default_factory=PolicyParams)
    stop_on_eos: bool = True
    stop: StopConditions = field(default_factory=StopConditions)
    # Log probabilities of the generated tokens under the verifier's target distribution (eesd.logprobs):
    # NO_LOGPROBS (none, nothing computed), 0 (each token's own) or n <= MAX_TOP_LOGPROBS (and the top n).
    # They do not change the output: a resumed session may ask for others than its first request did.
    top_logprobs: int = NO_LOGPROBS

    def validate(self) -> None:
        if self.max_new_tokens <= 0:
            raise InvalidArgument("max_new_tokens", f"must be > 0, got {self.max_new_tokens}")
        self.sampling.validate()
        self.policy.validate()
        self.stop.validate()
        check_top_logprobs(self.top_logprobs)


def check_token_ids(field: str, ids: list[int], vocab_size: int) -> None:
    """Raises InvalidArgument naming `field` for ids outside the vocabulary."""
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise InvalidArgument(field, f"ids outside the vocabulary [0, {vocab_size}): {bad[:5]}")


# A text prompt longer than this many characters per token of the prompt limit is refused before it is
# tokenized (tokenizing grows with the text); real text averages 3 to 5 characters per token.
MAX_CHARS_PER_TOKEN = 32


def check_prompt_size(field: str, size: int, max_tokens: int, characters: bool = False) -> None:
    """Refuses a prompt over the limit of `max_tokens` before any work: `size` is its token count, or its
    length in characters (MAX_CHARS_PER_TOKEN allowed per token) when `characters`."""
    limit = max_tokens * (MAX_CHARS_PER_TOKEN if characters else 1)
    if size > limit:
        unit = "characters" if characters else "tokens"
        raise InvalidArgument(field, f"{size} {unit}: at most {limit} (prompts are limited to {max_tokens} tokens)")


def check_context(prompt_length: int, max_new_tokens: int, context: int) -> None:
    """Refuses up front a request that could not finish inside the model's context, instead of failing it
    mid-stream."""
    if prompt_length >= context:
        raise InvalidArgument("prompt_ids", f"{prompt_length} tokens: the model's context is {context}")
    if prompt_length + max_new_tokens > context:
        raise InvalidArgument(
            "max_new_tokens",
            f"must be <= {context - prompt_length}: prompt ({prompt_length}) + max_new_tokens exceeds the "
            f"model's context of {context}",
        )


def validate_prompt(prompt_ids: list[int], vocab_size: int) -> None:
    """Raises InvalidArgument naming `prompt_ids` for an empty prompt or ids outside the vocabulary."""
    if len(prompt_ids) == 0:
        raise InvalidArgument("prompt_ids", "prompt is empty")
    check_token_ids("prompt_ids", prompt_ids, vocab_size)
