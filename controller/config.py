import os
from dataclasses import dataclass

from controller.discovery import DISCOVERY_MODES
from eesd.errors import InvalidArgument
from eesd.params import MAX_CHARS_PER_TOKEN, POLICY_NAMES, PolicyParams
from serving.config import ObservabilityConfig, SecurityConfig, field

UNKNOWN_CONTEXT_PROMPT_LIMIT = 65536  # prompts beyond it are refused by a controller without the model's config
REQUEST_OVERHEAD_BYTES = 64 * 1024  # a request's fields besides its prompt (parameters, policy options, id)


def max_request_bytes(prompt_limit: int) -> int:
    """The largest Generate request a prompt within `prompt_limit` tokens can need: its text (MAX_CHARS_PER_TOKEN
    characters a token, 4 UTF-8 bytes each at most; token ids take 5 bytes at most) plus the other fields.
    gRPC refuses a larger message (RESOURCE_EXHAUSTED) before the controller parses it, so a client cannot
    make the controller hold megabytes of prompt it will refuse anyway."""
    return prompt_limit * MAX_CHARS_PER_TOKEN * 4 + REQUEST_OVERHEAD_BYTES


@dataclass(frozen=True)
class ControllerConfig(SecurityConfig, ObservabilityConfig):
    """Controller: sessions, committed tokens and policy posteriors (Redis), routing, the round loop."""

    host: str = field("0.0.0.0", "address to listen on")
    port: int = field(50051, "gRPC port")
    metrics_port: int = field(9100, "Prometheus /metrics port (0: off)")
    http_port: int = field(
        0,
        "port of the OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, /v1/models; 0: off); "
        "requests name the model served_model_name",
    )
    redis_url: str = field(
        "memory://",
        "state store: memory:// (embedded), redis://host:6379/0, rediss:// (TLS) or "
        "redis+sentinel://host:26379[,host:26379]/service_name[/db] (Redis Sentinel)",
    )
    redis_max_connections: int = field(256, "Redis connections at most; a burst beyond waits for a free one")
    redis_ca_file: str = field("", "CA file that verifies a rediss:// Redis's certificate (empty: the system's CAs)")
    store_wait_s: float = field(
        30.0,
        "how long a running session waits for an unreachable state store, retrying with backoff, before it "
        "stops with UNAVAILABLE (longer than a Redis restart or failover)",
    )
    drafters: str = field("", "drafter addresses host:port,... (static/dns discovery, k8s fallback)")
    verifiers: str = field("", "verifier addresses host:port,...")
    discovery: str = field("static", "static, dns or kubernetes")
    namespace: str = field("", "Kubernetes namespace of the drafter/verifier pods")
    drafter_selector: str = field("", "label selector of the drafters' EndpointSlices")
    verifier_selector: str = field("", "label selector of the verifiers' EndpointSlices")
    session_ttl_s: int = field(3600, "idle seconds before a session's state expires")
    default_policy: str = field("beta-ts", "draft policy when a request names none")
    load_aware: bool = field(
        True, "the default beta-ts policy sizes its blocks by the nodes' measured load (k -> 0 as batches fill)"
    )
    k_max: int = field(8, "default cap on drafts per round")
    max_new_tokens_limit: int = field(4096, "largest max_new_tokens a request may ask for")
    max_prompt_tokens: int = field(
        0, "longest prompt in tokens, refused before any work (0: the model's context, 65536 without model_dir)"
    )
    model_dir: str = field("", "checkpoint directory for the tokenizer, EOS ids and vocabulary (optional)")
    auth_token: str = field(
        "",
        "bearer tokens clients may send, comma-separated: several at once rotate without downtime (empty, and no "
        "auth_token_file: no auth)",
    )
    auth_token_file: str = field("", "file of client bearer tokens, one a line, re-read when it changes")
    round_timeout_s: float = field(60.0, "deadline of one round's RPC")
    max_sessions: int = field(
        1024, "Generate calls this controller serves at once, running or waiting; more is RESOURCE_EXHAUSTED"
    )
    admission_wait_s: float = field(
        30.0, "how long a new session waits for room in a verifier's KV pool before RESOURCE_EXHAUSTED"
    )
    node_down_s: float = field(5.0, "seconds a failed node is kept out of routing before it is retried")
    node_probe_s: float = field(1.0, "seconds between health probes of every drafter and verifier")
    node_lost_s: float = field(
        5.0, "a node that has not answered SERVING this long is lost: its calls end and its sessions move"
    )
    grace_s: float = field(30.0, "seconds in-flight generations get to finish on SIGTERM")

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
        if self.discovery not in DISCOVERY_MODES:
            raise InvalidArgument("discovery", f"must be one of {DISCOVERY_MODES}")
        if not 0 <= self.http_port < 65536 or (self.http_port and self.http_port in (self.port, self.metrics_port)):
            raise InvalidArgument("http_port", "must be 0 (off) or a free port other than port and metrics_port")
        if self.default_policy not in POLICY_NAMES:
            raise InvalidArgument("default_policy", f"must be one of {POLICY_NAMES}")
        if self.max_sessions < 1:
            raise InvalidArgument("max_sessions", f"must be >= 1, got {self.max_sessions}")
        if self.max_prompt_tokens < 0:
            raise InvalidArgument("max_prompt_tokens", f"must be >= 0, got {self.max_prompt_tokens}")
        for name in ("node_probe_s", "node_lost_s"):
            if getattr(self, name) <= 0:
                raise InvalidArgument(name, f"must be > 0, got {getattr(self, name)}")
        if self.admission_wait_s < 0:
            raise InvalidArgument("admission_wait_s", f"must be >= 0, got {self.admission_wait_s}")
        if self.store_wait_s < 0:
            raise InvalidArgument("store_wait_s", f"must be >= 0, got {self.store_wait_s}")
        if self.discovery != "kubernetes" and not self.verifiers:
            raise InvalidArgument("verifiers", "at least one verifier address is required")
