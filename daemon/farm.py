"""Turns the daemon config's `scheduler:` section into the farm's parts: the executor with its
device groups and supervision rules, the placement policy and the first cost model.

Kept apart from server.py so the policy inputs (quotas, expert placement, move cost) are read in
one place, and so `executor: ray` imports Ray only when asked for. `worker` picks what the workers
run (the model, or the fake that renders nothing) by name, as a dotted path the workers import.
"""

from __future__ import annotations

import logging

from storyfarm.daemon.config import DaemonConfig
from storyfarm.story.presets import Preset
from storyfarm.scheduler.gpu_pool.executor import Executor, SupervisionConfig
from storyfarm.scheduler.gpu_pool.gpus import XidWatcher, device_groups
from storyfarm.scheduler.gpu_pool.worker_loop import WORKER_FACTORIES
from storyfarm.scheduler.policy import CostModel, PolicyConfig, ProjectQuota

log = logging.getLogger(__name__)


def policy_config(config: DaemonConfig) -> PolicyConfig:
    s = config.scheduler

    def quota(q) -> ProjectQuota:
        return ProjectQuota(q.guaranteed, q.burst, q.max_concurrent_stories)

    return PolicyConfig(expert_placement=s.expert_placement, move_cost_s=s.move_cost_s,
                        projects={name: quota(q) for name, q in s.projects.items()},
                        default_quota=quota(s.default_project))


def cost_model(config: DaemonConfig, preset: Preset) -> CostModel:
    """The operator's cost settings, with the memory window of the preset the workers load (a
    shot never sees more than `memory.max_size` memory frames, so its cost stops growing there)."""
    c = config.scheduler.cost
    return CostModel(base_s=c.base_s, growth_per_memory_frame=c.growth_per_memory_frame, swap_s=c.swap_s,
                     max_memory_frames=preset.memory.max_size)


def build_executor(config: DaemonConfig) -> Executor:
    s = config.scheduler
    supervision = SupervisionConfig(heartbeat_timeout_s=s.heartbeat_timeout_s, start_timeout_s=s.start_timeout_s,
                                    failure_limit=s.failure_limit, failure_window_s=s.failure_window_s)
    # a dotted path, imported only inside the workers: the daemon never imports what renders
    common = {"expert_placement": s.expert_placement, "supervision": supervision,
              "worker_factory": WORKER_FACTORIES[s.worker]}
    if s.executor == "ray":
        from storyfarm.scheduler.gpu_pool.ray_actors import RayExecutor, connect_ray, ray_groups

        connect_ray(s.ray.address, num_cpus=s.ray.num_cpus)
        groups = ray_groups(config.device, config.workers, s.gpus_per_worker)
        log.info("ray executor: %d worker(s) (%s)", len(groups), ", ".join(g.name for g in groups))
        return RayExecutor(config.preset, groups, **common)
    from storyfarm.scheduler.gpu_pool.processes import ProcessExecutor

    groups = device_groups(config.device, config.workers, s.gpus_per_worker)
    return ProcessExecutor(config.preset, groups, **common)


def xid_watcher(config: DaemonConfig) -> XidWatcher | None:
    if config.device == "cpu":
        return None
    watcher = XidWatcher()
    return watcher if watcher.available else None
