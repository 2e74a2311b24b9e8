"""The render worker: one spawned process per device group, models loaded once, a shot at a time.

The parent (the daemon) stays CUDA-free; everything that touches torch lives here. A worker loads
its preset once, says Ready, then renders the ShotTasks it is handed. The story folder is the whole
state a shot needs (its memory bank on disk, the previous clip), so any worker can render any shot
and a replaced worker loses nothing. Cancellation is checked at every denoising step through a
shared Event; progress is sent at every step. A CUDA error marks the worker fatal: it is replaced,
never reused.
"""

from __future__ import annotations

import os
import queue
import signal
import time
import traceback
from pathlib import Path

from storyfarm.scheduler.messages import Done, Failed, Progress, Ready, ShotTask

FATAL_MARKERS = ("CUDA error", "cudaError", "CUBLAS_STATUS", "device-side assert", "illegal memory access")


def _load_story(task: ShotTask, limits):
    from storyfarm.m2v.story import check_against_model, parse_story

    story = parse_story(task.story_document, source=f"story {task.story_id}", base_dir=task.references_dir)
    return check_against_model(story, limits)


def _render(task: ShotTask, renderer, worker_id: str, outbox, cancel) -> Done:
    from storyfarm.m2v.driver import Cancelled

    started = time.perf_counter()
    story = _load_story(task, renderer.preset.model_limits())
    shot = story.shots[task.shot_index]
    outbox.put(Progress(worker_id, task.attempt_id, shot.index, "text_encode"))

    def on_step(step, total, timestep, expert):
        if cancel.is_set():
            raise Cancelled()
        outbox.put(Progress(worker_id, task.attempt_id, shot.index, "denoise", step, total))

    entry = renderer.render_shot(story, shot, task.story_dir, on_step=on_step)
    files = [entry["file"]]
    manifest = None
    if task.finish_story:
        outbox.put(Progress(worker_id, task.attempt_id, shot.index, "mp4_encode"))
        manifest = renderer.finish(story, task.story_dir, [*task.entries, entry])
        files += ["story.mp4", "contact_sheet.png", "manifest.json"] + [k["file"] for k in manifest["keyframes"]]
    if task.finish_story:
        renderer.engine.pool.release(f"story:{Path(task.story_dir).resolve()}")  # the story ended: free its memory
    resident = len(renderer.engine.pool.namespaces() - {"shared"})
    return Done(worker_id, task.attempt_id, entry, tuple(files), manifest, time.perf_counter() - started, resident)


def _next_task(inbox, parent: int):
    """The next task; None to stop. Exits when the daemon that spawned this worker is gone."""
    while True:
        try:
            return inbox.get(timeout=1.0)
        except queue.Empty:
            if os.getppid() != parent:  # orphaned (the daemon was SIGKILLed): never linger on a GPU
                return None


def worker_main(worker_id: str, preset_name: str, device: str, inbox, outbox, cancel, threads: int | None = None) -> None:
    """Process entry point (spawned): load, say Ready, serve tasks until a None task arrives.

    SIGINT/SIGTERM are ignored: a Ctrl-C or a service manager signals the whole process group, and
    stopping workers is the daemon's job (it lets the running shot finish within its grace)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    parent = os.getppid()
    try:
        import torch

        if threads:
            torch.set_num_threads(threads)
        from storyfarm.m2v.driver import Cancelled, RenderSettings, StoryRenderer
        from storyfarm.m2v.engine import Engine
        from storyfarm.m2v.preset import load_preset

        t0 = time.perf_counter()
        engine = Engine(load_preset(preset_name), device=device)
        renderer = StoryRenderer(engine, RenderSettings())
        outbox.put(Ready(worker_id, device, engine.preset.name, time.perf_counter() - t0))
    except BaseException as exc:  # noqa: BLE001 - report every start failure to the parent
        outbox.put(Failed(worker_id, None, f"worker failed to start: {exc!r}", fatal=True))
        return
    while True:
        task = _next_task(inbox, parent)
        if task is None:
            return
        cancel.clear()
        try:
            outbox.put(_render(task, renderer, worker_id, outbox, cancel))
        except Cancelled:
            outbox.put(Failed(worker_id, task.attempt_id, "cancelled", cancelled=True, retryable=False))
        except BaseException as exc:  # noqa: BLE001 - a failed shot must be reported, not lost
            text = f"{type(exc).__name__}: {exc}"
            fatal = any(marker in text for marker in FATAL_MARKERS)
            retryable = not isinstance(exc, (ValueError, FileNotFoundError)) or fatal
            outbox.put(Failed(worker_id, task.attempt_id, text, retryable=retryable, fatal=fatal,
                              details={"traceback": traceback.format_exc(limit=8), "pid": os.getpid()}))
            if fatal:
                return
