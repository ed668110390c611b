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
    ],
)
def test_cli_bad_input(tiny_models, capsys, args, message):
    assert (
        main(["generate", "--model", str(tiny_models["llama"]), "--exit-layer", "1", "--max-new-tokens", "4", *args])
        == 2
    )
    assert message in capsys.readouterr().err
