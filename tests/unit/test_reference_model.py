"""The reference model build, on a tiny recipe (a few files, a few steps): seconds, not minutes."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM, PreTrainedTokenizerFast

from eesd import corpus
from eesd.errors import TrainingDiverged
from eesd.reference_model import (
    PROMPTS_FILE,
    REPORT_FILE,
    SPLIT_FILE,
    TRAIN_PROMPTS_FILE,
    Recipe,
    batch_schedule,
    build_reference_model,
    lr_factor,
    pack_blocks,
)

TINY = Recipe(
    vocab_size=320,
    hidden_size=64,
    num_layers=2,
    num_heads=2,
    intermediate_size=128,
    context=64,
    batch_size=2,
    steps=6,
    warmup_steps=2,
    max_files=40,
    heldout_percent=20,
    eval_blocks=4,
    num_prompts=8,
    prompt_chars=100,
    sample_tokens=4,
)


def weights_hash(model_dir: Path) -> str:
    return hashlib.sha256((model_dir / "model.safetensors").read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_reference_model(tmp_path_factory.mktemp("ref") / "model", TINY)


def test_two_builds_give_identical_weights_and_tokenizer(built: Path, tmp_path: Path) -> None:
    again = build_reference_model(tmp_path / "model", TINY)
    assert weights_hash(again) == weights_hash(built) == json.loads((built / REPORT_FILE).read_text())["weights_sha256"]
    assert (again / "tokenizer.json").read_bytes() == (built / "tokenizer.json").read_bytes()
    assert (again / PROMPTS_FILE).read_bytes() == (built / PROMPTS_FILE).read_bytes()


def test_checkpoint_loads_with_transformers(built: Path) -> None:
    model = LlamaForCausalLM.from_pretrained(built)
    tokenizer = AutoTokenizer.from_pretrained(built)
    assert model.config.num_hidden_layers == TINY.num_layers
    assert model.config.vocab_size == TINY.vocab_size == len(tokenizer)
    assert model.config.eos_token_id == model.generation_config.eos_token_id == tokenizer.eos_token_id
    ids = tokenizer("def f(x):\n    return x\n", return_tensors="pt").input_ids
    logits = model(ids).logits  # [1, T, V]
    assert logits.shape == (1, ids.shape[1], TINY.vocab_size)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("loader", [AutoTokenizer, PreTrainedTokenizerFast])
def test_tokenizer_round_trips_code(built: Path, loader: type) -> None:
    tokenizer = loader.from_pretrained(built)
    text = 'class A:\n\tdef f(self, é="ü"):\n        return {1: [2, 3]}  # ✓\n\n'
    ids = tokenizer(text).input_ids
    assert tokenizer.eos_token_id not in ids  # no BOS/EOS added to prompts
    assert tokenizer.decode(ids) == text


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_heldout_split_is_disjoint_and_prompts_come_from_their_split(built: Path) -> None:
    split = json.loads((built / SPLIT_FILE).read_text())
    assert split["train"] and split["heldout"]
    assert not set(split["train"]) & set(split["heldout"])
    for name, files in [(PROMPTS_FILE, split["heldout"]), (TRAIN_PROMPTS_FILE, split["train"])]:
        prompts = read_jsonl(built / name)
        assert len(prompts) == TINY.num_prompts
        assert {p["path"] for p in prompts} <= set(files)
        for p in prompts:
            source = (corpus.stdlib_root() / p["path"]).read_text(encoding="utf-8")
            assert "".join(source.splitlines(keepends=True)[p["line"] - 1 :]).startswith(p["prompt"])


def test_report_has_losses(built: Path) -> None:
    report = json.loads((built / REPORT_FILE).read_text())
    assert report["heldout_loss"] > 0 and report["train_loss"] > 0
    assert report["last_steps_loss"] < report["first_step_loss"]  # it learns, even in 6 steps
    # The precision it trained in (the recipe's, so the stamp's) and the CPU that chose it.
    assert report["dtype"] == ("bfloat16" if TINY.bf16_autocast else "float32")
    assert report["hardware"]["cpu_flags"].keys() >= {"avx2", "avx512_bf16", "amx_bf16"}


def test_cached_build_is_a_no_op_and_a_new_recipe_rebuilds(tmp_path: Path) -> None:
    out = build_reference_model(tmp_path / "model", TINY)
    mtime = (out / "model.safetensors").stat().st_mtime_ns
    build_reference_model(out, TINY)
    assert (out / "model.safetensors").stat().st_mtime_ns == mtime
    build_reference_model(out, Recipe(**{**TINY.__dict__, "steps": TINY.steps + 1}))
    assert (out / "model.safetensors").stat().st_mtime_ns != mtime
    assert not out.with_name(out.name + ".building").exists()


def test_pack_blocks_joins_documents_with_eos_and_drops_the_tail() -> None:
    blocks = pack_blocks([[1, 2, 3], [4, 5]], eos_id=0, block_len=3)
    assert blocks.tolist() == [[1, 2, 3], [0, 4, 5]]


def test_batch_schedule_is_seeded_and_covers_every_block_each_epoch() -> None:
    schedule = batch_schedule(n_blocks=6, batch_size=2, steps=6, seed=1)
    assert schedule.shape == (6, 2)
    assert torch.equal(schedule, batch_schedule(6, 2, 6, seed=1))
    assert sorted(schedule[:3].flatten().tolist()) == list(range(6))
    assert sorted(schedule[3:].flatten().tolist()) == list(range(6))


def test_lr_factor_warms_up_then_decays_to_the_floor() -> None:
    factors = [lr_factor(s, warmup_steps=4, total_steps=20, min_ratio=0.1) for s in range(20)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in zip(factors[3:], factors[4:], strict=False))
    assert factors[-1] == pytest.approx(0.1)


def test_split_depends_only_on_the_path() -> None:
    paths = [f"pkg/mod{i}.py" for i in range(200)]
    train, heldout = corpus.split_paths(paths, heldout_percent=10)
    assert set(train).isdisjoint(heldout) and len(train) + len(heldout) == len(paths)
    assert 5 <= len(heldout) <= 40
    assert corpus.split_paths(paths[::-1][:50], 10)[1] == [p for p in paths[::-1][:50] if p in heldout]


def test_prompts_are_whole_lines_of_bounded_length() -> None:
    source = corpus.SourceFile("m.py", "".join(f"line {i} " * 3 + "\n" for i in range(100)))
    prompts = corpus.cut_prompts([source], count=10, min_chars=40, seed=3)
    assert len(prompts) == 10
    assert prompts == corpus.cut_prompts([source], count=10, min_chars=40, seed=3)
    lines = source.text.splitlines(keepends=True)
    for p in prompts:
        assert 40 <= len(p.text) <= 80 and p.text.endswith("\n")
        assert p.text.startswith(lines[p.line - 1])


def test_a_diverging_build_stops_and_saves_nothing(tmp_path: Path) -> None:
    out = tmp_path / "model"
    with pytest.raises(TrainingDiverged, match="the model's training diverged at step"):
        build_reference_model(out, Recipe(**{**TINY.__dict__, "lr": 1e30, "warmup_steps": 1}))
    assert not out.exists() and not out.with_name(out.name + ".building").exists()
