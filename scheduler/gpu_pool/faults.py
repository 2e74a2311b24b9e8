"""Injected faults for the reliability suite: named crash points and per-shot worker faults.

Why this exists: "every acknowledged story finishes exactly once" is only believable once the
daemon has been killed at its worst moments and its workers have crashed, frozen and failed in
every way a GPU fails. Those moments are inside the code, so the code names them here, in one
module both layers may import (the daemon imports the scheduler; m2v never imports either: its
one seam, `m2v.files.before_replace`, is armed from here inside the worker).

Everything is driven by environment variables that only tests set. Unset, every hook is one
environment lookup and a return: nothing is armed, nothing is read from disk.

- `STORYFARM_CRASH_AT="point[:n][,point[:n]...]"`: SIGKILL at the n-th pass (default the first)
  through `crash_point(point)` in this process. Points: `after_submit_commit` (the story is on disk,
  the client has no answer), `after_publish_before_commit` (a shot's files are published, the store
  does not know yet), `during_recovery` (start-up recovery half done, its transaction open) and
  `mid_artifact_write` (a worker's atomic write: the temporary is half written, not renamed). A
  crash point in a worker takes the daemon down with it (its parent first): a host going down.
- `STORYFARM_STALL_AT="point:seconds[:times]"`: sleep at that point instead, the first `times`
  passes (default: every pass) since this value was set (a reply that arrives after the client's
  deadline although the commit happened: the client-retry tests).
- `STORYFARM_WORKER_FAULTS=/path/plan.json`: a list of `{"match": {"prompt_contains": str,
  "story_name": str, "shot_index": int}, "kind": crash | freeze | cuda_error | oom | content,
  "times": n}`, read by `worker_fault(task)` at the start of every shot (so a test may add rules
  while the daemon runs). A rule fires for the first `times` matching shots, counted per rule in
  `plan.json.counts` under a file lock so the counts survive worker replacement; every shot start is logged to `plan.json.log` (one JSON line: pid,
  attempt, story, shot, low_memory, the fault fired or null) for the tests to read back.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import threading
import time
from contextlib import contextmanager
from pathlib import Path

CRASH_ENV = "STORYFARM_CRASH_AT"
STALL_ENV = "STORYFARM_STALL_AT"
PLAN_ENV = "STORYFARM_WORKER_FAULTS"
CRASH_POINTS = ("after_submit_commit", "after_publish_before_commit", "during_recovery", "mid_artifact_write")
FAULT_KINDS = ("crash", "freeze", "cuda_error", "oom", "content")
MATCH_KEYS = ("prompt_contains", "story_name", "shot_index")

_hits: dict[str, int] = {}  # passes through each point in this process
stalls: dict[str, int] = {}  # STORYFARM_STALL_AT value -> stalls done under it (tests read it)
_write_armed = False
_lock = threading.Lock()


class OutOfMemoryError(RuntimeError):
    """Named like torch.cuda.OutOfMemoryError (workers classify by type name or text)."""


def parse_points(value: str, env: str = CRASH_ENV) -> dict[str, float]:
    """`"a:2,b"` -> {"a": 2, "b": 1}; unknown points and bad numbers raise ValueError naming them."""
    out: dict[str, float] = {}
    for item in filter(None, (part.strip() for part in value.split(","))):
        name, _, number = item.partition(":")
        if name not in CRASH_POINTS:
            raise ValueError(f"{env}: unknown point {name!r}; known: {', '.join(CRASH_POINTS)}")
        try:
            out[name] = float(number) if number else 1.0
        except ValueError:
            raise ValueError(f"{env}: {item!r}: expected POINT or POINT:NUMBER") from None
        if out[name] <= 0:
            raise ValueError(f"{env}: {item!r}: the number must be positive")
    return out


def parse_stall(value: str) -> tuple[str, float, int | None]:
    """`"point:seconds[:times]"` -> (point, seconds, times or None); bad values raise ValueError."""
    name, _, rest = value.partition(":")
    seconds, _, times = rest.partition(":")
    parse_points(name, STALL_ENV)
    try:
        return name, float(seconds), int(times) if times else None
    except ValueError:
        raise ValueError(f"{STALL_ENV}: {value!r}: expected POINT:SECONDS or POINT:SECONDS:TIMES") from None


def _stall(value: str, name: str) -> None:
    point, seconds, times = parse_stall(value)
    if point != name:
        return
    with _lock:
        if times is not None and stalls.get(value, 0) >= times:
            return
        stalls[value] = stalls.get(value, 0) + 1
    time.sleep(seconds)


def _die() -> None:
    """SIGKILL this process; inside a render worker, its daemon first (the host goes down)."""
    if _in_worker():
        os.kill(os.getppid(), signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(60)  # never returns: the signal is delivered before this ends


def _in_worker() -> bool:
    import multiprocessing

    return multiprocessing.parent_process() is not None


def _count(name: str) -> int:
    """This pass's number at `name` (gRPC handlers pass through points from many threads)."""
    with _lock:
        _hits[name] = _hits.get(name, 0) + 1
        return _hits[name]


def crash_point(name: str) -> None:
    """Die (STORYFARM_CRASH_AT) or stall (STORYFARM_STALL_AT) here when a test asks for `name`."""
    crash, stall = os.environ.get(CRASH_ENV), os.environ.get(STALL_ENV)
    if not crash and not stall:
        return
    if stall:
        _stall(stall, name)
    if crash and _count(name) == parse_points(crash).get(name):
        _die()


# -- the worker side ----------------------------------------------------------------------------

def _arm_write_crash() -> None:
    """Point m2v's atomic writes at `mid_artifact_write`: the n-th write in this worker is cut in
    half on disk and the host dies before the rename."""
    global _write_armed
    if _write_armed or "mid_artifact_write" not in os.environ.get(CRASH_ENV, ""):
        return
    from storyfarm.story import files

    def before_replace(tmp: Path, final: Path) -> None:
        if _count("mid_artifact_write") == parse_points(os.environ.get(CRASH_ENV, "")).get("mid_artifact_write"):
            os.truncate(tmp, tmp.stat().st_size // 2)
            _die()

    files.before_replace = before_replace
    _write_armed = True


def load_plan(path: str | os.PathLike) -> list[dict]:
    """The fault plan, checked: every rule has a known kind, a known match and times >= 1."""
    try:
        plan = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{PLAN_ENV}: cannot read the fault plan {path}: {exc}") from None
    if not isinstance(plan, list):
        raise ValueError(f"{PLAN_ENV}: {path}: expected a JSON list of rules")
    for i, rule in enumerate(plan):
        where = f"{PLAN_ENV}: {path}: rule [{i}]"
        if not isinstance(rule, dict) or rule.get("kind") not in FAULT_KINDS:
            raise ValueError(f"{where}.kind: one of {', '.join(FAULT_KINDS)}")
        match = rule.get("match")
        if not isinstance(match, dict) or not match or set(match) - set(MATCH_KEYS):
            raise ValueError(f"{where}.match: a mapping of {', '.join(MATCH_KEYS)}")
        if not isinstance(rule.get("times", 1), int) or rule.get("times", 1) < 1:
            raise ValueError(f"{where}.times: an integer >= 1")
    return plan


@contextmanager
def _locked(path: Path):
    with open(path.with_name(path.name + ".lock"), "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _shot_facts(task) -> dict:
    """What rules match on: the shot's prompt, the story's name, the shot's index."""
    from storyfarm.story.format import parse_story

    story = parse_story(task.story_document, source=f"story {task.story_id}", base_dir=task.references_dir,
                        name=task.story_name)
    return {"prompt": story.shots[task.shot_index].prompt, "story_name": story.name, "shot_index": task.shot_index}


def _matches(match: dict, facts: dict) -> bool:
    return (match.get("prompt_contains", "") in facts["prompt"]
            and match.get("story_name", facts["story_name"]) == facts["story_name"]
            and match.get("shot_index", facts["shot_index"]) == facts["shot_index"])


def _claim(plan_path: Path, facts: dict, task) -> str | None:
    """Under the lock: the kind of the first rule that still fires for this shot (counted), and a
    log line for the shot start either way."""
    plan = load_plan(plan_path)
    counts_path = plan_path.with_name(plan_path.name + ".counts")
    with _locked(plan_path):
        counts = json.loads(counts_path.read_text()) if counts_path.exists() else {}
        fired = None
        for rule in plan:
            key = json.dumps(rule, sort_keys=True)  # not the position: a test may add rules as it goes
            if _matches(rule["match"], facts) and counts.get(key, 0) < rule.get("times", 1):
                counts[key] = counts.get(key, 0) + 1
                fired = rule["kind"]
                break
        counts_path.write_text(json.dumps(counts))
        line = {"time": time.time(), "pid": os.getpid(), "attempt_id": task.attempt_id, "story_id": task.story_id,
                "shot_index": task.shot_index, "low_memory": bool(getattr(task, "low_memory", False)), "fault": fired}
        with open(plan_path.with_name(plan_path.name + ".log"), "a") as log:
            log.write(json.dumps(line) + "\n")
            log.flush()
            os.fsync(log.fileno())
    return fired


def worker_fault(task) -> None:
    """Called by the worker at the start of every shot: fail the way the test's plan says."""
    if os.environ.get(CRASH_ENV):
        _arm_write_crash()
    plan = os.environ.get(PLAN_ENV)
    if not plan:
        return
    kind = _claim(Path(plan), _shot_facts(task), task)
    if kind == "crash":
        os._exit(70)
    if kind == "freeze":  # a kernel that never returns: no progress, no heartbeat, no reply
        parent = os.getppid()
        while os.getppid() == parent:  # still gone with the daemon, so no test leaves one behind
            time.sleep(0.5)
        os._exit(0)
    if kind == "cuda_error":
        raise RuntimeError("CUDA error: an illegal memory access was encountered")
    if kind == "oom":
        raise OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.15 GiB total capacity; "
                               "77.80 GiB already allocated; injected by the reliability suite)")
    if kind == "content":
        raise ValueError("injected content failure")


def add_rules(plan_path: str | os.PathLike, rules: list[dict]) -> None:
    """Append rules to a plan (created if missing), atomically, under the plan's lock."""
    path = Path(plan_path)
    with _locked(path):
        plan = load_plan(path) if path.exists() else []
        tmp = path.with_name(path.name + ".new")
        tmp.write_text(json.dumps(plan + list(rules)))
        os.replace(tmp, path)
    load_plan(path)  # the rules are checked now, not in the middle of a worker's shot


def read_log(plan_path: str | os.PathLike) -> list[dict]:
    """The shot starts the workers logged against a plan, oldest first."""
    path = Path(plan_path)
    log = path.with_name(path.name + ".log")
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
