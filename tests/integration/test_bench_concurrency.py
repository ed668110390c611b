"""bench.concurrency end to end on a tiny fp32 model: every arm, batched or one at a time, in-process or
through the stack, produces the same greedy tokens, and the report has every part the docs quote. Timings
are never asserted: they are what the benchmark measures."""

from bench.concurrency import NODE_FLAGS, node_flag_support, run, stack_node_flags
from serving.models import ServedModel

METRICS = {"tokens_per_second", "ttft_ms", "tpot_ms", "e2e_ms", "k_histogram", "mean_k", "differing_from_reference"}
ARMS = {"off", "fixed-2", "fixed-4", "beta-ts", "load-aware"}


def tiny(tiny_models) -> ServedModel:
    # N = L-1 with an untrained exit layer drafts exactly the model's tokens: speculation always runs.
    return ServedModel(tiny_models["llama"], 3, "", "float32", [[5, 6, 7, 8], [300, 200, 100]])


def arms_of(result: dict):
    for c, by_setting in result["levels"].items():
        for setting, by_mode in by_setting.items():
            for mode, by_policy in by_mode.items():
                for policy, metrics in by_policy.items():
                    yield c, setting, mode, policy, metrics


def test_in_process_sweep_is_lossless_and_complete(tiny_models):
    result = run(
        tiny(tiny_models), concurrency=(1, 2), settings=("in-process",), max_new_tokens=12, requests_per_level=2
    )
    assert set(result["levels"]) == {"1", "2"}
    assert result["settings"] == ["in-process"]
    assert set(result["policies"]) == ARMS
    assert result["policies"]["load-aware"] == {"policy": "beta-ts", "options": {"load_aware": 1.0}}
    seen = set()
    for c, setting, mode, policy, metrics in arms_of(result):
        seen.add((c, setting, mode, policy))
        assert METRICS <= set(metrics)
        assert metrics["requests"] == 2 and metrics["tokens"] == 24  # EOS never stops a request early
        assert metrics["differing_from_reference"] == 0, (c, setting, mode, policy)
        assert metrics["tokens_per_second"]["median"] > 0
        assert metrics["ttft_ms"]["p50"] <= metrics["ttft_ms"]["p99"]
        if policy == "off" or policy.startswith("fixed-"):  # the others choose k by what they measure
            assert (metrics["mean_k"] == 0) == (policy == "off")
    assert len(seen) == 2 * 2 * len(ARMS)  # levels x batched/single x policies
    assert result["levels"]["1"]["in-process"]["batched"]["fixed-2"]["k_histogram"] == {
        "2": 8
    }  # 2 x 12 tokens, 3 a round
    for key in ("machine", "model", "dtype", "device", "source_tree", "load_average", "torch_threads"):
        assert key in result
    assert {"avx512_bf16", "amx_bf16"} <= set(result["machine"]["cpu_flags"])
    checks = result["checks"]
    assert set(checks["many_over_one_session"]) >= {"setting", "levels", "target", *ARMS}
    assert set(checks["load_aware_over_best_of_off_and_fixed"]["in-process/batched"]) == {"1", "2"}
    assert set(checks["load_aware_over_off"]["in-process/single"]) == {"1", "2"}
    assert set(checks["one_session_batched_over_single"]["in-process"]) == ARMS


def test_stack_sweep_matches_in_process(tiny_models):
    # One stack (the slow part): batched where the nodes take --max-batch, else today's one at a time.
    batched_nodes = all(node_flag_support().values())
    mode = "batched" if batched_nodes else "single"
    result = run(
        tiny(tiny_models),
        concurrency=(2,),
        batching=(mode,),
        policies=("off", "load-aware"),
        max_new_tokens=8,
        requests_per_level=2,
        redis=False,
    )
    assert set(result["levels"]["2"]) == {"in-process", "stack"}
    assert set(result["levels"]["2"]["stack"]) == {mode}
    assert bool(result["notes"]) != batched_nodes  # nodes without --max-batch are reported, not hidden
    for _, setting, mode_, policy, metrics in arms_of(result):
        assert metrics["differing_from_reference"] == 0, (setting, mode_, policy)
        assert metrics["tokens"] == 16
    off = result["levels"]["2"]["stack"][mode]["off"]
    assert off["k_histogram"] == {"0": off["rounds"]}


def test_stack_node_flags_fall_back_to_what_the_nodes_take():
    both = ("batched", "single")
    notes = []
    assert stack_node_flags(both, NODE_FLAGS, 16, {"drafter": True, "verifier": True}, notes) == {
        "batched": ["--max-batch", "16"],
        "single": ["--max-batch", "1"],
    }
    assert notes == []
    flags = stack_node_flags(both, NODE_FLAGS, 16, {"drafter": True, "verifier": False}, notes)
    assert flags == {"single": []}
    assert len(notes) == 2 and all("verifier" in note for note in notes)
