"""What the dispatcher tells the rest of the daemon about the work it moves.

The dispatcher is the one place that sees every attempt start and end, every worker come and go,
and every story reach its final state. Metrics, structured logs and anything else that wants to
follow the farm subscribe here instead of being called from the dispatcher's internals, so the
dispatcher stays about placement and bookkeeping. Observers run on the dispatcher thread: they must
be quick and must not raise (an exception is logged and swallowed, never allowed to stop the loop).

Outcomes of an attempt: `succeeded`, `failed` (content: spends the shot's retry budget), `lost`
(infrastructure: worker died, froze or hit a fatal CUDA error; no budget spent), `cancelled`.
`reason` is a short, bounded label (`ok`, `worker_died`, `heartbeat_timeout`, `cuda_error`,
`out_of_memory`, `content`, `cancelled`, `preempted`) fit for a metric label; the full error text
stays in the store.
"""

from __future__ import annotations

import logging
from typing import Protocol

from storyfarm.scheduler.gpu_pool.messages import Done, Failed, ShotTask

log = logging.getLogger(__name__)


class DispatchObserver(Protocol):
    def attempt_started(self, task: ShotTask, *, worker_id: str, project: str, priority: int,
                        queue_wait_s: float, placement: str) -> None:
        """`placement`: `affinity` (the worker already held the story's memory), `moved` (the story
        left the worker that held it), `new` (the story's first shot on any worker)."""

    def attempt_finished(self, task: ShotTask, *, worker_id: str, project: str, outcome: str, reason: str,
                         report: Done | Failed | None, shot_state: str) -> None:
        """`report` is the worker's message when there was one (Done carries `stats`); `shot_state`
        is the shot's state as the store recorded it with this attempt (a final state, or where a
        retry or a lost attempt put it back), so no observer has to guess it."""

    def story_finished(self, story_id: str, *, project: str, state: str, reason: str, seconds: float) -> None:
        """The story reached a final state (`succeeded`, `failed`, `cancelled`); `seconds` since
        its submission. Not called when a re-render ends (see `rerender_finished`)."""

    def rerender_finished(self, story_id: str, *, project: str, state: str, reason: str, seconds: float) -> None:
        """A story brought back by a re-render (RerenderShot: a new take of a shot of a finished
        story) reached a final state again; `seconds` since that re-render was requested. An
        observer without this method is not told: the story had already finished once."""

    def worker_event(self, worker_id: str, *, device: str, event: str, reason: str = "") -> None:
        """`event`: `started`, `ready`, `replaced`, `out_of_service`."""


class Observers:
    """Fans one notification out to every registered observer; a failing observer is logged once
    per call and never breaks the dispatcher."""

    def __init__(self, *observers: DispatchObserver):
        self._observers = list(observers)

    def add(self, observer: DispatchObserver) -> None:
        self._observers.append(observer)

    def _call(self, name: str, *args, **kwargs) -> None:
        for observer in self._observers:
            method = getattr(observer, name, None)
            if method is None:
                continue
            try:
                method(*args, **kwargs)
            except Exception:  # noqa: BLE001 - an observer must never stop the farm
                log.exception("observer %r failed in %s", observer, name)

    def attempt_started(self, *args, **kwargs) -> None:
        self._call("attempt_started", *args, **kwargs)

    def attempt_finished(self, *args, **kwargs) -> None:
        self._call("attempt_finished", *args, **kwargs)

    def story_finished(self, *args, **kwargs) -> None:
        self._call("story_finished", *args, **kwargs)

    def rerender_finished(self, *args, **kwargs) -> None:
        self._call("rerender_finished", *args, **kwargs)

    def worker_event(self, *args, **kwargs) -> None:
        self._call("worker_event", *args, **kwargs)
