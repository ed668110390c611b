"""Which model `make run` / `make demo` serve: the reference model with its distilled exit head once
`make model` has built them, a tiny random model before that."""

import json
from dataclasses import dataclass
from pathlib import Path

CACHE = Path(".cache")
REFERENCE_DIR = CACHE / "reference-model"
TINY_DIR = CACHE / "demo-tiny-llama"
TINY_PROMPTS = [[1, 17, 42, 99, 7], [5, 6, 7, 8, 9, 10], [300, 200, 100]]


@dataclass(frozen=True)
class ServedModel:
    model_dir: Path
    exit_layer: int
    exit_head: str  # "" for an untrained exit layer
    dtype: str
    prompts: list  # prompt texts, or token-id lists for a model without tokenizer


def held_out_prompts(model_dir: Path) -> list[str]:
    path = model_dir / "heldout_prompts.jsonl"
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [row["prompt"] if isinstance(row, dict) else row for row in rows]


def distilled_head(model_dir: Path) -> Path | None:
    """The newest exit head under .cache/ distilled from exactly this build of the model.

    A retrained model keeps its config hash, so heads are matched on the build stamp that distillation
    records (distill.json) against the model's build_report.json.
    """
    stamp = json.loads((model_dir / "build_report.json").read_text())["stamp"]
    heads = [
        report.parent
        for report in CACHE.glob("**/distill.json")
        if json.loads(report.read_text()).get("model_stamp") == stamp and (report.parent / "exit_layer.json").is_file()
    ]
    return max(heads, key=lambda p: (p / "exit_layer.json").stat().st_mtime, default=None)


def default_model() -> ServedModel:
    if (REFERENCE_DIR / "build_report.json").is_file() and (head := distilled_head(REFERENCE_DIR)) is not None:
        exit_layer = json.loads((head / "exit_layer.json").read_text())["exit_layer"]
        return ServedModel(REFERENCE_DIR, exit_layer, str(head), "auto", held_out_prompts(REFERENCE_DIR))
    from eesd.tiny import save_tiny_model

    if not (TINY_DIR / "config.json").is_file():
        # 8 layers, exit at N=7: an untrained exit layer (a copy of the last layer) drafts well that deep.
        save_tiny_model(
            TINY_DIR,
            "llama",
            hidden_size=256,
            intermediate_size=512,
            num_hidden_layers=8,
            num_attention_heads=8,
            num_key_value_heads=8,
            vocab_size=2048,
            initializer_range=0.05,
        )
    # fp32: random weights tie often in bf16, and a tie may break differently in a wider verify pass.
    return ServedModel(TINY_DIR, 7, "", "float32", TINY_PROMPTS)
