"""One typed config per service: dataclass fields drive CLI flags (--field-name), environment variables
(EESD_FIELD_NAME) and the Helm values (`<role>.config.fieldName`, rendered into EESD_* variables).

Precedence: flag > environment > default.
"""

import argparse
import dataclasses
import math
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar, get_type_hints

from eesd.errors import InvalidArgument
from eesd.hardware import DTYPE_HELP, DTYPES
from serving.logs import LOG_FORMATS, LOG_LEVELS

C = TypeVar("C")
ENV_PREFIX = "EESD_"


def env_name(field: str) -> str:
    return ENV_PREFIX + field.upper()


def flag_name(field: str) -> str:
    return field.replace("_", "-")


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
            f"--{flag_name(f.name)}",
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
    check_fields(config)  # each field's own Rules, then the rules that tie fields together
    validate = getattr(config, "validate", None)
    if validate is not None:
        validate()
    return config


@dataclasses.dataclass(frozen=True)
class Pattern:
    """A string's shape: `regex`, matched in full, and `shape`, how a matching value reads (for messages)."""

    regex: str
    shape: str


@dataclasses.dataclass(frozen=True)
class Rules:
    """What a config field accepts, declared with it (`field`). The service checks it when it loads its config
    (`check_fields`), and deploy/render.py writes it into the Helm chart's values.schema.json
    (`json_schema`), so a rule is written once. "Empty" is "" or 0, the unset value of a field."""

    choices: tuple[str, ...] = ()
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: float | None = None
    pattern: Pattern | None = None  # for a non-empty string; "" stays the field's "unset"
    required: bool = False  # a string that may not be empty
    requires: tuple[str, ...] = ()  # fields that must be set too when this one is

    def violation(self, value: Any) -> str | None:
        """What is wrong with `value` on its own, or None."""
        if self.required and not value:
            return "is required"
        if isinstance(value, float) and not math.isfinite(value):  # NaN passes every comparison below
            return f"must be a finite number, got {value!r}"
        if self.choices and value not in self.choices:
            return f"must be one of {', '.join(self.choices)}, got {value!r}"
        if self.minimum is not None and value < self.minimum:
            return f"must be >= {self.minimum}, got {value!r}"
        if self.maximum is not None and value > self.maximum:
            return f"must be <= {self.maximum}, got {value!r}"
        if self.exclusive_minimum is not None and value <= self.exclusive_minimum:
            return f"must be > {self.exclusive_minimum}, got {value!r}"
        if self.pattern is not None and value and not re.fullmatch(self.pattern.regex, value):
            return f"must be {self.pattern.shape}"  # not echoed: a URL may carry a password
        return None

    def json_schema(self, empty_allowed: bool = False) -> dict:
        """The JSON Schema keywords of these rules; `empty_allowed`: "" passes a required string (the chart fills
        it in). `requires` has none: a $def sees one value, and the chart may fill the other field."""
        schema: dict = {}
        if self.choices:
            schema["enum"] = list(self.choices)
        for key, bound in (
            ("minimum", self.minimum),
            ("maximum", self.maximum),
            ("exclusiveMinimum", self.exclusive_minimum),
        ):
            if bound is not None:
                schema[key] = bound
        if self.required and not empty_allowed:
            schema["minLength"] = 1
        if self.pattern is not None:
            schema["pattern"] = f"^({self.pattern.regex})?$"
        return schema


def field(
    default: Any,
    help: str,  # noqa: A002 - mirrors argparse's name
    *,
    choices: Sequence[str] = (),
    minimum: float | None = None,
    maximum: float | None = None,
    exclusive_minimum: float | None = None,
    pattern: Pattern | None = None,
    required: bool = False,
    requires: Sequence[str] = (),
) -> Any:
    """A config field: its default, its --help text and what it accepts (`Rules`)."""
    rules = Rules(tuple(choices), minimum, maximum, exclusive_minimum, pattern, required, tuple(requires))
    return dataclasses.field(default=default, metadata={"help": help, "rules": rules})


def check_fields(config: Any) -> None:
    """Raises InvalidArgument naming the first field of `config` that breaks its `Rules`."""
    for f in dataclasses.fields(config):
        rules: Rules = f.metadata["rules"]
        value = getattr(config, f.name)
        problem = rules.violation(value)
        if problem is not None:
            raise InvalidArgument(f.name, f"{problem} (--{flag_name(f.name)} or {env_name(f.name)})")
        for other in rules.requires if value else ():
            if not getattr(config, other):
                raise InvalidArgument(f.name, f"needs {other} too")


# Ports a service listens on; with OR_OFF, 0 turns that listener off.
PORT = {"minimum": 1, "maximum": 65535}
PORT_OR_OFF = {"minimum": 0, "maximum": 65535}
# host:port[,host:port...] as serving.addresses.parse_addresses reads it (IPv6 hosts in brackets).
ADDRESSES = Pattern(r"\s*[^\s,]+:[0-9]+\s*(,\s*[^\s,]+:[0-9]+\s*)*", "host:port[,host:port...]")


@dataclasses.dataclass(frozen=True)
class ObservabilityConfig:
    """Logs, traces and the metrics' model label, the same fields on every service (serving/observability.py,
    docs/observability.md)."""

    served_model_name: str = field("", "model_name label of the vllm: metrics (empty: the model directory's name)")
    log_format: str = field("json", "json (one JSON object per line) or text", choices=LOG_FORMATS)
    log_level: str = field("INFO", "DEBUG, INFO, WARNING, ERROR or CRITICAL", choices=LOG_LEVELS)
    otlp_endpoint: str = field(
        "",
        "OTLP/gRPC collector the traces go to, e.g. http://otel-collector:4317 (https:// for TLS; empty: tracing "
        "off); the OTEL_* environment variables (sampler, headers, batching) apply too",
        pattern=Pattern(r"https?://[^\s/]+(/.*)?", "http://host:port or https://host:port"),
    )


@dataclasses.dataclass(frozen=True)
class SecurityConfig:
    """Transport security and internal authentication, the same fields on every service (serving/security.py,
    docs/deployment.md: TLS and authentication)."""

    tls_cert_file: str = field(
        "",
        "PEM certificate chain served on the gRPC port (TLS on, with tls_key_file; re-read when it changes); also "
        "the client certificate this service presents to the drafters and verifiers it calls",
        requires=("tls_key_file",),
    )
    tls_key_file: str = field("", "PEM private key of tls_cert_file", requires=("tls_cert_file",))
    tls_ca_file: str = field(
        "",
        "PEM CA bundle that verifies the drafters' and verifiers' certificates (empty: the system's CAs) and, with "
        "tls_client_auth, the clients' certificates",
    )
    tls_client_auth: bool = field(
        False,
        "mutual TLS: refuse clients without a certificate signed by tls_ca_file",
        requires=("tls_cert_file", "tls_ca_file"),
    )
    tls_client_names: str = field(
        "",
        "with tls_client_auth: names (DNS SAN or common name) a client certificate must carry one of, comma-"
        "separated; other callers are UNAUTHENTICATED (empty: any certificate tls_ca_file signed)",
        requires=("tls_client_auth",),
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
    health_port: int = field(
        0, "plain-text port serving only grpc.health.v1, for probes without TLS (0: off)", **PORT_OR_OFF
    )

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert_file)

    def validate_security(self) -> None:
        for name in ("tls_cert_file", "tls_key_file", "tls_ca_file", "internal_token_file"):
            path = getattr(self, name)
            if path and not os.path.isfile(path):
                raise InvalidArgument(name, f"no such file: {path}")


@dataclasses.dataclass(frozen=True)
class ModelNodeConfig(SecurityConfig, ObservabilityConfig):
    """What a drafter and a verifier are both configured with: one model, its KV pool, its batching."""

    host: str = field("0.0.0.0", "address to listen on", required=True)
    port: int = field(50061, "gRPC port", **PORT)
    metrics_port: int = field(9101, "Prometheus /metrics port (0: off)", **PORT_OR_OFF)
    model_dir: str = field(
        "", "checkpoint directory, or a Hugging Face id org/name[@revision] (eesd/fetch.py)", required=True
    )
    dtype: str = field("auto", DTYPE_HELP, choices=("auto", *DTYPES))
    device: str = field("cpu", "cpu or cuda", choices=("cpu", "cuda"))
    max_sessions: int = field(256, "KV caches kept at once; more is RESOURCE_EXHAUSTED", minimum=1)
    kv_tokens: int = field(
        0, "KV pool size in token positions, preallocated (0: a full context per max_sessions)", minimum=0
    )
    max_batch: int = field(64, "sessions batched in one forward pass (1: one session per pass)", minimum=1)
    max_pass_tokens: int = field(2048, "new tokens a forward pass takes at most, summed over its sessions", minimum=1)
    session_idle_s: float = field(600.0, "a session's KV cache unused this long is closed (0: never)", minimum=0)
    session_evict_s: float = field(
        10.0,
        "when the node is full, sessions unused this long make room for a new one, least recently used first",
        minimum=0,
    )
    max_pass_s: float = field(
        60.0, "a forward pass or model call running longer turns health NOT_SERVING", exclusive_minimum=0
    )
    node_id: str = field("", "name in handshakes and metrics (default host:port)")
    grace_s: float = field(10.0, "seconds in-flight rounds get to finish on SIGTERM", minimum=0)

    def validate(self) -> None:
        self.validate_security()
