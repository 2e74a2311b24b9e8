"""Live progress and wake-ups for watchers, held in memory.

Durable events (state changes, attempts, artifacts) live in the store's event log and are replayed
from there; per-step progress is too chatty to store, so it lives here: the latest progress of each
story (for GetStory) and, for each open watch, a bounded queue of every step (so a watcher sees
each step, not just the last one). Any change bumps a version and wakes every waiting watcher.
"""

from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class LiveProgress:
    shot_index: int
    stage: str
    step: int
    total: int
    worker: str
    time: float


class EventHub:
    def __init__(self):
        self._cond = threading.Condition()
        self._version = 0
        self._progress: dict[str, LiveProgress] = {}
        self._subscribers: dict[str, list[collections.deque]] = {}

    def subscribe(self, story_id: str, maxlen: int = 10_000) -> collections.deque:
        """A queue receiving every progress update of `story_id` until `unsubscribe`."""
        queue: collections.deque = collections.deque(maxlen=maxlen)
        with self._cond:
            self._subscribers.setdefault(story_id, []).append(queue)
        return queue

    def unsubscribe(self, story_id: str, queue: collections.deque) -> None:
        with self._cond:
            queues = self._subscribers.get(story_id, [])
            if queue in queues:
                queues.remove(queue)
            if not queues:
                self._subscribers.pop(story_id, None)

    @property
    def version(self) -> int:
        return self._version

    def changed(self) -> None:
        with self._cond:
            self._version += 1
            self._cond.notify_all()

    def progress(self, story_id: str, shot_index: int, stage: str, step: int, total: int, worker: str) -> None:
        with self._cond:
            update = LiveProgress(shot_index, stage, step, total, worker, time.time())
            self._progress[story_id] = update
            for queue in self._subscribers.get(story_id, ()):
                queue.append(update)
            self._version += 1
            self._cond.notify_all()

    def clear(self, story_id: str) -> None:
        with self._cond:
            self._progress.pop(story_id, None)

    def latest(self, story_id: str) -> LiveProgress | None:
        return self._progress.get(story_id)

    def wait(self, seen_version: int, timeout: float) -> int:
        """Block until something changed after `seen_version` (or timeout); returns the version."""
        with self._cond:
            self._cond.wait_for(lambda: self._version != seen_version, timeout=timeout)
            return self._version
