"""bench.distributed end to end on a tiny fp32 model: both stacks produce the in-process engine's tokens,
the pipelined drafter's lookaheads are counted, and the report has every part the docs quote, with the
commit and load it ran at."""

import pytest

from bench.distributed import SPLIT, run
from serving.models import ServedModel


@pytest.mark.slow  # ~30 s: two whole stacks, one after the other
def test_distributed_bench_on_a_tiny_model(tiny_models):
    model = ServedModel(tiny_models["llama"], 3, "", "float32", [[5, 6, 7, 8], [300, 200, 100]])
    result = run(1, 24, "fixed", 2, 1, redis=False, dtype="", concurrency=[2], model=model)
    assert result["runs_differing_from_in_process"] == {"pipelined": 0, "unpipelined": 0}
    # N = L-1 with an untrained exit layer drafts exactly the model's tokens: every guess holds.
    assert result["lookaheads"]["used"] > 0 and result["lookaheads"]["dropped"] == 0
    assert set(result["tokens_per_second"]) == {"in_process", "pipelined", "unpipelined"}
    assert all(v["median"] > 0 for v in result["tokens_per_second"].values())
    assert set(result["round_ms"]["pipelined"]) == set(SPLIT)
    assert set(result["concurrent_tokens_per_second"]["2"]) == {"pipelined", "unpipelined"}
    assert result["concurrent_pipelined_over_unpipelined"]["2"] > 0
    assert result["source_tree"]["commit"] and len(result["load_average"]["end"]) == 3  # what a result must name
