"""A whole stack with TLS, mutual TLS and tokens on (certificates made by the test): the SDK generates the
model's greedy output through it, and plain-text, certificate-less, foreign, wrong-identity, token-less and
wrong-token calls are refused. The controller, the drafter and the verifier serve TLS, require client
certificates of the test CA, and the nodes accept only the services' own certificate and the internal token.
The load generator reaches the controller through both its ports, gRPC and HTTPS (the OpenAI API), with the
same TLS and token options."""

import json
import time

import grpc
import pytest
from eesd_client import AsyncEesdClient, EesdClient, RetryPolicy, TlsConfig, UnauthenticatedError, UnavailableError
from grpc_health.v1 import health_pb2, health_pb2_grpc

from eesd_proto.eesd.v1 import (
    controller_pb2,
    controller_pb2_grpc,
    drafter_pb2,
    drafter_pb2_grpc,
    verifier_pb2,
    verifier_pb2_grpc,
)
from loadtest.__main__ import main as loadtest_main
from serving.local_stack import StackSecurity, free_port
from tests.e2e.helpers import log_tails, oracle, start_stack, stop_stack
from tests.tls import SERVICE_NAME, make_pki

CLIENT_TOKEN, INTERNAL_TOKEN = "client-token-1", "internal-token-1"
ONCE = RetryPolicy(max_attempts=1)


@pytest.fixture(scope="module")
def secure_stack(tiny_models, tmp_path_factory):
    pki = make_pki(tmp_path_factory.mktemp("pki"))
    security = StackSecurity(
        cert_file=str(pki.service_cert),
        key_file=str(pki.service_key),
        ca_file=str(pki.ca),
        server_name=SERVICE_NAME,
        client_auth=True,
        node_client_names=SERVICE_NAME,
        internal_token=f"{INTERNAL_TOKEN},internal-token-0",
        auth_token=f"old-client-token,{CLIENT_TOKEN}",
    )
    logs = tmp_path_factory.mktemp("secure-stack-logs")
    stack = start_stack(tiny_models["llama"], 1, logs, security=security, http_port=free_port())
    try:
        wait_for_drafting(stack, pki)
    except BaseException:
        stop_stack(stack)
        raise
    yield stack, pki
    stop_stack(stack)


def wait_for_drafting(stack, pki, timeout_s: float = 60.0) -> None:
    """Until the controller drafts: its health probes of the nodes (TLS, once a second) may see them SERVING
    a moment after the stack's own start-up checks did, and until then rounds run verifier-only."""
    deadline = time.monotonic() + timeout_s
    with EesdClient(stack.controller_address, tls=client_tls(pki), auth_token=CLIENT_TOKEN, timeout=60) as client:
        while True:
            result = client.generate_text([1, 2, 3], max_new_tokens=2, policy="fixed", k_max=2, stop_on_eos=False)
            if result.stats.speculation.drafted > 0:
                return
            assert time.monotonic() < deadline, "the controller never drafted: " + log_tails(stack)
            time.sleep(0.5)


def client_tls(pki, cert: bool = True) -> TlsConfig:
    if not cert:
        return TlsConfig.from_files(pki.ca, server_name_override=SERVICE_NAME)
    return TlsConfig.from_files(pki.ca, pki.client_key, pki.client_cert, SERVICE_NAME)


def test_the_sdk_generates_through_tls_and_tokens(secure_stack, tiny_models) -> None:
    stack, pki = secure_stack
    prompt = [11, 12, 13, 14]
    expected = oracle(tiny_models["llama"], prompt, 10)
    for token in (CLIENT_TOKEN, "old-client-token"):  # both tokens of the list work: rotation
        with EesdClient(stack.controller_address, tls=client_tls(pki), auth_token=token, timeout=120) as client:
            result = client.generate_text(prompt, max_new_tokens=10, policy="fixed", k_max=3, stop_on_eos=False)
        assert result.token_ids == expected
        # The drafter took part: the controller reached it, and it reached the verifier, with TLS and the token.
        assert result.stats.speculation.drafted > 0


def test_the_async_sdk_over_tls(secure_stack, tiny_models) -> None:
    import asyncio

    stack, pki = secure_stack
    prompt = [5, 6, 7]

    async def main():
        async with AsyncEesdClient(
            stack.controller_address, tls=client_tls(pki), auth_token=CLIENT_TOKEN, timeout=120
        ) as client:
            return await client.generate_text(prompt, max_new_tokens=6, stop_on_eos=False)

    assert asyncio.run(main()).token_ids == oracle(tiny_models["llama"], prompt, 6)


def test_the_controller_refuses_wrong_tokens_and_missing_certificates(secure_stack) -> None:
    stack, pki = secure_stack
    for token in (None, "wrong-token"):
        with EesdClient(stack.controller_address, tls=client_tls(pki), auth_token=token, retry=ONCE) as client:
            with pytest.raises(UnauthenticatedError):
                client.generate_text([1, 2, 3], max_new_tokens=2)
    # mutual TLS: a client without a certificate does not get a connection
    with EesdClient(
        stack.controller_address, tls=client_tls(pki, cert=False), auth_token=CLIENT_TOKEN, retry=ONCE, timeout=10
    ) as client:
        with pytest.raises(UnavailableError):
            client.generate_text([1, 2, 3], max_new_tokens=2)
    # plain text to the TLS port: no connection either
    with EesdClient(stack.controller_address, auth_token=CLIENT_TOKEN, retry=ONCE, timeout=10) as client:
        with pytest.raises(UnavailableError):
            client.generate_text([1, 2, 3], max_new_tokens=2)


def node_channel(address: str, pki, cert, key) -> grpc.Channel:
    credentials = grpc.ssl_channel_credentials(
        pki.ca.read_bytes(), key.read_bytes() if key else None, cert.read_bytes() if cert else None
    )
    return grpc.secure_channel(address, credentials, [("grpc.ssl_target_name_override", SERVICE_NAME)])


def node_calls(stack):
    """(address, a call that needs authentication) for the drafter and the verifier."""
    drafter, verifier = stack.by_role("drafter")[0], stack.by_role("verifier")[0]
    return [
        (
            drafter.address,
            lambda ch, md: drafter_pb2_grpc.DrafterServiceStub(ch).GetModelIdentity(
                drafter_pb2.DrafterServiceGetModelIdentityRequest(), metadata=md, timeout=10
            ),
        ),
        (
            verifier.address,
            lambda ch, md: verifier_pb2_grpc.VerifierServiceStub(ch).GetModelIdentity(
                verifier_pb2.VerifierServiceGetModelIdentityRequest(), metadata=md, timeout=10
            ),
        ),
    ]


def test_nodes_accept_only_the_internal_token_and_the_services_certificate(secure_stack) -> None:
    stack, pki = secure_stack
    good = (("authorization", f"Bearer {INTERNAL_TOKEN}"),)
    for address, call in node_calls(stack):
        with node_channel(address, pki, pki.service_cert, pki.service_key) as channel:
            assert call(channel, good).identity.model_type  # the controller's way in
            for metadata in ((), (("authorization", "Bearer wrong"),), (("authorization", f"Bearer {CLIENT_TOKEN}"),)):
                with pytest.raises(grpc.RpcError) as refused:
                    call(channel, metadata)
                assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED, address
            # Probes need no token.
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert health.status == health_pb2.HealthCheckResponse.SERVING
        # A certificate of the CA with another identity (a client's), even with the token: UNAUTHENTICATED.
        with node_channel(address, pki, pki.client_cert, pki.client_key) as channel:
            with pytest.raises(grpc.RpcError) as wrong_identity:
                call(channel, good)
            assert wrong_identity.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # Another CA's certificate, no certificate, plain text: no connection.
        for cert, key in ((pki.foreign_cert, pki.foreign_key), (None, None)):
            with node_channel(address, pki, cert, key) as channel:
                with pytest.raises(grpc.RpcError) as refused:
                    call(channel, good)
                assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        with grpc.insecure_channel(address) as channel:
            with pytest.raises(grpc.RpcError) as plain:
                call(channel, good)
            assert plain.value.code() == grpc.StatusCode.UNAVAILABLE


def test_get_session_and_cancel_need_the_token(secure_stack) -> None:
    stack, pki = secure_stack
    with node_channel(stack.controller_address, pki, pki.client_cert, pki.client_key) as channel:
        stub = controller_pb2_grpc.ControllerServiceStub(channel)
        for method, request in (
            (stub.GetSession, controller_pb2.GetSessionRequest(session_id="s-1")),
            (stub.Cancel, controller_pb2.CancelRequest(session_id="s-1")),
        ):
            with pytest.raises(grpc.RpcError) as refused:
                method(request, timeout=10)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED


LOAD_REQUESTS, LOAD_TOKENS = 4, 8


def run_loadtest(stack, pki, out, protocol: str, token: str | None, name: str, *extra: str) -> dict:
    """loadtest over `protocol` with the client certificate of the test CA (mutual TLS), the CA, and the name the
    service certificate carries (the target is an IP address); its report."""
    target = f"https://127.0.0.1:{stack.http_port}" if protocol == "http" else stack.controller_address
    prompts = out / "prompts.jsonl"
    prompts.write_text('{"prompt": [11, 12, 13, 14]}\n[5, 6, 7, 8, 9]\n')
    argv = ["--target", target, "--protocol", protocol, "--tls-ca-file", str(pki.ca), "--tls-server-name", SERVICE_NAME]
    argv += ["--tls-cert-file", str(pki.client_cert), "--tls-key-file", str(pki.client_key)]
    argv += ["--auth-token", token] if token else []
    argv += ["--metrics-urls", ",".join(n.metrics_url for n in stack.nodes if n.metrics_port), "--warmup", "0"]
    argv += ["--concurrency", "2", "--requests", str(LOAD_REQUESTS), "--max-new-tokens", str(LOAD_TOKENS)]
    argv += ["--policy", "fixed", "--k-max", "3", "--prompts", str(prompts), "--out", str(out), "--name", name]
    loadtest_main([*argv, *extra])
    return json.loads((out / f"{name}.json").read_text())


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_loadtest_over_tls_and_tokens_on_either_port(secure_stack, tmp_path, protocol) -> None:
    """The same report from either front end: every request completes, one chunk per round, the tokens and
    speculation counts the responses carried equal the servers' metrics; the protocol is recorded, the token
    is not."""
    stack, pki = secure_stack
    report = run_loadtest(stack, pki, tmp_path, protocol, CLIENT_TOKEN, protocol)
    env, (run,) = report["environment"], report["runs"]
    assert env["stack"] | {"target": None} == {
        "local": False,
        "target": None,
        "protocol": protocol,
        "tls": True,
        "auth": True,
        "drafters": None,
        "verifiers": None,
        "state_store": None,
        "threads_per_process": None,
    }
    assert CLIENT_TOKEN not in json.dumps(report) and "--auth-token ***" in env["command"]
    assert run["requests"] == {"issued": LOAD_REQUESTS, "completed": LOAD_REQUESTS, "failed": 0, "errors": {}}
    tokens, client, server = run["tokens"], run["speculation_client"], run["speculation_server"]
    assert tokens["output"] == tokens["output_in_results"] == tokens["output_in_summaries"]
    assert tokens["output"] == LOAD_REQUESTS * LOAD_TOKENS  # ignore_eos: every request runs to its length
    assert tokens["chunks"] == client["rounds"] == server["rounds"] and run["ttft_ms"]["count"] == LOAD_REQUESTS
    assert (client["draft_tokens"], client["accepted_tokens"]) == (server["draft_tokens"], server["accepted_tokens"])
    assert server["http_statuses"] == ({"200": LOAD_REQUESTS} if protocol == "http" else {})
    # Only the gRPC summaries carry the k histogram; over HTTP the report has it from the metrics alone.
    assert (client["k_histogram"] is None) == (protocol == "http") and server["k_histogram"]


def test_loadtest_without_the_token_fails_every_request(secure_stack, tmp_path, tiny_models) -> None:
    stack, pki = secure_stack
    with pytest.raises(SystemExit, match="v1/models: HTTP 401"):  # the model's name is asked first: a clear stop
        run_loadtest(stack, pki, tmp_path, "http", None, "refused")
    with pytest.raises(SystemExit) as failed:
        run_loadtest(stack, pki, tmp_path, "http", None, "refused", "--model", tiny_models["llama"].name)
    assert failed.value.code == 1
    (run,) = json.loads((tmp_path / "refused.json").read_text())["runs"]
    assert run["requests"]["errors"] == {"HTTP 401": LOAD_REQUESTS}
