"""Building blocks for the job-store tests (tests/unit/test_store*.py): a strictly increasing clock,
stories of n shots submitted in one call, and one attempt run to an outcome.

Fixtures (db_path, store) live in tests/unit/conftest.py; these are plain functions so that any
test module can import them as `helpers.job_store`.
"""

from __future__ import annotations

import hashlib
import itertools

from storyfarm.daemon.store import ArtifactIn, JobStore, ShotIn

CLOCK = itertools.count(1_000_000)


def tick() -> float:
    """A strictly increasing test clock, so creation order is the order of the calls."""
    return float(next(CLOCK))


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def shots_in(n: int) -> list[ShotIn]:
    return [ShotIn(index=i, scene=1, shot=i + 1, prompt=f"shot {i}", settings='{"steps": 4}') for i in range(n)]


def submit(store: JobStore, n: int = 3, request_id: str | None = None, payload: str = "story",
           project: str = "p", **kw) -> str:
    request_id = request_id or f"req-{next(CLOCK)}"
    return store.submit_story(request_id, project, sha(payload), "a story", '{"scenes": []}', shots_in(n),
                              now=kw.pop("now", None) or tick(), **kw).story_id


def shot_id(store: JobStore, story_id: str, index: int) -> str:
    return store.get_story(story_id).shots[index].id


def states(store: JobStore, story_id: str) -> tuple[str, list[str]]:
    record = store.get_story(story_id)
    return record.state, [s.state for s in record.shots]


def artifact(name: str, **kw) -> ArtifactIn:
    return ArtifactIn(name=name, kind="shot_video", path=f"stories/x/{name}", size=10, sha256=sha(name), **kw)


def run(store: JobStore, story_id: str, index: int, outcome: str = "succeeded", worker: str = "gpu0", **kw):
    attempt = store.start_attempt(shot_id(store, story_id, index), worker, now=tick())
    if outcome == "succeeded" and "artifacts" not in kw:
        kw["artifacts"] = [artifact(f"shot_{index:03d}.mp4")]
    return store.finish_attempt(attempt, outcome, now=tick(), **kw)
