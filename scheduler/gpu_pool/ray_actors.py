"""The `ray` executor: workers as Ray actors, so the daemon can drive a whole Ray cluster.

A studio that outgrows one machine runs the same daemon as the driver of a Ray cluster: each
device group becomes one actor with `num_gpus` set, in its own placement group with STRICT_PACK
(its GPUs on one node, next to each other), running what `worker_factory` names (the model's
WorkerRuntime by default), built inside the actor as in a local process.
Actor messages (Ready, StageUpdate, Done, Failed) come back through one Ray queue, exactly like the
`mp` executor's shared queue, so supervision, heartbeats and replacement are the Executor's.
A dead actor shows up when its pending call fails; a frozen one is killed by the heartbeat rule.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from storyfarm.scheduler.gpu_pool.executor import DeviceGroup, Executor, WorkerHandle
from storyfarm.scheduler.gpu_pool.messages import Release, ShotTask
from storyfarm.scheduler.gpu_pool.worker_loop import DEFAULT_WORKER_FACTORY, build_runtime

log = logging.getLogger(__name__)
PING_EVERY_S = 5.0


class RayWorker:
    """The actor body (made remote in `_actor_class`): the runtime `worker_factory` names (built
    here, inside the actor), a cancel flag that a second actor thread can set while a shot renders."""

    def __init__(self, worker_id: str, preset: str, device: str, outbox, threads: int | None, expert_placement: str,
                 group_size: int = 1, worker_factory: str = DEFAULT_WORKER_FACTORY):
        self.worker_id, self.outbox = worker_id, outbox
        self.cancel_flag = threading.Event()
        self.runtime = None
        self._build = lambda: build_runtime(worker_factory, worker_id, preset, device, outbox.put, threads=threads,
                                            expert_placement=expert_placement, group_size=group_size)

    def load(self) -> bool:
        from storyfarm.scheduler.gpu_pool.messages import Failed

        try:
            self.runtime = self._build()
            self.outbox.put(self.runtime.load())
            return True
        except BaseException as exc:  # noqa: BLE001 - every start failure goes to the driver
            self.outbox.put(Failed(self.worker_id, None, f"worker failed to start: {exc!r}", fatal=True,
                                   reason="start_failed"))
            return False

    def run(self, task) -> bool:
        self.cancel_flag.clear()
        result = self.runtime.run(task, self.cancel_flag)
        self.outbox.put(result)
        return not getattr(result, "fatal", False)

    def cancel(self) -> None:
        self.cancel_flag.set()

    def release(self, story_dir: str) -> None:
        self.runtime.release(story_dir)

    def ping(self) -> bool:
        return True


_ACTOR = None


def _actor_class():
    global _ACTOR
    if _ACTOR is None:
        import ray

        _ACTOR = ray.remote(max_concurrency=2)(RayWorker)  # run + cancel at once
    return _ACTOR


@dataclass
class _Actor:
    actor: object
    placement_group: object
    pending: object = None  # the ObjectRef of its current load/run call
    dead: bool = False
    pinged_at: float = 0.0


def ray_groups(device: str, workers: int, gpus_per_worker: int) -> list[DeviceGroup]:
    """Device groups from the cluster's resources: one per `gpus_per_worker` GPUs; CPU workers
    (`workers` of them) when the cluster has no GPU and the device allows it."""
    import ray

    gpus = int(ray.cluster_resources().get("GPU", 0)) if device != "cpu" else 0
    if gpus == 0:
        if device == "cuda":
            raise RuntimeError("device: cuda asked for, but the Ray cluster has no GPU")
        return [DeviceGroup(f"ray-cpu{n}", "cpu") for n in range(workers)]
    return [DeviceGroup(f"ray-gpu{n}", "cuda:0", None, tuple(range(gpus_per_worker)))
            for n in range(gpus // gpus_per_worker)]


class RayExecutor(Executor):
    kind = "ray"

    def __init__(self, preset: str, groups: list[DeviceGroup], **kwargs):
        import ray
        from ray.util.queue import Queue

        if not ray.is_initialized():
            raise RuntimeError("ray is not initialised: call connect_ray() first")
        super().__init__(preset, groups, **kwargs)
        self.outbox = Queue()

    def _launch(self, handle: WorkerHandle) -> None:
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        gpus = len(handle.group.gpu_indices)
        bundle = {"CPU": 1, **({"GPU": gpus} if gpus else {})}
        pg = placement_group([bundle], strategy="STRICT_PACK", name=f"storyfarm-{handle.id}-{handle.generation}")
        actor = _actor_class().options(
            num_cpus=1, num_gpus=gpus, name=None,
            scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=pg, placement_group_bundle_index=0),
        ).remote(handle.id, self.preset, handle.group.device, self.outbox, self.threads, self.expert_placement,
                 max(1, gpus), self.worker_factory)
        handle.runtime = _Actor(actor, pg, actor.load.remote())

    def _send(self, handle: WorkerHandle, message) -> None:
        actor = handle.runtime.actor
        if message is None:
            return  # stopping: the actor is killed in _stop_wait
        if isinstance(message, Release):
            actor.release.remote(message.story_dir)
        elif isinstance(message, ShotTask):
            handle.runtime.pending = actor.run.remote(message)

    def _signal_cancel(self, handle: WorkerHandle) -> None:
        handle.runtime.actor.cancel.remote()

    def _alive(self, handle: WorkerHandle) -> bool:
        import ray

        runtime = handle.runtime
        if runtime is None or getattr(runtime, "dead", False):
            return False
        if runtime.pending is None:  # idle: a cheap ping every few seconds shows a dead actor
            if time.monotonic() - runtime.pinged_at > PING_EVERY_S:
                runtime.pending, runtime.pinged_at = runtime.actor.ping.remote(), time.monotonic()
            return True
        ready, _ = ray.wait([runtime.pending], timeout=0)
        if not ready:
            return True
        try:
            ray.get(runtime.pending)
        except ray.exceptions.RayActorError:
            runtime.dead = True
            return False
        except Exception:  # noqa: BLE001 - the call itself failed; the actor still lives
            pass
        runtime.pending = None
        return True

    def _kill(self, handle: WorkerHandle) -> bool:
        import ray
        from ray.util.placement_group import remove_placement_group

        runtime = handle.runtime
        ray.kill(runtime.actor, no_restart=True)
        confirmed = False
        try:
            ray.get(runtime.actor.ping.remote(), timeout=30)
        except ray.exceptions.RayActorError:
            confirmed = True
        except Exception:  # noqa: BLE001 - a timeout: not confirmed
            confirmed = False
        runtime.dead = True
        try:
            remove_placement_group(runtime.placement_group)
        except Exception:  # noqa: BLE001 - already gone with its node
            pass
        return confirmed

    def _receive(self, timeout: float) -> list:
        from ray.util.queue import Empty

        out = []
        try:
            out.append(self.outbox.get(block=True, timeout=timeout))
            out.extend(self.outbox.get_nowait_batch(self.outbox.qsize()))
        except Empty:
            pass
        return out

    def _stop_wait(self, grace: float) -> None:
        deadline = time.monotonic() + grace
        for w in self.workers.values():
            runtime = w.runtime
            if runtime is None or getattr(runtime, "dead", False):
                continue
            while runtime.pending is not None and time.monotonic() < deadline and self._alive(w):
                time.sleep(0.05)
            self._kill(w)
        try:
            self.outbox.shutdown()
        except Exception:  # noqa: BLE001 - already gone
            pass


def connect_ray(address: str | None, *, num_cpus: int | None = None, namespace: str = "storyfarm") -> None:
    """Join the Ray cluster at `address` ("auto": the local node's cluster), or start a local
    instance when `address` is None."""
    import ray

    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, namespace=namespace, log_to_driver=False)
    else:
        ray.init(num_cpus=num_cpus, namespace=namespace, include_dashboard=False, log_to_driver=False,
                 object_store_memory=256 << 20)
    resources = ray.cluster_resources()
    log.info("connected to Ray: %g CPU(s), %g GPU(s)", resources.get("CPU", 0), resources.get("GPU", 0),
             extra={"resources": resources})
