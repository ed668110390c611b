"""Prompts of a load test: a file, or the served model's held-out prompts (serving.models.default_model)."""

import json
from pathlib import Path


def load_prompts(path: str | Path | None = None) -> list:
    """Texts or token-id lists. A .jsonl file holds {"prompt": text | ids} objects, strings or id lists, one
    per line; any other file one text prompt per non-empty line. No file: the default model's prompts."""
    if path is None:
        from serving.models import default_model

        prompts = default_model().prompts
    else:
        lines = [line for line in Path(path).read_text().splitlines() if line.strip()]
        if str(path).endswith(".jsonl"):
            rows = [json.loads(line) for line in lines]
            prompts = [row["prompt"] if isinstance(row, dict) else row for row in rows]
        else:
            prompts = lines
    if not prompts:
        raise ValueError(f"no prompts in {path or 'the default model'}")
    return list(prompts)
