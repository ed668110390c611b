"""serving.node.ModelNode: jobs submitted together share passes, a lone job runs at once, a session
nobody uses for session_idle_s gives its KV space back."""

import asyncio
import time

from eesd.decoder_stack import Row
from eesd.rounds import DraftBlock, VerifyRequest
from eesd.verifier import Verifier
from serving.node import ModelNode


def verify_request(session_id: str, prompt: list[int]) -> VerifyRequest:
    return VerifyRequest(session_id, 0, 0, prompt, DraftBlock([], []), seed=1)


def test_jobs_submitted_together_share_passes_and_equal_their_lone_runs(tiny_models):
    verifier = Verifier(tiny_models["llama"])
    prompts = {f"s{i}": [3 + i, 50, 7 * i + 1, 9][: 1 + i % 4] for i in range(6)}
    alone = {sid: verifier.verify(verify_request(sid, p)) for sid, p in prompts.items()}
    for sid in prompts:
        verifier.sessions.close(sid)

    async def scenario():
        node = ModelNode("v", "verifier", max_batch=4)
        await node.load(lambda: verifier)
        try:
            verdicts = await asyncio.gather(
                *(
                    node.run_job(verifier.verify_job(verify_request(sid, p)), "verify", sid)
                    for sid, p in prompts.items()
                )
            )
            return dict(zip(prompts, verdicts, strict=True)), node.load_now()
        finally:
            node.shutdown()

    batched, load = asyncio.run(scenario())
    assert batched == alone  # same verdicts, whatever the batch
    assert load is not None and 1.0 < load.rows_per_pass <= 4.0  # passes held several sessions, never > max_batch


def test_an_idle_session_is_closed_and_its_space_returned(tiny_models):
    verifier = Verifier(tiny_models["llama"])

    async def scenario():
        node = ModelNode("v", "verifier", session_idle_s=0.3)
        await node.load(lambda: verifier)
        try:
            await node.open_session("left-behind", 64)
            await node.run_job(verifier.verify_job(verify_request("driven", [4, 5])), "verify", "driven")
            used = verifier.sessions.usage()
            deadline = time.monotonic() + 5.0
            while "left-behind" in verifier.sessions._caches and time.monotonic() < deadline:
                await node.run_job(verifier.verify_job(verify_request("driven", [4, 5])), "verify", "driven")
                await asyncio.sleep(0.05)
            return used, verifier.sessions.usage(), set(verifier.sessions._caches)
        finally:
            node.shutdown()

    used, after, open_sessions = asyncio.run(scenario())
    assert open_sessions == {"driven"} and after < used


def test_the_drafter_streams_only_to_configured_verifiers():
    """VerifierAllowlist: configured host:port entries, and the addresses their hosts resolve to."""
    from drafter_service.verifier_link import VerifierAllowlist

    async def scenario():
        allow = VerifierAllowlist("localhost:50062, 10.0.0.7:50062", refresh_s=0.0)
        return [
            await allow.allows(address)
            for address in ("10.0.0.7:50062", "127.0.0.1:50062", "127.0.0.1:50063", "10.0.0.8:50062", "x")
        ]

    assert asyncio.run(scenario()) == [True, True, False, False, False]


def test_a_call_that_makes_no_progress_shows_as_stalled():
    async def scenario():
        node = ModelNode("n", "verifier")
        try:
            slow = asyncio.ensure_future(node.run(time.sleep, 0.6, op="slow"))
            await asyncio.sleep(0.3)
            during = node.stalled(0.1), node.stalled(5.0)
            await slow
            return during, node.stalled(0.1)
        finally:
            node.shutdown()

    (during_short, during_long), after = asyncio.run(scenario())
    assert during_short and not during_long and not after


def test_health_follows_progress():
    """serving.server.watch_progress: NOT_SERVING while stalled, SERVING once progress resumes."""
    from grpc_health.v1 import health_pb2

    from serving.server import watch_progress

    class Health:
        def __init__(self):
            self.log: list[tuple[str, int]] = []

        async def set(self, service, status):
            self.log.append((service, status))

    async def scenario():
        health, stalled = Health(), {"now": False}
        watcher = asyncio.ensure_future(watch_progress("t", health, ("", "svc"), lambda: stalled["now"], 0.02))
        await asyncio.sleep(0.1)
        stalled["now"] = True
        await asyncio.sleep(0.1)
        stalled["now"] = False
        await asyncio.sleep(0.1)
        watcher.cancel()
        return health.log

    not_serving, serving = health_pb2.HealthCheckResponse.NOT_SERVING, health_pb2.HealthCheckResponse.SERVING
    assert asyncio.run(scenario()) == [("", not_serving), ("svc", not_serving), ("", serving), ("svc", serving)]


def test_jobs_of_one_session_run_one_after_the_other_and_a_failed_pass_leaves_the_node_serving(tiny_models):
    """Two jobs of the same session must never share a pass (they share a cache): the second waits, and
    other sessions go ahead of it. A pass that fails fails its jobs, not the node's compute thread."""
    verifier = Verifier(tiny_models["llama"])

    async def scenario():
        node = ModelNode("v", "verifier")
        await node.load(lambda: verifier)
        try:
            same = [verifier.verify_job(verify_request("s", [4, 5])) for _ in range(2)]
            verdicts = await asyncio.gather(
                *(node.run_job(job, "verify", "s") for job in same),
                node.run_job(verifier.verify_job(verify_request("t", [6])), "verify", "t"),
            )

            def broken_row():  # a token id past the embedding: the pass itself raises
                yield Row([10**7], verifier.sessions.open("u", 16))

            failed = await asyncio.gather(node.run_job(broken_row(), "verify", "u"), return_exceptions=True)
            after = await node.run_job(verifier.verify_job(verify_request("u", [7])), "verify", "u")
            return verdicts, failed, after
        finally:
            node.shutdown()

    verdicts, failed, after = asyncio.run(scenario())
    assert verdicts[0] == verdicts[1] and verdicts[0].cache_length == 2
    assert isinstance(failed[0], Exception) and after.cache_length == 1
