"""The models this project trains itself, each a recipe of :mod:`eesd.reference_model` plus the distillation of
its exit layer at N (:mod:`eesd.distill`), both cached: the model by its build stamp, the head by its config and
the model's stamp. One code path for both; they differ only in how long they train.

- ``reference`` (`make model`, .cache/reference-model): the model the benchmarks and docs quote, ~9 minutes of
  training and ~3.5 of distillation on 2 cores.
- ``demo`` (`make demo`'s first run when `make model` has not run, .cache/demo-model): the same architecture
  and tokenizer recipe, trained on shorter blocks in smaller batches for half the reference's tokens, and a
  quick head (the settings `eesd sweep` distills its candidates with), so that a fresh clone's first demo,
  installation included, fits in 10 minutes on 2 cores (docs/architecture.md §4.1). Like the reference, a toy:
  its continuations are Python-like fragments, often repetitive, not programs.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from eesd import hardware, reference_model
from eesd.distill import DistillConfig
from eesd.errors import InvalidArgument
from eesd.heads import head_dir

log = logging.getLogger("eesd.presets")


@dataclasses.dataclass(frozen=True)
class Preset:
    name: str
    out_dir: Path
    recipe_fields: dict[str, Any]  # on top of Recipe's defaults (built when asked: auto dtypes resolve then)
    exit_layer: int
    distill_fields: dict[str, Any]  # on top of the reference's distillation recipe (reference_distill_config)

    def recipe(self) -> reference_model.Recipe:
        return reference_model.Recipe(**self.recipe_fields)


# The quick exit head: a third of the reference recipe's distillation steps and a quarter of its prompts (~1
# minute here). eesd sweep distills its candidates with it, the demo preset its head.
QUICK_DISTILL_STEPS, QUICK_DISTILL_PROMPTS = 100, 64


def quick_distill_fields(steps: int = QUICK_DISTILL_STEPS, num_prompts: int = QUICK_DISTILL_PROMPTS) -> dict[str, int]:
    """The quick recipe's changes to the reference distillation (`reference_distill_config`)."""
    return dict(num_prompts=num_prompts, steps=steps, warmup_steps=max(1, steps // 10), checkpoint_every=steps)


# N = 1: the fastest exit layer of `make sweep` on held-out prompts, also with heads distilled by the full
# recipe (2.48x plain decoding against 2.32x at N = 2: bench/results/sweep-full-heads.md).
REFERENCE = Preset("reference", reference_model.DEFAULT_OUT, {}, 1, {})
DEMO = Preset(
    "demo",
    Path(".cache/demo-model"),
    # Blocks of 256 tokens (room for a held-out prompt of ~80 tokens and the demo's 64 new ones), 2 per step:
    # with minutes to spend, many small steps learn more per token than the reference's 4 x 512. Measured
    # here: held-out loss 5.45-5.6 after 600 such steps against the reference's 5.55 after 330 (9 minutes);
    # 160 steps of 8 blocks (the same tokens) reached only 6.16. lr stays the reference's: 2.5e-3 diverged
    # (NaN gradients in the first layer within 50 steps, in fp32 too). 1 thread: steps this small are mostly
    # barriers for 2 threads (0.33 s a step with 1 thread, 0.21 with 2 spinning on an idle machine but
    # slower than 1 as soon as the cores are shared, 0.41 with 2 waiting passively; eesd/threads.py).
    dict(context=256, batch_size=2, steps=600, warmup_steps=20, threads=1),
    1,  # as for the reference: 1.96x plain decoding against 1.79x at N = 2 (`eesd sweep` on the demo model)
    quick_distill_fields(),
)
PRESETS = {p.name: p for p in (REFERENCE, DEMO)}


def reference_distill_config(model_dir: str, head_dir: str, exit_layer: int, prompts: str) -> DistillConfig:
    """The distillation recipe of the reference model's exit head (`make model`); presets and sweeps vary it."""
    return DistillConfig(
        model_dir=model_dir,
        exit_layer=exit_layer,
        out_dir=head_dir,
        prompts=prompts,
        num_prompts=256,
        prompt_len=64,
        gen_len=128,
        sampled_fraction=0.5,
        steps=300,
        batch_size=8,
        lr=2e-3,
        warmup_steps=20,
        checkpoint_every=50,
        seed=0,
        dtype="float32",  # batched generation on this CPU is faster in fp32
        # The exit layer's matmuls are not: bf16 autocast (fp32 master weights) where the CPU computes bf16
        # natively. Part of the config distill.json records, so the head is rebuilt when the choice changes.
        train_bf16=hardware.native_bf16("cpu"),
    )


def distill_config(preset: Preset, model_dir: Path | str, exit_layer: int, out_dir: Path | str) -> DistillConfig:
    """The preset's distillation of the exit layer at N: prompts from the model's training files only, so
    the held-out prompts the demo and the benchmarks use stay unseen."""
    prompts = Path(model_dir) / reference_model.TRAIN_PROMPTS_FILE
    base = reference_distill_config(str(model_dir), str(out_dir), exit_layer, str(prompts))
    return dataclasses.replace(base, **preset.distill_fields)


def ensure_model(
    preset: Preset,
    model_dir: Path | str | None = None,
    exit_layer: int | None = None,
    exit_head: Path | str | None = None,
    *,
    build: bool = True,
    force_distill: bool = False,
    threads: int = 2,
    progress: bool = True,
) -> tuple[Path, Path]:
    """Builds the preset's model (unless `build` is False or it is up to date) and distills its exit head
    (unless up to date); returns (model directory, exit-head directory)."""
    import torch

    from eesd.distill import distill, up_to_date

    model_dir = Path(model_dir or preset.out_dir)
    exit_layer = preset.exit_layer if exit_layer is None else exit_layer
    if build:
        reference_model.build_reference_model(model_dir, preset.recipe(), progress=progress)
    stamp = reference_model.cached_stamp(model_dir)
    if stamp is None:
        raise InvalidArgument("model_dir", f"no model built in {str(model_dir)!r}; run `make model`")
    head = Path(exit_head or head_dir(model_dir, exit_layer))
    cfg = distill_config(preset, model_dir, exit_layer, head)
    if up_to_date(cfg, stamp) and not force_distill:
        log.info("exit head in %s is up to date", head)
    else:
        torch.set_num_threads(threads)
        distill(cfg, resume=not force_distill, progress=progress, model_stamp=stamp)
    return model_dir, head
