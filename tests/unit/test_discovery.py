"""Discovery of drafter/verifier endpoints: static, DNS, and the Kubernetes API.

No Kubernetes API server can run on these machines, so the Kubernetes tests stand one in: a small HTTP
server on 127.0.0.1 that answers the two requests the `kubernetes` client makes for EndpointSlices (list,
and a chunked watch stream) with objects shaped exactly as kube-apiserver returns them (metadata,
ownerReferences, the labels the EndpointSlice controller copies from the Service, `conditions`,
`targetRef`, named ports, watch events, the 410 Gone Status). Everything on our side of the socket is
real: the kubernetes client, its Watch, and controller.discovery.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import pytest
from kubernetes import client

from controller.discovery import (
    DnsDiscovery,
    Endpoint,
    KubernetesDiscovery,
    StaticDiscovery,
    make_discovery,
    ready_endpoints,
    slice_endpoints,
)

NAMESPACE = "llm"
SELECTOR = "app.kubernetes.io/component=drafter,app.kubernetes.io/instance=eesd"
SLICES_PATH = f"/apis/discovery.k8s.io/v1/namespaces/{NAMESPACE}/endpointslices"


def pod_endpoint(ip: str, pod: str, ready: bool = True, terminating: bool = False) -> dict:
    return {
        "addresses": [ip],
        "conditions": {"ready": ready, "serving": ready or terminating, "terminating": terminating},
        "targetRef": {"kind": "Pod", "namespace": NAMESPACE, "name": pod, "uid": f"uid-{pod}"},
        "nodeName": "gpu-node-1",
        "zone": "zone-a",
    }


def endpoint_slice(name: str, endpoints: list[dict], port: int = 50061, rv: str = "1") -> dict:
    """An EndpointSlice as GET /apis/discovery.k8s.io/v1 returns it for the chart's headless Service."""
    return {
        "kind": "EndpointSlice",
        "apiVersion": "discovery.k8s.io/v1",
        "metadata": {
            "name": name,
            "generateName": "eesd-drafter-",
            "namespace": NAMESPACE,
            "uid": f"uid-{name}",
            "resourceVersion": rv,
            "generation": 1,
            "creationTimestamp": "2025-01-01T00:00:00Z",
            "labels": {
                "app.kubernetes.io/component": "drafter",
                "app.kubernetes.io/instance": "eesd",
                "app.kubernetes.io/name": "eesd",
                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
                "kubernetes.io/service-name": "eesd-drafter",
                "service.kubernetes.io/headless": "",
            },
            "annotations": {"endpoints.kubernetes.io/last-change-trigger-time": "2025-01-01T00:00:00Z"},
            "ownerReferences": [
                {
                    "apiVersion": "v1",
                    "kind": "Service",
                    "name": "eesd-drafter",
                    "uid": "uid-svc",
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
        },
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": [{"name": "grpc", "protocol": "TCP", "port": port, "appProtocol": "grpc"}],
    }


# ---------------------------------------------------------------- the pure function


def test_slice_endpoints_reads_readiness_port_and_pod():
    es = endpoint_slice(
        "s1",
        [
            pod_endpoint("10.0.0.1", "drafter-a"),
            pod_endpoint("10.0.0.2", "drafter-b", ready=False),
            pod_endpoint("10.0.0.3", "drafter-c", ready=False, terminating=True),
        ],
    )
    assert slice_endpoints(es) == [
        Endpoint("10.0.0.1:50061", True, "drafter-a"),
        Endpoint("10.0.0.2:50061", False, "drafter-b"),
        Endpoint("10.0.0.3:50061", False, "drafter-c"),
    ]
    assert ready_endpoints([es]) == [Endpoint("10.0.0.1:50061", True, "drafter-a")]


def test_terminating_endpoint_is_not_ready_even_when_ready_unset():
    ep = pod_endpoint("10.0.0.1", "a")
    ep["conditions"] = {"serving": True, "terminating": True}
    assert ready_endpoints([endpoint_slice("s", [ep])]) == []
    ep["conditions"] = {}  # unset `ready` means ready (API contract)
    assert ready_endpoints([endpoint_slice("s", [ep])]) == [Endpoint("10.0.0.1:50061", True, "a")]


def test_slice_without_the_grpc_port_yields_nothing_and_ipv6_is_bracketed():
    es = endpoint_slice("s", [pod_endpoint("10.0.0.1", "a")])
    es["ports"] = [{"name": "metrics", "protocol": "TCP", "port": 9101}]
    assert slice_endpoints(es) == []
    v6 = endpoint_slice("s6", [pod_endpoint("fd00::1", "a")])
    v6["addressType"] = "IPv6"
    assert slice_endpoints(v6) == [Endpoint("[fd00::1]:50061", True, "a")]


def test_duplicate_across_slices_counts_once_ready_if_any_says_so():
    a = endpoint_slice("s1", [pod_endpoint("10.0.0.1", "a", ready=False)])
    b = endpoint_slice("s2", [pod_endpoint("10.0.0.1", "a")])
    assert ready_endpoints([a, b]) == [Endpoint("10.0.0.1:50061", True, "a")]


def test_client_model_objects_give_the_same_result_as_api_json():
    es = endpoint_slice("s1", [pod_endpoint("10.0.0.1", "a"), pod_endpoint("10.0.0.2", "b", ready=False)])
    model = client.ApiClient().deserialize(json.dumps(es), "V1EndpointSlice", "application/json")
    assert isinstance(model, client.V1EndpointSlice)
    assert slice_endpoints(model) == slice_endpoints(es)


# ---------------------------------------------------------------- static and DNS


def test_static_discovery_parses_flag_list():
    d = StaticDiscovery("drafter-0:50061, 10.1.2.3:50061")
    assert [e.address for e in d.endpoints()] == ["10.1.2.3:50061", "drafter-0:50061"]
    with pytest.raises(ValueError, match="host:port"):
        StaticDiscovery("no-port")


def test_dns_discovery_resolves_and_follows_changes():
    answers = {"eesd-drafter": ["10.0.0.1", "10.0.0.2"]}

    def resolve(host, port, type):  # socket.getaddrinfo's shape: (family, type, proto, canon, sockaddr)
        if host not in answers:
            raise OSError("Name or service not known")
        return [(2, type, 6, "", (ip, port)) for ip in answers[host]]

    d = DnsDiscovery("eesd-drafter:50061", resolve=resolve)
    seen = []
    d.subscribe(seen.append)
    assert [e.address for e in d.endpoints()] == ["10.0.0.1:50061", "10.0.0.2:50061"]
    answers["eesd-drafter"] = ["10.0.0.2"]
    d.refresh()
    assert seen == [[Endpoint("10.0.0.2:50061")]]
    del answers["eesd-drafter"]  # lookup failure keeps the last known set
    d.refresh()
    assert d.endpoints() == [Endpoint("10.0.0.2:50061")]
    assert len(seen) == 1


def test_dns_discovery_real_resolver_on_localhost():
    d = DnsDiscovery("localhost:50061")
    assert {e.address for e in d.endpoints()} & {"127.0.0.1:50061", "[::1]:50061"}


def test_make_discovery_modes():
    assert isinstance(make_discovery("static", "a:1"), StaticDiscovery)
    assert isinstance(make_discovery("dns", "localhost:1"), DnsDiscovery)
    with pytest.raises(ValueError, match="discovery must be one of"):
        make_discovery("consul", "a:1")
    with pytest.raises(ValueError, match="namespace"):
        make_discovery("kubernetes", "a:1")


# ---------------------------------------------------------------- Kubernetes API


class FakeApiServer:
    """List and watch of EndpointSlices in one namespace, answered as kube-apiserver answers them."""

    def __init__(self) -> None:
        self.slices: dict[str, dict] = {}
        self.resource_version = 100
        self.events: queue.Queue = queue.Queue()
        self.requests: list[dict] = []
        self.closing = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                url = urlparse(self.path)
                query = {k: v[0] for k, v in parse_qs(url.query).items()}
                server.requests.append(query)
                assert url.path == SLICES_PATH, url.path
                assert query["labelSelector"] == SELECTOR
                if query.get("watch") == "true":
                    self.watch()
                else:
                    self.send_json(server.list_body())

            def send_json(self, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def chunk(self, data: bytes) -> None:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                self.wfile.flush()

            def watch(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                while not server.closing.is_set():
                    try:
                        item = server.events.get(timeout=0.05)
                    except queue.Empty:
                        continue
                    if item == "close":  # the server-side timeoutSeconds ran out
                        break
                    self.chunk(json.dumps(item).encode() + b"\n")
                    if item["type"] == "ERROR":
                        break
                self.chunk(b"")

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def list_body(self) -> dict:
        return {
            "kind": "EndpointSliceList",
            "apiVersion": "discovery.k8s.io/v1",
            "metadata": {"resourceVersion": str(self.resource_version)},
            "items": list(self.slices.values()),
        }

    def change(self, event_type: str, es: dict) -> None:
        """Applies a change to the stored slices and emits its watch event."""
        self.resource_version += 1
        es["metadata"]["resourceVersion"] = str(self.resource_version)
        if event_type == "DELETED":
            self.slices.pop(es["metadata"]["name"])
        else:
            self.slices[es["metadata"]["name"]] = es
        self.events.put({"type": event_type, "object": es})

    def gone(self) -> None:
        self.events.put(
            {
                "type": "ERROR",
                "object": {
                    "kind": "Status",
                    "apiVersion": "v1",
                    "metadata": {},
                    "status": "Failure",
                    "message": "too old resource version: 101 (150)",
                    "reason": "Expired",
                    "code": 410,
                },
            }
        )

    def shutdown(self) -> None:
        self.closing.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def api():
    server = FakeApiServer()
    yield server
    server.shutdown()


def discovery_for(api: FakeApiServer, **kwargs) -> KubernetesDiscovery:
    cfg = client.Configuration(host=api.url)
    return KubernetesDiscovery(NAMESPACE, SELECTOR, api_client=client.ApiClient(cfg), retry_s=0.05, **kwargs)


def wait_for(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def addresses(d) -> list[str]:
    return [e.address for e in d.endpoints()]


def test_kubernetes_discovery_follows_slices_added_unready_and_removed(api):
    api.slices["eesd-drafter-abc"] = endpoint_slice(
        "eesd-drafter-abc", [pod_endpoint("10.0.0.1", "d-1"), pod_endpoint("10.0.0.2", "d-2", ready=False)]
    )
    d = discovery_for(api)
    changes: list[list[Endpoint]] = []
    d.subscribe(changes.append)
    d.start()
    try:
        # Listed: the pod still loading its model (not ready) is not routed to.
        wait_for(lambda: addresses(d) == ["10.0.0.1:50061"])
        assert d.endpoints()[0].pod == "d-1"
        assert d.endpoints()[0].ready
        # The watch starts at the list's resourceVersion.
        wait_for(lambda: any(r.get("watch") == "true" for r in api.requests))
        watch_request = next(r for r in api.requests if r.get("watch") == "true")
        assert watch_request["resourceVersion"] == "100"
        assert watch_request["allowWatchBookmarks"] == "true"

        # d-2 finished loading.
        api.change(
            "MODIFIED",
            endpoint_slice("eesd-drafter-abc", [pod_endpoint("10.0.0.1", "d-1"), pod_endpoint("10.0.0.2", "d-2")]),
        )
        wait_for(lambda: addresses(d) == ["10.0.0.1:50061", "10.0.0.2:50061"])
        # A second slice appears (scale-out past the slice size).
        api.change("ADDED", endpoint_slice("eesd-drafter-xyz", [pod_endpoint("10.0.0.3", "d-3")]))
        wait_for(lambda: len(d.endpoints()) == 3)
        # d-1 is being deleted: terminating, no longer ready.
        api.change(
            "MODIFIED",
            endpoint_slice(
                "eesd-drafter-abc",
                [
                    pod_endpoint("10.0.0.1", "d-1", ready=False, terminating=True),
                    pod_endpoint("10.0.0.2", "d-2"),
                ],
            ),
        )
        wait_for(lambda: addresses(d) == ["10.0.0.2:50061", "10.0.0.3:50061"])
        # The second slice is removed.
        api.change("DELETED", api.slices["eesd-drafter-xyz"])
        wait_for(lambda: addresses(d) == ["10.0.0.2:50061"])
    finally:
        d.stop()
    assert [[e.address for e in c] for c in changes] == [
        ["10.0.0.1:50061"],
        ["10.0.0.1:50061", "10.0.0.2:50061"],
        ["10.0.0.1:50061", "10.0.0.2:50061", "10.0.0.3:50061"],
        ["10.0.0.2:50061", "10.0.0.3:50061"],
        ["10.0.0.2:50061"],
    ]


def test_kubernetes_discovery_resumes_after_timeout_and_relists_after_410(api):
    api.slices["s1"] = endpoint_slice("s1", [pod_endpoint("10.0.0.1", "d-1")])
    d = discovery_for(api)
    d.start()
    try:
        wait_for(lambda: addresses(d) == ["10.0.0.1:50061"])
        api.change(
            "MODIFIED",
            endpoint_slice("s1", [pod_endpoint("10.0.0.1", "d-1"), pod_endpoint("10.0.0.2", "d-2")]),
        )
        wait_for(lambda: len(d.endpoints()) == 2)
        # The server ends the watch (timeoutSeconds): resume from the last event's resourceVersion.
        api.events.put("close")
        wait_for(lambda: sum(r.get("watch") == "true" for r in api.requests) == 2)
        watches = [r for r in api.requests if r.get("watch") == "true"]
        assert watches[1]["resourceVersion"] == "101"
        lists_before = sum(r.get("watch") != "true" for r in api.requests)
        assert lists_before == 1

        # Changes happen that the watch never reports, then the server says 410 Gone: list again.
        api.slices = {"s9": endpoint_slice("s9", [pod_endpoint("10.0.0.9", "d-9")])}
        api.resource_version = 150
        api.gone()
        wait_for(lambda: addresses(d) == ["10.0.0.9:50061"])
        assert sum(r.get("watch") != "true" for r in api.requests) == 2
        wait_for(lambda: [r for r in api.requests if r.get("watch") == "true"][-1]["resourceVersion"] == "150")
    finally:
        d.stop()


def test_kubernetes_discovery_answers_from_fallback_until_first_list(api):
    fallback = StaticDiscovery("eesd-drafter:50061")
    d = discovery_for(api, fallback=fallback)
    assert addresses(d) == ["eesd-drafter:50061"]  # the API has not answered yet
    api.slices["s1"] = endpoint_slice("s1", [pod_endpoint("10.0.0.1", "d-1", ready=False)])
    d.start()
    try:
        # Once listed, the API is the truth, even when it says nothing is ready yet.
        wait_for(lambda: addresses(d) == [])
        api.change("MODIFIED", endpoint_slice("s1", [pod_endpoint("10.0.0.1", "d-1")]))
        wait_for(lambda: addresses(d) == ["10.0.0.1:50061"])
    finally:
        d.stop()


def test_stop_ends_the_watch_thread(api):
    d = discovery_for(api)
    d.start()
    wait_for(lambda: any(r.get("watch") == "true" for r in api.requests))
    thread = d._thread
    d.stop()
    assert thread is not None and not thread.is_alive()
