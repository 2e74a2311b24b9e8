"""Every metric the daemon exports, in one list, and the code that records them.

Why one list: the names, types, labels and units are an interface that dashboards, alert rules
and runbooks depend on. `CATALOG` is that interface; the registry is built from it, ops/README.md's
metric table is generated from it (a test keeps them equal), and the ops tests check that every
query in the dashboard and the alert rules names a metric listed here.

Rules the catalog keeps (`catalog_problems` checks them): prefix `storyfarm_`, base units in the
name (`_seconds`, `_bytes`), counters end in `_total`, no story, shot or attempt ids in labels
(label values stay bounded: worker, device, project, priority class, state, outcome, reason,
stage, backend, placement, open batches), hit rates as two counters (queries and hits), and
`storyfarm_build_info` with version and preset.

Where numbers come from: the daemon process alone serves /metrics. Workers never export anything
themselves; what they measure arrives in their Done reports and is recorded here, on the
dispatcher thread, through the DispatchObserver calls, so there is one count whichever worker
process did the work. A Done report's latent-pool counts (queries, hits, evictions) are that
shot's own and are added as they come. Its `recompiles` is the worker process's running total
(compiled graphs live as long as the process); it becomes a delta here against the same worker's
last report, and the baseline is dropped when the worker is replaced (or when the total goes
down), so a replacement neither double counts nor loses what its predecessor reported. Gauges that
describe the farm as it is now (queue depth, workers, quotas, batches) are read at scrape time by
metrics_farm.FarmCollector.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from importlib import metadata

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

from storyfarm.daemon.metrics_farm import PRIORITY_CLASSES, FarmCollector, priority_class
from storyfarm.scheduler.gpu_pool.messages import Done, Failed, ShotTask
from storyfarm.story.lifecycle import FINAL_STATES, OUTCOMES, RENDER_STAGES as STAGES, STORY_STATES

# Seconds to hours: tiny test shots take a fraction of a second, a 480p shot of the real model
# minutes, a story or an overnight queue wait hours.
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 900, 1800, 3600,
                    7200, 14400, 28800, 57600, 86400)
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300)
REALTIME_BUCKETS = (0.25, 0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)
_ENDED = tuple(s for s in STORY_STATES if s in FINAL_STATES)  # a story's final states, in lifecycle order
# Children created at zero when the daemon starts, so the first event is an increase Prometheus can
# see (a series that appears at 1 has no rate) and dashboards show zeros instead of gaps.
ZERO_START = {
    "storyfarm_shot_attempts_started_total": ("placement", ("affinity", "moved", "new")),
    "storyfarm_queue_wait_seconds": ("priority_class", PRIORITY_CLASSES),
    "storyfarm_shot_duration_seconds": ("outcome", OUTCOMES),
    "storyfarm_story_duration_seconds": ("state", _ENDED),
    "storyfarm_rerender_duration_seconds": ("state", _ENDED),
    "storyfarm_shot_stage_duration_seconds": ("stage", STAGES),
}
FORBIDDEN_LABELS = frozenset({"story", "story_id", "shot", "shot_id", "shot_index", "attempt", "attempt_id",
                              "request_id", "pid"})


@dataclass(frozen=True)
class MetricSpec:
    name: str
    kind: str  # counter | gauge | histogram
    labels: tuple[str, ...]
    help: str
    unit: str  # seconds, bytes, or what is counted (shots, stories, frames, ratio, info)
    source: str  # event: recorded as it happens; scrape: read from the store and pool at scrape time
    buckets: tuple[float, ...] = ()


def _spec(name, kind, labels, unit, source, help, buckets=()):
    return MetricSpec(name, kind, tuple(labels.split()) if labels else (), help, unit, source, tuple(buckets))


CATALOG: tuple[MetricSpec, ...] = (
    # -- work in and out --------------------------------------------------------------------------
    _spec("storyfarm_build_info", "gauge", "version preset", "info", "event",
          "Always 1; the daemon's storyfarm version and the model preset it serves."),
    _spec("storyfarm_stories_submitted_total", "counter", "project", "stories", "event",
          "Stories accepted by SubmitStory/SubmitBatch (idempotent repeats are not counted)."),
    _spec("storyfarm_shots_submitted_total", "counter", "project", "shots", "event",
          "Shots of the accepted stories."),
    _spec("storyfarm_stories_finished_total", "counter", "project state reason", "stories", "event",
          "Stories that reached a final state (succeeded, failed, cancelled), with the dispatcher's reason; "
          "the end of a re-render is not counted here (storyfarm_rerenders_finished_total)."),
    _spec("storyfarm_rerenders_finished_total", "counter", "project state reason", "re-renders", "event",
          "Re-renders (RerenderShot: new takes of a finished story) whose story reached a final state again."),
    _spec("storyfarm_shots_finished_total", "counter", "project state reason", "shots", "event",
          "Shots that reached a final state: succeeded, failed for good (retry budget spent or not retryable), cancelled."),
    _spec("storyfarm_shot_attempts_started_total", "counter", "placement", "attempts", "event",
          "Attempts handed to a worker; placement affinity/moved/new (affinity share = affinity / all)."),
    _spec("storyfarm_shot_attempts_finished_total", "counter", "outcome reason", "attempts", "event",
          "Attempts that ended: outcome succeeded, failed (spends the retry budget), lost (infrastructure), cancelled."),
    _spec("storyfarm_shot_retries_total", "counter", "reason", "attempts", "event",
          "Attempts that failed or were lost and whose shot went back to the queue."),
    _spec("storyfarm_out_of_memory_errors_total", "counter", "worker stage", "errors", "event",
          "Attempts that ran out of (GPU) memory, by the stage that failed."),
    _spec("storyfarm_generated_frames_total", "counter", "worker", "frames", "event",
          "Frames of published shot clips."),
    _spec("storyfarm_generated_video_seconds_total", "counter", "worker", "seconds", "event",
          "Seconds of video in published shot clips (frames / fps)."),
    _spec("storyfarm_shot_render_seconds_total", "counter", "worker", "seconds", "event",
          "Worker seconds spent on succeeded shots; divided by generated video seconds it is the realtime factor."),
    # -- latencies ------------------------------------------------------------------------------
    _spec("storyfarm_queue_wait_seconds", "histogram", "priority_class", "seconds", "event",
          "Time a shot waited runnable in the queue before an attempt started.", DURATION_BUCKETS),
    _spec("storyfarm_shot_duration_seconds", "histogram", "outcome", "seconds", "event",
          "Wall time of one attempt, from hand-out to its end (succeeded: the worker's own measure).", DURATION_BUCKETS),
    _spec("storyfarm_story_duration_seconds", "histogram", "state", "seconds", "event",
          "Time from a story's submission to its final state (re-renders are not observed here).", DURATION_BUCKETS),
    _spec("storyfarm_rerender_duration_seconds", "histogram", "state", "seconds", "event",
          "Time from a re-render's request to its story's final state again.", DURATION_BUCKETS),
    _spec("storyfarm_shot_stage_duration_seconds", "histogram", "stage", "seconds", "event",
          "Seconds per stage of a succeeded shot: text_encode, memory_encode, denoise, vae_decode, keyframes, mp4_encode.",
          DURATION_BUCKETS),
    _spec("storyfarm_denoise_step_duration_seconds", "histogram", "", "seconds", "event",
          "Seconds per denoising step (both CFG branches, one expert).", STEP_BUCKETS),
    _spec("storyfarm_shot_realtime_factor", "histogram", "", "ratio", "event",
          "Render seconds per second of video, per succeeded shot (1 = real time).", REALTIME_BUCKETS),
    # -- workers --------------------------------------------------------------------------------
    _spec("storyfarm_worker_restarts_total", "counter", "worker reason", "restarts", "event",
          "Worker processes replaced (died, froze, CUDA error), by reason."),
    _spec("storyfarm_latent_pool_queries_total", "counter", "worker", "queries", "event",
          "Latent pool look-ups (memory latents, blank clips, negative prompt embeddings)."),
    _spec("storyfarm_latent_pool_hits_total", "counter", "worker", "queries", "event",
          "Latent pool look-ups that found the tensor resident (hit share = hits / queries)."),
    _spec("storyfarm_latent_pool_evictions_total", "counter", "worker", "entries", "event",
          "Latent pool entries moved off the device or dropped to stay within budget."),
    _spec("storyfarm_latent_pool_resident_bytes", "gauge", "worker", "bytes", "event",
          "Bytes the worker's latent pool holds, as of its last report (0 after a replacement)."),
    _spec("storyfarm_recompiles_total", "counter", "worker", "recompiles", "event",
          "torch.compile recompilations in the workers."),
    _spec("storyfarm_attention_backend_info", "gauge", "worker backend", "info", "event",
          "Always 1; the attention kernel the worker's last shot ran with."),
    _spec("storyfarm_worker_up", "gauge", "worker device", "boolean", "scrape",
          "1 when the worker process has loaded its model and takes work (idle or busy), else 0."),
    _spec("storyfarm_worker_running_shots", "gauge", "worker", "shots", "scrape",
          "Shots the worker is rendering now (0 or 1)."),
    _spec("storyfarm_worker_out_of_service", "gauge", "worker device", "boolean", "scrape",
          "1 when the worker's device was taken out of service (repeated fatal errors), else 0."),
    _spec("storyfarm_worker_gpu_memory_used_bytes", "gauge", "worker device", "bytes", "scrape",
          "GPU memory used by the worker process (NVML when present, else the worker's last report)."),
    _spec("storyfarm_worker_info", "gauge", "worker device gpu_uuid", "info", "scrape",
          "Always 1; joins workers to DCGM exporter series through the GPU UUID (empty without NVML)."),
    _spec("storyfarm_latent_pool_stories", "gauge", "worker", "stories", "scrape",
          "Stories whose memory latents the worker's latent pool holds."),
    # -- queue, quotas, batches -----------------------------------------------------------------
    _spec("storyfarm_queue_shots", "gauge", "priority_class state", "shots", "scrape",
          "Unfinished shots by state (queued, waiting, running, paused) and priority class (high > 0, normal = 0, low < 0)."),
    _spec("storyfarm_queue_stories", "gauge", "priority_class state", "stories", "scrape",
          "Unfinished stories by state (queued, running, paused) and priority class."),
    _spec("storyfarm_queue_oldest_shot_age_seconds", "gauge", "", "seconds", "scrape",
          "How long the oldest queued shot has been runnable (0 when none is queued)."),
    _spec("storyfarm_draining", "gauge", "", "boolean", "scrape",
          "1 while the daemon is drained (no new shots start) or shutting down."),
    _spec("storyfarm_project_running_shots", "gauge", "project", "shots", "scrape",
          "Shots of the project running now (quota use)."),
    _spec("storyfarm_project_quota_guaranteed_shots", "gauge", "project", "shots", "scrape",
          "Shots the project may always run at once (its guaranteed quota), when quotas are configured."),
    _spec("storyfarm_project_quota_burst_shots", "gauge", "project", "shots", "scrape",
          "Shots the project may run at once when others leave room (its burst quota), when configured."),
    _spec("storyfarm_batch_remaining_stories", "gauge", "batch", "stories", "scrape",
          "Unfinished stories of each open batch (finished batches are not exported)."),
    _spec("storyfarm_batch_deadline_timestamp_seconds", "gauge", "batch", "seconds", "scrape",
          "Deadline of each open batch (unix time)."),
    _spec("storyfarm_batch_eta_timestamp_seconds", "gauge", "batch", "seconds", "scrape",
          "Estimated finish of each open batch (unix time), from the scheduler's estimate."),
)
SPECS = {spec.name: spec for spec in CATALOG}


def catalog_problems(catalog=CATALOG) -> list[str]:
    """Naming-rule violations of the catalog (empty when it follows them)."""
    problems = []
    for s in catalog:
        where = s.name
        if not s.name.startswith("storyfarm_"):
            problems.append(f"{where}: must start with storyfarm_")
        if s.kind not in ("counter", "gauge", "histogram"):
            problems.append(f"{where}: kind must be counter, gauge or histogram")
        if (s.kind == "counter") != s.name.endswith("_total"):
            problems.append(f"{where}: counters, and only counters, end in _total")
        if s.unit in ("seconds", "bytes") and f"_{s.unit}" not in s.name:
            problems.append(f"{where}: a metric in {s.unit} carries _{s.unit} in its name")
        if s.unit == "info" and s.kind != "gauge":
            problems.append(f"{where}: info metrics are gauges")
        if FORBIDDEN_LABELS & set(s.labels):
            problems.append(f"{where}: ids in labels ({', '.join(sorted(FORBIDDEN_LABELS & set(s.labels)))})")
        if s.kind == "histogram" and not s.buckets:
            problems.append(f"{where}: a histogram needs buckets")
        if s.source not in ("event", "scrape"):
            problems.append(f"{where}: source must be event or scrape")
        if s.source == "scrape" and s.kind != "gauge":
            problems.append(f"{where}: scrape-time metrics are gauges")
    return problems


def catalog_markdown(catalog=CATALOG) -> str:
    """The metric table of ops/README.md, generated from the catalog."""
    rows = ["| metric | type | labels | unit | what |", "|---|---|---|---|---|"]
    for s in catalog:
        labels = ", ".join(f"`{label}`" for label in s.labels) or "-"
        rows.append(f"| `{s.name}` | {s.kind} | {labels} | {s.unit} | {s.help} |")
    return "\n".join(rows) + "\n"


def storyfarm_version() -> str:
    try:
        return metadata.version("storyfarm")
    except metadata.PackageNotFoundError:
        return "unknown"


def _make(spec: MetricSpec, registry: CollectorRegistry):
    if spec.kind == "counter":
        return Counter(spec.name, spec.help, spec.labels, registry=registry)
    if spec.kind == "histogram":
        return Histogram(spec.name, spec.help, spec.labels, registry=registry, buckets=spec.buckets)
    return Gauge(spec.name, spec.help, spec.labels, registry=registry)


def _label(value) -> str:
    return str(value) if value not in (None, "") else "none"


class DaemonMetrics:
    """The daemon's registry and its recording: a DispatchObserver plus `story_submitted` for the
    servicer; `watch_farm` adds the scrape-time gauges."""

    def __init__(self, *, preset: str, version: str | None = None):
        disable_created_metrics()  # `_created` series double the series count and no query here reads them
        self.registry = CollectorRegistry(auto_describe=True)
        self._m = {s.name: _make(s, self.registry) for s in CATALOG if s.source == "event"}
        self._m["storyfarm_build_info"].labels(version=version or storyfarm_version(), preset=preset).set(1)
        for name, (label, values) in ZERO_START.items():
            for v in values:
                self._m[name].labels(**{label: v})
        self._lock = threading.Lock()
        self._started: dict[str, float] = {}  # attempt id -> monotonic hand-out time
        self._last: dict[tuple[str, str], float] = {}  # (worker, counter) -> last cumulative value
        self._backend: dict[str, str] = {}
        self.reported_gpu_bytes: dict[str, int] = {}  # worker -> bytes from its last report
        self.reported_gpu_uuid: dict[str, str] = {}  # worker -> its GPU's UUID, when it reports one (Ray nodes)
        self.out_of_service: set[str] = set()  # workers the dispatcher reported out of service

    def watch_farm(self, store, dispatcher=None, nvml=None) -> FarmCollector:
        """Export the scrape-time gauges of `store` and `dispatcher` (its farm_snapshot, or its pool)."""
        collector = FarmCollector(SPECS, store, dispatcher, self, nvml=nvml)
        self.registry.register(collector)
        return collector

    # -- servicer --------------------------------------------------------------------------------
    def story_submitted(self, project: str, shots: int) -> None:
        self._m["storyfarm_stories_submitted_total"].labels(project=project).inc()
        self._m["storyfarm_shots_submitted_total"].labels(project=project).inc(shots)

    # -- DispatchObserver ------------------------------------------------------------------------
    def attempt_started(self, task: ShotTask, *, worker_id: str, project: str, priority: int,
                        queue_wait_s: float, placement: str) -> None:
        self._started[task.attempt_id] = time.monotonic()
        self._m["storyfarm_shot_attempts_started_total"].labels(placement=_label(placement)).inc()
        self._m["storyfarm_queue_wait_seconds"].labels(priority_class=priority_class(priority)).observe(max(0.0, queue_wait_s))

    def attempt_finished(self, task: ShotTask, *, worker_id: str, project: str, outcome: str, reason: str,
                         report: Done | Failed | None, shot_state: str) -> None:
        started = self._started.pop(task.attempt_id, None)
        seconds = report.seconds if isinstance(report, Done) and report.seconds > 0 else None
        if seconds is None and started is not None:
            seconds = time.monotonic() - started
        if seconds is not None:
            self._m["storyfarm_shot_duration_seconds"].labels(outcome=outcome).observe(seconds)
        reason = _label(reason)
        self._m["storyfarm_shot_attempts_finished_total"].labels(outcome=outcome, reason=reason).inc()
        if shot_state in FINAL_STATES:
            self._m["storyfarm_shots_finished_total"].labels(project=_label(project), state=shot_state, reason=reason).inc()
        elif outcome in ("failed", "lost"):
            self._m["storyfarm_shot_retries_total"].labels(reason=reason).inc()
        if reason == "out_of_memory":
            stage = (getattr(report, "stage", "") or report.details.get("stage")) if isinstance(report, Failed) else None
            self._m["storyfarm_out_of_memory_errors_total"].labels(
                worker=_label(worker_id), stage=stage if stage in STAGES else "unknown").inc()
        if isinstance(report, Done):
            self._record_done(report.worker_id, report)

    def story_finished(self, story_id: str, *, project: str, state: str, reason: str, seconds: float) -> None:
        self._m["storyfarm_stories_finished_total"].labels(project=_label(project), state=state, reason=_label(reason)).inc()
        self._m["storyfarm_story_duration_seconds"].labels(state=state).observe(max(0.0, seconds))

    def rerender_finished(self, story_id: str, *, project: str, state: str, reason: str, seconds: float) -> None:
        """A re-render's end: its own series, so the story counts and durations above stay one per
        submitted story and submit-to-end (`seconds` here: from the re-render's request)."""
        self._m["storyfarm_rerenders_finished_total"].labels(project=_label(project), state=state, reason=_label(reason)).inc()
        self._m["storyfarm_rerender_duration_seconds"].labels(state=state).observe(max(0.0, seconds))

    def worker_event(self, worker_id: str, *, device: str, event: str, reason: str = "") -> None:
        if event in ("started", "replaced"):  # a new process: its counts start again from zero
            self._forget_worker(worker_id)
        if event == "replaced":
            self._m["storyfarm_worker_restarts_total"].labels(worker=worker_id, reason=_label(reason)).inc()
        with self._lock:
            if event == "out_of_service":
                self.out_of_service.add(worker_id)
            elif event == "ready":
                self.out_of_service.discard(worker_id)

    # -- recording -------------------------------------------------------------------------------
    def _delta(self, worker: str, key: str, value) -> float:
        """Growth of a per-process running total since the same worker's last report."""
        value = float(value)
        last = self._last.get((worker, key))
        self._last[(worker, key)] = value
        return value if last is None or value < last else value - last

    def _forget_worker(self, worker: str) -> None:
        for key in [k for k in self._last if k[0] == worker]:
            del self._last[key]
        self._m["storyfarm_latent_pool_resident_bytes"].labels(worker=worker).set(0)
        backend = self._backend.pop(worker, None)
        if backend is not None:
            self._m["storyfarm_attention_backend_info"].remove(worker, backend)
        with self._lock:
            self.reported_gpu_bytes.pop(worker, None)
            self.reported_gpu_uuid.pop(worker, None)

    def _record_done(self, worker: str, done: Done) -> None:
        stats, entry = done.stats or {}, done.entry or {}
        for stage, seconds in (stats.get("stages") or entry.get("seconds") or {}).items():
            self._m["storyfarm_shot_stage_duration_seconds"].labels(stage=stage if stage in STAGES else "other").observe(seconds)
        for seconds in stats.get("step_seconds") or ():
            self._m["storyfarm_denoise_step_duration_seconds"].observe(seconds)
        frames = stats.get("frames", entry.get("frames", 0)) or 0
        video_s = stats.get("video_seconds") or (frames / entry["fps"] if entry.get("fps") else 0.0)
        self._m["storyfarm_generated_frames_total"].labels(worker=worker).inc(frames)
        self._m["storyfarm_generated_video_seconds_total"].labels(worker=worker).inc(video_s)
        self._m["storyfarm_shot_render_seconds_total"].labels(worker=worker).inc(done.seconds)
        if video_s > 0 and done.seconds > 0:
            self._m["storyfarm_shot_realtime_factor"].observe(done.seconds / video_s)
        pool = stats.get("pool") or {}
        if "resident_bytes" in pool:
            self._m["storyfarm_latent_pool_resident_bytes"].labels(worker=worker).set(pool["resident_bytes"])
        if "hits" in pool:  # this shot's look-ups
            queries = pool.get("queries", pool["hits"] + pool.get("misses", 0))
            self._m["storyfarm_latent_pool_queries_total"].labels(worker=worker).inc(max(0, queries))
            self._m["storyfarm_latent_pool_hits_total"].labels(worker=worker).inc(max(0, pool["hits"]))
        if "evictions" in pool:
            self._m["storyfarm_latent_pool_evictions_total"].labels(worker=worker).inc(max(0, pool["evictions"]))
        if stats.get("recompiles") is not None:
            self._m["storyfarm_recompiles_total"].labels(worker=worker).inc(self._delta(worker, "recompiles", stats["recompiles"]))
        backend = stats.get("attention_backend")
        if backend:
            old = self._backend.get(worker)
            if old is not None and old != backend:
                self._m["storyfarm_attention_backend_info"].remove(worker, old)
            self._backend[worker] = backend
            self._m["storyfarm_attention_backend_info"].labels(worker=worker, backend=backend).set(1)
        with self._lock:
            if stats.get("gpu_memory_bytes") is not None:
                self.reported_gpu_bytes[worker] = int(stats["gpu_memory_bytes"])
            if stats.get("gpu_uuid"):
                self.reported_gpu_uuid[worker] = str(stats["gpu_uuid"])
