"""The real Dispatcher with a real JobStore, ArtifactStore and EventHub, driving workers that run
the fake worker (scheduler/gpu_pool/fake.py): placement and affinity, results and their hashes,
content failures and the retry budget, lost attempts, cancel, heartbeat timeouts and the
out-of-memory retry, all without torch. Most tests run the workers as threads
(helpers/threads.py, a clock that moves when told); the last ones spawn real worker processes
through the `mp` executor with the fake factory."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from helpers.threads import Clock, ThreadExecutor
from storyfarm.daemon.artifacts import ArtifactStore
from storyfarm.daemon.config import LimitsConfig
from storyfarm.daemon.dispatcher import Dispatcher
from storyfarm.daemon.events import EventHub
from storyfarm.daemon.store import JobStore
from storyfarm.daemon.submit import check_submit, store_references
from storyfarm.scheduler.gpu_pool.executor import DeviceGroup, SupervisionConfig
from storyfarm.scheduler.gpu_pool.processes import ProcessExecutor
from storyfarm.scheduler.gpu_pool.worker_loop import WORKER_FACTORIES, check_factory
from storyfarm.story.files import sha256_file
from storyfarm.story.lifecycle import RENDER_STAGES
from storyfarm.story.presets import load_preset
from storyfarm.v1 import render_pb2 as pb

FAKE = WORKER_FACTORIES["fake"]
FINAL = ("succeeded", "failed", "cancelled")


def story(name: str, *prompts: str, steps: int = 3) -> str:
    """A story whose shots carry `prompts` (fake: words script the fake worker)."""
    return json.dumps({"name": name, "resolution": "64x32", "frames": 9, "steps": steps,
                       "shots": [{"prompt": f"{name} shot {i}: {p}", **({"cut": False} if i else {})}
                                 for i, p in enumerate(prompts)]})


class Farm:
    """The daemon's parts around one executor; the test turns the dispatcher by hand."""

    def __init__(self, data: Path, executor, max_attempts: int = 3):
        self.data, self.executor = data, executor
        data.mkdir(parents=True, exist_ok=True)
        self.store = JobStore.open(data / "storyfarm.db", max_attempts=max_attempts)
        self.artifacts = ArtifactStore(data)
        self.hub = EventHub()
        self.dispatcher = Dispatcher(self.store, executor, self.artifacts, self.hub, poll_s=0.01)
        executor.start()

    def submit(self, text: str, default_name: str = "") -> str:
        checked = check_submit(pb.SubmitStoryRequest(request_id=uuid.uuid4().hex, story_json=text,
                                                     default_name=default_name), load_preset("tiny"), LimitsConfig())
        store_references(checked, self.data)
        return self.store.submit_story(uuid.uuid4().hex, "default", checked.payload_sha256, checked.story.name,
                                       checked.document, checked.shots).story_id

    def until(self, predicate, timeout: float = 30.0, what: str = "the condition") -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            assert time.monotonic() < deadline, f"{what} not reached in {timeout} s: {self.executor.snapshot()}"
            self.dispatcher.turn()

    def finish(self, *story_ids: str, timeout: float = 30.0) -> list:
        self.until(lambda: all(self.store.get_story(s).state in FINAL for s in story_ids), timeout,
                   f"stories {story_ids} final")
        return [self.store.get_story(s) for s in story_ids]

    def attempts(self, story_id: str, index: int = 0) -> list:
        return self.store.attempts(self.store.get_story(story_id).shots[index].id)

    def close(self) -> None:
        self.executor.stop(grace=2)
        self.store.close()


@pytest.fixture
def make_farm(tmp_path):
    farms = []

    def make(workers: int = 1, max_attempts: int = 3, executor=None, **supervision) -> Farm:
        executor = executor or ThreadExecutor([DeviceGroup(f"cpu{i}") for i in range(workers)], clock=Clock(),
                                              supervision=SupervisionConfig(**supervision))
        farms.append(Farm(tmp_path / f"farm{len(farms)}", executor, max_attempts))
        return farms[-1]

    yield make
    for farm in farms:
        farm.close()


def test_two_stories_on_two_workers_each_stay_with_the_worker_holding_their_memory(make_farm):
    farm = make_farm(workers=2)
    ids = [farm.submit(story(f"s{n}", "harbour", "quay", "lighthouse", "dawn")) for n in range(2)]
    assert [s.state for s in farm.finish(*ids)] == ["succeeded"] * 2
    used = set()
    for story_id in ids:
        per_shot = [[(a.worker, a.outcome) for a in farm.attempts(story_id, i)] for i in range(4)]
        assert all(len(a) == 1 and a[0][1] == "succeeded" for a in per_shot), per_shot
        workers = {a[0][0] for a in per_shot}
        assert len(workers) == 1, f"story {story_id} moved between workers: {per_shot}"
        used |= workers
    assert used == {"w0", "w1"} and farm.executor.restarts == 0


def test_a_story_succeeds_with_every_artifact_recorded_under_its_real_hash(make_farm):
    farm = make_farm()
    story_id = farm.submit(story("ok", "fog", "rain", "sun"))
    watch = farm.hub.subscribe(story_id)
    (record,) = farm.finish(story_id)
    assert record.state == "succeeded"
    names = {a.name: a for a in record.artifacts}
    clips = [s.result["file"] for s in record.shots]
    assert clips == ["shots/001_scene01_shot01.mp4", "shots/002_scene01_shot02.mp4", "shots/003_scene01_shot03.mp4"]
    assert set(names) == {*clips, "story.mp4", "contact_sheet.png", "manifest.json"}
    for artifact in record.artifacts:
        path = farm.data / artifact.path
        assert artifact.sha256 == sha256_file(path) and artifact.size == path.stat().st_size, artifact.name
    for shot in record.shots:
        assert shot.result["sha256"] == names[shot.result["file"]].sha256
        assert {"index", "file", "sha256", "frames", "fps", "seconds", "memory_keyframes"} <= set(shot.result)
    manifest = json.loads((farm.data / names["manifest.json"].path).read_text())
    assert [e["index"] for e in manifest["shots"]] == [0, 1, 2]
    assert (farm.data / names["contact_sheet.png"].path).read_bytes().startswith(b"\x89PNG")
    last = [(u.stage, u.step) for u in watch if u.shot_index == 2]
    stages = list(dict.fromkeys(stage for stage, _ in last))
    assert stages == list(RENDER_STAGES)  # every stage once, in order; the last shot assembles the story
    assert [step for stage, step in last if stage == "denoise"] == [0, 1, 2, 3]


def test_the_workers_manifest_names_an_unnamed_story_as_the_store_does(make_farm):
    """A story without a name of its own is called after its file (the client's default_name)
    everywhere: in the store and in the manifest its worker writes (not "story st_...")."""
    farm = make_farm()
    unnamed = json.dumps({"resolution": "64x32", "frames": 9, "steps": 2, "shots": [{"prompt": "a"}, {"prompt": "b"}]})
    story_id = farm.submit(unnamed, default_name="harbour")
    (record,) = farm.finish(story_id)
    assert record.state == "succeeded" and record.name == "harbour"
    manifest = next(a for a in record.artifacts if a.name == "manifest.json")
    assert json.loads((farm.data / manifest.path).read_text())["story"]["name"] == "harbour"


def test_content_failures_spend_the_retry_budget_then_fail_the_story(make_farm):
    farm = make_farm(max_attempts=3)
    poison = farm.submit(story("poison", "fake:fail"))
    flaky = farm.submit(story("flaky", "fake:fail*2", "calm"))
    poison_record, flaky_record = farm.finish(poison, flaky)
    assert poison_record.state == "failed" and "fake content failure" in poison_record.error
    assert [a.outcome for a in farm.attempts(poison)] == ["failed"] * 3
    assert flaky_record.state == "succeeded"
    assert [a.outcome for a in farm.attempts(flaky)] == ["failed", "failed", "succeeded"]


def test_a_worker_dying_mid_shot_loses_the_attempt_without_spending_the_budget(make_farm):
    farm = make_farm(workers=1, max_attempts=1)  # one real failure would fail the shot
    story_id = farm.submit(story("dies", "calm", "fake:die*1", "calm"))
    (record,) = farm.finish(story_id)
    assert record.state == "succeeded"
    attempts = farm.attempts(story_id, 1)
    assert [a.outcome for a in attempts] == ["lost", "succeeded"]
    assert attempts[0].error.startswith("worker died")
    assert farm.executor.restarts == 1 and farm.executor.workers["w0"].generation == 1


def test_cancel_stops_the_running_shot_at_its_next_step(make_farm):
    farm = make_farm()
    story_id = farm.submit(story("long", "fake:slow=0.05", "after", steps=200))
    watch = farm.hub.subscribe(story_id)
    farm.until(lambda: (p := farm.hub.latest(story_id)) is not None and p.stage == "denoise" and p.step >= 2,
               what="denoising under way")
    at = farm.hub.latest(story_id).step
    farm.store.request_cancel(story_id)  # the story is cancelled at once; its running shot ends at its worker
    started = time.monotonic()
    farm.until(lambda: farm.attempts(story_id)[0].outcome is not None, timeout=5, what="the attempt ended")
    assert time.monotonic() - started < 5
    record = farm.store.get_story(story_id)
    assert record.state == "cancelled" and [s.state for s in record.shots] == ["cancelled"] * 2
    assert [a.outcome for a in farm.attempts(story_id)] == ["cancelled"]
    steps = [u.step for u in watch if u.stage == "denoise"]
    assert max(steps) <= at + 2 < 200  # at most the step already under way
    assert not (farm.artifacts.story_dir(story_id) / "shots").exists()  # nothing published


def test_a_silent_worker_is_killed_at_the_heartbeat_timeout_and_its_shot_runs_again(make_farm):
    farm = make_farm(heartbeat_timeout_s=30)
    clock = farm.executor.clock
    story_id = farm.submit(story("frozen", "fake:hang*1"))
    farm.until(lambda: (p := farm.hub.latest(story_id)) is not None and p.stage == "denoise" and p.step >= 1,
               what="the shot denoising")
    frozen = farm.executor.workers["w0"].runtime
    for _ in range(20):  # it sends nothing more, and nothing happens while the clock stands still
        farm.dispatcher.turn()
    assert farm.executor.workers["w0"].state == "busy" and farm.attempts(story_id)[0].outcome is None
    clock.advance(31)
    (record,) = farm.finish(story_id)
    assert record.state == "succeeded"
    attempts = farm.attempts(story_id)
    assert [a.outcome for a in attempts] == ["lost", "succeeded"]
    assert attempts[0].error.startswith("heartbeat timeout")
    assert not frozen.thread.is_alive()  # killed before its shot was handed back
    assert farm.executor.workers["w0"].generation == 1


def test_out_of_memory_retries_once_in_low_memory_mode_outside_the_retry_budget(make_farm):
    farm = make_farm(max_attempts=1)
    once = farm.submit(story("oom-once", "fake:oom*1"))
    twice = farm.submit(story("oom-twice", "fake:oom"))
    once_record, twice_record = farm.finish(once, twice)
    tasks = {s: [t.low_memory for t in farm.executor.assigned if t.story_id == s] for s in (once, twice)}
    assert once_record.state == "succeeded", once_record.error
    assert [a.outcome for a in farm.attempts(once)] == ["failed", "succeeded"]
    assert tasks[once] == [False, True]
    assert twice_record.state == "failed"
    attempts = farm.attempts(twice)
    assert [a.outcome for a in attempts] == ["failed", "failed"] and tasks[twice] == [False, True]
    assert attempts[-1].reason == "out_of_memory"
    assert farm.store.get_story(twice).shots[0].error.startswith("out_of_memory")


def test_the_mp_executor_runs_the_fake_worker_in_real_processes(make_farm):
    groups = [DeviceGroup("cpu0"), DeviceGroup("cpu1")]
    executor = ProcessExecutor("tiny", groups, worker_factory=FAKE, threads=1,
                               supervision=SupervisionConfig(heartbeat_timeout_s=3))
    farm = make_farm(executor=executor, max_attempts=1)
    farm.until(lambda: len(executor.idle()) == 2, timeout=120, what="two fake workers ready")
    pids = {w.id: w.runtime.process.pid for w in executor.workers.values()}
    plain = farm.submit(story("plain", "calm", "calm"))
    dies = farm.submit(story("dies", "calm", "fake:die*1"))
    hangs = farm.submit(story("hangs", "fake:hang*1"))
    records = farm.finish(plain, dies, hangs, timeout=120)
    assert [r.state for r in records] == ["succeeded"] * 3, [r.error for r in records]
    assert [a.outcome for a in farm.attempts(dies, 1)] == ["lost", "succeeded"]
    assert farm.attempts(dies, 1)[0].error.startswith("worker died")
    assert [a.outcome for a in farm.attempts(hangs)] == ["lost", "succeeded"]
    assert farm.attempts(hangs)[0].error.startswith("heartbeat timeout")
    for record in records:
        for artifact in record.artifacts:
            assert artifact.sha256 == sha256_file(farm.data / artifact.path)
    assert executor.restarts == 2 and sum(w.generation for w in executor.workers.values()) == 2
    assert {w.id for w in executor.workers.values() if w.runtime.process.pid != pids[w.id]} == {
        w.id for w in executor.workers.values() if w.generation > 0}  # each replacement a new process


def test_a_factory_that_cannot_be_built_is_a_start_failure_and_paths_are_checked(make_farm):
    with pytest.raises(ValueError, match="worker_factory: 'storyfarm.nope'"):
        check_factory("storyfarm.nope")
    executor = ThreadExecutor([DeviceGroup("cpu0")], clock=Clock(), worker_factory="storyfarm.nope:Worker",
                              supervision=SupervisionConfig(failure_limit=1))
    farm = make_farm(executor=executor)
    farm.until(lambda: executor.workers["w0"].state == "out_of_service", what="the group out of service")
    assert executor.workers["w0"].generation == 0 and not executor.ready  # never respawned


def test_the_pool_and_the_fake_worker_load_no_torch_numpy_pil_or_av():
    code = ("import sys; import storyfarm.scheduler.gpu_pool.fake, storyfarm.scheduler.gpu_pool.processes, "
            "storyfarm.daemon.farm; bad = [m for m in ('torch', 'numpy', 'PIL', 'av', 'storyfarm.m2v') "
            "if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_fake_workers_script_is_read_from_prompt_words():
    from storyfarm.scheduler.gpu_pool.fake import script

    assert script("a quay at dawn") == {"faults": {}}
    assert script("fake:oom*1 and fake:slow=0.5, fake:steps=12.", "fake:die") == {
        "faults": {"oom": 1, "die": None}, "slow": 0.5, "steps": 12}
    assert script("fake:failure is not a word")["faults"] == {}
