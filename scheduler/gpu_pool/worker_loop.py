"""The worker's process loop and the factory seam that builds what renders in it.

Why this is its own module: the daemon's parent process must stay torch-free, and an import-linter
contract holds it to that statically (storyfarm.daemon.server never imports storyfarm.m2v, not even
inside a function). The `mp` executor names `worker_main` as its spawn target, so the loop lives
here, with no m2v import at all; what renders is named by a dotted path ("module:callable", the
`worker_factory`) and imported only inside the worker (a spawned process or a Ray actor).

A factory is called as `factory(worker_id, preset_name, device, send, threads=..., expert_placement=...,
extra_devices=...)` and returns a runtime with the interface of `worker.WorkerRuntime`:
- `load() -> Ready` (raises when the worker cannot start; the loop reports it as start_failed);
- `run(task, cancel) -> Done | Failed`, never raising, checking `cancel` (an Event) at every step
  and reporting progress through `send` (progress doubles as the heartbeat);
- `release(story_dir)`: a story ended, drop its memory.
Factories: `render` (the model runtime, the default) and `fake` (renders nothing: the daemon alone
is measured, and the dispatcher and executors are tested without torch).
"""

from __future__ import annotations

import importlib
import logging
import os
import queue
import re
import signal

from storyfarm.scheduler.gpu_pool.logfmt import LOG_FORMAT_ENV, configure_logging
from storyfarm.scheduler.gpu_pool.messages import Failed, Release

log = logging.getLogger(__name__)

WORKER_FACTORIES = {
    "render": "storyfarm.scheduler.gpu_pool.worker:WorkerRuntime",
    "fake": "storyfarm.scheduler.gpu_pool.fake:FakeWorker",
}
DEFAULT_WORKER_FACTORY = WORKER_FACTORIES["render"]
_DOTTED = re.compile(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*")


def check_factory(path: str) -> str:
    """`path` if it is written "package.module:callable" (checked without importing anything)."""
    if not isinstance(path, str) or not _DOTTED.fullmatch(path):
        raise ValueError(f"worker_factory: {path!r}: expected a dotted path 'package.module:callable' "
                         f"(built in: {', '.join(f'{k} = {v}' for k, v in WORKER_FACTORIES.items())})")
    return path


def resolve_factory(path: str):
    """Import the callable `path` names. Only a worker calls this: the daemon passes the string."""
    module, _, attr = check_factory(path).partition(":")
    target = importlib.import_module(module)
    for part in attr.split("."):
        target = getattr(target, part)
    if not callable(target):
        raise TypeError(f"worker_factory: {path!r} is not callable")
    return target


def build_runtime(factory: str, worker_id: str, preset_name: str, device: str, send, *, threads: int | None = None,
                  expert_placement: str = "both", group_size: int = 1):
    """The runtime `factory` builds for one worker; the rest of a GPU group are its extra devices."""
    return resolve_factory(factory)(worker_id, preset_name, device, send, threads=threads,
                                    expert_placement=expert_placement,
                                    extra_devices=tuple(f"cuda:{i}" for i in range(1, group_size)))


def serve(worker_id: str, build, send, next_message, cancel) -> None:
    """The loop every host of a runtime runs: build and load it, say Ready (or a start failure),
    then render one task at a time until `next_message()` returns None. A fatal failure (a CUDA
    error) ends the loop: that worker is replaced, never reused."""
    try:
        runtime = build()
        send(runtime.load())
    except BaseException as exc:  # noqa: BLE001 - report every start failure to the daemon
        send(Failed(worker_id, None, f"worker failed to start: {exc!r}", fatal=True, reason="start_failed"))
        return
    while True:
        message = next_message()
        if message is None:
            return
        if isinstance(message, Release):
            runtime.release(message.story_dir)
            continue
        cancel.clear()
        result = runtime.run(message, cancel)
        send(result)
        if isinstance(result, Failed) and result.fatal:
            return


def _next_message(inbox, parent: int):
    """The next task or Release; None to stop. Exits when the daemon that spawned it is gone."""
    while True:
        try:
            return inbox.get(timeout=1.0)
        except queue.Empty:
            if os.getppid() != parent:  # orphaned (the daemon was SIGKILLed): never linger on a GPU
                return None


def worker_main(worker_id: str, preset_name: str, device: str, inbox, outbox, cancel, threads: int | None = None,
                expert_placement: str = "both", visible_devices: str | None = None,
                worker_factory: str = DEFAULT_WORKER_FACTORY) -> None:
    """Process entry point (spawned): build the runtime `worker_factory` names, load, say Ready,
    serve tasks until a None message arrives. `outbox` is the write end of this worker's own pipe.

    SIGINT/SIGTERM are ignored: a Ctrl-C or a service manager signals the whole process group, and
    stopping workers is the daemon's job (it lets the running shot finish within its grace)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if visible_devices is not None:  # the GPU group, before anything can initialise CUDA
        os.environ["CUDA_VISIBLE_DEVICES"] = visible_devices
    if os.environ.get(LOG_FORMAT_ENV):  # set by `storyfarm serve`: the daemon's log format
        configure_logging(os.environ[LOG_FORMAT_ENV])
        logging.captureWarnings(True)
    parent = os.getppid()
    group = visible_devices.split(",") if visible_devices else []

    def build():
        return build_runtime(worker_factory, worker_id, preset_name, device, outbox.send, threads=threads,
                             expert_placement=expert_placement, group_size=max(1, len(group)))

    serve(worker_id, build, outbox.send, lambda: _next_message(inbox, parent), cancel)
