"""Supervision rules of the Executor (heartbeats, replacement, out of service, back-off) on a fake
executor with a fake clock, and GPU discovery against a fake NVML. The real-process paths are in
tests/integration/test_scheduler_daemon.py."""

from types import SimpleNamespace

import pytest

from storyfarm.scheduler.gpu_pool.executor import DeviceGroup, Executor, SupervisionConfig
from storyfarm.scheduler.gpu_pool.gpus import XidWatcher, device_groups, discover
from storyfarm.scheduler.gpu_pool.messages import Done, Failed, StageUpdate, Ready, Release, ShotTask


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


class FakeExecutor(Executor):
    kind = "fake"

    def __init__(self, n=2, groups=None, **kw):
        self.inbox: list = []  # messages "sent by workers"
        self.sent: list = []
        self.launched: list = []
        self.killed: list = []
        super().__init__("tiny", groups or [DeviceGroup(f"g{i}") for i in range(n)], **kw)

    def _launch(self, handle):
        handle.runtime = SimpleNamespace(alive=True, generation=handle.generation)
        self.launched.append((handle.id, handle.generation))

    def _send(self, handle, message):
        self.sent.append((handle.id, message))

    def _signal_cancel(self, handle):
        self.sent.append((handle.id, "cancel"))

    def _alive(self, handle):
        return handle.runtime.alive

    def _kill(self, handle):
        handle.runtime.alive = False
        self.killed.append(handle.id)
        return True

    def _receive(self, timeout):
        out, self.inbox = self.inbox, []
        return out


def task(n=1) -> ShotTask:
    return ShotTask(f"at{n}", "st", f"sh{n}", 0, "doc", "/tmp/s", "/tmp/r")


def ready(ex, *ids):
    ex.inbox += [Ready(i, "cpu", "tiny", 0.1) for i in ids]
    ex.poll()


def started(ex, events):
    ex.on_event = lambda worker, **kw: events.append((worker, kw["event"], kw.get("reason", "")))


def test_a_silent_busy_worker_is_killed_before_its_shot_comes_back():
    clock = Clock()
    events = []
    ex = FakeExecutor(supervision=SupervisionConfig(heartbeat_timeout_s=30), clock=clock)
    started(ex, events)
    ex.start()
    ready(ex, "w0", "w1")
    ex.assign(ex.workers["w0"], task())
    clock.t += 20
    ex.inbox.append(StageUpdate("w0", "at1", 0, "denoise", 1, 4))  # a heartbeat
    assert [type(m) for m in ex.poll()] == [StageUpdate]
    clock.t += 25  # 25 s since the last message: still within 30
    assert ex.supervise() == []
    clock.t += 10
    lost = ex.supervise()
    assert [(t.attempt_id, reason) for t, reason in lost] == [("at1", "heartbeat_timeout")]
    assert ex.killed == ["w0"]  # confirmed dead first
    assert ex.launched[-1] == ("w0", 1) and ex.workers["w0"].state == "starting"
    assert ("w0", "replaced", "heartbeat_timeout") in events
    # a late report of the frozen worker's attempt is dropped
    ex.inbox.append(Done("w0", "at1", {"sha256": "x"}))
    assert ex.poll() == []


def test_idle_workers_never_time_out_and_dead_ones_are_replaced():
    clock = Clock()
    ex = FakeExecutor(supervision=SupervisionConfig(heartbeat_timeout_s=5), clock=clock)
    ex.start()
    ready(ex, "w0", "w1")
    clock.t += 100
    assert ex.supervise() == []
    ex.assign(ex.workers["w1"], task(2))
    ex.workers["w1"].runtime.alive = False  # crashed
    lost = ex.supervise()
    assert [(t.attempt_id, r) for t, r in lost] == [("at2", "worker_died")]
    assert ex.restarts == 1 and ex.workers["w1"].restarts == 1


def test_a_fatal_cuda_error_replaces_the_worker_and_reports_the_failure():
    ex = FakeExecutor(clock=Clock())
    ex.start()
    ready(ex, "w0", "w1")
    ex.assign(ex.workers["w0"], task())
    ex.inbox.append(Failed("w0", "at1", "RuntimeError: CUDA error: an illegal memory access", fatal=True,
                           reason="cuda_error"))
    (msg,) = ex.poll()
    assert msg.fatal and ex.killed == ["w0"] and ex.workers["w0"].generation == 1
    assert ex.workers["w0"].state == "starting"  # never reused: a new process


def test_a_group_failing_repeatedly_is_taken_out_of_service_with_back_off_before():
    clock = Clock()
    events = []
    ex = FakeExecutor(n=1, supervision=SupervisionConfig(failure_limit=3, failure_window_s=600), clock=clock)
    started(ex, events)
    ex.start()
    ready(ex, "w0")
    ex.workers["w0"].runtime.alive = False
    ex.supervise()
    assert ex.launched == [("w0", 0), ("w0", 1)]  # first failure: replaced at once
    ex.workers["w0"].runtime.alive = False
    ex.supervise()
    assert ex.launched[-1] == ("w0", 1)  # second: respawn backs off
    clock.t += 0.5
    ex.supervise()
    assert ex.launched[-1] == ("w0", 1)
    clock.t += 1.0
    ex.supervise()
    assert ex.launched[-1] == ("w0", 2)
    ex.workers["w0"].runtime.alive = False
    ex.supervise()
    assert ex.workers["w0"].state == "out_of_service"
    assert ("w0", "out_of_service", "worker_died") in events
    clock.t += 3600
    ex.supervise()
    assert ex.launched[-1] == ("w0", 2) and not ex.ready  # no respawn while out of service
    assert ex.snapshot()[0]["out_of_service"] is True
    ex.return_to_service("w0")
    assert ex.launched[-1] == ("w0", 3)


def test_failures_outside_the_window_do_not_add_up():
    clock = Clock()
    ex = FakeExecutor(n=1, supervision=SupervisionConfig(failure_limit=2, failure_window_s=60), clock=clock)
    ex.start()
    for _ in range(4):
        ready(ex, "w0")
        ex.workers["w0"].runtime.alive = False
        ex.supervise()
        clock.t += 120
    assert ex.workers["w0"].state == "starting" and ex.restarts == 4


def test_a_worker_that_never_gets_ready_is_replaced():
    clock = Clock()
    ex = FakeExecutor(n=1, supervision=SupervisionConfig(start_timeout_s=60), clock=clock)
    ex.start()
    clock.t += 61
    assert ex.supervise() == []
    assert ex.killed == ["w0"] and ex.workers["w0"].generation == 1


def test_start_failures_replace_the_worker_and_stopping_replaces_nothing():
    ex = FakeExecutor(n=1, clock=Clock())
    ex.start()
    ex.inbox.append(Failed("w0", None, "worker failed to start: OSError()", fatal=True, reason="start_failed"))
    assert ex.poll() == []
    assert ex.workers["w0"].generation == 1
    ex.stop(grace=0)
    ex.workers["w0"].runtime.alive = False
    assert ex.supervise() == [] and ex.workers["w0"].state == "dead"


def test_release_goes_to_live_workers_and_cancel_to_the_right_one():
    ex = FakeExecutor(clock=Clock())
    ex.start()
    ready(ex, "w0")
    ex.release("/data/stories/st")
    assert ex.sent == [("w0", Release("/data/stories/st"))]  # w1 is still starting
    ready(ex, "w1")
    ex.assign(ex.workers["w1"], task(7))
    assert ex.cancel("at7") and ex.sent[-1] == ("w1", "cancel")
    assert not ex.cancel("nope")
    with pytest.raises(RuntimeError, match="w1 is busy"):
        ex.assign(ex.workers["w1"], task(8))


class FakeNvml:
    nvmlEventTypeXidCriticalError = 8

    def __init__(self, n=3, events=()):
        self.n, self.events = n, list(events)

    def nvmlDeviceGetCount(self):
        return self.n

    def nvmlDeviceGetHandleByIndex(self, i):
        return i

    def nvmlDeviceGetMemoryInfo(self, h):
        return SimpleNamespace(total=80 << 30, used=(h + 1) << 30)

    def nvmlDeviceGetUtilizationRates(self, h):
        return SimpleNamespace(gpu=10 * h)

    def nvmlDeviceGetName(self, h):
        return b"NVIDIA H100 80GB HBM3"

    def nvmlDeviceGetUUID(self, h):
        return f"GPU-{h}"

    def nvmlEventSetCreate(self):
        return "set"

    def nvmlDeviceRegisterEvents(self, h, kind, s):
        pass

    def nvmlEventSetWait_v2(self, s, timeout):
        if not self.events:
            raise RuntimeError("NVML_ERROR_TIMEOUT")
        gpu, xid = self.events.pop(0)
        return SimpleNamespace(eventData=xid, device=gpu)

    def nvmlDeviceGetIndex(self, h):
        return h


def test_gpu_discovery_and_device_groups():
    nvml = FakeNvml(n=5)
    gpus = discover(nvml)
    assert [(g.index, g.name, g.memory_used_bytes >> 30, g.utilisation_percent) for g in gpus][:2] == [
        (0, "NVIDIA H100 80GB HBM3", 1, 0), (1, "NVIDIA H100 80GB HBM3", 2, 10)]
    pairs = device_groups("auto", workers=1, gpus_per_worker=2, nvml=nvml)
    assert [(g.name, g.visible, g.devices) for g in pairs] == [
        ("gpu0-1", "0,1", ["cuda:0", "cuda:1"]), ("gpu2-3", "2,3", ["cuda:2", "cuda:3"])]  # GPU 4 left over
    assert len(device_groups("auto", workers=1, nvml=nvml)) == 5


def test_without_gpus_cpu_workers_are_used_and_said(caplog):
    none = FakeNvml(n=0)
    with caplog.at_level("WARNING"):
        groups = device_groups("auto", workers=3, nvml=none)
    assert [g.device for g in groups] == ["cpu"] * 3
    assert "no GPU found through NVML: running 3 CPU worker(s)" in caplog.text
    assert device_groups("cpu", workers=2, nvml=FakeNvml(n=4))[0].device == "cpu"
    with pytest.raises(RuntimeError, match="NVML finds no GPU"):
        device_groups("cuda", workers=1, nvml=none)
    with pytest.raises(ValueError, match="gpus_per_worker must be at least 1"):
        device_groups("auto", workers=1, gpus_per_worker=0, nvml=none)


def test_xid_watcher_reports_only_critical_xids():
    watcher = XidWatcher(FakeNvml(n=2, events=[(1, 79), (0, 13), (0, 48)]))
    assert watcher.available
    assert watcher.poll() == [(1, 79), (0, 48)]
    assert watcher.poll() == []


def test_a_critical_xid_replaces_the_worker_on_that_gpu_and_counts_toward_out_of_service():
    clock = Clock()
    groups = [DeviceGroup("gpu0-1", "cuda:0", "0,1", (0, 1)), DeviceGroup("gpu2-3", "cuda:0", "2,3", (2, 3))]
    ex = FakeExecutor(groups=groups, supervision=SupervisionConfig(failure_limit=2), clock=clock)
    ex.start()
    ready(ex, "w0", "w1")
    ex.assign(ex.workers["w1"], task(3))
    lost = ex.gpu_fault(3, 79)
    assert [(t.attempt_id, r) for t, r in lost] == [("at3", "xid_79")]
    assert ex.workers["w1"].generation == 1 and ex.workers["w0"].generation == 0
    ready(ex, "w1")
    assert ex.gpu_fault(2, 48) == [] and ex.workers["w1"].state == "out_of_service"
