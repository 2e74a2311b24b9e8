"""Log line formats shared by the daemon and its worker processes: `text` for people, `json` (one
object per line) for log shippers.

Why here, in the scheduler layer: workers run in their own processes and must write the same
format as the daemon that spawned them (a log shipper reading the daemon's stderr gets both), and
workers never import the daemon. The daemon passes its format to workers in LOG_FORMAT_ENV.

Every JSON line is one object with `time` (UTC, ISO 8601), `level`, `logger`, `message`, and the
context fields the record carries (`story_id`, `shot_id`, `shot_index`, `attempt_id`, `worker`,
`project`, passed as `extra=`); an exception adds `exc`. Text lines carry the same context at their end.

Structured values (a warm-up report, a cluster's resources) go in FIELDS, passed as `extra=` too,
never formatted into the message: in JSON they stay objects a log query can filter on (a Python
repr in `message` is neither JSON nor stable), in text they are written as compact JSON. Other
`extra=` keys are dropped, so a line's keys are the known ones.
"""

from __future__ import annotations

import json
import logging
import sys
import time

LOG_FORMAT_ENV = "STORYFARM_LOG_FORMAT"
CONTEXT = ("story_id", "shot_id", "shot_index", "attempt_id", "worker", "device", "project", "outcome", "reason")
# attention: the kernel a worker runs; warmup: engine.warm_up()'s report; resources: a Ray cluster's
FIELDS = ("attention", "warmup", "resources")
FORMATS = ("text", "json")


def _context(record: logging.LogRecord) -> dict:
    return {key: getattr(record, key) for key in CONTEXT + FIELDS if getattr(record, key, None) is not None}


def _text_value(value) -> str:
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, default=str, ensure_ascii=False, separators=(",", ":"))
    return str(value)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            **_context(record),
        }
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    def __init__(self):
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        context = _context(record)
        return line + (" [" + " ".join(f"{k}={_text_value(v)}" for k, v in context.items()) + "]" if context else "")


def configure_logging(log_format: str, level: int = logging.INFO, stream=None) -> logging.Handler:
    """Route the root logger to `stream` (stderr) in `log_format`; returns the handler."""
    if log_format not in FORMATS:
        raise ValueError(f"log_format: {log_format!r} is not one of {', '.join(FORMATS)}")
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    return handler
