"""One typed config per service: dataclass fields drive CLI flags (--field-name), environment variables
(EESD_FIELD_NAME) and the Helm values (`<role>.config.fieldName`, rendered into EESD_* variables).

Precedence: flag > environment > default.
"""

import argparse
import dataclasses
import os
import re
from collections.abc import Mapping, Sequence
from typing import TypeVar, get_type_hints

from eesd.errors import InvalidArgument
from serving.logs import LOG_FORMATS, LOG_LEVELS

C = TypeVar("C")
ENV_PREFIX = "EESD_"


def env_name(field: str) -> str:
    return ENV_PREFIX + field.upper()


def _convert(field: str, kind: type, text: str):
    if kind is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off", ""):
            return False
        raise InvalidArgument(field, f"expected a boolean, got {text!r}")
    try:
        return kind(text)
    except ValueError as exc:
        raise InvalidArgument(field, f"expected {kind.__name__}, got {text!r}") from exc


def load_config(cls: type[C], argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> C:
    """Builds `cls` from flags and environment; each field's `metadata["help"]` documents its flag."""
    env = os.environ if env is None else env
    hints = get_type_hints(cls)
    parser = argparse.ArgumentParser(description=cls.__doc__)
    for f in dataclasses.fields(cls):
        parser.add_argument(
            f"--{f.name.replace('_', '-')}",
            dest=f.name,
            default=None,
            help=f"{f.metadata.get('help', '')} (env {env_name(f.name)}; default {f.default!r})",
        )
    args = vars(parser.parse_args(argv))
    values = {}
    for f in dataclasses.fields(cls):
        text = args[f.name] if args[f.name] is not None else env.get(env_name(f.name))
        if text is not None:
            values[f.name] = _convert(f.name, hints[f.name], text)
    config = cls(**values)
    validate = getattr(config, "validate", None)
    if validate is not None:
        validate()
    if isinstance(config, ObservabilityConfig):
        config.validate_observability()
    return config


def field(default, help: str):  # noqa: A002 - mirrors argparse's name
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass(frozen=True)
class ObservabilityConfig:
    """Logs, traces and the metrics' model label, the same fields on every service (serving/observability.py,
    docs/observability.md)."""

    served_model_name: str = field("", "model_name label of the vllm: metrics (empty: the model directory's name)")
    log_format: str = field("json", "json (one JSON object per line) or text")
    log_level: str = field("INFO", "DEBUG, INFO, WARNING, ERROR or CRITICAL")
    otlp_endpoint: str = field(
        "",
        "OTLP/gRPC collector the traces go to, e.g. http://otel-collector:4317 (https:// for TLS; empty: tracing "
        "off); the OTEL_* environment variables (sampler, headers, batching) apply too",
    )

    def validate_observability(self) -> None:
        if self.log_format not in LOG_FORMATS:
            raise InvalidArgument("log_format", f"must be one of {LOG_FORMATS}, got {self.log_format!r}")
        if self.log_level.upper() not in LOG_LEVELS:
            raise InvalidArgument("log_level", f"must be one of {LOG_LEVELS}, got {self.log_level!r}")
        if self.otlp_endpoint and not re.fullmatch(r"https?://[^\s/]+(/.*)?", self.otlp_endpoint):
            raise InvalidArgument(
                "otlp_endpoint", f"must be http://host:port or https://host:port, got {self.otlp_endpoint!r}"
            )


@dataclasses.dataclass(frozen=True)
class SecurityConfig:
    """Transport security and internal authentication, the same fields on every service (serving/security.py,
    docs/deployment.md: TLS and authentication)."""

    tls_cert_file: str = field(
        "",
        "PEM certificate chain served on the gRPC port (TLS on, with tls_key_file; re-read when it changes); also "
        "the client certificate this service presents to the drafters and verifiers it calls",
    )
    tls_key_file: str = field("", "PEM private key of tls_cert_file")
    tls_ca_file: str = field(
        "",
        "PEM CA bundle that verifies the drafters' and verifiers' certificates (empty: the system's CAs) and, with "
        "tls_client_auth, the clients' certificates",
    )
    tls_client_auth: bool = field(False, "mutual TLS: refuse clients without a certificate signed by tls_ca_file")
    tls_client_names: str = field(
        "",
        "with tls_client_auth: names (DNS SAN or common name) a client certificate must carry one of, comma-"
        "separated; other callers are UNAUTHENTICATED (empty: any certificate tls_ca_file signed)",
    )
    internal_tls: bool = field(False, "call the drafters and verifiers over TLS, verifying them with tls_ca_file")
    internal_server_name: str = field(
        "", "name checked in the drafters' and verifiers' certificates (empty: the host of the address called)"
    )
    internal_token: str = field(
        "",
        "shared token of the controller, drafters and verifiers, comma-separated (the first is sent, all are "
        "accepted); drafters and verifiers refuse calls without one: UNAUTHENTICATED (empty: off)",
    )
    internal_token_file: str = field("", "file of internal tokens, one a line (the first is sent); re-read on change")
    health_port: int = field(0, "plain-text port serving only grpc.health.v1, for probes without TLS (0: off)")

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert_file)

    def validate_security(self) -> None:
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise InvalidArgument("tls_key_file", "TLS needs both tls_cert_file and tls_key_file")
        if self.tls_client_auth and not (self.tls and self.tls_ca_file):
            raise InvalidArgument("tls_client_auth", "needs TLS (tls_cert_file, tls_key_file) and tls_ca_file")
        if self.tls_client_names and not self.tls_client_auth:
            raise InvalidArgument("tls_client_names", "names client certificates: needs tls_client_auth")
        for name in ("tls_cert_file", "tls_key_file", "tls_ca_file", "internal_token_file"):
            path = getattr(self, name)
            if path and not os.path.isfile(path):
                raise InvalidArgument(name, f"no such file: {path}")
        if not 0 <= self.health_port <= 65535:
            raise InvalidArgument("health_port", f"must be a port or 0, got {self.health_port}")


@dataclasses.dataclass(frozen=True)
class ModelNodeConfig(SecurityConfig, ObservabilityConfig):
    """What a drafter and a verifier are both configured with: one model, its KV pool, its batching."""

    host: str = field("0.0.0.0", "address to listen on")
    port: int = field(50061, "gRPC port")
    metrics_port: int = field(9101, "Prometheus /metrics port (0: off)")
    model_dir: str = field("", "Hugging Face checkpoint directory")
    dtype: str = field("float32", "float32, bfloat16, float16 or auto")
    device: str = field("cpu", "cpu or cuda")
    max_sessions: int = field(256, "KV caches kept at once; more is RESOURCE_EXHAUSTED")
    kv_tokens: int = field(0, "KV pool size in token positions, preallocated (0: a full context per max_sessions)")
    max_batch: int = field(64, "sessions batched in one forward pass (1: one session per pass)")
    max_pass_tokens: int = field(2048, "new tokens a forward pass takes at most, summed over its sessions")
    session_idle_s: float = field(600.0, "a session's KV cache unused this long is closed (0: never)")
    session_evict_s: float = field(
        10.0, "when the node is full, sessions unused this long make room for a new one, least recently used first"
    )
    max_pass_s: float = field(60.0, "a forward pass or model call running longer turns health NOT_SERVING")
    node_id: str = field("", "name in handshakes and metrics (default host:port)")
    grace_s: float = field(10.0, "seconds in-flight rounds get to finish on SIGTERM")

    def validate(self) -> None:
        self.validate_security()
        if not self.model_dir:
            raise InvalidArgument("model_dir", "is required (--model-dir or EESD_MODEL_DIR)")
        for name in ("max_sessions", "max_batch", "max_pass_tokens"):
            if getattr(self, name) < 1:
                raise InvalidArgument(name, f"must be >= 1, got {getattr(self, name)}")
        if self.max_pass_s <= 0:
            raise InvalidArgument("max_pass_s", f"must be > 0, got {self.max_pass_s}")
        for name in ("session_idle_s", "session_evict_s"):
            if getattr(self, name) < 0:
                raise InvalidArgument(name, f"must be >= 0, got {getattr(self, name)}")
        if self.kv_tokens < 0:
            raise InvalidArgument("kv_tokens", f"must be >= 0, got {self.kv_tokens}")
