"""One typed config per service: dataclass fields drive CLI flags (--field-name), environment variables
(EESD_FIELD_NAME) and the Helm values (`<role>.config.fieldName`, rendered into EESD_* variables).

Precedence: flag > environment > default.
"""

import argparse
import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import TypeVar, get_type_hints

from eesd.errors import InvalidArgument

C = TypeVar("C")
ENV_PREFIX = "EESD_"


def env_name(field: str) -> str:
    return ENV_PREFIX + field.upper()


def _convert(field: str, kind: type, text: str):
    if kind is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off", ""):
            return False
        raise InvalidArgument(field, f"expected a boolean, got {text!r}")
    try:
        return kind(text)
    except ValueError as exc:
        raise InvalidArgument(field, f"expected {kind.__name__}, got {text!r}") from exc


def load_config(cls: type[C], argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> C:
    """Builds `cls` from flags and environment; each field's `metadata["help"]` documents its flag."""
    env = os.environ if env is None else env
    hints = get_type_hints(cls)
    parser = argparse.ArgumentParser(description=cls.__doc__)
    for f in dataclasses.fields(cls):
        parser.add_argument(
            f"--{f.name.replace('_', '-')}",
            dest=f.name,
            default=None,
            help=f"{f.metadata.get('help', '')} (env {env_name(f.name)}; default {f.default!r})",
        )
    args = vars(parser.parse_args(argv))
    values = {}
    for f in dataclasses.fields(cls):
        text = args[f.name] if args[f.name] is not None else env.get(env_name(f.name))
        if text is not None:
            values[f.name] = _convert(f.name, hints[f.name], text)
    config = cls(**values)
    validate = getattr(config, "validate", None)
    if validate is not None:
        validate()
    return config


def field(default, help: str):  # noqa: A002 - mirrors argparse's name
    return dataclasses.field(default=default, metadata={"help": help})
