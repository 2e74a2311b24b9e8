"""The daemon's log lines: `log_format: text` for people, `json` (one object per line) for log
shippers, and a dispatch observer that logs every attempt, story end and worker event with ids.

Why JSON lines: a farm's logs are searched by story and shot, not read top to bottom. Every line
is one JSON object with `time` (UTC, ISO 8601), `level`, `logger`, `message`, and the context
fields the record carries (`story_id`, `shot_id`, `shot_index`, `attempt_id`, `worker`, `project`,
passed as `extra=`); an exception adds `exc`. Text lines carry the same context at their end.
`configure_logging` replaces the root logger's handlers (stderr), so it is called once, by
`storyfarm serve`, never by code that runs inside tests or other programs.
"""

from __future__ import annotations

import json
import logging
import sys
import time

CONTEXT = ("story_id", "shot_id", "shot_index", "attempt_id", "worker", "device", "project", "outcome", "reason")
FORMATS = ("text", "json")


def _context(record: logging.LogRecord) -> dict:
    return {key: getattr(record, key) for key in CONTEXT if getattr(record, key, None) is not None}


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
        return line + (" [" + " ".join(f"{k}={v}" for k, v in context.items()) + "]" if context else "")


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


class LogObserver:
    """A DispatchObserver that writes one line per attempt start and end, story end and worker
    event, each with the ids a search needs."""

    def __init__(self, logger: logging.Logger | None = None):
        self.log = logger or logging.getLogger("storyfarm.farm")

    @staticmethod
    def _ids(task, **more) -> dict:
        return {"story_id": task.story_id, "shot_id": task.shot_id, "shot_index": task.shot_index,
                "attempt_id": task.attempt_id, **more}

    def attempt_started(self, task, *, worker_id, project, priority, queue_wait_s, placement) -> None:
        self.log.info("shot %d started on %s (%s placement, waited %.1f s)", task.shot_index, worker_id, placement,
                      queue_wait_s, extra=self._ids(task, worker=worker_id, project=project))

    def attempt_finished(self, task, *, worker_id, project, outcome, reason, report) -> None:
        level = logging.INFO if outcome in ("succeeded", "cancelled") else logging.WARNING
        error = getattr(report, "error", None)
        self.log.log(level, "shot %d %s on %s (%s)%s", task.shot_index, outcome, worker_id, reason,
                     f": {error}" if error else "",
                     extra=self._ids(task, worker=worker_id, project=project, outcome=outcome, reason=reason))

    def story_finished(self, story_id, *, project, state, reason, seconds) -> None:
        level = logging.INFO if state == "succeeded" else logging.WARNING
        self.log.log(level, "story %s %s after %.1f s (%s)", story_id, state, seconds, reason,
                     extra={"story_id": story_id, "project": project, "outcome": state, "reason": reason})

    def worker_event(self, worker_id, *, device, event, reason="") -> None:
        level = logging.INFO if event in ("started", "ready") else logging.WARNING
        self.log.log(level, "worker %s %s%s", worker_id, event, f" ({reason})" if reason else "",
                     extra={"worker": worker_id, "device": device, "reason": reason or None})
