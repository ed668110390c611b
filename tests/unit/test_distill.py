"""Self-distillation of the exit layer on a tiny random model: the loss falls, the head loads, acceptance rises."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import eesd.distill
from eesd.checkpoint import CheckpointReader, load_config
from eesd.cli import main
from eesd.distill import REPORT_FILE, DistillConfig, ExitHead, distill, target_features, up_to_date
from eesd.drafter import Drafter
from eesd.engine import SpeculativeEngine
from eesd.errors import InvalidArgument, TrainingDiverged
from eesd.exit_layer import META_FILE, untrained_exit_layer
from eesd.params import GenerationParams, PolicyParams
from eesd.verifier import Verifier

N = 2


def _config(model_dir, out_dir, **kw) -> DistillConfig:
    # fp32 as on any machine: the verifier below compares with it, and auto would follow the CPU.
    base = dict(num_prompts=48, prompt_len=8, gen_len=24, steps=40, batch_size=16, lr=3e-3, warmup_steps=3)
    base |= dict(dtype="float32")
    return DistillConfig(str(model_dir), N, str(out_dir), **{**base, **kw})


@pytest.fixture(scope="module")
def distilled(tiny_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("head")
    return out, distill(_config(tiny_models["llama"], out, checkpoint_every=15), progress=False)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_exit_head_training_forward_is_the_drafters(tiny_models, arch):
    """The training-time exit head computes exactly the drafter's logits (windowed mask included)."""
    model_dir = tiny_models[arch]
    seq = list(range(5, 70))  # longer than Mistral's window of 48
    drafter = Drafter(model_dir, N)
    expected = drafter.stack(seq, drafter.stack.new_cache())  # (T, vocab)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    features = target_features(model.eval(), [seq, seq[:30]], N, batch_size=2)  # padded batch
    state = untrained_exit_layer(CheckpointReader.open(model_dir), load_config(model_dir), torch.float32)
    head = ExitHead(model, state)
    with torch.no_grad():
        torch.testing.assert_close(head(features[0][0][None])[0], expected, rtol=0, atol=1e-4)
        torch.testing.assert_close(head(features[1][0][None])[0], expected[:30], rtol=0, atol=1e-4)
        torch.testing.assert_close(model.lm_head(features[0][1]), model(torch.tensor([seq])).logits[0])


def test_loss_falls_and_report_is_written(distilled):
    out, report = distilled
    history = report["loss_history"]
    assert len(history) == 40
    assert sum(history[-5:]) / 5 < 0.8 * sum(history[:5]) / 5
    assert report["after"]["kl"] < report["before"]["kl"]
    assert report["trainable_parameters"] < report["model_parameters"]
    assert json.loads((out / REPORT_FILE).read_text())["after"] == report["after"]
    assert json.loads((out / META_FILE).read_text())["trained"] is True
    assert (report["dtype"], report["train_bf16_autocast"]) == ("float32", False)
    assert report["hardware"]["device"] == "cpu" and "avx512_bf16" in report["hardware"]["cpu_flags"]


def test_a_diverging_distillation_stops_and_saves_no_head(tiny_models, tmp_path):
    with pytest.raises(TrainingDiverged, match="distillation diverged at step"):
        distill(_config(tiny_models["llama"], tmp_path / "head", lr=1e30, steps=6), progress=False)
    assert not (tmp_path / "head" / META_FILE).exists()


def test_up_to_date_names_config_and_model_build(tiny_models, distilled):
    out, _ = distilled
    cfg = _config(tiny_models["llama"], out, checkpoint_every=15)
    assert up_to_date(cfg)
    assert not up_to_date(cfg, model_stamp="another build")
    assert not up_to_date(_config(tiny_models["llama"], out, checkpoint_every=15, steps=41))


def test_saved_head_loads_and_raises_acceptance(tiny_models, distilled):
    """Greedy decoding of the corpus prompts retraces the target's greedy continuations the head was trained on."""
    out, report = distilled
    model_dir = tiny_models["llama"]
    corpus = json.loads((out / "checkpoints" / "corpus.json").read_text())["sequences"]
    greedy_prompts = [s[:8] for s in corpus[len(corpus) // 2 :]][:6]  # the first half was sampled
    verifier = Verifier(model_dir)
    params = GenerationParams(20, policy=PolicyParams("fixed", k_max=3, options={"k": 3}), stop_on_eos=False)

    def tau(head) -> tuple[float, list[list[int]]]:
        engine = SpeculativeEngine(Drafter(model_dir, N, exit_head=head), verifier)
        results = [engine.generate(p, params) for p in greedy_prompts]
        rounds = sum(r.stats.rounds for r in results)
        return sum(r.stats.generated for r in results) / rounds, [r.token_ids for r in results]

    tau_before, tokens_before = tau(None)
    tau_after, tokens_after = tau(out)
    assert tokens_after == tokens_before  # lossless either way
    assert tau_after > tau_before


def test_resume_continues_to_the_same_head(tiny_models, tmp_path, distilled, monkeypatch):
    """Interrupted at step 20 (last checkpoint at 15), then resumed: the same losses and weights as one run."""
    out, report = distilled
    partial = tmp_path / "head"
    real_lr = eesd.distill._lr

    def interrupt(step, *args):
        if step == 20:  # after 20 steps, before the 21st
            raise KeyboardInterrupt
        return real_lr(step, *args)

    monkeypatch.setattr(eesd.distill, "_lr", interrupt)
    with pytest.raises(KeyboardInterrupt):
        distill(_config(tiny_models["llama"], partial, checkpoint_every=15), progress=False)
    assert [p.name for p in (partial / "checkpoints").glob("step-*.pt")] == ["step-000015.pt"]
    monkeypatch.setattr(eesd.distill, "_lr", real_lr)
    resumed = distill(_config(tiny_models["llama"], partial, checkpoint_every=15), progress=False)
    assert resumed["loss_history"] == pytest.approx(report["loss_history"], abs=1e-6)
    a = torch.load(out / "checkpoints" / "step-000040.pt", weights_only=False)["exit_state"]
    b = torch.load(partial / "checkpoints" / "step-000040.pt", weights_only=False)["exit_state"]
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6)


def test_cli_distill_and_bad_input(tiny_models, tmp_path, capsys):
    args = ["distill", "--model", str(tiny_models["qwen2"]), "--exit-layer", "1", "--out", str(tmp_path / "h")]
    small = ["--num-prompts", "8", "--prompt-len", "6", "--gen-len", "8", "--steps", "3", "--batch-size", "4"]
    assert main([*args, *small, "--no-progress"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert {"before", "after"} <= set(report)
    assert Drafter(tiny_models["qwen2"], 1, exit_head=tmp_path / "h").identity.exit_head_hash
    assert main([*args, "--steps", "0"]) == 2
    assert "steps" in capsys.readouterr().err
    with pytest.raises(InvalidArgument, match="tokenizer"):
        distill(_config(tiny_models["llama"], tmp_path / "x", prompts=str(tmp_path)), progress=False)
