"""Workers that die, freeze and fail the way GPUs fail: the shot re-runs elsewhere, the retry
budget is spent only on the shot's own failures, and other stories go on.

One `storyfarm serve` with two workers and a short heartbeat timeout; faults are injected per
shot from a plan file (STORYFARM_WORKER_FAULTS, scheduler/gpu_pool/faults.py) that each test extends with
rules matching its own prompts, and every shot start is logged with the worker's pid, so the
tests can tell which process ran which attempt. Scenarios:
- a worker SIGKILLed in the middle of denoising, and workers crashing at a shot's start three times
  in a row: lost attempts, each re-run by another process, and the shot still succeeds on a
  fourth attempt (three real failures would have failed it);
- a frozen worker (no progress, no heartbeat): killed after the heartbeat timeout and confirmed
  dead before its shot is queued again;
- a CUDA error: the worker is replaced, never reused; the shot is lost, not failed;
- out of memory: retried once in low-memory mode; a second one fails the shot with reason
  out_of_memory after exactly two attempts;
- a poison shot (a content failure every time) fails after exactly three attempts while a story
  submitted with it finishes.
"""

from __future__ import annotations

import json
import os
import signal
import time
import uuid

import pytest

from helpers.audit import audit, summary
from helpers.daemon_proc import DaemonProcess
from storyfarm.daemon.store import JobStore
from storyfarm.scheduler.gpu_pool import faults
from storyfarm.v1 import render_pb2 as pb

pytestmark = pytest.mark.slow
HEARTBEAT_S = 6.0
MAX_ATTEMPTS = 3


def pid_alive(pid: int) -> bool:
    psutil = pytest.importorskip("psutil", reason="psutil tells whether a worker process is gone")
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


class Farm:
    def __init__(self, daemon: DaemonProcess, plan):
        self.daemon, self.plan = daemon, plan

    def submit(self, tag: str, shots: int = 1, steps: int = 2, frames: int = 5) -> str:
        text = json.dumps({"name": tag, "resolution": "64x32", "frames": frames, "steps": steps,
                           "shots": [{"prompt": f"{tag} shot {i}: fog over the quay"} for i in range(shots)]})
        return self.daemon.stub.SubmitStory(pb.SubmitStoryRequest(request_id=uuid.uuid4().hex, story_json=text),
                                            timeout=30).story_id

    def wait(self, story_id: str, states=(pb.STORY_STATE_SUCCEEDED,), timeout: float = 150) -> pb.Story:
        deadline = time.monotonic() + timeout
        while (story := self.daemon.stub.GetStory(pb.GetStoryRequest(story_id=story_id), timeout=10)).state not in states:
            assert story.state not in (pb.STORY_STATE_FAILED, pb.STORY_STATE_CANCELLED, pb.STORY_STATE_SUCCEEDED), story
            assert time.monotonic() < deadline, f"story {story_id} still {story.state}: {self.daemon.tail()}"
            time.sleep(0.1)
        return story

    def attempts(self, story_id: str, index: int = 0):
        with JobStore.open(self.daemon.data / "storyfarm.db") as store:
            shot = store.get_story(story_id).shots[index]
            return store.attempts(shot.id)

    def starts(self, story_id: str, index: int = 0) -> list[dict]:
        """The worker-side log of this shot's starts: pid, attempt, the fault injected."""
        return [e for e in faults.read_log(self.plan) if e["story_id"] == story_id and e["shot_index"] == index]


@pytest.fixture(scope="module")
def farm(tmp_path_factory):
    folder = tmp_path_factory.mktemp("worker-faults")
    plan = folder / "faults.json"
    faults.add_rules(plan, [])
    daemon = DaemonProcess(folder / "data", env={"STORYFARM_WORKER_FAULTS": str(plan)}, config={
        "workers": 2, "max_attempts": MAX_ATTEMPTS,
        # failures of this test's injecting are many and quick: never take the group out of service
        "scheduler": {"heartbeat_timeout_s": HEARTBEAT_S, "failure_limit": 1000, "failure_window_s": 1.0}})
    daemon.start()
    try:
        yield Farm(daemon, plan)
    finally:
        daemon.stop()


def test_a_worker_killed_mid_shot_or_crashing_three_times_costs_no_retry_budget(farm, figures):
    # SIGKILL from outside while the shot is denoising.
    story_id = farm.submit("midkill", steps=40, frames=9)
    deadline = time.monotonic() + 90
    while True:
        story = farm.daemon.stub.GetStory(pb.GetStoryRequest(story_id=story_id), timeout=10)
        if story.shots[0].progress.step >= 2 and farm.starts(story_id):
            break
        assert time.monotonic() < deadline and story.state != pb.STORY_STATE_SUCCEEDED, "could not catch the shot mid-way"
        time.sleep(0.02)
    victim = farm.starts(story_id)[-1]["pid"]
    os.kill(victim, signal.SIGKILL)
    farm.wait(story_id)
    outcomes = [a.outcome for a in farm.attempts(story_id)]
    assert outcomes == ["lost", "succeeded"], outcomes
    pids = [e["pid"] for e in farm.starts(story_id)]
    assert pids[0] == victim and pids[-1] != victim, pids

    # Three crashes at the shot's start, then it renders: four attempts for a 3-attempt budget.
    faults.add_rules(farm.plan, [{"match": {"prompt_contains": "crashy shot 0"}, "kind": "crash", "times": 3}])
    crashy = farm.submit("crashy", shots=2)
    farm.wait(crashy)
    outcomes = [a.outcome for a in farm.attempts(crashy)]
    assert outcomes == ["lost", "lost", "lost", "succeeded"], outcomes
    starts = farm.starts(crashy)
    assert [e["fault"] for e in starts] == ["crash"] * 3 + [None], starts
    assert all(a["pid"] != b["pid"] for a, b in zip(starts, starts[1:])), "a crashed process ran the shot again"
    report = audit(farm.daemon.data, [story_id, crashy])
    figures.setdefault("worker faults", {})["killed mid-shot or crashed"] = summary(report)


def test_a_frozen_worker_is_confirmed_dead_before_its_shot_is_queued_again(farm, figures):
    faults.add_rules(farm.plan, [{"match": {"prompt_contains": "frozen shot 0"}, "kind": "freeze", "times": 1}])
    story_id = farm.submit("frozen")
    deadline = time.monotonic() + 60
    while not (starts := farm.starts(story_id)):
        assert time.monotonic() < deadline, "the frozen shot never started"
        time.sleep(0.05)
    frozen = starts[0]["pid"]
    frozen_at = time.monotonic()
    alive_at_requeue = None
    while alive_at_requeue is None:  # the moment the store hands the shot back, is the process gone?
        attempts = farm.attempts(story_id)
        if attempts[0].finished_at is not None:
            alive_at_requeue = pid_alive(frozen)
        assert time.monotonic() - frozen_at < HEARTBEAT_S + 60, "the frozen worker was never replaced"
        time.sleep(0.02)
    assert alive_at_requeue is False, "the shot was queued again while its frozen worker was still alive"
    waited = time.monotonic() - frozen_at
    assert waited >= HEARTBEAT_S * 0.9, f"re-queued after {waited:.1f} s, before the heartbeat timeout"
    farm.wait(story_id)
    attempts = farm.attempts(story_id)
    assert [a.outcome for a in attempts] == ["lost", "succeeded"], [(a.outcome, a.error) for a in attempts]
    assert "heartbeat" in (attempts[0].error or ""), attempts[0].error
    assert farm.starts(story_id)[-1]["pid"] != frozen
    figures.setdefault("worker faults", {})["frozen"] = {"heartbeat_timeout_s": HEARTBEAT_S,
                                                          "requeued_after_s": round(waited, 1),
                                                          "alive at requeue": alive_at_requeue}


def test_a_cuda_error_replaces_the_worker_and_the_shot_is_lost_not_failed(farm, figures):
    faults.add_rules(farm.plan, [{"match": {"prompt_contains": "cudaerr shot 0"}, "kind": "cuda_error", "times": 1}])
    story_id = farm.submit("cudaerr")
    farm.wait(story_id)
    attempts = farm.attempts(story_id)
    assert [a.outcome for a in attempts] == ["lost", "succeeded"], [(a.outcome, a.error) for a in attempts]
    assert "CUDA error" in (attempts[0].error or "") or "cuda" in (attempts[0].error or "").lower(), attempts[0].error
    starts = farm.starts(story_id)
    assert starts[0]["fault"] == "cuda_error" and starts[-1]["pid"] != starts[0]["pid"]
    deadline = time.monotonic() + 30
    while pid_alive(starts[0]["pid"]):  # replaced, never reused
        assert time.monotonic() < deadline, "the worker that hit a CUDA error is still running"
        time.sleep(0.1)
    figures.setdefault("worker faults", {})["cuda error"] = {"outcomes": [a.outcome for a in attempts]}


def test_out_of_memory_is_retried_once_in_low_memory_mode_then_fails_the_shot(farm, figures):
    faults.add_rules(farm.plan, [{"match": {"prompt_contains": "oomonce shot 0"}, "kind": "oom", "times": 1},
                                 {"match": {"prompt_contains": "oomtwice shot 0"}, "kind": "oom", "times": 5}])
    once, twice = farm.submit("oomonce"), farm.submit("oomtwice")
    farm.wait(once)
    starts = farm.starts(once)
    assert [(e["fault"], e["low_memory"]) for e in starts] == [("oom", False), (None, True)], starts
    assert [a.outcome for a in farm.attempts(once)] == ["failed", "succeeded"]
    story = farm.wait(twice, states=(pb.STORY_STATE_FAILED,))
    attempts = farm.attempts(twice)
    assert [a.outcome for a in attempts] == ["failed", "failed"], [(a.outcome, a.error) for a in attempts]
    assert [e["low_memory"] for e in farm.starts(twice)] == [False, True]
    assert "out_of_memory" in story.shots[0].error or "out_of_memory" in (attempts[-1].error or ""), story.shots[0].error
    figures.setdefault("worker faults", {})["out of memory"] = {
        "once": [a.outcome for a in farm.attempts(once)], "twice": [a.outcome for a in attempts]}


def test_a_poison_shot_fails_after_exactly_three_attempts_while_another_story_finishes(farm, figures):
    faults.add_rules(farm.plan, [{"match": {"prompt_contains": "poison shot 1"}, "kind": "content", "times": 99}])
    poison, healthy = farm.submit("poison", shots=3), farm.submit("healthy", shots=3)
    story = farm.wait(poison, states=(pb.STORY_STATE_FAILED,))
    attempts = farm.attempts(poison, 1)
    assert [a.outcome for a in attempts] == ["failed"] * MAX_ATTEMPTS, [(a.outcome, a.error) for a in attempts]
    assert [s.state for s in story.shots] == [pb.SHOT_STATE_SUCCEEDED, pb.SHOT_STATE_FAILED, pb.SHOT_STATE_WAITING]
    assert "injected content failure" in story.shots[1].error
    farm.wait(healthy)
    report = audit(farm.daemon.data, [poison, healthy], expect={poison: "failed", healthy: "succeeded"})
    figures.setdefault("worker faults", {})["poison"] = {"attempts": len(attempts), **summary(report)}
