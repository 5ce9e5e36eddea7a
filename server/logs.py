"""Logging: plain text or one JSON object per line, and the id of the request being served.

Every HTTP request gets an id: the client's ``X-Request-Id`` when it is a sane token, else a fresh one.
It goes back in the reply's ``X-Request-Id`` header and into every log line written while the request is
served (the access line, error logs), so a reply, its log lines and a trace can be joined. Request texts
and secrets are never logged: log calls pass routes, statuses, counts and timings, never bodies or headers.
"""

from __future__ import annotations

import contextvars
import itertools
import json
import logging
import os
import re
import sys
from datetime import UTC, datetime

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)

_SANE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:/+=-]{1,128}$")
# Attributes every LogRecord has; anything else on a record was passed with ``extra=`` and is logged.
_RECORD_FIELDS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


def request_id_from(header: str | None) -> str:
    """The client's id if it is a sane token (no spaces, quotes or control characters, at most 128
    characters: it is echoed in a header and written to logs), else a new one: 32 hex digits, this
    process's 64 random bits then a count (unique, and no ``getrandom`` system call per request)."""
    if header is not None and _SANE_REQUEST_ID.match(header):
        return header
    return f"{_id_prefix}{next(_id_count):016x}"


def _new_id_prefix() -> None:
    global _id_prefix, _id_count
    _id_prefix, _id_count = os.urandom(8).hex(), itertools.count()


_id_prefix, _id_count = "", itertools.count()
_new_id_prefix()
os.register_at_fork(after_in_child=_new_id_prefix)  # a forked child must not repeat its parent's ids


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, process tag, request id, extras."""

    def __init__(self, process: str = "") -> None:
        super().__init__()
        self.process = process

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if self.process:
            entry["process"] = self.process
        request_id = request_id_var.get()
        if request_id is not None:
            entry["request_id"] = request_id
        for key, value in vars(record).items():
            if key not in _RECORD_FIELDS and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class _RequestIdFilter(logging.Filter):
    """Text logs: `` [request_id]`` after the logger name while a request is served."""

    def filter(self, record: logging.LogRecord) -> bool:
        request_id = request_id_var.get()
        record.request_tag = f" [{request_id}]" if request_id is not None else ""
        return True


def configure_logging(level: str, process: str = "", log_format: str = "text") -> None:
    """Logs on stderr, as text or JSON lines; request texts are never logged."""
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter(process))
    else:
        tag = f"[{process}] " if process else ""
        handler.setFormatter(
            logging.Formatter(f"%(asctime)s %(levelname)s {tag}%(name)s%(request_tag)s: %(message)s")
        )
        handler.addFilter(_RequestIdFilter())
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
