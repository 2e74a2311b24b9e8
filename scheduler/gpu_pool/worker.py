"""The render worker: one process (or Ray actor) per device group, models loaded once, a shot at a time.

The parent (the daemon) stays CUDA-free; everything that touches torch lives here. A worker loads
its preset once, warms up, says Ready, then renders the ShotTasks it is handed. The story folder is
the whole state a shot needs (its memory bank on disk, the previous clip), so any worker can render
any shot and a replaced worker loses nothing. A StageUpdate goes out for every render stage, once and
in order (the driver's ShotFeed sees to it), and for every denoising step; it doubles as the heartbeat: a worker stuck in a CUDA kernel stops sending and the daemon
kills it. Cancellation is checked at every step. Failures are classified for the daemon: a CUDA
error is fatal (the process is replaced, never reused), an out-of-memory says in which stage it
happened (the store allows it a low-memory retry of its own), anything else is a content failure.

`WorkerRuntime` is the part both executors share and what the default `worker_factory` names
(`worker_loop.WORKER_FACTORIES["render"]`): the `mp` executor builds it inside
`worker_loop.worker_main`, the `ray` executor inside an actor. The process loop lives in worker_loop
so the daemon's parent, which names that loop as its spawn target, never imports this module.
"""

from __future__ import annotations

import logging
import os
import time
import traceback
from contextlib import nullcontext
from pathlib import Path

from storyfarm.scheduler.gpu_pool.messages import Done, Failed, StageUpdate, Ready, ShotTask
from storyfarm.scheduler.gpu_pool.faults import worker_fault

log = logging.getLogger(__name__)

FATAL_MARKERS = ("CUDA error", "cudaError", "CUBLAS_STATUS", "CUDNN_STATUS", "device-side assert",
                 "illegal memory access", "unspecified launch failure", "NCCL error")
OOM_MARKERS = ("out of memory", "OutOfMemoryError")


def classify(exc: BaseException) -> str:
    """cancelled | out_of_memory | cuda_error | story (bad input: never retried) | content."""
    from storyfarm.m2v.render.observe import Cancelled
    from storyfarm.story.fields import StoryValidationError

    if isinstance(exc, Cancelled):
        return "cancelled"
    text = f"{type(exc).__name__}: {exc}"
    if type(exc).__name__ == "OutOfMemoryError" or any(m in text for m in OOM_MARKERS):
        return "out_of_memory"
    if any(marker in text for marker in FATAL_MARKERS):
        return "cuda_error"
    if isinstance(exc, StoryValidationError):
        return "story"
    return "content"


class WorkerRuntime:
    """Loads a preset on one device and renders tasks, reporting through `send` (a callable)."""

    def __init__(self, worker_id: str, preset_name: str, device: str, send, *, threads: int | None = None,
                 expert_placement: str = "both", extra_devices: tuple[str, ...] = ()):
        self.worker_id, self.preset_name, self.device = worker_id, preset_name, device
        self.send, self.threads, self.expert_placement = send, threads, expert_placement
        self.extra_devices = tuple(extra_devices)  # the rest of a GPU group: FIFO windows run there too
        self.renderer = None
        self.stage = ""

    def load(self) -> Ready:
        import torch

        if self.threads:
            torch.set_num_threads(self.threads)
        from storyfarm.m2v.render.driver import RenderSettings, StoryRenderer
        from storyfarm.m2v.render.engine import Engine
        from storyfarm.story.presets import load_preset

        t0 = time.perf_counter()
        # the placement decides where experts load: all on the GPU never happens for `swap`
        engine = Engine(load_preset(self.preset_name), device=self.device, expert_placement=self.expert_placement)
        if self.extra_devices:
            from storyfarm.m2v.render.fifo_shot import add_window_devices

            add_window_devices(engine, list(self.extra_devices))
        report = engine.warm_up()  # compiles and first-call costs move out of the first shot
        # the report is a structure: a field of its own in JSON lines, never a repr in the message
        log.info("worker %s on %s warmed up in %.1f s (attention %s)", self.worker_id, self.device,
                 report.get("seconds", 0.0), engine.attention_backend,
                 extra={"worker": self.worker_id, "device": str(self.device),
                        "attention": str(engine.attention_backend), "warmup": report})
        self.renderer = StoryRenderer(engine, RenderSettings())
        return Ready(self.worker_id, self.device, engine.preset.name, time.perf_counter() - t0,
                     str(engine.attention_backend))

    @property
    def engine(self):
        return self.renderer.engine

    def release(self, story_dir: str) -> None:
        self.engine.latent_pool.release(f"story:{Path(story_dir).resolve()}")

    def _progress(self, task: ShotTask, stage: str, step: int = 0, total: int = 0) -> None:
        self.stage = stage
        self.send(StageUpdate(self.worker_id, task.attempt_id, task.shot_index, stage, step, total))


    def run(self, task: ShotTask, cancel) -> Done | Failed:
        """Render one task; never raises (every failure becomes a classified Failed)."""
        self.stage = "load"
        try:
            return self._render(task, cancel)
        except BaseException as exc:  # noqa: BLE001 - a failed shot must be reported, not lost
            reason = classify(exc)
            text = f"{type(exc).__name__}: {exc}"
            if reason == "cancelled":
                return Failed(self.worker_id, task.attempt_id, "cancelled", cancelled=True, retryable=False,
                              reason="cancelled", stage=self.stage)
            return Failed(self.worker_id, task.attempt_id, text, retryable=reason != "story",
                          fatal=reason == "cuda_error", reason=reason, stage=self.stage,
                          details={"traceback": traceback.format_exc(limit=8), "pid": os.getpid()})

    def _render(self, task: ShotTask, cancel) -> Done:
        worker_fault(task)
        from storyfarm.m2v.accel.placement import low_memory
        from storyfarm.story.format import check_against_model, parse_story

        started = time.perf_counter()
        renderer, engine = self.renderer, self.engine
        story = parse_story(task.story_document, source=f"story {task.story_id}", base_dir=task.references_dir,
                            name=task.story_name)
        story = check_against_model(story, renderer.preset.model_limits())
        shot = story.shots[task.shot_index]
        reports = _ShotReports(self, task)
        pool_before = engine.latent_pool.stats.as_dict()
        with low_memory(engine) if task.low_memory else nullcontext():
            entry = renderer.render_shot(story, shot, task.story_dir, reports, edit=task.edit, cancel=cancel.is_set)
        files = [entry["file"]]
        manifest = None
        if task.finish_story:
            reports.stage("assemble")
            manifest = renderer.finish(story, task.story_dir, sorted([*task.entries, entry], key=lambda e: e["index"]))
            files += ["story.mp4", "contact_sheet.png", "manifest.json"] + [k["file"] for k in manifest["keyframes"]]
            self.release(task.story_dir)  # the story ended: free its memory
        resident = len(engine.latent_pool.namespaces() - {"shared"})
        return Done(self.worker_id, task.attempt_id, entry, tuple(files), manifest, time.perf_counter() - started,
                    resident, stats=self._stats(entry, reports.step_seconds, pool_before))

    def _stats(self, entry: dict, steps: list[float], pool_before: dict) -> dict:
        engine = self.engine
        pool = engine.latent_pool.stats.as_dict()
        fps = entry.get("fps") or 0
        stats = {
            "stages": dict(entry.get("seconds", {})),
            "step_seconds": [round(s, 6) for s in steps],
            "frames": entry.get("frames", 0),
            "video_seconds": entry.get("frames", 0) / fps if fps else 0.0,
            "memory_frames": len(entry.get("memory_keyframes", [])),
            "pool": {
                "resident_bytes": pool["device_bytes"], "cpu_bytes": pool["cpu_bytes"],
                "stories": len(engine.latent_pool.namespaces() - {"shared"}),
                "hits": pool["hits"] - pool_before["hits"], "misses": pool["misses"] - pool_before["misses"],
                "queries": (pool["hits"] + pool["misses"]) - (pool_before["hits"] + pool_before["misses"]),
                "evictions": (pool["spills"] + pool["drops"]) - (pool_before["spills"] + pool_before["drops"]),
            },
            "expert_swaps": engine.residency.swaps,
        }
        backend = getattr(engine, "attention_backend", None)
        if backend:
            stats["attention_backend"] = str(backend)
        recompiles = getattr(engine, "recompiles", None)
        if recompiles is not None:
            stats["recompiles"] = int(recompiles() if callable(recompiles) else recompiles)
        if engine.device.type == "cuda":
            import torch

            stats["gpu_memory_bytes"] = int(torch.cuda.max_memory_allocated(engine.device))
        return stats


class _ShotReports:
    """The worker's RenderObserver (m2v.render.observe, by shape: this module imports no m2v at
    module level): every stage and denoising step of one task goes to the daemon as a StageUpdate,
    and the steps' durations are kept for the metrics."""

    def __init__(self, runtime: WorkerRuntime, task: ShotTask):
        self.runtime, self.task = runtime, task
        self.step_seconds: list[float] = []
        self._last = time.perf_counter()

    def story_start(self, story, total_shots) -> None:
        pass

    def shot_start(self, shot, plan) -> None:
        self._last = time.perf_counter()

    def shot_done(self, shot, entry) -> None:
        pass

    def stage(self, name: str, step: int = 0, total: int = 0, detail: str = "") -> None:
        if name == "denoise" and not step:  # the first step's time starts here, not at the text encoder
            self._last = time.perf_counter()
        if name == "denoise" and step:
            now = time.perf_counter()
            self.step_seconds.append(now - self._last)
            self._last = now
        self.runtime._progress(self.task, name, step, total)
