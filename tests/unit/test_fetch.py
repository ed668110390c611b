"""eesd.fetch: a checkpoint from an http(s) archive or from the Hugging Face hub, here a local HTTP server
standing in for each (no network), into a directory, idempotently."""

import io
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from eesd import fetch
from eesd.errors import InvalidArgument, NotFound
from eesd.identity import tokenizer_hash
from tests.hub import REPO, Server, hub_env, hub_routes


def archive_of(model: Path, top: str = "tiny-llama") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        tar.add(model, arcname=top)
    return buffer.getvalue()


def same_files(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.iterdir() if p.is_file())
    return names == sorted(p.name for p in b.iterdir() if p.is_file()) and all(
        (a / n).read_bytes() == (b / n).read_bytes() for n in names
    )


def test_an_archive_url_is_fetched_and_kept(tiny_models, tmp_path):
    model = tiny_models["llama"]
    server = Server({"/models/tiny.tar.gz": (200, {}, archive_of(model))})
    try:
        dest = fetch.fetch(f"{server.url}/models/tiny.tar.gz", tmp_path / "models" / "tiny")
        assert same_files(dest, model)
        fetch.fetch(f"{server.url}/models/tiny.tar.gz", dest)  # there already: no second download
        assert len(server.requests) == 1
        assert [p.name for p in dest.parent.iterdir()] == ["tiny"]  # no staging directory left behind
    finally:
        server.close()


def test_an_archive_escaping_its_directory_or_holding_no_checkpoint_is_refused(tmp_path):
    evil = io.BytesIO()
    with tarfile.open(fileobj=evil, mode="w:gz") as tar:
        info = tarfile.TarInfo("../escaped")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    empty = io.BytesIO()
    with tarfile.open(fileobj=empty, mode="w:gz") as tar:
        info = tarfile.TarInfo("README")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    server = Server({"/evil.tar.gz": (200, {}, evil.getvalue()), "/empty.tar.gz": (200, {}, empty.getvalue())})
    try:
        with pytest.raises(tarfile.OutsideDestinationError):
            fetch.fetch(f"{server.url}/evil.tar.gz", tmp_path / "m")
        with pytest.raises(InvalidArgument):
            fetch.fetch(f"{server.url}/empty.tar.gz", tmp_path / "m")
        assert not (tmp_path / "escaped").exists() and not (tmp_path / "m").exists()
    finally:
        server.close()


def test_a_hub_model_id_is_fetched_through_the_configured_endpoint(tiny_models, tmp_path):
    """As the chart's init container runs it: `python -m eesd.fetch` with HF_ENDPOINT set (read at import)."""
    model, dest = tiny_models["llama"], tmp_path / "models" / "hub-llama"
    server = Server(hub_routes(model))
    try:
        done = subprocess.run(
            [sys.executable, "-m", "eesd.fetch", "--source", REPO, "--dest", str(dest)],
            env=hub_env(server.url, tmp_path / "hf-home"),
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        server.close()
    assert done.returncode == 0, done.stderr
    assert same_files(dest, model)  # the checkpoint's files only: README.md and model.bin were skipped
    assert tokenizer_hash(dest) == tokenizer_hash(model)


def test_a_malformed_source_and_a_wait_that_times_out_are_refused(tmp_path):
    with pytest.raises(InvalidArgument):
        fetch.fetch("not-a-model-id", tmp_path / "m")
    with pytest.raises(NotFound):
        fetch.wait_for(tmp_path / "never", timeout_s=0.05, period_s=0.01)
