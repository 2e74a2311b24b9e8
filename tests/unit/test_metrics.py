"""The metric catalog and the daemon's recording, driven by hand-made reports against a real
SQLite job store, read back through prometheus_client's exposition and a real HTTP endpoint."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
from prometheus_client import generate_latest

from storyfarm.daemon.metrics import CATALOG, DaemonMetrics, catalog_markdown, catalog_problems
from storyfarm.daemon.metrics_farm import priority_class
from storyfarm.daemon.metrics_http import MetricsServer
from storyfarm.daemon.metrics_nvml import Nvml
from storyfarm.daemon.store import JobStore, ShotIn
from storyfarm.scheduler.gpu_pool.messages import Done, Failed, ShotTask

REPO = Path(__file__).resolve().parents[2]


def value(m: DaemonMetrics, name: str, **labels) -> float | None:
    return m.registry.get_sample_value(name, labels)


def task(story_id="st_1", shot_id="sh_1", index=0, attempt="at_1") -> ShotTask:
    return ShotTask(attempt, story_id, shot_id, index, "", "", "")


def done(attempt="at_1", worker="w0", seconds=8.0, stats=None, entry=None) -> Done:
    entry = entry or {"frames": 17, "fps": 16, "seconds": {"denoise": 5.0, "vae_decode": 1.0}}
    return Done(worker, attempt, entry, seconds=seconds, stats=stats or {})


@pytest.fixture()
def store(tmp_path):
    with JobStore.open(tmp_path / "jobs.db", max_attempts=2) as s:
        yield s


def submit(store, request_id, shots=2, **kw) -> str:
    return store.submit_story(request_id, kw.pop("project", "ads"), hashlib.sha256(request_id.encode()).hexdigest(), "s", "{}",
                              [ShotIn(i, 1, i + 1, f"p{i}") for i in range(shots)], **kw).story_id


def test_catalog_follows_the_naming_rules_and_the_readme_table_is_current():
    assert catalog_problems() == []
    assert len({s.name for s in CATALOG}) == len(CATALOG)
    broken = [CATALOG[0].__class__("requests", "counter", ("story_id",), "h", "seconds", "event")]
    assert len(catalog_problems(broken)) == 4  # prefix, _total, _seconds, id label
    readme = (REPO / "ops" / "README.md").read_text()
    table = readme.split("<!-- metrics:begin -->\n")[1].split("<!-- metrics:end -->")[0]
    assert table == catalog_markdown(), "ops/README.md's metric table is stale: regenerate it from catalog_markdown()"
    for spec in CATALOG:  # seconds to hours
        if spec.kind == "histogram" and spec.unit == "seconds" and "step" not in spec.name:
            assert min(spec.buckets) <= 1 and max(spec.buckets) >= 4 * 3600, spec.name


def test_a_succeeded_attempt_records_latencies_throughput_and_pool_counts():
    m = DaemonMetrics(preset="tiny", version="9.9")
    m.story_submitted("ads", 3)
    t = task()
    m.attempt_started(t, worker_id="w0", project="ads", priority=5, queue_wait_s=12.0, placement="new")
    stats = {"stages": {"text_encode": 0.5, "denoise": 6.0, "mystery": 1.0}, "step_seconds": [0.3, 0.3, 0.4],
             "frames": 17, "video_seconds": 17 / 16,
             "pool": {"resident_bytes": 4096, "hits": 3, "misses": 1, "queries": 4, "evictions": 2},
             "attention_backend": "sdpa_flash", "recompiles": 2, "gpu_memory_bytes": 123}
    m.attempt_finished(t, worker_id="w0", project="ads", outcome="succeeded", reason="ok", report=done(stats=stats), shot_state="succeeded")
    m.story_finished("st_1", project="ads", state="succeeded", reason="ok", seconds=90.0)
    assert value(m, "storyfarm_build_info", version="9.9", preset="tiny") == 1
    assert value(m, "storyfarm_stories_submitted_total", project="ads") == 1
    assert value(m, "storyfarm_shots_submitted_total", project="ads") == 3
    assert value(m, "storyfarm_shot_attempts_started_total", placement="new") == 1
    assert value(m, "storyfarm_queue_wait_seconds_sum", priority_class="high") == 12.0
    assert value(m, "storyfarm_shot_duration_seconds_sum", outcome="succeeded") == 8.0  # the worker's measure
    assert value(m, "storyfarm_shots_finished_total", project="ads", state="succeeded", reason="ok") == 1
    assert value(m, "storyfarm_shot_stage_duration_seconds_sum", stage="denoise") == 6.0
    assert value(m, "storyfarm_shot_stage_duration_seconds_count", stage="other") == 1  # unknown stages stay bounded
    assert value(m, "storyfarm_denoise_step_duration_seconds_count") == 3
    assert value(m, "storyfarm_generated_frames_total", worker="w0") == 17
    assert value(m, "storyfarm_generated_video_seconds_total", worker="w0") == pytest.approx(17 / 16)
    assert value(m, "storyfarm_shot_realtime_factor_sum") == pytest.approx(8.0 / (17 / 16))
    assert value(m, "storyfarm_latent_pool_queries_total", worker="w0") == 4
    assert value(m, "storyfarm_latent_pool_hits_total", worker="w0") == 3
    assert value(m, "storyfarm_latent_pool_evictions_total", worker="w0") == 2
    assert value(m, "storyfarm_latent_pool_resident_bytes", worker="w0") == 4096
    assert value(m, "storyfarm_attention_backend_info", worker="w0", backend="sdpa_flash") == 1
    assert value(m, "storyfarm_story_duration_seconds_bucket", state="succeeded", le="120.0") == 1
    assert m.reported_gpu_bytes == {"w0": 123}


def test_a_report_without_stats_falls_back_to_the_manifest_entry():
    m = DaemonMetrics(preset="tiny")
    m.attempt_finished(task(), worker_id="w1", project="p", outcome="succeeded", reason="ok", report=done(worker="w1"), shot_state="succeeded")
    assert value(m, "storyfarm_shot_stage_duration_seconds_sum", stage="vae_decode") == 1.0
    assert value(m, "storyfarm_generated_video_seconds_total", worker="w1") == pytest.approx(17 / 16)


def test_per_shot_pool_counts_add_up_and_process_totals_survive_a_replaced_worker():
    m = DaemonMetrics(preset="tiny")

    def report(n, recompiles):
        m.attempt_finished(task(attempt=f"at_{n}"), worker_id="w0", project="p", outcome="succeeded", reason="ok",
                           report=done(attempt=f"at_{n}", stats={"recompiles": recompiles, "attention_backend": f"b{n % 2}",
                                                                "pool": {"hits": 1, "queries": 2, "resident_bytes": 10}}),
                           shot_state="succeeded")

    report(1, 3)
    report(2, 5)  # the process total grew by 2
    m.worker_event("w0", device="cpu", event="replaced", reason="worker_died")
    assert value(m, "storyfarm_latent_pool_resident_bytes", worker="w0") == 0  # the new process holds nothing yet
    assert value(m, "storyfarm_attention_backend_info", worker="w0", backend="b0") is None
    report(3, 1)  # a new process: its total starts again
    report(4, 4)
    report(5, 2)  # went down without an event: another new process
    assert value(m, "storyfarm_recompiles_total", worker="w0") == 3 + 2 + 1 + 3 + 2
    assert value(m, "storyfarm_latent_pool_queries_total", worker="w0") == 10  # 5 shots, 2 look-ups each
    assert value(m, "storyfarm_latent_pool_hits_total", worker="w0") == 5
    assert value(m, "storyfarm_worker_restarts_total", worker="w0", reason="worker_died") == 1
    # one backend series per worker: the one its last shot ran with
    assert value(m, "storyfarm_attention_backend_info", worker="w0", backend="b1") == 1
    assert value(m, "storyfarm_attention_backend_info", worker="w0", backend="b0") is None


def test_failures_are_retries_until_the_store_says_the_shot_failed_for_good(store):
    m = DaemonMetrics(preset="tiny")
    story = submit(store, "r1")
    shot = store.get_story(story).shots[0]
    for n, expected_state in ((1, "queued"), (2, "failed")):  # max_attempts=2
        attempt = store.start_attempt(shot.id, "w0")
        store.finish_attempt(attempt, "failed", error="boom")  # the dispatcher records first, then notifies
        assert store.shot(shot.id).state == expected_state
        m.attempt_finished(task(story, shot.id, attempt=attempt), worker_id="w0", project="ads", outcome="failed",
                           reason="content", report=Failed("w0", attempt, "boom"), shot_state=store.shot(shot.id).state)
    assert value(m, "storyfarm_shot_retries_total", reason="content") == 1
    assert value(m, "storyfarm_shots_finished_total", project="ads", state="failed", reason="content") == 1
    assert value(m, "storyfarm_shot_attempts_finished_total", outcome="failed", reason="content") == 2
    other = submit(store, "r2")
    shot2 = store.get_story(other).shots[0]
    attempt = store.start_attempt(shot2.id, "w1")
    store.finish_attempt(attempt, "lost", error="worker died")
    m.attempt_finished(task(other, shot2.id, attempt=attempt), worker_id="w1", project="ads", outcome="lost",
                       reason="worker_died", report=None, shot_state=store.shot(shot2.id).state)
    assert value(m, "storyfarm_shot_retries_total", reason="worker_died") == 1


def test_out_of_memory_is_counted_by_stage_and_the_shot_state_the_dispatcher_passes_decides_final():
    m = DaemonMetrics(preset="tiny")
    oom = Failed("w2", "at_9", "CUDA out of memory", retryable=True, reason="out_of_memory", stage="vae_decode")
    m.attempt_finished(task(attempt="at_9"), worker_id="w2", project="p", outcome="failed", reason="out_of_memory", report=oom,
                       shot_state="queued")
    assert value(m, "storyfarm_out_of_memory_errors_total", worker="w2", stage="vae_decode") == 1
    assert value(m, "storyfarm_shot_retries_total", reason="out_of_memory") == 1
    bad = Failed("w2", "at_10", "ValueError: bad story", retryable=False)
    m.attempt_finished(task(attempt="at_10"), worker_id="w2", project="p", outcome="failed", reason="content", report=bad, shot_state="failed")
    assert value(m, "storyfarm_shots_finished_total", project="p", state="failed", reason="content") == 1


class FakeDispatcher:
    def __init__(self, snapshot, draining=False):
        self._snapshot, self.draining = snapshot, draining

    def farm_snapshot(self):
        return self._snapshot


class FakeNvmlModule:
    """pynvml's calls, for one GPU running pid 4242 with 3 GiB."""

    def nvmlInit(self):
        pass

    def nvmlDeviceGetCount(self):
        return 1

    def nvmlDeviceGetHandleByIndex(self, index):
        return index

    def nvmlDeviceGetComputeRunningProcesses(self, handle):
        return [SimpleNamespace(pid=4242, usedGpuMemory=3 << 30), SimpleNamespace(pid=1, usedGpuMemory=None)]

    def nvmlDeviceGetUUID(self, handle):
        return b"GPU-1234"


def test_scrape_time_gauges_read_the_store_and_the_farm_snapshot(store):
    high = submit(store, "h1", shots=3, priority=10, batch_id="night", deadline=2000.0, now=100.0)
    submit(store, "n1", shots=1, now=150.0)
    low = submit(store, "l1", shots=2, priority=-3, now=160.0)
    store.request_pause(low)
    store.start_attempt(store.get_story(high).shots[0].id, "w0", now=200.0)
    snapshot = {
        "workers": [{"id": "w0", "device": "cuda:0", "state": "busy", "pid": 4242, "story_id": high, "shot_index": 0,
                     "resident_stories": 2, "gpu_memory_bytes": 5, "restarts": 0, "out_of_service": False},
                    {"id": "w1", "device": "cuda:1", "state": "dead", "pid": 77, "story_id": None, "shot_index": None,
                     "resident_stories": 0, "gpu_memory_bytes": 9, "restarts": 3, "out_of_service": True}],
        "projects": {"ads": {"running": 1, "guaranteed": 2, "burst": None}},
        "batches": [{"batch_id": "night", "deadline": 2000.0, "eta": 2500.0}],
    }
    m = DaemonMetrics(preset="tiny")
    m.watch_farm(store, FakeDispatcher(snapshot, draining=True), nvml=Nvml(FakeNvmlModule())).clock = lambda: 1000.0
    assert value(m, "storyfarm_queue_shots", priority_class="high", state="running") == 1
    assert value(m, "storyfarm_queue_shots", priority_class="high", state="waiting") == 2
    assert value(m, "storyfarm_queue_shots", priority_class="normal", state="queued") == 1
    assert value(m, "storyfarm_queue_shots", priority_class="low", state="paused") == 2
    assert value(m, "storyfarm_queue_shots", priority_class="low", state="queued") == 0  # zeros are exported
    assert value(m, "storyfarm_queue_stories", priority_class="high", state="running") == 1
    assert value(m, "storyfarm_queue_oldest_shot_age_seconds") == 1000.0 - 150.0  # the paused story's shot is held
    assert value(m, "storyfarm_draining") == 1
    assert value(m, "storyfarm_worker_up", worker="w0", device="cuda:0") == 1
    assert value(m, "storyfarm_worker_up", worker="w1", device="cuda:1") == 0
    assert value(m, "storyfarm_worker_out_of_service", worker="w1", device="cuda:1") == 1
    assert value(m, "storyfarm_worker_running_shots", worker="w0") == 1
    assert value(m, "storyfarm_latent_pool_stories", worker="w0") == 2
    assert value(m, "storyfarm_worker_gpu_memory_used_bytes", worker="w0", device="cuda:0") == 3 << 30  # NVML by pid
    assert value(m, "storyfarm_worker_gpu_memory_used_bytes", worker="w1", device="cuda:1") == 9  # its report
    assert value(m, "storyfarm_worker_info", worker="w0", device="cuda:0", gpu_uuid="GPU-1234") == 1
    assert value(m, "storyfarm_project_running_shots", project="ads") == 1
    assert value(m, "storyfarm_project_quota_guaranteed_shots", project="ads") == 2
    assert value(m, "storyfarm_project_quota_burst_shots", project="ads") is None  # no cap: no series
    assert value(m, "storyfarm_batch_remaining_stories", batch="night") == 1
    assert value(m, "storyfarm_batch_deadline_timestamp_seconds", batch="night") == 2000.0
    assert value(m, "storyfarm_batch_eta_timestamp_seconds", batch="night") == 2500.0


def test_without_a_farm_snapshot_the_pool_and_the_store_stand_in_and_a_broken_part_costs_only_itself(store):
    story = submit(store, "b1", shots=1, batch_id="b", deadline=50.0, project="vfx")
    store.start_attempt(store.get_story(story).shots[0].id, "w0")
    pool = SimpleNamespace(kind="mp", snapshot=lambda: [{"id": "w0", "device": "cpu", "state": "busy", "pid": 1,
                                                         "story_id": story, "shot_index": 0, "resident_stories": 1}])
    m = DaemonMetrics(preset="tiny")
    m.watch_farm(store, SimpleNamespace(executor=pool, draining=False), nvml=Nvml(FakeNvmlModule()))
    assert value(m, "storyfarm_project_running_shots", project="vfx") == 1
    assert value(m, "storyfarm_batch_deadline_timestamp_seconds", batch="b") == 50.0
    assert value(m, "storyfarm_batch_eta_timestamp_seconds", batch="b") is None
    assert value(m, "storyfarm_worker_gpu_memory_used_bytes", worker="w0", device="cpu") is None  # CPU: no series
    store.close()  # the store going away mid-shutdown: worker gauges still come
    text = generate_latest(m.registry).decode()
    assert 'storyfarm_worker_up{device="cpu",worker="w0"} 1.0' in text and "storyfarm_queue_shots{" not in text


def test_nvml_absent_means_no_gpu_readings():
    class Broken:
        def nvmlInit(self):
            raise RuntimeError("NVML Shared Library Not Found")

    nvml = Nvml(Broken())
    assert not nvml.available and nvml.process_memory() == {} and nvml.uuid("cuda:0") == ""
    assert priority_class(1) == "high" and priority_class(0) == "normal" and priority_class(-100) == "low"


def test_metrics_endpoint_over_http_and_its_refusals():
    m = DaemonMetrics(preset="tiny")
    server = MetricsServer(m.registry, "127.0.0.1:0")
    port = server.start()
    try:
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        assert 'storyfarm_build_info{preset="tiny"' in body and "_created" not in body
        with pytest.raises(RuntimeError, match=r"metrics_listen: cannot bind 127\.0\.0\.1:\d+"):
            MetricsServer(m.registry, f"127.0.0.1:{port}").start()
    finally:
        server.stop()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)
    with pytest.raises(ValueError, match="metrics_listen: 'unix:/tmp/m.sock' is a unix socket"):
        MetricsServer(m.registry, "unix:/tmp/m.sock").start()
    with pytest.raises(ValueError, match="metrics_listen: .*expected HOST:PORT"):
        MetricsServer(m.registry, "nonsense").start()


def test_promtool_accepts_the_exposition():
    promtool = shutil.which("promtool") or ("/usr/bin/promtool" if Path("/usr/bin/promtool").exists() else None)
    if promtool is None:
        pytest.skip("promtool not found (Debian package `prometheus`; .ci/run installs it)")
    m = DaemonMetrics(preset="tiny")
    t = task()
    m.attempt_started(t, worker_id="w0", project="p", priority=0, queue_wait_s=1, placement="affinity")
    m.attempt_finished(t, worker_id="w0", project="p", outcome="succeeded", reason="ok",
                       report=done(stats={"pool": {"hits": 1, "queries": 1, "evictions": 0, "resident_bytes": 1},
                                          "recompiles": 1, "attention_backend": "sdpa", "step_seconds": [0.1]}),
                       shot_state="succeeded")
    m.worker_event("w0", device="cpu", event="replaced", reason="cuda_error")
    result = subprocess.run([promtool, "check", "metrics"], input=generate_latest(m.registry), capture_output=True)
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()
