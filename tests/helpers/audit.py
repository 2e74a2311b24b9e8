"""The "exactly once" audit of a data dir after whatever a test did to the daemon.

Why one function: every crash, kill and shutdown test ends with the same promise, checked the same
way from what is on disk (the SQLite file and the story folders), never from what the daemon says:
- the store passes SQLite's integrity and foreign-key checks, and no attempt is left open;
- every story finished in the state the test expects, every shot of a succeeded story succeeded
  exactly once (one `succeeded` attempt; other attempts `lost` or `failed`);
- every artifact was published once (one `artifact_published` event per name) and its file is
  there with the recorded size and sha256; every shot of a succeeded story has its clip;
- no temporary file (`.<name>.<random>.tmp<ext>`) or half-removed story folder is left behind.
It returns what it checked (stories, shots, artifacts whose bytes matched) and the attempts per
shot, which the tests report.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

from storyfarm.daemon.artifacts import REMOVAL_PREFIX, TEMPORARY_PATTERN
from storyfarm.daemon.store import JobStore


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def leftovers(data: Path) -> list[str]:
    """Temporaries and half-removed folders anywhere under the data dir's stories and references."""
    found = []
    for folder in (data / "stories", data / "references"):
        for path in folder.rglob("*") if folder.exists() else ():
            if TEMPORARY_PATTERN.fullmatch(path.name) or path.name.startswith(REMOVAL_PREFIX):
                found.append(str(path.relative_to(data)))
    return sorted(found)


def events(store: JobStore, story_id: str) -> list:
    out, seq = [], 0
    while batch := store.events_since(story_id, seq, limit=500):
        out += batch
        seq = batch[-1].seq
    return out


def audit(data: Path, story_ids, *, expect: str | dict = "succeeded") -> dict:
    """Check the promise for `story_ids` (final state `expect`, or {story_id: state}); return
    {"attempts": {story_id: [outcomes of shot 0's attempts, of shot 1's, ...]}, "stories": n,
    "shots": n, "artifacts verified": n}. Raises AssertionError."""
    data = Path(data)
    attempts: dict[str, list[list[str]]] = {}
    verified = 0
    with JobStore.open(data / "storyfarm.db") as store:
        assert store.integrity_check(), "SQLite integrity or foreign-key check failed"
        for story_id in story_ids:
            story = store.get_story(story_id)
            assert story is not None, f"acknowledged story {story_id} is lost"
            wanted = expect if isinstance(expect, str) else expect[story_id]
            assert story.state == wanted, f"story {story_id} is {story.state}, expected {wanted}: {story.error}"
            per_shot = []
            for shot in story.shots:
                outcomes = [a.outcome for a in store.attempts(shot.id)]
                assert None not in outcomes, f"story {story_id} shot {shot.index}: an attempt is still open {outcomes}"
                if story.state == "succeeded":
                    assert shot.state == "succeeded" and outcomes.count("succeeded") == 1, (story_id, shot.index, outcomes)
                per_shot.append(outcomes)
            attempts[story_id] = per_shot
            published = Counter(e.payload["name"] for e in events(store, story_id) if e.kind == "artifact_published")
            twice = {name: n for name, n in published.items() if n > 1}
            assert not twice, f"story {story_id}: artifacts published more than once: {twice}"
            recorded = {a.name: a for a in story.artifacts}
            assert set(published) == set(recorded), (story_id, set(published) ^ set(recorded))
            for artifact in story.artifacts:
                path = data / artifact.path
                assert path.is_file(), f"story {story_id}: artifact {artifact.name} is recorded but missing on disk"
                assert path.stat().st_size == artifact.size and sha256(path) == artifact.sha256, \
                    f"story {story_id}: {artifact.name} on disk does not match its record"
                verified += 1
            if story.state == "succeeded":
                clips = Counter(a.shot_index for a in story.artifacts if a.kind == "shot_video")
                assert clips == Counter(range(len(story.shots))), f"story {story_id}: shot clips {dict(clips)}"
    left = leftovers(data)
    assert not left, f"temporary files left behind: {left}"
    return {"attempts": attempts, "stories": len(attempts), "shots": sum(len(s) for s in attempts.values()),
            "artifacts verified": verified}


def summary(report: dict) -> dict:
    """The audit for the figures: counts, and how many shots took 1, 2, 3 ... attempts."""
    counts = Counter(len(outcomes) for shots in report["attempts"].values() for outcomes in shots)
    per_shot = {f"{n} attempt{'' if n == 1 else 's'}": counts[n] for n in sorted(counts)}
    return {**{k: v for k, v in report.items() if k != "attempts"}, "attempts per shot": per_shot}
