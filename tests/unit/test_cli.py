"""The `eesd generate` contract on a checkpoint saved to disk."""

import json
import subprocess
import sys

import pytest

from eesd.cli import main
from tests.conftest import hf_greedy


def test_cli_json_equals_hf_greedy(tiny_models, capsys):
    model_dir = tiny_models["mistral"]
    expected = hf_greedy(model_dir, [5, 6, 7], 25)
    assert (
        main(
            [
                "generate",
                "--model",
                str(model_dir),
                "--exit-layer",
                "2",
                "--prompt-ids",
                "5,6,7",
                "--max-new-tokens",
                "25",
                "--policy",
                "calibration-ts",
                "--dtype",
                "float32",  # the default, auto, is bf16 on some CPUs, where random logits tie
                "--json",
            ]
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert out["token_ids"] == expected
    assert {"rounds", "drafted", "accepted", "mean_accepted_tokens", "tokens_per_second"} <= set(out["stats"])
    assert out["stats"]["mean_accepted_tokens"] == pytest.approx(25 / out["stats"]["rounds"])


def test_console_script_reports_bad_input(tiny_models):
    """Runs the installed entry point in a fresh process: clear message, exit code 2."""
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "eesd.cli",
            "generate",
            "--model",
            str(tiny_models["llama"]),
            "--exit-layer",
            "7",
            "--prompt-ids",
            "1,2",
            "--max-new-tokens",
            "4",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2
    assert "exit_layer: must be in 1..3" in run.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--prompt-ids", "1,x"], "prompt_ids"),
        (["--prompt-ids", "1", "--policy", "guess"], "policy"),
        (["--prompt", "hello"], "no tokenizer"),
        (["--prompt-ids", "1", "--dtype", "float32", "--device", "tpu"], "device: must be cpu or cuda"),
        (["--prompt-ids", "1", "--device", "cuda"], "device: cuda requested but no GPU is available"),
    ],
)
def test_cli_bad_input(tiny_models, capsys, args, message):
    assert (
        main(["generate", "--model", str(tiny_models["llama"]), "--exit-layer", "1", "--max-new-tokens", "4", *args])
        == 2
    )
    assert message in capsys.readouterr().err


def test_cli_prompts_file_generates_every_request_batched(tiny_models, tmp_path, capsys):
    """Offline batch generation: one JSON line per request, in input order, each equal to HF greedy; lines
    may carry their own max_new_tokens."""
    model_dir = tiny_models["llama"]
    requests = [{"prompt_ids": [5, 6, 7]}, {"prompt_ids": [9], "max_new_tokens": 7}, {"prompt_ids": [3, 4, 8, 11]}]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps(r) for r in requests) + "\n\n")
    output = tmp_path / "out.jsonl"
    argv = ["generate", "--model", str(model_dir), "--exit-layer", "2", "--prompts-file", str(prompts)]
    argv += ["--dtype", "float32"]  # the default, auto, is bf16 on some CPUs, where random logits tie
    assert main([*argv, "--max-new-tokens", "16", "--max-batch", "2", "--output", str(output)]) == 0
    lines = [json.loads(line) for line in output.read_text().splitlines()]
    assert [line["index"] for line in lines] == [0, 1, 2]
    for request, line in zip(requests, lines, strict=True):
        assert line["token_ids"] == hf_greedy(model_dir, request["prompt_ids"], request.get("max_new_tokens", 16))
    assert "3 prompts" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("line", "message"),
    [('{"prompt_ids": [1, "x"]}', "line 1"), ('{"prompt_ids": [1], "temp": 1}', "unknown fields"), ("[1]", "line 1")],
)
def test_cli_prompts_file_bad_lines_name_the_line(tiny_models, tmp_path, capsys, line, message):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(line + "\n")
    argv = ["generate", "--model", str(tiny_models["llama"]), "--exit-layer", "1", "--prompts-file", str(prompts)]
    assert main([*argv, "--max-new-tokens", "4"]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "flag", "minimum"),
    [
        (["sweep", "--model", "m", "--skip-evaluation-prompts", "-1"], "--skip-evaluation-prompts", 0),
        (["sweep", "--model", "m", "--repetitions", "0"], "--repetitions", 1),
        (["bench", "--model", "m", "--exit-layer", "2", "--num-prompts", "-3"], "--num-prompts", 1),
        (["bench", "--model", "m", "--exit-layer", "2", "--num-tune-prompts", "-1"], "--num-tune-prompts", 0),
        (["model", "--out", "o", "--threads", "0"], "--threads", 1),
        (["generate", "--model", "m", "--exit-layer", "1", "--max-batch", "0"], "--max-batch", 1),
    ],
)
def test_a_count_below_its_minimum_is_a_usage_error_naming_the_flag(capsys, argv, flag, minimum):
    """Counts are checked as the command line is read, before any model is loaded."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert f"argument {flag}: must be at least {minimum}" in capsys.readouterr().err


def test_a_count_that_is_no_number_is_a_usage_error(capsys):
    with pytest.raises(SystemExit):
        main(["sweep", "--model", "m", "--num-prompts", "many"])
    assert "argument --num-prompts: invalid integer value: 'many'" in capsys.readouterr().err
