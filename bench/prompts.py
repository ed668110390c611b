"""Which prompts a measurement runs on, chosen deterministically and recorded with the result.

A benchmark's evaluation prompts, the prompts its policy options are tuned on and the prompts an exit layer
is distilled on must not overlap: options or heads chosen on the prompts they are then measured on
overstate the result. `PromptSet.record()` names the file, the rows and their source files in the JSON.
"""

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from eesd import corpus
from eesd.errors import InvalidArgument

RANDOM_PROMPT_LEN = 16  # id-only checkpoints (tiny test models) get random prompts of this length


@dataclass(frozen=True)
class PromptSet:
    source: str  # the file, or "random(seed=S)"
    indices: list[int]  # rows of the file (random prompts: their draw order)
    paths: list[str | None]  # the source file each prompt was cut from, where the row names it
    ids: list[list[int]]

    def record(self) -> dict:
        """What the result JSON says about these prompts (not the ids: the file and rows reproduce them)."""
        return {
            "source": self.source,
            "indices": self.indices,
            "paths": self.paths,
            "lengths": [len(p) for p in self.ids],
        }


def _rows(path: str) -> list:
    source = Path(path)
    if not source.is_file():
        raise InvalidArgument("prompts", f"no such file: {path!r}")
    if source.suffix == ".jsonl":
        return [json.loads(line) for line in source.read_text().splitlines() if line.strip()]
    rows = json.loads(source.read_text())
    return rows.get("prompts", rows) if isinstance(rows, dict) else rows


def load_prompt_set(path: str, model_dir: str, limit: int, exclude: Sequence[PromptSet] = ()) -> PromptSet:
    """`limit` prompts as token ids from a .jsonl ({"prompt": text} or {"prompt_ids": [...]}, optionally
    with "path", the source file) or a .json list of strings / id lists; text needs the checkpoint's
    tokenizer. Rows cut from a source file of an `exclude` set, or equal to one of its prompts, are skipped."""
    from eesd.cli import load_tokenizer

    rows = _rows(path)
    tokenizer = None

    def row_ids(row) -> list[int]:
        nonlocal tokenizer
        if isinstance(row, dict):
            row = row.get("prompt_ids", row.get("prompt", row.get("text")))
        if isinstance(row, str):
            tokenizer = tokenizer or load_tokenizer(model_dir)
            if tokenizer is None:
                raise InvalidArgument("prompts", f"{model_dir} has no tokenizer for text prompts")
            row = tokenizer(row)["input_ids"]
        return [int(t) for t in row]

    def row_path(row) -> str | None:
        return row.get("path") if isinstance(row, dict) else None

    excluded_paths = {p for s in exclude for p in s.paths if p is not None}
    excluded_ids = {tuple(p) for s in exclude for p in s.ids}
    skip = frozenset(
        i
        for i, row in enumerate(rows)
        if row_path(row) in excluded_paths or (excluded_ids and tuple(row_ids(row)) in excluded_ids)
    )
    indices = corpus.spread(len(rows), limit, skip)
    if not indices:
        raise InvalidArgument("prompts", f"no prompts left in {path!r}" + (" after exclusion" if skip else ""))
    return PromptSet(path, indices, [row_path(rows[i]) for i in indices], [row_ids(rows[i]) for i in indices])


def random_prompts(vocab_size: int, count: int, seed: int, exclude: Sequence[PromptSet] = ()) -> PromptSet:
    """Random-id prompts for checkpoints without a tokenizer; draws equal to an excluded prompt are redrawn."""
    rng, excluded = random.Random(seed), {tuple(p) for s in exclude for p in s.ids}
    ids: list[list[int]] = []
    while len(ids) < count:
        prompt = [rng.randrange(3, vocab_size) for _ in range(RANDOM_PROMPT_LEN)]
        if tuple(prompt) not in excluded:
            ids.append(prompt)
    return PromptSet(f"random(seed={seed})", list(range(count)), [None] * count, ids)
