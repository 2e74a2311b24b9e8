"""The fault-injection module itself: inert unless a test's environment asks, and strict about
what it is asked (a typo in a crash point must not silently test nothing)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from storyfarm.scheduler.gpu_pool import faults
from storyfarm.scheduler.gpu_pool.messages import ShotTask


def task(prompt: str, name: str = "harbour", index: int = 0) -> ShotTask:
    doc = json.dumps({"name": name, "shots": [{"prompt": f"{prompt} {i}"} for i in range(index + 1)]})
    return ShotTask(attempt_id=f"at_{time.time_ns()}", story_id="st_0123456789abcdef", shot_id="sh_1", shot_index=index,
                    story_document=doc, story_dir="/nonexistent", references_dir="/nonexistent")


def test_unset_means_inert(monkeypatch):
    for env in (faults.CRASH_ENV, faults.STALL_ENV, faults.PLAN_ENV):
        monkeypatch.delenv(env, raising=False)
    for point in faults.CRASH_POINTS:
        faults.crash_point(point)  # returns: no kill, no sleep
    faults.worker_fault(task("x"))
    from storyfarm.story import files

    assert files.before_replace is None  # the write seam stays unarmed


@pytest.mark.parametrize("value, message", [
    ("after_sumbit_commit", "unknown point 'after_sumbit_commit'"),
    ("during_recovery:x", "expected POINT or POINT:NUMBER"),
    ("during_recovery:0", "must be positive"),
])
def test_bad_crash_specs_name_the_variable_and_what_is_allowed(value, message):
    with pytest.raises(ValueError, match=f"{faults.CRASH_ENV}: .*{message}"):
        faults.parse_points(value)


@pytest.mark.parametrize("plan, message", [
    ({"kind": "crash"}, "expected a JSON list"),
    ([{"kind": "explode", "match": {"story_name": "x"}}], r"rule \[0\]\.kind: one of crash, freeze"),
    ([{"kind": "crash", "match": {"prompt": "x"}}], r"rule \[0\]\.match: a mapping of prompt_contains"),
    ([{"kind": "crash", "match": {"story_name": "x"}, "times": 0}], r"rule \[0\]\.times: an integer >= 1"),
])
def test_bad_plans_are_refused_with_the_rule_and_field(tmp_path, plan, message):
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(plan))
    with pytest.raises(ValueError, match=message):
        faults.load_plan(path)


def test_rules_fire_their_number_of_times_across_processes(tmp_path, monkeypatch):
    plan = tmp_path / "plan.json"
    faults.add_rules(plan, [{"match": {"prompt_contains": "storm", "shot_index": 0}, "kind": "content", "times": 2},
                            {"match": {"story_name": "quiet"}, "kind": "oom", "times": 1}])
    monkeypatch.setenv(faults.PLAN_ENV, str(plan))
    script = ("import json, sys; from storyfarm.scheduler.gpu_pool import faults; from storyfarm.scheduler.gpu_pool.messages import ShotTask\n"
              "t = ShotTask('at_x', 'st_0123456789abcdef', 'sh', 0, json.dumps({'name': 'h', 'shots': [{'prompt': 'storm 0'}]}),"
              " '/n', '/n')\n"
              "try:\n    faults.worker_fault(t); print('none')\nexcept ValueError as e:\n    print(e)\n")
    runs = [subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=os.environ, timeout=60)
            for _ in range(3)]
    assert [r.stdout.strip() for r in runs] == ["injected content failure"] * 2 + ["none"], [r.stderr for r in runs]
    with pytest.raises(faults.OutOfMemoryError, match="CUDA out of memory"):
        faults.worker_fault(task("calm", name="quiet"))
    faults.worker_fault(task("calm", name="quiet"))  # its one time is spent
    faults.worker_fault(task("storm", index=1))  # shot 1 does not match shot_index 0
    assert [e["fault"] for e in faults.read_log(plan)] == ["content", "content", None, "oom", None, None]


def test_a_stall_sleeps_its_number_of_times(monkeypatch):
    spec = f"after_submit_commit:0.05:2#{time.time_ns()}"
    with pytest.raises(ValueError, match="POINT:SECONDS"):
        faults.parse_stall(spec)
    spec = f"after_submit_commit:0.05{time.time_ns() % 1000:03d}:2"
    monkeypatch.setenv(faults.STALL_ENV, spec)
    took = []
    for _ in range(3):
        t0 = time.perf_counter()
        faults.crash_point("after_submit_commit")
        faults.crash_point("during_recovery")  # another point: never stalls
        took.append(time.perf_counter() - t0)
    assert took[0] >= 0.05 and took[1] >= 0.05 and took[2] < 0.05, took
    assert faults.stalls[spec] == 2


def test_a_crash_point_sigkills_at_its_hit(tmp_path):
    script = ("from storyfarm.scheduler.gpu_pool import faults\n"
              "for i in range(3):\n    print(i, flush=True); faults.crash_point('after_publish_before_commit')\n")
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                         env={**os.environ, faults.CRASH_ENV: "after_publish_before_commit:2"})
    assert run.returncode == -9 and run.stdout.split() == ["0", "1"], (run.returncode, run.stdout, run.stderr)
