"""One call a service serves, whatever its protocol: an RPC (any service's gRPC port) or a request to the
controller's OpenAI-compatible HTTP API. `serving.observability.observed` watches every one of them the same
way (metrics, span, access line); this module only says what each protocol calls things (span names and
attributes follow OpenTelemetry's RPC and HTTP conventions).

Which calls get a span and an access line: RPCs of the eesd services get spans (health checks and reflection
do not), the controller's public RPCs (ControllerService) access lines; every HTTP request but `/health`
(the probes') gets both.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import grpc

TRACEPARENT, TRACESTATE = "traceparent", "tracestate"
TRACED_PREFIX = "/eesd."  # RPCs of the eesd services get spans; health checks and reflection do not
ACCESS_LOGGED = "/eesd.v1.ControllerService/"  # the RPCs that get an access line: the controller's public API
HTTP_UNLOGGED = frozenset({"/health"})  # probed every few seconds: metrics only
HTTP_CLIENT_GONE = 499  # nginx's "client closed request": the client hung up before the response ended
UNMATCHED_ROUTE = "none"  # the route label of a path the API does not serve (bounded label values)


def _carrier(pairs: Iterable[tuple[str, Any]]) -> dict[str, str]:
    """The W3C trace context among a call's headers or metadata."""
    return {k: v for k, v in pairs if k in (TRACEPARENT, TRACESTATE) and isinstance(v, str)}


@dataclass
class Call:
    """What the observers of a call read: its name, where it came from, its trace context, and the status it
    ended with (`status`, set by whoever serves it)."""

    peer: str = ""
    carrier: Mapping[str, str] = field(default_factory=dict)  # the W3C traceparent / tracestate it came with
    session: str = ""  # a session id the request named (client-chosen: bounded where it is written)
    traced: bool = False
    access_logged: bool = False
    status: Any = "UNKNOWN"
    protocol: ClassVar[str]

    @property
    def name(self) -> str:
        """How the access line names the call."""
        raise NotImplementedError

    @property
    def span_name(self) -> str:
        return self.name

    def span_attributes(self) -> dict[str, Any]:
        raise NotImplementedError

    def status_attributes(self) -> dict[str, Any]:
        """The span's attributes of the status the call ended with."""
        raise NotImplementedError

    @property
    def status_name(self) -> str:
        return str(getattr(self.status, "name", self.status))

    @property
    def failed(self) -> bool:
        """Whether the server failed it (its span's status is ERROR)."""
        raise NotImplementedError

    def client_gone(self) -> None:
        """The client went away before the call ended."""
        raise NotImplementedError


@dataclass
class GrpcCall(Call):
    protocol: ClassVar[str] = "grpc"
    method: str = ""  # "/eesd.v1.ControllerService/Generate"

    @classmethod
    def of(cls, method: str, context: Any = None, request: Any = None) -> GrpcCall:
        """`context`: the call's grpc.aio.ServicerContext; `request`: its message (a session_id is named)."""
        traced, access_logged = method.startswith(TRACED_PREFIX), method.startswith(ACCESS_LOGGED)
        peer, carrier = "", {}
        # Read only where used: every internal RPC of every round passes here.
        if context is not None and access_logged:
            with contextlib.suppress(Exception):  # a context whose call already ended has no peer
                peer = context.peer()
        if context is not None and traced:
            carrier = _carrier(context.invocation_metadata() or ())
        session = getattr(request, "session_id", "")
        return cls(
            peer=peer,
            carrier=carrier,
            session=session if isinstance(session, str) else "",
            traced=traced,
            access_logged=access_logged,
            method=method,
        )

    @property
    def service(self) -> str:
        return self.method.lstrip("/").rpartition("/")[0]

    @property
    def rpc(self) -> str:
        return self.method.rpartition("/")[2]

    @property
    def name(self) -> str:
        return self.rpc

    @property
    def span_name(self) -> str:
        return f"{self.service}/{self.rpc}"

    def span_attributes(self) -> dict[str, Any]:
        return {"rpc.system": "grpc", "rpc.service": self.service, "rpc.method": self.rpc}

    def status_attributes(self) -> dict[str, Any]:
        return {"rpc.grpc.status_code": self.status_name}

    @property
    def failed(self) -> bool:
        return self.status != grpc.StatusCode.OK

    def client_gone(self) -> None:
        self.status = grpc.StatusCode.CANCELLED


@dataclass
class HttpCall(Call):
    protocol: ClassVar[str] = "http"
    verb: str = "GET"
    route: str = UNMATCHED_ROUTE  # the API's path that served it ("none": a path it does not serve)
    scheme: str = "http"

    @classmethod
    def of(cls, scope: Mapping[str, Any], routes: Iterable[str]) -> HttpCall:
        """An ASGI HTTP `scope`; `routes`: the paths the API serves."""
        client = scope.get("client")
        headers = ((k.decode("latin-1"), v.decode("latin-1")) for k, v in scope.get("headers", ()))
        path = scope.get("path", "")
        route = path if path in routes else UNMATCHED_ROUTE
        return cls(
            peer=f"{client[0]}:{client[1]}" if client else "",
            carrier=_carrier(headers),
            traced=route not in HTTP_UNLOGGED,
            access_logged=route not in HTTP_UNLOGGED,
            verb=scope.get("method", "GET"),
            route=route,
            scheme=scope.get("scheme", "http"),
        )

    @property
    def name(self) -> str:
        return f"{self.verb} {self.route}"

    def span_attributes(self) -> dict[str, Any]:
        return {"http.request.method": self.verb, "http.route": self.route, "url.scheme": self.scheme}

    def status_attributes(self) -> dict[str, Any]:
        return {"http.response.status_code": self.status} if isinstance(self.status, int) else {}

    @property
    def failed(self) -> bool:
        # OpenTelemetry's rule for SERVER spans: a 4xx is the client's error, not the server's.
        return not isinstance(self.status, int) or self.status >= 500

    def client_gone(self) -> None:
        self.status = HTTP_CLIENT_GONE
