"""Self-distillation of the early-exit layer (docs/architecture.md §4).

The frozen target generates continuations of a prompt corpus (greedy and sampled); the exit layer, fed
the target's hidden states after layer N-1, learns KL(p_target || q_exit) at every position. Only the
exit layer trains; the final norm and the LM head it feeds are the target's own, frozen.

The target's features (layer-N hidden states and the normed final hidden states, from which p is one
matmul away) are computed once; training then runs the exit layer only. Checkpoints under
`<out>/checkpoints/` hold the corpus and the training state, so an interrupted run resumes to the
same result as an uninterrupted one.
"""

import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM

from eesd import hardware
from eesd.checkpoint import CheckpointReader, config_hash, load_config, modeling_module
from eesd.decoder_stack import attention_window, causal_mask
from eesd.errors import InvalidArgument, TrainingDiverged
from eesd.exit_layer import META_FILE, ExitLayerMeta, save_exit_head, untrained_exit_layer, validate_exit_layer
from eesd.progress import Progress, track

REPORT_FILE = "distill.json"
CORPUS_SUFFIXES = (".py", ".txt", ".md", ".rst")


@dataclass(frozen=True)
class DistillConfig:
    model_dir: str
    exit_layer: int
    out_dir: str
    prompts: str | None = None  # text file, .jsonl ({"prompt"} or {"prompt_ids"}), directory; None: random ids
    num_prompts: int = 256
    prompt_len: int = 32  # tokens per prompt cut from the corpus
    gen_len: int = 96  # tokens the target generates per prompt
    sampled_fraction: float = 0.5  # share of prompts continued by sampling (the rest greedily)
    sample_temperature: float = 1.0
    eval_fraction: float = 0.1  # held-out share of the generated sequences, for the before/after report
    steps: int = 300
    batch_size: int = 16
    lr: float = 1e-3
    warmup_steps: int = 20
    checkpoint_every: int = 50
    seed: int = 0
    device: str = "cpu"
    dtype: str = "auto"  # the target's dtype; auto: bfloat16 where the device computes it natively (eesd.hardware)
    train_bf16: bool = False  # bf16 autocast for the exit layer's training also under a float32 target
    gen_batch_size: int = 32

    def validate(self) -> None:
        hardware.check_device(self.device)
        for name in ("num_prompts", "prompt_len", "gen_len", "steps", "batch_size", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise InvalidArgument(name, f"must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.sampled_fraction <= 1.0 or not 0.0 < self.eval_fraction < 1.0:
            raise InvalidArgument("sampled_fraction", "sampled_fraction in [0, 1], eval_fraction in (0, 1)")

    def corpus_key(self) -> dict:
        """The settings that determine the generated corpus (a resumed run must match them)."""
        keys = ("prompts", "num_prompts", "prompt_len", "gen_len", "sampled_fraction", "sample_temperature", "seed")
        return {k: getattr(self, k) for k in keys} | {"dtype": hardware.dtype_name(self.dtype, self.device)}


# ---------------------------------------------------------------------------------------------- prompts
def _tokenizer(model_dir: str):
    root = Path(model_dir)
    if not (root / "tokenizer.json").is_file() and not (root / "tokenizer.model").is_file():
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def _window(ids: list[int], length: int, rng: random.Random) -> list[int]:
    start = rng.randrange(0, len(ids) - length + 1) if len(ids) > length else 0
    return ids[start : start + length]


def load_prompts(cfg: DistillConfig, vocab_size: int) -> list[list[int]]:
    """`num_prompts` token-id prompts of at most `prompt_len` tokens, chosen deterministically from `seed`."""
    rng = random.Random(cfg.seed)
    if cfg.prompts is None:  # id-only checkpoints (random test models): random prompts
        return [[rng.randrange(3, vocab_size) for _ in range(cfg.prompt_len)] for _ in range(cfg.num_prompts)]
    source = Path(cfg.prompts)
    if not source.exists():
        raise InvalidArgument("prompts", f"no such file or directory: {str(source)!r}")
    tokenizer = _tokenizer(cfg.model_dir)
    if source.suffix == ".jsonl":
        rows = [json.loads(line) for line in source.read_text().splitlines() if line.strip()]
        if any("prompt_ids" not in r for r in rows) and tokenizer is None:
            raise InvalidArgument("prompts", "text prompts need the checkpoint's tokenizer")
        ids = [r["prompt_ids"] if "prompt_ids" in r else tokenizer(r["prompt"])["input_ids"] for r in rows]
        rng.shuffle(ids)
        return [p[-cfg.prompt_len :] for p in ids[: cfg.num_prompts] if p]
    if tokenizer is None:
        raise InvalidArgument("prompts", f"{cfg.model_dir} has no tokenizer; use a .jsonl of prompt_ids")
    if source.is_file():
        text = source.read_text(errors="replace")
        ids = tokenizer(text)["input_ids"]
        return [_window(ids, cfg.prompt_len, rng) for _ in range(cfg.num_prompts)]
    files = sorted(p for p in source.rglob("*") if p.is_file() and p.suffix in CORPUS_SUFFIXES)
    if not files:
        raise InvalidArgument("prompts", f"no {'/'.join(CORPUS_SUFFIXES)} files under {str(source)!r}")
    prompts: list[list[int]] = []
    while len(prompts) < cfg.num_prompts:
        text = rng.choice(files).read_text(errors="replace")
        ids = tokenizer(text[: 64 * cfg.prompt_len * 8])["input_ids"]  # a window near the start is plenty
        if len(ids) >= cfg.prompt_len:
            prompts.append(_window(ids, cfg.prompt_len, rng))
    return prompts


# ---------------------------------------------------------------------------------------------- corpus
@torch.inference_mode()
def generate_corpus(
    model: nn.Module, prompts: list[list[int]], cfg: DistillConfig, eos: set[int], progress: bool = False
) -> list[list[int]]:
    """Prompt + continuation of every prompt by the frozen target, cut after the first EOS."""
    device = next(model.parameters()).device
    num_sampled = round(cfg.sampled_fraction * len(prompts))
    by_length: dict[tuple[int, bool], list[int]] = {}
    for i, prompt in enumerate(prompts):
        by_length.setdefault((len(prompt), i < num_sampled), []).append(i)
    out: list[list[int]] = [[] for _ in prompts]
    batches = [
        (length, sampled, b, indices[b : b + cfg.gen_batch_size])
        for (length, sampled), indices in sorted(by_length.items())
        for b in range(0, len(indices), cfg.gen_batch_size)
    ]
    for length, sampled, b, batch in track(batches, "distill: target continuations", unit="batch", enabled=progress):
        torch.manual_seed(cfg.seed * 100_003 + length * 1009 + b + sampled)
        ids = torch.tensor([prompts[i] for i in batch], device=device)
        kwargs = dict(temperature=cfg.sample_temperature, top_k=0, top_p=1.0) if sampled else {}
        generated = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=cfg.gen_len,
            do_sample=sampled,
            pad_token_id=model.config.pad_token_id or 0,
            **kwargs,
        )
        for row, i in zip(generated.tolist(), batch, strict=True):
            tail = row[length:]
            cut = next((j + 1 for j, t in enumerate(tail) if t in eos), len(tail))
            out[i] = row[:length] + tail[:cut]
    return out


@torch.inference_mode()
def target_features(model: nn.Module, sequences: list[list[int]], n: int, batch_size: int) -> list[tuple]:
    """Per sequence: (h_n (T, d): hidden states after layer n-1, h_out (T, d): normed final hidden states)."""
    device = next(model.parameters()).device
    base = getattr(model, model.base_model_prefix)
    features = []
    for b in range(0, len(sequences), batch_size):
        batch = sequences[b : b + batch_size]
        width = max(map(len, batch))
        ids = torch.tensor([s + [0] * (width - len(s)) for s in batch], device=device)  # right padding: causal
        out = base(input_ids=ids, output_hidden_states=True, use_cache=False)
        for row, seq in enumerate(batch):
            t = len(seq)
            features.append((out.hidden_states[n][row, :t].cpu(), out.last_hidden_state[row, :t].cpu()))
    return features


# ---------------------------------------------------------------------------------------------- exit head
class ExitHead(nn.Module):
    """Exit layer -> the target's final norm -> its LM head; the same computation as the drafter's stack."""

    def __init__(self, model: nn.Module, state: dict[str, torch.Tensor]):
        super().__init__()
        config = model.config
        module, prefix = modeling_module(config)
        self.layer = getattr(module, f"{prefix}DecoderLayer")(config, config.num_hidden_layers - 1)
        self.layer.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
        base = getattr(model, model.base_model_prefix)
        # Frozen parts, not registered as submodules: only the exit layer is trained and saved.
        self._frozen = (base.rotary_emb, base.norm, model.lm_head)
        self.window = attention_window(self.layer, config)

    def forward(self, h_n: torch.Tensor) -> torch.Tensor:
        """h_n: (B, T, d) -> exit logits (B, T, vocab)."""
        rotary, norm, head = self._frozen
        t = h_n.shape[1]
        positions = torch.arange(t, device=h_n.device)[None]  # (1, T)
        hidden = self.layer(
            h_n,
            attention_mask=causal_mask(t, 0, self.window, h_n.device),
            position_ids=positions,
            position_embeddings=rotary(h_n, positions),
        )
        return head(norm(hidden))


def _batch(features: list[tuple], indices: list[int], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> h_n (B, T, d), h_out (B, T, d), mask (B, T) of real positions (right padding)."""
    width = max(features[i][0].shape[0] for i in indices)
    d = features[indices[0]][0].shape[1]
    h_n = torch.zeros(len(indices), width, d, dtype=features[indices[0]][0].dtype)
    h_out, mask = torch.zeros_like(h_n), torch.zeros(len(indices), width, dtype=torch.bool)
    for row, i in enumerate(indices):
        t = features[i][0].shape[0]
        h_n[row, :t], h_out[row, :t], mask[row, :t] = features[i][0], features[i][1], True
    return h_n.to(device), h_out.to(device), mask.to(device)


def _losses(head: ExitHead, h_n, h_out, mask, autocast: bool) -> dict[str, torch.Tensor]:
    """KL(p || q) averaged over real positions, plus greedy agreement and sum_x min(p, q) for the report."""
    lm_head = head._frozen[2]
    with torch.autocast(h_n.device.type, dtype=torch.bfloat16, enabled=autocast):
        q_logits = head(h_n)
        with torch.no_grad():
            p_logits = lm_head(h_out)
    log_q = F.log_softmax(q_logits[mask].float(), dim=-1)  # (positions, vocab)
    log_p = F.log_softmax(p_logits[mask].float(), dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1).mean()
    with torch.no_grad():
        agreement = (log_p.argmax(-1) == log_q.argmax(-1)).float().mean()
        overlap = torch.minimum(log_p.exp(), log_q.exp()).sum(-1).mean()
    return {"kl": kl, "agreement": agreement, "overlap": overlap}


@torch.no_grad()
def evaluate(head: ExitHead, features: list[tuple], batch_size: int, device, autocast: bool) -> dict[str, float]:
    """Position-weighted means over the held-out sequences; agreement = greedy per-token acceptance,
    overlap = expected per-token acceptance when sampling at temperature 1."""
    totals, count = {"kl": 0.0, "agreement": 0.0, "overlap": 0.0}, 0
    for b in range(0, len(features), batch_size):
        indices = list(range(b, min(b + batch_size, len(features))))
        h_n, h_out, mask = _batch(features, indices, device)
        positions = int(mask.sum())
        for name, value in _losses(head, h_n, h_out, mask, autocast).items():
            totals[name] += float(value) * positions
        count += positions
    return {name: value / count for name, value in totals.items()}


# ---------------------------------------------------------------------------------------------- training
def _lr(step: int, cfg: DistillConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def _latest_checkpoint(ckpt_dir: Path) -> Path | None:
    found = sorted(ckpt_dir.glob("step-*.pt"))
    return found[-1] if found else None


def up_to_date(cfg: DistillConfig, model_stamp: str = "") -> bool:
    """Whether cfg.out_dir holds a head distilled with exactly this config from this model build."""
    report, meta = Path(cfg.out_dir) / REPORT_FILE, Path(cfg.out_dir) / META_FILE
    if not report.is_file() or not meta.is_file():
        return False
    saved = json.loads(report.read_text())
    return saved.get("config") == json.loads(json.dumps(asdict(cfg))) and saved.get("model_stamp") == model_stamp


def distill(cfg: DistillConfig, resume: bool = True, progress: bool = True, model_stamp: str = "") -> dict:
    """Trains and saves the exit head under cfg.out_dir; returns the report (also written to distill.json).

    `model_stamp` names the model build the head belongs to (recorded for `up_to_date`)."""
    cfg.validate()
    config = load_config(cfg.model_dir)
    validate_exit_layer(cfg.exit_layer, config)
    device = torch.device(cfg.device)
    dtype = hardware.resolve_dtype(cfg.dtype, cfg.device)
    autocast = dtype == torch.bfloat16 or cfg.train_bf16
    out = Path(cfg.out_dir)
    ckpt_dir = out / "checkpoints"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    log = (lambda *a: print(*a, file=sys.stderr)) if progress else (lambda *a: None)
    flags = " ".join(sorted(f for f, on in hardware.cpu_record()["cpu_flags"].items() if on)) or "none"
    training = "under bf16 autocast" if autocast else "in float32"
    log(f"distill: target in {dtype}, exit layer trained {training} ({cfg.device}; CPU flags: {flags})")

    model = AutoModelForCausalLM.from_pretrained(cfg.model_dir, dtype=dtype, attn_implementation="sdpa")
    model = model.to(device).eval().requires_grad_(False)
    eos = model.generation_config.eos_token_id
    eos = set() if eos is None else {eos} if isinstance(eos, int) else set(eos)

    corpus_file = ckpt_dir / "corpus.json"
    t0 = time.perf_counter()
    if resume and corpus_file.is_file() and json.loads(corpus_file.read_text())["key"] == cfg.corpus_key():
        sequences = json.loads(corpus_file.read_text())["sequences"]
        log(f"distill: corpus of {len(sequences)} sequences reused from {corpus_file}")
    else:
        for stale in ckpt_dir.glob("step-*.pt"):
            stale.unlink()
        prompts = load_prompts(cfg, config.vocab_size)
        log(f"distill: the target continues {len(prompts)} prompts ({cfg.gen_len} tokens each)")
        sequences = generate_corpus(model, prompts, cfg, eos, progress)
        corpus_file.write_text(json.dumps({"key": cfg.corpus_key(), "sequences": sequences}))
    generation_s = time.perf_counter() - t0
    order = list(range(len(sequences)))
    random.Random(cfg.seed).shuffle(order)
    num_eval = max(1, round(cfg.eval_fraction * len(sequences)))
    eval_ids, train_ids = order[:num_eval], order[num_eval:] or order[:num_eval]
    features = target_features(model, sequences, cfg.exit_layer, cfg.gen_batch_size)
    train = [features[i] for i in train_ids]
    held_out = [features[i] for i in eval_ids]

    head = ExitHead(model, untrained_exit_layer(CheckpointReader.open(cfg.model_dir), config, torch.float32))
    head = head.to(device).train()
    optimizer = torch.optim.AdamW(head.layer.parameters(), lr=cfg.lr, weight_decay=0.0)
    before = evaluate(head, held_out, cfg.batch_size, device, autocast)
    log(f"distill: before: {json.dumps(before)}")

    step, history = 0, []
    latest = _latest_checkpoint(ckpt_dir) if resume else None
    saved = torch.load(latest, weights_only=False) if latest is not None else None
    if saved is not None and saved.get("config") != asdict(cfg):  # another recipe: start over
        log(f"distill: {latest.name} was written by another config; starting over")
        saved = None
    if saved is not None:
        head.layer.load_state_dict(saved["exit_state"])
        optimizer.load_state_dict(saved["optimizer"])
        step, history, before = saved["step"], saved["history"], saved["before"]
        log(f"distill: resumed from {latest.name}")

    t1 = time.perf_counter()
    with Progress(cfg.steps, "distill: training", unit="step", initial=step, enabled=progress) as bar:
        while step < cfg.steps:
            # The batch of a step depends on (seed, step) only: a resumed run sees the same batches.
            rng = random.Random(cfg.seed * 1_000_003 + step)
            indices = [rng.randrange(len(train)) for _ in range(cfg.batch_size)]
            h_n, h_out, mask = _batch(train, indices, device)
            for group in optimizer.param_groups:
                group["lr"] = _lr(step, cfg)
            loss = _losses(head, h_n, h_out, mask, autocast)["kl"]
            history.append(TrainingDiverged.check("distillation", step, loss.item()))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(head.layer.parameters(), 1.0)
            optimizer.step()
            step += 1
            bar.update(kl=f"{history[-1]:.4f}")
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                state = {"step": step, "history": history, "before": before, "optimizer": optimizer.state_dict()}
                state["config"] = asdict(cfg)
                torch.save({**state, "exit_state": head.layer.state_dict()}, ckpt_dir / f"step-{step:06d}.pt")
                for old in sorted(ckpt_dir.glob("step-*.pt"))[:-2]:
                    old.unlink()
    training_s = time.perf_counter() - t1

    head.eval()
    after = evaluate(head, held_out, cfg.batch_size, device, autocast)
    log(f"distill: after:  {json.dumps(after)}")
    meta = ExitLayerMeta(cfg.exit_layer, config_hash(config), config.model_type, trained=True)
    save_exit_head(out, {k: v.float() for k, v in head.layer.state_dict().items()}, meta)
    report = {
        "config": asdict(cfg),
        "model_stamp": model_stamp,
        "dtype": str(dtype).removeprefix("torch."),
        "train_bf16_autocast": autocast,
        "hardware": hardware.hardware_record(cfg.device),
        "train_sequences": len(train),
        "eval_sequences": len(held_out),
        "train_tokens": sum(f[0].shape[0] for f in train),
        "trainable_parameters": sum(p.numel() for p in head.layer.parameters()),
        "model_parameters": sum(p.numel() for p in model.parameters()),
        "before": before,
        "after": after,
        "loss_history": history,
        "generation_s": generation_s,
        "training_s": training_s,
    }
    (out / REPORT_FILE).write_text(json.dumps(report, indent=1) + "\n")
    return report
