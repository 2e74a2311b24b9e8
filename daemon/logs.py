"""The daemon's log lines: `log_format: text` for people, `json` (one object per line) for log
shippers, and a dispatch observer that logs every attempt, story end and worker event with ids.

Why JSON lines: a farm's logs are searched by story and shot, not read top to bottom. Every line
is one JSON object with `time` (UTC, ISO 8601), `level`, `logger`, `message`, and the context
fields the record carries (`story_id`, `shot_id`, `shot_index`, `attempt_id`, `worker`, `project`,
passed as `extra=`); an exception adds `exc`. Structured values (FIELDS: a warm-up report, a Ray
cluster's resources) are JSON fields too, never Python reprs inside `message`. Text lines carry the
same context at their end.
`configure_logging` replaces the root logger's handlers (stderr), so it is called once, by
`storyfarm serve`, never by code that runs inside tests or other programs. The formats live in
scheduler/gpu_pool/logfmt.py so the worker processes write the same lines.
"""

from __future__ import annotations

import logging

from storyfarm.scheduler.gpu_pool.logfmt import (  # noqa: F401 - the daemon's log formats are the workers' too
    CONTEXT, FIELDS, FORMATS, LOG_FORMAT_ENV, JsonFormatter, TextFormatter, configure_logging,
)
from storyfarm.story.numbering import shot_number


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
        self.log.info("shot %d started on %s (%s placement, waited %.1f s)", shot_number(task.shot_index), worker_id, placement,
                      queue_wait_s, extra=self._ids(task, worker=worker_id, project=project))

    def attempt_finished(self, task, *, worker_id, project, outcome, reason, report, shot_state) -> None:
        level = logging.INFO if outcome in ("succeeded", "cancelled") else logging.WARNING
        error = getattr(report, "error", None)
        self.log.log(level, "shot %d %s on %s (%s)%s", shot_number(task.shot_index), outcome, worker_id, reason,
                     f": {error}" if error else "",
                     extra=self._ids(task, worker=worker_id, project=project, outcome=outcome, reason=reason))

    def story_finished(self, story_id, *, project, state, reason, seconds) -> None:
        level = logging.INFO if state == "succeeded" else logging.WARNING
        self.log.log(level, "story %s %s after %.1f s (%s)", story_id, state, seconds, reason,
                     extra={"story_id": story_id, "project": project, "outcome": state, "reason": reason})

    def rerender_finished(self, story_id, *, project, state, reason, seconds) -> None:
        level = logging.INFO if state == "succeeded" else logging.WARNING
        self.log.log(level, "story %s %s again, %.1f s after its re-render was requested (%s)", story_id, state, seconds,
                     reason, extra={"story_id": story_id, "project": project, "outcome": state, "reason": reason})

    def worker_event(self, worker_id, *, device, event, reason="") -> None:
        level = logging.INFO if event in ("started", "ready") else logging.WARNING
        self.log.log(level, "worker %s %s%s", worker_id, event, f" ({reason})" if reason else "",
                     extra={"worker": worker_id, "device": device, "reason": reason or None})
