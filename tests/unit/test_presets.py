"""Presets (eesd/presets.py) and the served default model (serving/models.py), on a tiny preset: a model of a
few files and steps and a head of a few distillation steps, built and cached in seconds."""

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import eesd.distill
import eesd.presets
import eesd.reference_model
import serving.models
from eesd.heads import head_dir, head_dirs
from eesd.presets import DEMO, REFERENCE, Preset, ensure_model
from eesd.reference_model import Recipe, build_stamp
from serving.demo import Printer
from serving.models import default_model, describe, distilled_head, served

TINY = Preset(
    "tiny",
    Path("unused"),
    dict(
        vocab_size=320,
        hidden_size=64,
        num_layers=3,
        num_heads=2,
        intermediate_size=128,
        context=64,
        batch_size=2,
        steps=4,
        warmup_steps=1,
        max_files=30,
        heldout_percent=20,
        eval_blocks=2,
        num_prompts=6,
        prompt_chars=40,
        sample_tokens=2,
    ),
    1,
    dict(num_prompts=8, prompt_len=8, gen_len=8, steps=3, batch_size=4, warmup_steps=1, checkpoint_every=3),
)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, Path]:
    return ensure_model(TINY, tmp_path_factory.mktemp("tiny") / "model", progress=False)


def test_a_preset_builds_its_model_and_head_then_reuses_both(built, monkeypatch):
    model_dir, head = built
    assert head == model_dir.parent / "model-exit-head-n1"
    assert json.loads((head / "exit_layer.json").read_text())["exit_layer"] == 1
    report = json.loads((head / "distill.json").read_text())
    assert report["model_stamp"] == eesd.reference_model.cached_stamp(model_dir)
    assert report["config"]["prompts"] == str(model_dir / "train_prompts.jsonl")  # never the held-out prompts

    def rebuilt(*args, **kwargs):
        raise AssertionError("a cached model or head was built again")

    monkeypatch.setattr(eesd.reference_model, "_build", rebuilt)
    monkeypatch.setattr(eesd.distill, "distill", rebuilt)
    assert ensure_model(TINY, model_dir, progress=False) == built


def test_the_served_model_says_what_it_is(built):
    model_dir, head = built
    model = served(model_dir, head)
    assert (model.exit_layer, model.exit_head, model.dtype) == (1, str(head), "auto")
    assert model.prompts and all(isinstance(p, str) for p in model.prompts)
    assert model.description == describe(model_dir, head)
    assert "a toy" in model.description and "does not chat" in model.description
    assert "3 layers of 64" in model.description and "the first 1 of its 3 layers" in model.description


def test_the_served_head_is_the_models_own(built, tmp_path):
    """A newer head of the same build elsewhere (eesd sweep's cache names them <model>-n<N>-<key>) or a head
    of another build is never served."""
    model_dir, head = built
    model = tmp_path / "model"
    shutil.copytree(model_dir, model)
    own = tmp_path / "model-exit-head-n1"
    shutil.copytree(head, own)
    shutil.copytree(head, tmp_path / "model-n1-0123abcd")
    assert distilled_head(model) == own
    report = json.loads((own / "distill.json").read_text())
    (own / "distill.json").write_text(json.dumps(report | {"model_stamp": "another build"}))
    assert distilled_head(model) is None


def test_without_the_reference_model_the_demo_model_is_served(built, tmp_path, monkeypatch):
    model_dir, head = built
    monkeypatch.setattr(serving.models, "REFERENCE_DIR", tmp_path / "no-reference")
    monkeypatch.setattr(eesd.presets, "DEMO", dataclasses.replace(TINY, out_dir=model_dir))
    assert default_model() == served(model_dir, head)


def test_the_reference_preset_is_the_reference_recipe():
    """Its stamp is the one `make model` built under (.cache/reference-model keeps it); the demo's differs."""
    assert build_stamp(REFERENCE.recipe(), "corpus") == build_stamp(Recipe(), "corpus")
    assert build_stamp(DEMO.recipe(), "corpus") != build_stamp(Recipe(), "corpus")
    assert DEMO.recipe().hidden_size == Recipe().hidden_size and DEMO.recipe().num_layers == Recipe().num_layers


def test_the_demo_prints_long_runs_of_newlines_compactly(capsys):
    printer = Printer()
    printer.write("a\n\n")
    printer.write("\n\nb\n")
    shown = capsys.readouterr().out
    assert shown.startswith("a\n\n") and shown.count("↵") == 2 and shown.endswith("b\n")


def test_exit_heads_are_named_in_one_place(tmp_path):
    """eesd.heads names the directory `eesd model` writes and the only ones the serving side looks at."""
    model = tmp_path / "model"
    assert head_dir(model, 12) == tmp_path / "model-exit-head-n12"
    for name in ("model-exit-head-n1", "model-exit-head-n12", "model-exit-head-nx", "model-exit-head-n1.bak"):
        (tmp_path / name).mkdir()
    (tmp_path / "other-exit-head-n1").mkdir()
    assert head_dirs(model) == [head_dir(model, 1), head_dir(model, 12)]
    # ... and the Makefile asks it (`make bench`'s --exit-head) rather than spelling the name again.
    asked = subprocess.run([sys.executable, "-m", "eesd.heads", str(model), "12"], capture_output=True, text=True)
    assert asked.returncode == 0 and asked.stdout == f"{head_dir(model, 12)}\n"


def test_finding_the_served_model_imports_no_torch():
    """`make demo` and the local stack import no torch in the process that spawns the nodes; finding the
    served model must not load it."""
    code = "import sys, serving.models; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
