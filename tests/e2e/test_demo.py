"""`make demo` through a real stack (controller, drafter, verifier processes), on a tiny trained preset: text
prompts, both answers streamed as text, the same tokens with and without speculation, the speedup line."""

import pytest
from eesd_client import EesdClient

from eesd.presets import ensure_model
from serving.demo import run
from serving.local_stack import LocalStack
from serving.models import served
from tests.unit.test_presets import TINY


@pytest.fixture(scope="module")
def tiny_trained(tmp_path_factory):
    return served(*ensure_model(TINY, tmp_path_factory.mktemp("demo") / "model", progress=False))


def test_the_demo_streams_text_both_ways_and_measures_the_speedup(tiny_trained, tmp_path, capsys):
    prompts = tiny_trained.prompts[:2]
    # float32: the same tokens with and without speculation, exactly (bf16 may break a near-tie differently).
    with LocalStack(tiny_trained.model_dir, 1, tiny_trained.exit_head, "float32", log_dir=tmp_path) as stack:
        with EesdClient(stack.controller_address) as client:
            run(client, tiny_trained, prompts, "beta-ts", 12)
    shown = capsys.readouterr().out
    assert shown.count("[speculative, beta-ts]") == shown.count("[plain, speculation off]") == 2
    assert prompts[0].rstrip("\n").split("\n")[-1] in shown  # the prompt as text
    assert shown.count(", the same tokens") == 2 and "DIFFERENT" not in shown
    assert "2/2 prompts gave the same tokens" in shown
    summary = shown.strip().splitlines()[-1]
    assert "held-out prompts, greedy" in summary and "speedup" in summary and "exit layer N=1" in summary
