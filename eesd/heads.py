"""Where `eesd model` keeps a model's distilled exit heads: next to the model, one directory per N
(<model_dir>-exit-head-n<N>). Torch-free, so the serving side finds heads without importing training code.

    python -m eesd.heads MODEL_DIR N    # prints the head directory (the Makefile asks here, not spelling it)
"""

import re
import sys
from pathlib import Path

_SUFFIX = "-exit-head-n"


def head_dir(model_dir: Path | str, exit_layer: int) -> Path:
    """The directory of the model's exit head at N."""
    return Path(f"{model_dir}{_SUFFIX}{exit_layer}")


def head_dirs(model_dir: Path | str) -> list[Path]:
    """Every exit-head directory of the model, whatever its N."""
    model_dir = Path(model_dir)
    pattern = re.compile(re.escape(model_dir.name + _SUFFIX) + r"\d+")
    return sorted(p for p in model_dir.parent.glob(f"{model_dir.name}{_SUFFIX}*") if pattern.fullmatch(p.name))


if __name__ == "__main__":
    model_dir, exit_layer = sys.argv[1:]
    print(head_dir(model_dir, int(exit_layer)))
