"""The controller's OpenAI-compatible HTTP port in the chart: a container port and a Service port named
http (controller.config.httpPort, 8000 by default), reachable through the NetworkPolicy like the gRPC port,
and none of them when it is 0."""

from deploy_helpers import Release, release_for


def http_ports(release: Release) -> tuple[list, list, list]:
    (container,) = release.pod_spec("controller")["containers"]
    service = release.component("Service", "controller")
    policy = release.component("NetworkPolicy", "controller")
    return (
        [p["containerPort"] for p in container["ports"] if p["name"] == "http"],
        [(p["port"], p["targetPort"]) for p in service["spec"]["ports"] if p["name"] == "http"],
        [p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]],
    )


def test_the_http_api_has_its_ports_by_default():
    release = release_for(None)
    assert release.config("controller")["EESD_HTTP_PORT"] == "8000"
    containers, services, allowed = http_ports(release)
    assert containers == [8000] and services == [(8000, "http")] and 8000 in allowed


def test_http_port_zero_turns_it_off():
    release = Release({"controller": {"config": {"httpPort": 0}}})
    assert http_ports(release)[:2] == ([], []) and 8000 not in http_ports(release)[2]
    assert release.config("controller")["EESD_HTTP_PORT"] == "0"
