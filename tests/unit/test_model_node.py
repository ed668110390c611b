"""serving.node.ModelNode: jobs submitted together share passes, a lone job runs at once, a session
nobody uses for session_idle_s gives its KV space back."""

import asyncio
import time

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
                *(node.run_job(verifier.verify_job(verify_request(sid, p)), "verify") for sid, p in prompts.items())
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
            await node.run_job(verifier.verify_job(verify_request("driven", [4, 5])), "verify")
            used = verifier.sessions.usage()
            deadline = time.monotonic() + 5.0
            while "left-behind" in verifier.sessions._caches and time.monotonic() < deadline:
                await node.run_job(verifier.verify_job(verify_request("driven", [4, 5])), "verify")  # kept busy
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
