"""The offline text corpus of the reference model: the Python standard library's own source files.

Every machine that runs the project has a Python 3.11 standard library, so this is text that needs no
network and no model hub. Files are named by their path relative to the library root (never the
absolute path, which differs per machine), listed sorted, and split into train / held-out by a hash of
that relative path: the split of a file never depends on which other files exist.

Left out: site-packages (differs per machine), the test suites (much generated and deliberately odd
text), the codec tables in ``encodings/`` and the generated ``pydoc_data/topics.py`` (huge string
literals that teach a code model nothing).
"""

from __future__ import annotations

import hashlib
import random
import sysconfig
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

EXCLUDED_DIRS = frozenset({"site-packages", "test", "tests", "idle_test", "encodings", "pydoc_data", "__pycache__"})


@dataclass(frozen=True)
class SourceFile:
    """One corpus document: its path relative to the library root and its text."""

    path: str
    text: str


@dataclass(frozen=True)
class Prompt:
    """A prompt cut from a document at a line start, made of whole lines."""

    path: str
    line: int  # 1-based line number of the prompt's first line
    text: str


def stdlib_root() -> Path:
    """Root of this interpreter's standard library (the base one, also inside a virtualenv)."""
    return Path(sysconfig.get_paths()["stdlib"])


def list_source_files(root: Path, max_files: int | None = None) -> list[str]:
    """Relative paths of the corpus's ``*.py`` files under root, sorted; the first max_files if given."""
    paths = sorted(
        p.relative_to(root).as_posix()
        for p in root.rglob("*.py")
        if not EXCLUDED_DIRS.intersection(p.relative_to(root).parts[:-1])
    )
    return paths[:max_files] if max_files is not None else paths


def is_heldout(path: str, heldout_percent: int) -> bool:
    """Whether a relative path belongs to the held-out split (a stable hash bucket of the path)."""
    bucket = int.from_bytes(hashlib.sha256(path.encode()).digest()[:4], "big") % 100
    return bucket < heldout_percent


def split_paths(paths: Sequence[str], heldout_percent: int) -> tuple[list[str], list[str]]:
    """(train, heldout) relative paths, each in the order given."""
    train = [p for p in paths if not is_heldout(p, heldout_percent)]
    heldout = [p for p in paths if is_heldout(p, heldout_percent)]
    return train, heldout


def read_sources(root: Path, paths: Iterable[str]) -> list[SourceFile]:
    """The files' texts; a file that is not UTF-8 is skipped (the same ones on every machine)."""
    sources = []
    for path in paths:
        try:
            text = (root / path).read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        if text.strip():
            sources.append(SourceFile(path, text))
    return sources


def fingerprint(sources: Iterable[SourceFile]) -> str:
    """SHA-256 over paths and texts: changes whenever the corpus does (another Python version, say)."""
    digest = hashlib.sha256()
    for source in sources:
        for part in (source.path, source.text):
            data = part.encode()
            digest.update(len(data).to_bytes(8, "big"))
            digest.update(data)
    return digest.hexdigest()


def cut_prompts(sources: Sequence[SourceFile], count: int, min_chars: int, seed: int) -> list[Prompt]:
    """Up to count prompts of whole lines (at least min_chars, at most 2 * min_chars each).

    A prompt starts at a non-blank line and ends at a line end, so it reads like a natural cut in
    code. Starting lines are tried in a seeded random order until count prompts are found; the
    prompts come back sorted by (path, line), so the output does not depend on that order.
    """
    candidates = [
        (si, li)
        for si, source in enumerate(sources)
        for li, line in enumerate(source.text.splitlines(keepends=True))
        if line.strip()
    ]
    random.Random(seed).shuffle(candidates)
    prompts = []
    for si, li in candidates:
        text = _whole_lines_from(sources[si].text.splitlines(keepends=True)[li:], min_chars)
        if text is not None:
            prompts.append(Prompt(sources[si].path, li + 1, text))
        if len(prompts) == count:
            break
    return sorted(prompts, key=lambda p: (p.path, p.line))


def _whole_lines_from(lines: Sequence[str], min_chars: int) -> str | None:
    """The shortest run of leading lines with at least min_chars, or None when the file ends first or
    the run exceeds 2 * min_chars (a single giant line is no useful prompt)."""
    text = ""
    for line in lines:
        text += line
        if len(text) >= min_chars:
            return text if len(text) <= 2 * min_chars else None
    return None


def spread(count: int, limit: int, skip: frozenset[int] = frozenset()) -> list[int]:
    """`limit` row indices of `count` rows, evenly spread over the rows not in `skip` (held-out prompts come
    sorted by source file, so the first rows would all be one file); all of them when fewer remain."""
    rows = [i for i in range(count) if i not in skip]
    if len(rows) <= limit:
        return rows
    if limit == 1:
        return rows[:1]
    return [rows[round(j * (len(rows) - 1) / (limit - 1))] for j in range(limit)]
