"""Log lines of every service: one JSON object per line by default, plain text on request.

A JSON line has `ts` (UTC, ISO 8601 with milliseconds), `level`, `service`, `logger`, `msg`, the record's
extra fields (`log.info("...", extra={...})`), `trace_id` / `span_id` while a traced span is current, and
`exc` with the traceback of an exception. A message is never split over lines: a newline a client put into
an id stays escaped inside its JSON string (text lines escape it too).

The controller writes one access line per call of its public API, gRPC or HTTP, to the `eesd.access` logger
(`access_scope`): for Generate the session, status, tokens, tau and durations, never the prompt or its text.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import sys
import time
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any, TextIO

from serving import tracing
from serving.calls import Call

LOG_FORMATS = ("json", "text")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
ACCESS_LOGGER = "eesd.access"
# Attributes every LogRecord has: whatever else a record carries came from `extra`.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")}


def _timestamp(record: logging.LogRecord) -> str:
    moment = datetime.datetime.fromtimestamp(record.created, datetime.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str):
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname,
            "service": self.service,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        line.update(_extras(record))
        ids = tracing.current_ids()
        if ids is not None:
            line["trace_id"], line["span_id"] = ids
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exc"] = record.exc_text
        return json.dumps(line, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """`time service logger LEVEL message key=value ...`, each line one record."""

    def __init__(self, service: str):
        super().__init__("%(asctime)s " + service + " %(name)s %(levelname)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        fields = _extras(record)
        ids = tracing.current_ids()
        if ids is not None:
            fields["trace_id"] = ids[0]
        if fields:
            text += " " + " ".join(f"{k}={_plain(v)}" for k, v in fields.items())
        return text.replace("\r", "\\r").replace("\n", "\n    ") if record.exc_info else _one_line(text)


def _plain(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return json.dumps(text) if (not text or any(c in text for c in ' "=\n\r\t')) else text


def _one_line(text: str) -> str:
    return text.replace("\r", "\\r").replace("\n", "\\n")


def setup_logging(service: str, level: str = "INFO", fmt: str = "json", stream: TextIO | None = None) -> None:
    """The root logger writes `fmt` lines at `level` and above to `stream` (stderr); called once at startup,
    replacing whatever handlers the root logger had."""
    formatter = JsonFormatter(service) if fmt == "json" else TextFormatter(service)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    logging.captureWarnings(True)


_access: ContextVar[dict[str, Any] | None] = ContextVar("eesd_access_fields", default=None)


def access_fields() -> dict[str, Any]:
    """The fields the running call adds to its access line (a throwaway dict outside an access-logged call).
    A value with an `access_fields()` method (serving.metrics.RequestTimes) is expanded when the line is
    written, so it reports what the call got to, however it ended."""
    fields = _access.get()
    return fields if fields is not None else {}


@contextlib.contextmanager
def access_scope(call: Call) -> Iterator[None]:
    """Around one call of the controller's public API (`call.access_logged`; serving.observability opens it
    for every call): writes its access line to the `eesd.access` logger when it ends, with the status
    `call.status` holds then, and puts the same fields on the call's span."""
    if not call.access_logged:
        yield
        return
    fields: dict[str, Any] = {}
    token, start = _access.set(fields), time.perf_counter()
    try:
        yield
    finally:
        line = _access_line(call, start)
        for key, value in fields.items():
            line.update(value.access_fields() if hasattr(value, "access_fields") else {key: value})
        tracing.annotate(**{f"eesd.{k}": v for k, v in line.items() if k not in ("method", "peer")})
        logging.getLogger(ACCESS_LOGGER).info("%s %s", line["method"], line["status"], extra=line)
        with contextlib.suppress(ValueError):  # a generator finished in another context keeps its value
            _access.reset(token)


def _access_line(call: Call, start: float) -> dict[str, Any]:
    line: dict[str, Any] = {"method": call.name, "status": call.status_name, "protocol": call.protocol}
    if call.session:
        line["session"] = call.session[:64]  # client-chosen: bounded (and escaped by the formatter)
    line["duration_ms"] = round((time.perf_counter() - start) * 1e3, 3)
    if call.peer:
        line["peer"] = call.peer
    return line
