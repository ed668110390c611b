"""Refuses to build a client without its generated controller stubs (all metadata is in pyproject.toml)."""

from pathlib import Path

from setuptools import setup

STUBS = Path(__file__).resolve().parent / "eesd_client" / "_proto" / "eesd" / "v1" / "controller_pb2.py"

if not STUBS.exists():
    raise SystemExit(f"{STUBS} is missing: run `make proto` at the repository root before building")

setup()
