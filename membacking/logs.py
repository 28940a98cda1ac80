"""Logging set-up for the daemon and mappers: plain text or one JSON object per line.

Records keep their `extra` fields (e.g. `pid`, `reason`) in JSON output.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                plain = value is None or isinstance(value, (str, int, float, bool))
                out[key] = value if plain else repr(value)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


def ready_line(fmt: str, fields: dict[str, Any]) -> str:
    """The daemon's one line on stdout once it serves: `membacking manager ready: key=value ...`
    as text, or one JSON object like the log lines (`msg` "membacking manager ready")."""
    if fmt == "json":
        record = logging.makeLogRecord(
            {"name": "membacking.manager", "levelno": logging.INFO, "levelname": "INFO"}
        )
        record.msg = "membacking manager ready"
        for key, value in fields.items():
            setattr(record, key, value)
        return JsonFormatter().format(record)
    shown = {**fields}
    if "address_space" in shown:
        from .units import format_size

        shown["address_space"] = format_size(shown["address_space"])
    text = " ".join(
        f"{key.replace('_', '-')}={'none' if value is None else value}"
        for key, value in shown.items()
    )
    return f"membacking manager ready: {text}"


def configure(level: str = "info", fmt: str = "text") -> None:
    """Send log records to stderr in `fmt` ("text" or "json") from `level` up."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
