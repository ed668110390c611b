"""Where a checkpoint comes from: a local directory or a Hugging Face model id.

`resolve_model` is the one rule for every `--model` / `model_dir` (the CLI, the services): an existing
directory is used as it is; otherwise a Hugging Face id, `org/name` or `org/name@revision` (a branch, tag or
commit; optionally `hf://...`), is looked up in huggingface_hub's cache and downloaded into it when missing.
huggingface_hub's variables apply as usual: HF_ENDPOINT (a mirror, a private hub), HF_HOME or HF_HUB_CACHE
(where the cache lies), HF_HUB_OFFLINE (the cache only), HF_TOKEN (gated and private models). An id that
cannot be had (offline and not cached, no such model or revision, the hub unreachable) is a NotFound naming it.

Fetching a checkpoint into a directory: `python -m eesd.fetch` (the chart's model init container) and
`eesd fetch`. A source is a hub id as above, downloaded by the same code, or an http(s) URL of a .tar or
.tar.gz archive of the checkpoint directory (a presigned S3 URL, an internal artifact store). Fetching is
idempotent and safe from many pods at once: the checkpoint is assembled in a temporary directory next to
the destination and renamed into place, and a destination that already holds a checkpoint is kept.
`--wait` only waits for another pod's fetch to finish.
"""

import argparse
import logging
import re
import shutil
import sys
import tarfile
import tempfile
import time
import urllib.request
from pathlib import Path

from eesd.errors import EesdError, InvalidArgument, NotFound

log = logging.getLogger(__name__)

# What a checkpoint needs; other files of a hub repository (other weight formats, docs) are skipped.
HUB_FILES = [
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "*.safetensors",
    "*.safetensors.index.json",
]


# org/name[@revision]: the hub's repository names (letters, digits, - _ .), a revision without spaces.
HUB_ID = re.compile(r"(?:hf://)?([A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(\S+))?")


def hub_id(source: str) -> tuple[str, str | None] | None:
    """(repository, revision or None) of a Hugging Face id; None when `source` is not one."""
    match = HUB_ID.fullmatch(source)
    return (match.group(1), match.group(2)) if match else None


def hub_model(model: str) -> tuple[str, str | None] | None:
    """The Hugging Face id a `--model` value stands for: None for a local directory (which comes first, so a
    directory named like an id is the directory) and for a string that is no id."""
    return None if Path(model).is_dir() else hub_id(model)


def resolve_model(model: str, field: str = "model") -> Path:
    """The checkpoint directory `model` names: a local directory, or a hub id's snapshot in the cache."""
    if Path(model).is_dir():  # first, so a directory named like an id is the directory (hub_model)
        return Path(model)
    if hub_id(model) is None:
        raise InvalidArgument(field, f"{model!r} is neither a directory nor a Hugging Face id (org/name[@revision])")
    return Path(_download(model, field))


def _download(source: str, field: str, local_dir: Path | None = None) -> str:
    """The hub id's checkpoint files, into huggingface_hub's cache (or `local_dir`); NotFound naming the id
    when they cannot be had, InvalidArgument naming `field` for a name the hub refuses."""
    from huggingface_hub import constants, snapshot_download  # only what downloads needs it
    from huggingface_hub.errors import (
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        RevisionNotFoundError,
    )

    repo, revision = hub_id(source)
    where = f"the Hugging Face hub at {constants.ENDPOINT}"
    try:
        return snapshot_download(repo, revision=revision, local_dir=local_dir, allow_patterns=HUB_FILES)
    except HFValidationError as error:  # a name the hub refuses ("--", "..", too long)
        raise InvalidArgument(field, f"{source!r}: {error}") from error
    except RevisionNotFoundError as error:
        raise NotFound(f"{source}: {where} has no revision {revision!r} of {repo}") from error
    except HfHubHTTPError as error:  # no such repository, gated or private (a 401 or 404), the hub failing
        status = error.response.status_code if error.response is not None else "no answer"
        raise NotFound(f"{source}: {where} answered {status} for {repo} (no such model, or set HF_TOKEN)") from error
    except LocalEntryNotFoundError as error:  # offline, or the hub unreachable, and not in the cache
        why = "HF_HUB_OFFLINE is set" if constants.is_offline_mode() else f"{where} cannot be reached"
        raise NotFound(f"{source}: not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and {why}") from error


def is_checkpoint(path: Path) -> bool:
    return (path / "config.json").is_file()


def fetch(source: str, dest: str | Path) -> Path:
    """The checkpoint of `source` in `dest` (kept when it is there already)."""
    dest = Path(dest)
    if is_checkpoint(dest):
        log.info("%s already holds a checkpoint: kept", dest)
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        if source.startswith(("http://", "https://")):
            _fetch_archive(source, staging)
        else:
            _fetch_hub(source, staging)
        if not is_checkpoint(staging):
            raise InvalidArgument("source", f"{source} holds no config.json: not a checkpoint")
        try:
            staging.rename(dest)  # atomic on one filesystem
        except OSError:
            if not is_checkpoint(dest):  # not another pod that finished first
                raise
        log.info("fetched %s into %s", source, dest)
        return dest
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _fetch_hub(source: str, into: Path) -> None:
    if hub_id(source) is None:
        raise InvalidArgument("source", f"{source!r}: expected org/name[@revision] or an http(s) URL")
    _download(source, "source", local_dir=into)
    shutil.rmtree(into / ".cache", ignore_errors=True)  # huggingface_hub's bookkeeping


def _fetch_archive(url: str, into: Path) -> None:
    """Streams a .tar / .tar.gz archive into `into`; a single top-level directory is unwrapped."""
    with urllib.request.urlopen(url, timeout=60) as response, tarfile.open(fileobj=response, mode="r|*") as archive:
        archive.extractall(into, filter="data")  # refuses absolute paths, .. and links out of the tree
    entries = list(into.iterdir())
    if len(entries) == 1 and entries[0].is_dir() and not is_checkpoint(into):
        for item in entries[0].iterdir():
            item.rename(into / item.name)
        entries[0].rmdir()


def wait_for(dest: str | Path, timeout_s: float, period_s: float = 2.0) -> Path:
    """Blocks until `dest` holds a checkpoint (another pod fetches it); NotFound after `timeout_s`."""
    dest, deadline = Path(dest), time.monotonic() + timeout_s
    while not is_checkpoint(dest):
        if time.monotonic() > deadline:
            raise NotFound(f"no checkpoint appeared in {dest} within {timeout_s:g} s")
        time.sleep(period_s)
    return dest


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dest", required=True, help="checkpoint directory to fill (kept when it holds one)")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--source", help="org/name[@revision] on the Hugging Face hub, or an http(s) .tar(.gz) URL")
    what.add_argument("--wait", action="store_true", help="only wait for --dest to hold a checkpoint")
    parser.add_argument("--timeout-s", type=float, default=3600.0, help="with --wait: how long")


def run(args: argparse.Namespace) -> int:
    if args.wait:
        wait_for(args.dest, args.timeout_s)
    else:
        fetch(args.source, args.dest)
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    parser = argparse.ArgumentParser(prog="python -m eesd.fetch", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    try:
        return run(parser.parse_args(argv))
    except EesdError as error:
        print(f"eesd.fetch: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
