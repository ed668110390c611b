import os
import re
from dataclasses import dataclass

from controller.discovery import DISCOVERY_MODES
from controller.state_store import MEMORY_SCHEME, REDIS_SCHEMES, SENTINEL_SCHEMES
from eesd.errors import InvalidArgument
from eesd.params import MAX_CHARS_PER_TOKEN, POLICY_NAMES, PolicyParams
from serving.config import ADDRESSES, PORT, PORT_OR_OFF, ObservabilityConfig, Pattern, SecurityConfig, field

UNKNOWN_CONTEXT_PROMPT_LIMIT = 65536  # prompts beyond it are refused by a controller without the model's config
REQUEST_OVERHEAD_BYTES = 64 * 1024  # a request's fields besides its prompt (parameters, policy options, id)
# The URLs open_state_store takes: memory:// as it is, the Redis schemes with a location after them.
STORE_URL = Pattern(
    "|".join([re.escape(MEMORY_SCHEME) + ".*", *(re.escape(s) + ".+" for s in REDIS_SCHEMES + SENTINEL_SCHEMES)]),
    "a memory://, redis://, rediss://, unix:// or redis+sentinel:// URL",
)


def max_request_bytes(prompt_limit: int) -> int:
    """The largest Generate request a prompt within `prompt_limit` tokens can need: its text (MAX_CHARS_PER_TOKEN
    characters a token, 4 UTF-8 bytes each at most; token ids take 5 bytes at most) plus the other fields.
    gRPC refuses a larger message (RESOURCE_EXHAUSTED) before the controller parses it, so a client cannot
    make the controller hold megabytes of prompt it will refuse anyway."""
    return prompt_limit * MAX_CHARS_PER_TOKEN * 4 + REQUEST_OVERHEAD_BYTES


@dataclass(frozen=True)
class ControllerConfig(SecurityConfig, ObservabilityConfig):
    """Controller: sessions, committed tokens and policy posteriors (Redis), routing, the round loop."""

    host: str = field("0.0.0.0", "address to listen on", required=True)
    port: int = field(50051, "gRPC port", **PORT)
    metrics_port: int = field(9100, "Prometheus /metrics port (0: off)", **PORT_OR_OFF)
    http_port: int = field(
        0,
        "port of the OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, /v1/models; 0: off); "
        "requests name the model served_model_name",
        **PORT_OR_OFF,
    )
    redis_url: str = field(
        "memory://",
        "state store: memory:// (embedded), redis://host:6379/0, rediss:// (TLS) or "
        "redis+sentinel://host:26379[,host:26379]/service_name[/db] (Redis Sentinel)",
        required=True,
        pattern=STORE_URL,
    )
    redis_max_connections: int = field(256, "Redis connections at most; a burst beyond waits for a free one", minimum=1)
    redis_ca_file: str = field("", "CA file that verifies a rediss:// Redis's certificate (empty: the system's CAs)")
    store_wait_s: float = field(
        30.0,
        "how long a running session waits for an unreachable state store, retrying with backoff, before it "
        "stops with UNAVAILABLE (longer than a Redis restart or failover)",
        minimum=0,
    )
    drafters: str = field("", "drafter addresses host:port,... (static/dns discovery, k8s fallback)", pattern=ADDRESSES)
    verifiers: str = field("", "verifier addresses host:port,...", pattern=ADDRESSES)
    discovery: str = field("static", "static, dns or kubernetes", choices=DISCOVERY_MODES)
    namespace: str = field("", "Kubernetes namespace of the drafter/verifier pods")
    drafter_selector: str = field("", "label selector of the drafters' EndpointSlices")
    verifier_selector: str = field("", "label selector of the verifiers' EndpointSlices")
    session_ttl_s: int = field(3600, "idle seconds before a session's state expires", minimum=1)
    default_policy: str = field("beta-ts", "draft policy when a request names none", choices=POLICY_NAMES)
    load_aware: bool = field(
        True, "the default beta-ts policy sizes its blocks by the nodes' measured load (k -> 0 as batches fill)"
    )
    k_max: int = field(8, "default cap on drafts per round", minimum=0)
    max_new_tokens_limit: int = field(4096, "largest max_new_tokens a request may ask for", minimum=1)
    max_prompt_tokens: int = field(
        0,
        "longest prompt in tokens, refused before any work (0: the model's context, 65536 without model_dir)",
        minimum=0,
    )
    model_dir: str = field(
        "", "checkpoint directory or Hugging Face id org/name[@revision]: tokenizer, EOS ids, vocabulary (optional)"
    )
    auth_token: str = field(
        "",
        "bearer tokens clients may send, comma-separated: several at once rotate without downtime (empty, and no "
        "auth_token_file: no auth)",
    )
    auth_token_file: str = field("", "file of client bearer tokens, one a line, re-read when it changes")
    round_timeout_s: float = field(60.0, "deadline of one round's RPC", exclusive_minimum=0)
    max_sessions: int = field(
        1024,
        "Generate calls this controller serves at once, running or waiting; more is RESOURCE_EXHAUSTED",
        minimum=1,
    )
    admission_wait_s: float = field(
        30.0, "how long a new session waits for room in a verifier's KV pool before RESOURCE_EXHAUSTED", minimum=0
    )
    node_down_s: float = field(5.0, "seconds a failed node is kept out of routing before it is retried", minimum=0)
    node_probe_s: float = field(1.0, "seconds between health probes of every drafter and verifier", exclusive_minimum=0)
    node_lost_s: float = field(
        5.0,
        "a node that has not answered SERVING this long is lost: its calls end and its sessions move",
        exclusive_minimum=0,
    )
    grace_s: float = field(30.0, "seconds in-flight generations get to finish on SIGTERM", minimum=0)

    def prompt_limit(self, context: int | None) -> int:
        """The longest prompt a request may send, in tokens, for a model of `context` (None: unknown)."""
        return self.max_prompt_tokens or (context - 1 if context else UNKNOWN_CONTEXT_PROMPT_LIMIT)

    def default_policy_params(self) -> PolicyParams:
        """The policy of a request that names none."""
        options = {"load_aware": 1.0} if self.load_aware and self.default_policy == "beta-ts" else {}
        return PolicyParams(self.default_policy, self.k_max, options)

    def validate(self) -> None:
        self.validate_security()
        if self.auth_token_file and not os.path.isfile(self.auth_token_file):
            raise InvalidArgument("auth_token_file", f"no such file: {self.auth_token_file}")
        if self.http_port and self.http_port in (self.port, self.metrics_port):
            raise InvalidArgument("http_port", "must differ from port and metrics_port")
        if self.discovery != "kubernetes" and not self.verifiers:
            raise InvalidArgument("verifiers", "at least one verifier address is required")
