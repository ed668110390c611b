"""Discovery of drafter and verifier endpoints: static list, DNS, or the Kubernetes API.

All three share one interface: ``endpoints()`` returns the ready endpoints now, ``subscribe(cb)`` calls
``cb(endpoints)`` whenever that set changes, ``start()``/``stop()`` run and end the background refresh.
The module knows no gRPC: the controller decides what to do with an endpoint that appears or goes.

Kubernetes discovery watches EndpointSlices (discovery.k8s.io/v1) selected by label. Readiness comes from
the slice, so it is the pod's readiness probe (grpc.health.v1 SERVING, i.e. the model is loaded) that
admits a pod, and a terminating pod leaves the routing set as soon as it starts draining.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from serving.addresses import join_host_port, parse_addresses, split_host_port

log = logging.getLogger(__name__)

# The chart names the gRPC port of every role's Service "grpc"; EndpointSlice ports carry that name.
GRPC_PORT_NAME = "grpc"
# Links a slice to its Service (set by the EndpointSlice controller).
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
DISCOVERY_MODES = ("static", "dns", "kubernetes")


@dataclass(frozen=True, order=True)
class Endpoint:
    """One drafter or verifier process: ``address`` is host:port, ``pod`` is empty when not known."""

    address: str
    ready: bool = True
    pod: str = ""


Callback = Callable[[list[Endpoint]], None]


def _as_api_dict(obj: Any) -> Mapping[str, Any]:
    """API JSON as a dict; kubernetes client model objects are serialised to the same camelCase shape."""
    if isinstance(obj, Mapping):
        return obj
    from kubernetes.client import ApiClient

    return ApiClient().sanitize_for_serialization(obj)


def _endpoint_ready(conditions: Mapping[str, Any]) -> bool:
    # The API says an unset `ready` means ready; a terminating endpoint is never ready for new work,
    # even while it still serves (drains) the sessions it has.
    return conditions.get("ready") is not False and conditions.get("terminating") is not True


def slice_endpoints(endpoint_slice: Any, port_name: str = GRPC_PORT_NAME) -> list[Endpoint]:
    """Every endpoint of one EndpointSlice, ready or not, as host:port of the named port.

    A slice without that port (or, when it has a single unnamed port, that one) yields nothing: its
    addresses are not reachable on the port we speak.
    """
    es = _as_api_dict(endpoint_slice)
    if es.get("addressType", "IPv4") not in ("IPv4", "IPv6"):
        return []  # FQDN slices are not produced for selector-based Services
    ports = es.get("ports") or []
    named = [p for p in ports if p.get("name") == port_name]
    if not named and len(ports) == 1 and not ports[0].get("name"):
        named = ports
    if not named or named[0].get("port") is None:
        return []
    port = int(named[0]["port"])
    out = []
    for ep in es.get("endpoints") or []:
        ready = _endpoint_ready(ep.get("conditions") or {})
        pod = (ep.get("targetRef") or {}).get("name", "")
        # Kubernetes fills one address per endpoint today; the list form allows more.
        out.extend(Endpoint(join_host_port(ip, port), ready, pod) for ip in ep.get("addresses") or [])
    return out


def ready_endpoints(slices: Iterable[Any], port_name: str = GRPC_PORT_NAME) -> list[Endpoint]:
    """The routing set of a group of EndpointSlices: ready endpoints, deduplicated, sorted.

    During slice rebalancing one pod may appear in two slices for a moment; it counts once, ready if
    any slice says so.
    """
    by_address: dict[str, Endpoint] = {}
    for endpoint_slice in slices:
        for ep in slice_endpoints(endpoint_slice, port_name):
            seen = by_address.get(ep.address)
            if seen is None or (ep.ready and not seen.ready):
                by_address[ep.address] = ep
    return sorted(ep for ep in by_address.values() if ep.ready)


class _Discovery:
    """Holds the current ready set under a lock and notifies subscribers when it changes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._endpoints: list[Endpoint] = []
        self._callbacks: list[Callback] = []

    def endpoints(self) -> list[Endpoint]:
        with self._lock:
            return list(self._endpoints)

    def subscribe(self, callback: Callback) -> None:
        """``callback(endpoints)`` runs on the refresh thread after every change of the ready set."""
        with self._lock:
            self._callbacks.append(callback)

    def _publish(self, endpoints: list[Endpoint]) -> None:
        endpoints = sorted(endpoints)
        with self._lock:
            if endpoints == self._endpoints:
                return
            self._endpoints = endpoints
            callbacks = list(self._callbacks)
        log.info("%s: %d ready endpoint(s): %s", type(self).__name__, len(endpoints), endpoints)
        for callback in callbacks:
            try:
                callback(list(endpoints))
            except Exception:  # a broken subscriber must not stop discovery for the others
                log.exception("discovery subscriber failed")

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError


class StaticDiscovery(_Discovery):
    """A fixed list of host:port addresses (the `--drafters`/`--verifiers` flags), all taken as ready."""

    def __init__(self, addresses: str | Iterable[str]) -> None:
        super().__init__()
        self._endpoints = sorted(Endpoint(a) for a in parse_addresses(addresses))

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass


Resolver = Callable[..., list[tuple[Any, ...]]]


class _Poller(_Discovery):
    """A discovery refreshed by a daemon thread every `interval_s` until stop()."""

    def __init__(self, interval_s: float) -> None:
        super().__init__()
        self._interval_s = interval_s
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._stopped.clear()
            self._thread = threading.Thread(target=self._run, name=type(self).__name__, daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def _run(self) -> None:
        raise NotImplementedError


class DnsDiscovery(_Poller):
    """Resolves each host:port (typically a headless Service name) every `interval_s` seconds.

    A headless Service's DNS record lists the ready pods only, so every resolved address counts as ready.
    A failed lookup keeps the last known set: a DNS hiccup must not empty the routing table.
    """

    def __init__(
        self, addresses: str | Iterable[str], interval_s: float = 5.0, resolve: Resolver = socket.getaddrinfo
    ) -> None:
        super().__init__(interval_s)
        self._targets = [split_host_port(a) for a in parse_addresses(addresses)]
        self._resolve = resolve
        self.refresh()

    def refresh(self) -> None:
        found: set[Endpoint] = set()
        for host, port in self._targets:
            try:
                infos = self._resolve(host, port, type=socket.SOCK_STREAM)
            except OSError as err:
                log.warning("DNS lookup of %s failed, keeping the last known endpoints: %s", host, err)
                return
            found.update(Endpoint(join_host_port(info[4][0], port)) for info in infos)
        self._publish(list(found))

    def _run(self) -> None:
        while not self._stopped.wait(self._interval_s):
            self.refresh()


class KubernetesDiscovery(_Poller):
    """Lists, then watches, the EndpointSlices matching `selector` in `namespace`.

    The watch resumes from the last resourceVersion seen (events, bookmarks); when the API answers 410
    Gone (that version was compacted) or the stream fails, it lists again. Until the first list succeeds,
    `endpoints()` answers from `fallback` (the flag/DNS addresses); after that the API is the truth, and
    an API outage keeps the last known set.
    """

    def __init__(
        self,
        namespace: str,
        selector: str,
        api_client: Any = None,
        port_name: str = GRPC_PORT_NAME,
        fallback: _Discovery | None = None,
        watch_timeout_s: int = 300,
        retry_s: float = 2.0,
    ) -> None:
        super().__init__(retry_s)
        from kubernetes import client, config

        if api_client is None:
            try:
                config.load_incluster_config()
            except config.ConfigException:
                config.load_kube_config()
            api_client = client.ApiClient()
        self._api = client.DiscoveryV1Api(api_client)
        self._namespace = namespace
        self._selector = selector
        self._port_name = port_name
        self._fallback = fallback
        self._watch_timeout_s = watch_timeout_s
        self._synced = threading.Event()
        self._slices: dict[str, Mapping[str, Any]] = {}  # slice name -> slice as API JSON
        self._watch: Any = None

    def endpoints(self) -> list[Endpoint]:
        if not self._synced.is_set() and self._fallback is not None:
            return self._fallback.endpoints()
        return super().endpoints()

    def start(self) -> None:
        if self._fallback is not None:
            self._fallback.start()
        super().start()

    def stop(self) -> None:
        self._stopped.set()
        if self._watch is not None:
            self._watch.stop()  # unblocks the read of the open watch stream
        super().stop()
        if self._fallback is not None:
            self._fallback.stop()

    def list_slices(self) -> str:
        """Replaces the known slices with a fresh list; returns the list's resourceVersion."""
        result = self._api.list_namespaced_endpoint_slice(self._namespace, label_selector=self._selector)
        self._slices = {item.metadata.name: _as_api_dict(item) for item in result.items or []}
        self._synced.set()
        self._publish(ready_endpoints(self._slices.values(), self._port_name))
        return result.metadata.resource_version

    def apply_event(self, event_type: str, raw_object: Mapping[str, Any]) -> None:
        """One watch event (type, object as API JSON) applied to the known slices."""
        name = raw_object["metadata"]["name"]
        if event_type == "DELETED":
            self._slices.pop(name, None)
        elif event_type in ("ADDED", "MODIFIED"):
            self._slices[name] = raw_object
        else:
            return
        self._publish(ready_endpoints(self._slices.values(), self._port_name))

    def _watch_from(self, resource_version: str) -> str:
        """Follows one watch stream until the server closes it; returns the last resourceVersion."""
        from kubernetes import watch

        self._watch = watch.Watch()
        stream = self._watch.stream(
            self._api.list_namespaced_endpoint_slice,
            self._namespace,
            label_selector=self._selector,
            resource_version=resource_version,
            allow_watch_bookmarks=True,
            timeout_seconds=self._watch_timeout_s,
            # A silent dead connection must not hang us forever: read timeout past the server's own.
            _request_timeout=(10, self._watch_timeout_s + 30),
        )
        for event in stream:
            raw = event["raw_object"]
            resource_version = raw.get("metadata", {}).get("resourceVersion") or resource_version
            self.apply_event(event["type"], raw)
        return resource_version

    def _run(self) -> None:
        from kubernetes.client.exceptions import ApiException

        resource_version = None
        while not self._stopped.is_set():
            try:
                if resource_version is None:
                    resource_version = self.list_slices()
                resource_version = self._watch_from(resource_version)
            except ApiException as err:
                if err.status != 410:
                    log.warning("EndpointSlice watch failed (%s), listing again", err.status)
                    self._stopped.wait(self._interval_s)
                resource_version = None  # 410 Gone: our version was compacted, list again now
            except Exception as err:  # connection reset, timeout: keep the last set, retry
                if self._stopped.is_set():
                    return
                log.warning("EndpointSlice watch interrupted (%s), listing again", err)
                resource_version = None
                self._stopped.wait(self._interval_s)


def make_discovery(
    mode: str,
    addresses: str = "",
    namespace: str = "",
    selector: str = "",
    port_name: str = GRPC_PORT_NAME,
) -> _Discovery:
    """The discovery the controller config asks for (`--discovery`, `--drafters`, `--drafter-selector`).

    In `kubernetes` mode the addresses, when given, are resolved by DNS as the fallback used until the
    API has answered, and instead of the API when no Kubernetes credentials are found.
    """
    if mode not in DISCOVERY_MODES:
        raise ValueError(f"discovery must be one of {DISCOVERY_MODES}, got {mode!r}")
    if mode == "static":
        return StaticDiscovery(addresses)
    fallback = DnsDiscovery(addresses) if parse_addresses(addresses) else None
    if mode == "dns":
        if fallback is None:
            raise ValueError("dns discovery needs at least one host:port address")
        return fallback
    if not namespace or not selector:
        raise ValueError("kubernetes discovery needs a namespace and a label selector")
    from kubernetes.config import ConfigException

    try:
        return KubernetesDiscovery(namespace, selector, port_name=port_name, fallback=fallback)
    except ConfigException as err:
        if fallback is None:
            raise
        log.warning("no Kubernetes credentials (%s): discovering by DNS instead", err)
        return fallback
