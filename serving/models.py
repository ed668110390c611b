"""Which model `make run`, `make demo` and the load tests serve: the reference model with its distilled exit head
once `make model` has built them, else the demo model (eesd.presets.DEMO: the same recipe, trained for a few
minutes), which the first call builds and distills (about 4 minutes on 2 cores, then cached by its stamp)."""

import json
from dataclasses import dataclass
from pathlib import Path

from eesd.heads import head_dirs

CACHE = Path(".cache")
REFERENCE_DIR = CACHE / "reference-model"
# Token-id prompts for checkpoints without a tokenizer (the tests' tiny random models).
TINY_PROMPTS = [[1, 17, 42, 99, 7], [5, 6, 7, 8, 9, 10], [300, 200, 100]]


@dataclass(frozen=True)
class ServedModel:
    model_dir: Path
    exit_layer: int
    exit_head: str  # "" for an untrained exit layer
    dtype: str
    prompts: list  # prompt texts, or token-id lists for a model without tokenizer
    description: str = ""  # what the model is, in one line (describe)


def held_out_prompts(model_dir: Path) -> list[str]:
    path = model_dir / "heldout_prompts.jsonl"
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [row["prompt"] if isinstance(row, dict) else row for row in rows]


def distilled_head(model_dir: Path) -> Path | None:
    """The newest exit head `eesd model` distilled from exactly this build (eesd.heads names them).

    A retrained model keeps its config hash, so heads are matched on the build stamp that distillation
    records (distill.json) against the model's build_report.json. `eesd sweep`'s quick heads (.cache/sweep)
    are not candidates: the served head is the one `make model` made.
    """
    stamp = json.loads((model_dir / "build_report.json").read_text())["stamp"]
    heads = [
        head
        for head in head_dirs(model_dir)
        if (head / "distill.json").is_file()
        and json.loads((head / "distill.json").read_text()).get("model_stamp") == stamp
        and (head / "exit_layer.json").is_file()
    ]
    return max(heads, key=lambda p: (p / "exit_layer.json").stat().st_mtime, default=None)


def describe(model_dir: Path, exit_head: Path) -> str:
    """One line from the build and distillation reports: what the model is, how long it trained, its exit layer."""
    build = json.loads((model_dir / "build_report.json").read_text())
    head = json.loads((exit_head / "distill.json").read_text())
    recipe, n = build["recipe"], head["config"]["exit_layer"]
    return (
        f"{model_dir.name}: a toy, a {build['parameters'] / 1e6:.1f}M-parameter Llama ({recipe['num_layers']} layers "
        f"of {recipe['hidden_size']}) trained for {build['train_seconds'] / 60:.1f} minutes on "
        f"{build['train_tokens_seen'] / 1e3:.0f}k tokens of the Python standard library's source (held-out "
        f"perplexity {build['heldout_perplexity']:.0f}): it continues Python-like code, often repetitively, "
        f"and does not chat. Drafter: the first {n} of its {recipe['num_layers']} layers + an exit layer "
        f"distilled from it (greedy agreement with it {head['after']['agreement']:.0%} on held-out continuations)"
    )


def served(model_dir: Path, exit_head: Path) -> ServedModel:
    exit_layer = json.loads((exit_head / "exit_layer.json").read_text())["exit_layer"]
    return ServedModel(
        model_dir, exit_layer, str(exit_head), "auto", held_out_prompts(model_dir), describe(model_dir, exit_head)
    )


def default_model() -> ServedModel:
    if (REFERENCE_DIR / "build_report.json").is_file() and (head := distilled_head(REFERENCE_DIR)) is not None:
        return served(REFERENCE_DIR, head)
    from eesd.presets import DEMO, ensure_model

    return served(*ensure_model(DEMO))
