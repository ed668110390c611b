"""The reference model: a byte-level BPE tokenizer and a small Llama trained from scratch, offline.

The corpus is the Python standard library's own source (see :mod:`eesd.corpus`); the result is a plain
Hugging Face checkpoint directory that :class:`transformers.LlamaForCausalLM` and
:class:`transformers.AutoTokenizer` load, plus held-out prompts for the benchmarks.

Size (hidden 256, 16 layers, 4 heads of 64, FFN 768, vocab 4096, context 512; ~15.7M parameters):

- Deep and narrow, because on 2 CPU cores a decode step is dominated by a fixed per-layer cost
  (~0.45 ms of Python per layer, measured here; docs/architecture.md §9), not by width. A drafter of
  N=1 layer + 1 exit layer then costs about 2/16 of the model's layers, against 2/12 for a 12-layer
  model: every draft token is that much cheaper against the verify pass it saves.
- Width 256 is what the time budget allows: training is compute-bound (~1.9k tokens/s with bf16
  autocast on 2 cores with avx512_bf16, about 2x fp32; a CPU without native bf16 trains in fp32, see
  eesd.hardware), so the whole build must fit in well under 15 minutes and the
  model sees well under one epoch of its ~2.6M training tokens; a wider model would see fewer tokens.
- Vocab 4096: byte-level BPE on code still gives ~3.6 characters per token, the LM head stays cheap
  for the drafter (which runs it every draft token), and the embeddings learn faster from few tokens.
  Untied embeddings, so the drafter loads embed and head as two plain tensors.
- Context 512 so prompts of a few hundred characters plus a few hundred generated tokens stay within
  the positions the model was trained on.

Deterministic: sorted files, a path-hash split, seeded init and data order, fixed threads, and
deterministic torch algorithms; two builds of one recipe give byte-identical weights. The output
directory carries a stamp (a hash of the recipe, the corpus and the library versions): a build whose
stamp matches is skipped, a changed recipe rebuilds.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import shutil
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import tokenizers
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from eesd import corpus, hardware, threads
from eesd.errors import TrainingDiverged
from eesd.progress import Progress

log = logging.getLogger("eesd.reference_model")  # also when run as __main__

# Bump when the build's code changes what it produces (the recipe fields alone do not say that).
RECIPE_VERSION = 1
EOS_TOKEN = "<|endoftext|>"
REPORT_FILE = "build_report.json"
PROMPTS_FILE = "heldout_prompts.jsonl"
TRAIN_PROMPTS_FILE = "train_prompts.jsonl"  # for distillation, which must not see the held-out text
SPLIT_FILE = "corpus_split.json"
DEFAULT_OUT = Path(".cache/reference-model")


def bf16_autocast_for(dtype: str) -> bool:
    """Whether a build in `dtype` trains under bf16 autocast (auto: where the CPU computes bf16 natively)."""
    return hardware.resolve_dtype(dtype, "cpu") == torch.bfloat16


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Everything that decides the built model; its hash is the cache stamp."""

    vocab_size: int = 4096
    hidden_size: int = 256
    num_layers: int = 16
    num_heads: int = 4
    intermediate_size: int = 768
    context: int = 512
    batch_size: int = 4
    steps: int = 330
    lr: float = 1.5e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.1
    # The resolved dtype, so part of the stamp: a build is deterministic for its dtype. (A bool rather than
    # the dtype's name keeps the stamps of builds made before auto.)
    bf16_autocast: bool = dataclasses.field(default_factory=lambda: bf16_autocast_for("auto"))
    threads: int = 2
    seed: int = 0
    heldout_percent: int = 5
    max_files: int | None = None  # the first files of the sorted list only (tests)
    eval_blocks: int = 32
    num_prompts: int = 256
    prompt_chars: int = 300
    sample_tokens: int = 48


def train_tokenizer(texts: Sequence[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE: lossless on any text (indentation included), one special token (EOS)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer, length=len(texts))
    return tokenizer


def hf_tokenizer(tokenizer: Tokenizer, model_max_length: int) -> PreTrainedTokenizerFast:
    """The transformers wrapper; EOS doubles as BOS and PAD (documents are joined by EOS, no BOS)."""
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=EOS_TOKEN,
        bos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        clean_up_tokenization_spaces=False,  # decode must give back the code byte for byte
        model_max_length=model_max_length,
    )


def model_config(recipe: Recipe, eos_id: int) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=recipe.vocab_size,
        hidden_size=recipe.hidden_size,
        intermediate_size=recipe.intermediate_size,
        num_hidden_layers=recipe.num_layers,
        num_attention_heads=recipe.num_heads,
        num_key_value_heads=recipe.num_heads,
        max_position_embeddings=recipe.context,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
        dtype="float32",
    )


def pack_blocks(documents: Sequence[Sequence[int]], eos_id: int, block_len: int) -> torch.Tensor:
    """[n_blocks, block_len] int64: the documents each followed by EOS, concatenated, cut into blocks
    (the tail shorter than a block is dropped)."""
    stream = [token for doc in documents for token in (*doc, eos_id)]
    n_blocks = len(stream) // block_len
    return torch.tensor(stream[: n_blocks * block_len], dtype=torch.long).view(n_blocks, block_len)


def batch_schedule(n_blocks: int, batch_size: int, steps: int, seed: int) -> torch.Tensor:
    """[steps, batch_size] block indices: seeded permutations, one per epoch, read in order."""
    generator = torch.Generator().manual_seed(seed)
    epochs = math.ceil(steps * batch_size / n_blocks)
    order = torch.cat([torch.randperm(n_blocks, generator=generator) for _ in range(epochs)])
    return order[: steps * batch_size].view(steps, batch_size)


def lr_factor(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Linear warmup to 1, then cosine decay to min_ratio at the last step."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - 1 - warmup_steps)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def evenly_spaced(blocks: torch.Tensor, count: int) -> torch.Tensor:
    """[min(count, n), block_len]: blocks spread over the whole corpus, not just its first files."""
    index = torch.linspace(0, len(blocks) - 1, min(count, len(blocks))).round().long()
    return blocks[index]


@contextlib.contextmanager
def deterministic_torch(threads: int) -> Iterator[None]:
    """Fixed thread count and deterministic kernels for the build; restores the caller's settings."""
    saved = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled())
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(saved[0])
        torch.use_deterministic_algorithms(saved[1])


def _loss(model: LlamaForCausalLM, batch: torch.Tensor, bf16: bool) -> torch.Tensor:
    # batch: [B, T]; the model shifts the labels itself.
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        return model(input_ids=batch, labels=batch).loss


def train(model: LlamaForCausalLM, blocks: torch.Tensor, recipe: Recipe, progress: bool = True) -> list[float]:
    """AdamW + warmup/cosine over a seeded block order; returns the loss of every step (the mean of the
    last 10 shows on the progress bar)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]  # no decay on norms
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=recipe.lr,
        betas=(0.9, 0.95),
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, recipe.warmup_steps, recipe.steps, recipe.min_lr_ratio)
    )
    model.train()
    losses = []
    start = time.perf_counter()
    with Progress(recipe.steps, "build: training", unit="step", enabled=progress) as bar:
        for step, index in enumerate(batch_schedule(len(blocks), recipe.batch_size, recipe.steps, recipe.seed)):
            loss = _loss(model, blocks[index], recipe.bf16_autocast)
            losses.append(TrainingDiverged.check("the model's training", step, loss.item()))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            tokens_per_s = (step + 1) * blocks[index].numel() / (time.perf_counter() - start)
            bar.update(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.3f}", tok_s=f"{tokens_per_s:.0f}")
    return losses


@torch.no_grad()
def evaluate(model: LlamaForCausalLM, blocks: torch.Tensor, recipe: Recipe) -> float:
    """Mean next-token loss (nats) over blocks, in the precision training used."""
    model.eval()
    losses = [_loss(model, batch, recipe.bf16_autocast).item() for batch in blocks.split(recipe.batch_size)]
    return sum(losses) / len(losses)


@torch.no_grad()
def greedy_samples(
    model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, prompts: Sequence[str], max_new_tokens: int
) -> list[dict[str, str]]:
    """Greedy continuations (fp32) of a few prompts, for a human to judge that it writes Python."""
    model.eval()
    samples = []
    for prompt in prompts:
        encoded = tokenizer(prompt, return_tensors="pt")
        output = model.generate(**encoded, max_new_tokens=max_new_tokens, do_sample=False)
        continuation = tokenizer.decode(output[0, encoded.input_ids.shape[1] :])
        samples.append({"prompt": prompt, "continuation": continuation})
    return samples


def write_prompts(path: Path, prompts: Sequence[corpus.Prompt]) -> None:
    """One JSON object per line: {"path", "line", "prompt"} (the format `eesd distill --prompts` reads)."""
    with path.open("w") as f:
        for p in prompts:
            f.write(json.dumps({"path": p.path, "line": p.line, "prompt": p.text}) + "\n")


def build_stamp(recipe: Recipe, corpus_fingerprint: str) -> str:
    """Hash of everything the weights depend on: recipe, build code version, corpus, libraries."""
    parts = {
        "recipe": dataclasses.asdict(recipe),
        "recipe_version": RECIPE_VERSION,
        "corpus": corpus_fingerprint,
        "versions": [torch.__version__, transformers.__version__, tokenizers.__version__],
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def cached_stamp(out_dir: Path) -> str | None:
    """The stamp of a complete build in out_dir, or None."""
    report = out_dir / REPORT_FILE
    return json.loads(report.read_text())["stamp"] if report.is_file() else None


def build_reference_model(
    out_dir: Path | str = DEFAULT_OUT, recipe: Recipe | None = None, force: bool = False, progress: bool = True
) -> Path:
    """Build the tokenizer, model and held-out prompts into out_dir, unless a build of the same stamp
    is already there. Builds into a sibling directory and renames it, so out_dir is never half-built."""
    out_dir = Path(out_dir)
    recipe = recipe or Recipe()
    root = corpus.stdlib_root()
    train_paths, heldout_paths = corpus.split_paths(
        corpus.list_source_files(root, recipe.max_files), recipe.heldout_percent
    )
    train_sources = corpus.read_sources(root, train_paths)
    heldout_sources = corpus.read_sources(root, heldout_paths)
    stamp = build_stamp(recipe, corpus.fingerprint(train_sources + heldout_sources))
    if not force and cached_stamp(out_dir) == stamp:
        log.info("model in %s is up to date (stamp %s)", out_dir, stamp[:12])
        return out_dir

    work_dir = out_dir.with_name(out_dir.name + ".building")
    shutil.rmtree(work_dir, ignore_errors=True)
    work_dir.mkdir(parents=True)
    try:
        with deterministic_torch(recipe.threads):
            report = _build(work_dir, recipe, train_sources, heldout_sources, progress)
    except BaseException:  # a diverged or interrupted build leaves no half-written directory either
        shutil.rmtree(work_dir, ignore_errors=True)
        raise
    report |= {"dtype": "bfloat16" if recipe.bf16_autocast else "float32", "hardware": hardware.hardware_record()}
    (work_dir / REPORT_FILE).write_text(json.dumps({"stamp": stamp, **report}, indent=2) + "\n")
    shutil.rmtree(out_dir, ignore_errors=True)
    work_dir.rename(out_dir)
    log.info("reference model written to %s", out_dir)
    return out_dir


def _build(
    out_dir: Path,
    recipe: Recipe,
    train_sources: list[corpus.SourceFile],
    heldout_sources: list[corpus.SourceFile],
    progress: bool = True,
) -> dict:
    """Tokenizer, training, evaluation and files of one build; returns the report's contents."""
    start = time.perf_counter()
    tokenizer = train_tokenizer([s.text for s in train_sources], recipe.vocab_size)
    eos_id = tokenizer.token_to_id(EOS_TOKEN)
    train_blocks = pack_blocks(
        [e.ids for e in tokenizer.encode_batch([s.text for s in train_sources])], eos_id, recipe.context
    )
    heldout_blocks = pack_blocks(
        [e.ids for e in tokenizer.encode_batch([s.text for s in heldout_sources])], eos_id, recipe.context
    )
    tokenizer_s = time.perf_counter() - start
    log.info(
        "tokenizer: %d train files -> %d blocks of %d, %d held-out files -> %d blocks (%.0f s)",
        len(train_sources), len(train_blocks), recipe.context, len(heldout_sources), len(heldout_blocks), tokenizer_s,
    )  # fmt: skip

    torch.manual_seed(recipe.seed)
    model = LlamaForCausalLM(model_config(recipe, eos_id))
    log.info("training %d steps of %d x %d tokens", recipe.steps, recipe.batch_size, recipe.context)
    losses = train(model, train_blocks, recipe, progress)
    train_s = time.perf_counter() - start - tokenizer_s
    train_loss = evaluate(model, evenly_spaced(train_blocks, recipe.eval_blocks), recipe)
    heldout_loss = evaluate(model, evenly_spaced(heldout_blocks, recipe.eval_blocks), recipe)
    log.info("train loss %.3f (ppl %.1f), held-out loss %.3f (ppl %.1f)",
             train_loss, math.exp(train_loss), heldout_loss, math.exp(heldout_loss))  # fmt: skip

    hf_tok = hf_tokenizer(tokenizer, recipe.context)
    prompts = corpus.cut_prompts(heldout_sources, recipe.num_prompts, recipe.prompt_chars, recipe.seed)
    samples = greedy_samples(model, hf_tok, [p.text for p in prompts[:: max(1, len(prompts) // 3)][:3]],
                             recipe.sample_tokens)  # fmt: skip
    model.generation_config = GenerationConfig(bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id)
    model.save_pretrained(out_dir)  # config.json, generation_config.json, model.safetensors
    hf_tok.save_pretrained(out_dir)
    write_prompts(out_dir / PROMPTS_FILE, prompts)
    write_prompts(
        out_dir / TRAIN_PROMPTS_FILE,
        corpus.cut_prompts(train_sources, recipe.num_prompts, recipe.prompt_chars, recipe.seed),
    )
    split = {"train": [s.path for s in train_sources], "heldout": [s.path for s in heldout_sources]}
    (out_dir / SPLIT_FILE).write_text(json.dumps(split, indent=1) + "\n")
    return {
        "recipe": dataclasses.asdict(recipe),
        "parameters": sum(p.numel() for p in model.parameters()),
        # The config alone does not tell two trainings apart: consumers (an exit head's base) key on this.
        "weights_sha256": hashlib.sha256((out_dir / "model.safetensors").read_bytes()).hexdigest(),
        "train_tokens_available": train_blocks.numel(),
        "train_tokens_seen": recipe.steps * recipe.batch_size * recipe.context,
        "first_step_loss": losses[0],
        "last_steps_loss": sum(losses[-10:]) / len(losses[-10:]),
        "train_loss": train_loss,
        "train_perplexity": math.exp(train_loss),
        "heldout_loss": heldout_loss,
        "heldout_perplexity": math.exp(heldout_loss),
        "tokenizer_seconds": round(tokenizer_s, 1),
        "train_seconds": round(train_s, 1),
        "total_seconds": round(time.perf_counter() - start, 1),
        "samples": samples,
    }


def main(argv: Sequence[str] | None = None) -> None:
    threads.for_training(restart=True)  # torch is loaded already: restarts with passive OpenMP waiting
    parser = argparse.ArgumentParser(description="Build the reference model (cached by recipe stamp).")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="checkpoint directory")
    parser.add_argument("--steps", type=int, default=Recipe.steps, help="training steps")
    parser.add_argument("--force", action="store_true", help="rebuild even when the stamp matches")
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"), help="training precision")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    recipe = Recipe(steps=args.steps, bf16_autocast=bf16_autocast_for(args.dtype))
    build_reference_model(args.out, recipe, force=args.force)


if __name__ == "__main__":
    main()
