"""The server's log lines: plain text, or one JSON object per record (``--json-logs``), the same in the HTTP
process and the model worker.

``configure("json" | "text", level)`` attaches one stderr handler to the ``edgerope`` and ``uvicorn`` loggers;
records that carry ``extra={"request": {...}}`` (one per request, worker deaths and restarts) log those fields.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

LOGGERS = ("edgerope", "uvicorn")


class JsonLines(logging.Formatter):
    """One JSON object per log record: the request fields when the server attached them, else the message."""

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {"time": round(record.created, 3), "level": record.levelname, "logger": record.name}
        request = getattr(record, "request", None)
        data.update(request if isinstance(request, dict) else {"message": record.getMessage()})
        if record.exc_info and not isinstance(request, dict):
            data["exception"] = self.formatException(record.exc_info)
        return json.dumps(data, default=str)


def configure(fmt: str, level: int = logging.INFO) -> None:
    """Log to stderr as ``fmt`` ("json" or "text") from ``level`` on."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLines() if fmt == "json" else logging.Formatter("%(asctime)s %(message)s"))
    for name in LOGGERS:
        log = logging.getLogger(name)
        log.handlers[:] = [handler]
        log.setLevel(level if name == "edgerope" else max(level, logging.WARNING))  # uvicorn: problems only
        log.propagate = False
