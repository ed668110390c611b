"""Transport security and authentication, the same for every service (docs/deployment.md §11, TLS and
authentication; docs/architecture.md §2).

- **Server TLS**: a service configured with `tls_cert_file` and `tls_key_file` serves TLS on its gRPC port,
  and with `tls_client_auth` requires a client certificate signed by `tls_ca_file` (mutual TLS). The
  credentials are gRPC's dynamic ones: before each new connection's handshake the files are looked at
  again (stat only), and a changed certificate, key or CA is used from that connection on, without a
  restart (a Kubernetes Secret or cert-manager renewal swaps the files in place). Connections already open
  keep the certificate they were made with.
- **Internal clients** (the controller's calls and health probes to drafters and verifiers, a drafter's
  VerifyStream to its verifiers) verify the servers with `tls_ca_file` when `internal_tls` is on, checking
  `internal_server_name` (nodes are called by pod IP) and presenting this service's own certificate, so
  that nodes with `tls_client_auth` know them. When the files change (`Peers.generation`), the controller
  replaces its channels to the nodes (the old ones close once their calls are done) and a drafter opens
  its next VerifyStream on a new channel, so a renewed client certificate is presented without a restart.
- **Tokens**: `AuthInterceptor` admits a call when its `authorization: Bearer <token>` metadata names one
  of the accepted tokens (compared in constant time: SHA-256 digests with `hmac.compare_digest`, every
  token tried) and, with `tls_client_names`, when its client certificate names one of them. Everything else
  ends UNAUTHENTICATED before its message is even parsed. grpc.health.v1 and server reflection stay open
  for probes. The controller accepts the clients' tokens (`auth_token`, `auth_token_file`); drafters and
  verifiers accept the internal tokens (`internal_token`, `internal_token_file`), which the controller and
  the drafters send on every call. A token list rotates without downtime: the first token is the one sent,
  all are accepted, and a token file is read again when it changes.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc import aio

from eesd.errors import InvalidArgument
from serving import tracing
from serving.calls import GrpcCall
from serving.config import SecurityConfig
from serving.metrics import rpc_metrics

log = logging.getLogger(__name__)

# Methods every caller may use: kubelet and the controller's probes, grpcurl and buf curl's discovery.
OPEN_METHOD_PREFIXES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)
AUTHORIZATION = "authorization"
BEARER = "bearer "


class WatchedFiles:
    """Files read again when they change: their (mtime, size, inode) is compared at most every
    `min_check_s` seconds. A Kubernetes Secret volume replaces a file by swapping a symlink, which changes
    the inode the path resolves to."""

    def __init__(self, paths: Sequence[str], min_check_s: float = 1.0):
        self.paths, self.min_check_s = tuple(paths), min_check_s
        self._signature = self._stat()
        self._contents = self._read()
        self._checked = time.monotonic()

    def _stat(self) -> tuple:
        signature = []
        for path in self.paths:
            try:
                st = os.stat(path)
                signature.append((st.st_mtime_ns, st.st_size, st.st_ino))
            except OSError:
                signature.append(None)
        return tuple(signature)

    def _read(self) -> tuple[bytes, ...]:
        contents = []
        for path in self.paths:
            with open(path, "rb") as f:
                contents.append(f.read())
        return tuple(contents)

    @property
    def contents(self) -> tuple[bytes, ...]:
        return self._contents

    def reload(self) -> bool:
        """Reads the files again if they changed since the last read; True when their contents did. A file
        that cannot be read now (being replaced) keeps the last contents read, and is tried again later."""
        now = time.monotonic()
        if now - self._checked < self.min_check_s:
            return False
        self._checked = now
        signature = self._stat()
        if signature == self._signature:
            return False
        try:
            contents = self._read()
        except OSError as err:
            log.warning("could not read %s again (keeping the last contents): %s", ", ".join(self.paths), err)
            return False
        self._signature = signature
        if contents == self._contents:
            return False
        self._contents = contents
        log.info("%s changed: reloaded", ", ".join(self.paths))
        return True


def _split_tokens(text: str) -> list[str]:
    return [t.strip() for t in text.replace("\n", ",").split(",") if t.strip()]


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class Tokens:
    """Accepted bearer tokens: a comma-separated list and/or a file of them (one a line, read again when
    it changes). The first token (of the list, else of the file) is the one a client of this process sends."""

    def __init__(self, listed: str = "", file: str = ""):
        self._listed = _split_tokens(listed)
        try:
            self._file = WatchedFiles([file]) if file else None
        except OSError as err:
            raise InvalidArgument("token_file", f"cannot read {file}: {err}") from err
        self._digests: list[bytes] = []
        self._tokens: list[str] = []
        self._refresh(force=True)
        if file and not self._tokens:
            raise InvalidArgument("token_file", f"{file} holds no token")

    def _refresh(self, force: bool = False) -> None:
        if force or (self._file is not None and self._file.reload()):
            from_file = _split_tokens(self._file.contents[0].decode()) if self._file is not None else []
            self._tokens = self._listed + from_file
            self._digests = [_digest(t) for t in self._tokens]

    def __bool__(self) -> bool:
        return bool(self._tokens)

    def first(self) -> str:
        self._refresh()
        return self._tokens[0] if self._tokens else ""

    def accepts(self, token: str) -> bool:
        """Constant time in the token sent: every accepted token is compared, by digest."""
        self._refresh()
        sent = _digest(token)
        found = False
        for digest in self._digests:
            found |= hmac.compare_digest(sent, digest)
        return found


def bearer_of(metadata: Iterable[tuple[str, Any]] | None) -> str:
    """The token of an `authorization: Bearer <token>` entry ("" without one)."""
    for key, value in metadata or ():
        if key == AUTHORIZATION:
            text = value.decode() if isinstance(value, bytes) else str(value)
            return text[len(BEARER) :] if text[: len(BEARER)].lower() == BEARER else ""
    return ""


def peer_names(context: aio.ServicerContext) -> set[str]:
    """The names a call's client certificate carries: DNS/URI subject alternative names and the common name."""
    auth = context.auth_context() or {}
    names = set()
    for key in ("x509_subject_alternative_name", "x509_common_name"):
        names.update(v.decode() if isinstance(v, bytes) else str(v) for v in auth.get(key, ()))
    return names


class AuthInterceptor(aio.ServerInterceptor):
    """Admits a call only with an accepted bearer token (when `tokens` holds any) and, when `client_names`
    is not empty, a client certificate naming one of them; other calls end UNAUTHENTICATED, counted in
    eesd:grpc_server_handled_total. Health checking and reflection stay open. Goes first among a server's
    interceptors, so a refused call's request is never parsed."""

    def __init__(self, tokens: Tokens | None, client_names: Iterable[str] = (), what: str = "bearer token"):
        self.tokens, self.client_names, self.what = tokens, frozenset(client_names), what

    @property
    def active(self) -> bool:
        return bool(self.tokens) or bool(self.client_names)

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(OPEN_METHOD_PREFIXES):
            return handler
        if self.tokens and not self.tokens.accepts(bearer_of(handler_call_details.invocation_metadata)):
            return _refusing(handler, method, f"missing or wrong {self.what} in the authorization metadata")
        if self.client_names:
            return _checking_peer(handler, method, self.client_names)
        return handler


def _refuse(context: aio.ServicerContext, method: str, message: str) -> None:
    call = GrpcCall.of(method)
    with rpc_metrics().served(call):
        call.status = grpc.StatusCode.UNAUTHENTICATED
    context.set_code(grpc.StatusCode.UNAUTHENTICATED)
    context.set_details(message)


def _refusing(handler: grpc.RpcMethodHandler, method: str, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind that ends the call UNAUTHENTICATED; its request stays bytes (no deserializer)."""

    async def unary(request, context):
        _refuse(context, method, message)

    async def stream(request, context):
        _refuse(context, method, message)
        return
        yield  # an async generator that yields nothing

    encode = handler.response_serializer
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(unary, None, encode)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(stream, None, encode)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(unary, None, encode)
    return grpc.stream_stream_rpc_method_handler(stream, None, encode)


def _checking_peer(handler: grpc.RpcMethodHandler, method: str, names: frozenset[str]) -> grpc.RpcMethodHandler:
    """`handler` behind a check of the client certificate's names."""

    def refused(context) -> bool:
        if peer_names(context) & names:
            return False
        _refuse(context, method, "the client certificate names none of the callers this service accepts")
        return True

    def unary(behavior):
        async def wrapper(request, context):
            return None if refused(context) else await behavior(request, context)

        return wrapper

    def stream(behavior):
        async def wrapper(request, context):
            if refused(context):
                return
            async for response in behavior(request, context):
                yield response

        return wrapper

    decode, encode = handler.request_deserializer, handler.response_serializer
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(unary(handler.unary_unary), decode, encode)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(stream(handler.unary_stream), decode, encode)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(unary(handler.stream_unary), decode, encode)
    return grpc.stream_stream_rpc_method_handler(stream(handler.stream_stream), decode, encode)


def server_interceptor(
    config: SecurityConfig, tokens: Tokens | None, what: str = "bearer token"
) -> AuthInterceptor | None:
    """The server's authentication: `tokens` (the clients' at the controller, the internal ones at a node)
    and the client certificate names of `config`; None when neither is set."""
    names = _split_tokens(config.tls_client_names) if config.tls_client_auth else ()
    interceptor = AuthInterceptor(tokens, names, what)
    return interceptor if interceptor.active else None


_internal: dict[tuple[str, str], Tokens] = {}


def internal_tokens_of(config: SecurityConfig) -> Tokens:
    """The internal tokens `config` names (one Tokens per process and setting, shared by server and clients)."""
    key = (config.internal_token, config.internal_token_file)
    if key not in _internal:
        _internal[key] = Tokens(*key)
    return _internal[key]


def server_credentials(config: SecurityConfig) -> grpc.ServerCredentials | None:
    """TLS credentials that look at the certificate, key and CA files again before each handshake; None
    without TLS."""
    if not config.tls:
        return None
    paths = [config.tls_key_file, config.tls_cert_file] + ([config.tls_ca_file] if config.tls_ca_file else [])
    try:
        files = WatchedFiles(paths)
    except OSError as err:
        raise InvalidArgument("tls_cert_file", f"cannot read the TLS files: {err}") from err

    def configuration() -> grpc.ServerCertificateConfiguration:
        key, cert, *ca = files.contents
        return grpc.ssl_server_certificate_configuration([(key, cert)], ca[0] if ca else None)

    def fetch() -> grpc.ServerCertificateConfiguration | None:
        try:
            return configuration() if files.reload() else None
        except Exception:  # a half-written file: keep serving the current certificate
            log.exception("new TLS files could not be used; keeping the current certificate")
            return None

    return grpc.dynamic_ssl_server_credentials(configuration(), fetch, config.tls_client_auth)


class _Bearer:
    """Adds `authorization: Bearer <first token>` to a call's metadata."""

    def __init__(self, tokens: Tokens):
        self.tokens = tokens

    def _details(self, details):
        metadata = aio.Metadata(*(details.metadata or ()))
        metadata[AUTHORIZATION] = f"Bearer {self.tokens.first()}"
        return details._replace(metadata=metadata)


class _BearerUnaryUnary(_Bearer, aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, details, request):
        return await continuation(self._details(details), request)


class _BearerUnaryStream(_Bearer, aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, details, request):
        return await continuation(self._details(details), request)


class _BearerStreamUnary(_Bearer, aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation, details, request_iterator):
        return await continuation(self._details(details), request_iterator)


class _BearerStreamStream(_Bearer, aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation, details, request_iterator):
        return await continuation(self._details(details), request_iterator)


def bearer_interceptors(tokens: Tokens) -> list:
    """Client interceptors that send the first of `tokens` on every call of a channel (grpc.aio takes one
    interceptor object per kind of call)."""
    return [cls(tokens) for cls in (_BearerUnaryUnary, _BearerUnaryStream, _BearerStreamUnary, _BearerStreamStream)]


@dataclass(frozen=True)
class Peers:
    """How this process calls the drafters and verifiers: TLS or not, and the internal token."""

    tls: bool = False
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    server_name: str = ""
    tokens: Tokens | None = None
    _changes: list = field(default_factory=list, compare=False, repr=False)  # [WatchedFiles, changes so far]

    @classmethod
    def of(cls, config: SecurityConfig) -> Peers:
        tokens = internal_tokens_of(config)
        return cls(
            config.internal_tls,
            config.tls_ca_file,
            config.tls_cert_file,
            config.tls_key_file,
            config.internal_server_name,
            tokens if tokens else None,
        )

    def generation(self) -> int:
        """How often the CA, certificate or key files changed since the first call (stat at most once a
        second): a channel made at another generation presents an outdated certificate."""
        paths = [p for p in (self.ca_file, self.cert_file, self.key_file) if p] if self.tls else []
        if not paths:
            return 0
        if not self._changes:
            self._changes.extend([WatchedFiles(paths), 0])
        elif self._changes[0].reload():
            self._changes[1] += 1
        return self._changes[1]

    def credentials(self) -> grpc.ChannelCredentials:
        """Read now, so a channel made after a certificate renewal presents the new one."""

        def read(path: str) -> bytes | None:
            if not path:
                return None
            with open(path, "rb") as f:
                return f.read()

        return grpc.ssl_channel_credentials(read(self.ca_file), read(self.key_file), read(self.cert_file))

    def channel(self, address: str, options: Sequence[tuple[str, Any]]) -> aio.Channel:
        # The internal token; and, while tracing is on, the caller's trace context (serving/tracing.py).
        bearer = bearer_interceptors(self.tokens) if self.tokens else []
        interceptors = [*bearer, *tracing.client_interceptors()] or None
        if not self.tls:
            return aio.insecure_channel(address, options=options, interceptors=interceptors)
        options = [*options, *([("grpc.ssl_target_name_override", self.server_name)] if self.server_name else [])]
        return aio.secure_channel(address, self.credentials(), options=options, interceptors=interceptors)
