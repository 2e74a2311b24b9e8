"""The farm on a virtual clock: the real placement policy against a cost model, in seconds of CPU.

Why: scheduling choices (affinity, priorities, deadlines, expert placement) only show their worth
over thousands of shots, which no test can render. The simulator drives the same `Scheduler` the
daemon uses with a cost per shot (a base time growing with memory size, expert swaps, random
jitter and injected failures) and reports how close the makespan comes to its lower bound (the
larger of total work over the GPUs and the longest story), GPU utilisation, how often a shot ran
where its story's memory already was, deadline hits and how far the up-front ETA was off.

Expert placements: `both` (each GPU holds both experts), `swap` (one expert resident, swapped at the
boundary: two swaps per shot), `pipeline` (GPUs in pairs, the high-noise expert on one and the
low-noise expert on the other; a pair takes the next shot as soon as its first GPU is free).
"""

from __future__ import annotations

import heapq
import random
from dataclasses import asdict, dataclass

from storyfarm.scheduler.policy import CostModel, PolicyConfig, Scheduler, StoryWork


@dataclass(frozen=True)
class SimConfig:
    stories: int = 100
    shots_per_story: int = 10
    gpus: int = 8
    policy: str = "both"  # expert placement: both | swap | pipeline
    base_s: float = 60.0
    growth_per_memory_frame: float = 0.06
    swap_s: float = 4.0
    jitter: float = 0.1  # each shot's real time is its modelled time times U(1-j, 1+j)
    failure_rate: float = 0.0  # chance an attempt fails for content reasons part way through
    max_attempts: int = 3
    deadline_s: float | None = None  # one overnight batch deadline for every story
    priorities: int = 1  # stories get priorities 0..priorities-1 round robin
    seed: int = 0


@dataclass(frozen=True)
class SimReport:
    makespan_s: float
    lower_bound_s: float
    makespan_over_bound: float
    gpu_utilisation: float
    affinity_hit_rate: float
    placements: dict
    shots_run: int
    failed_attempts: int
    stories_finished: int
    failed_stories: int
    deadline_hits: int | None
    deadline_hit_rate: float | None
    eta_mean_abs_error_s: float
    eta_mean_rel_error: float
    policy: str
    stories: int
    shots_per_story: int
    gpus: int
    wall_s: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)


def _check(config: SimConfig) -> None:
    problems = []
    if config.stories < 1:
        problems.append("stories must be at least 1")
    if config.shots_per_story < 1:
        problems.append("shots_per_story must be at least 1")
    if config.gpus < 1:
        problems.append("gpus must be at least 1")
    if config.policy not in ("both", "swap", "pipeline"):
        problems.append(f"policy must be one of both, swap, pipeline, got {config.policy!r}")
    if config.policy == "pipeline" and config.gpus % 2:
        problems.append(f"gpus must be even for the pipeline policy (pairs of GPUs), got {config.gpus}")
    if not 0 <= config.failure_rate < 1:
        problems.append(f"failure_rate must be in [0, 1), got {config.failure_rate}")
    if not 0 <= config.jitter < 1:
        problems.append(f"jitter must be in [0, 1), got {config.jitter}")
    if config.base_s <= 0:
        problems.append(f"base_s must be positive, got {config.base_s}")
    if problems:
        raise ValueError("; ".join(problems))


def simulate(config: SimConfig) -> SimReport:
    import time

    _check(config)
    started = time.perf_counter()
    rng = random.Random(config.seed)
    cost = CostModel(base_s=config.base_s, growth_per_memory_frame=config.growth_per_memory_frame,
                     swap_s=config.swap_s)
    sched = Scheduler(PolicyConfig(expert_placement=config.policy), cost)
    pipeline = config.policy == "pipeline"
    groups = config.gpus // 2 if pipeline else config.gpus
    for g in range(groups):
        sched.add_worker(f"g{g:03d}")
    deadline = config.deadline_s
    ids = [f"s{i:05d}" for i in range(config.stories)]
    for i, story_id in enumerate(ids):
        sched.add_story(StoryWork(story_id, priority=i % config.priorities, deadline=deadline,
                                  submitted_at=i * 1e-6, total_shots=config.shots_per_story))
    eta = project_finish(sched, cost, pipeline, now=0.0)

    events: list[tuple] = []  # (time, seq, kind, payload)
    seq = 0
    second_stage_free: dict[str, float] = {}  # pipeline: when each pair's low-noise GPU frees up
    busy_s = 0.0
    attempts: dict[tuple[str, int], int] = {}
    chain_s: dict[str, float] = {sid: 0.0 for sid in ids}
    finished_at: dict[str, float] = {}
    failed_stories = 0
    failed_attempts = 0
    shots_run = 0
    placements = {"affinity": 0, "moved": 0, "new": 0}

    def start(now: float) -> None:
        nonlocal seq, busy_s, shots_run, failed_attempts
        for a in sched.schedule(now).assignments:
            placements[a.placement] += 1
            shots_run += 1
            real = a.estimated_s * rng.uniform(1 - config.jitter, 1 + config.jitter)
            fails = rng.random() < config.failure_rate
            if fails:
                real *= rng.uniform(0.1, 1.0)
                failed_attempts += 1
            chain_s[a.story_id] += real
            if pipeline:
                first = real * cost.high_noise_fraction
                second = real - first
                second_start = max(now + first, second_stage_free.get(a.worker_id, 0.0))
                end = second_start + second
                second_stage_free[a.worker_id] = end
                busy_s += real
                seq += 1
                heapq.heappush(events, (now + first, seq, "release", (a.worker_id, None, None)))
            else:
                end = now + real
                busy_s += real
            seq += 1
            heapq.heappush(events, (end, seq, "done", (a.worker_id, a.story_id, a.shot_index, fails)))

    start(0.0)
    now = 0.0
    while events:
        now, _, kind, payload = heapq.heappop(events)
        if kind == "release":
            sched.release_worker(payload[0])
        else:
            _, story_id, index, fails = payload
            if fails:
                key = (story_id, index)
                attempts[key] = attempts.get(key, 0) + 1
                if attempts[key] >= config.max_attempts:
                    sched.shot_finished(story_id, "failed", release_worker=not pipeline)
                    sched.remove_story(story_id)
                    failed_stories += 1
                else:
                    sched.shot_finished(story_id, "failed", release_worker=not pipeline)
            else:
                sched.shot_finished(story_id, "succeeded", release_worker=not pipeline)
                if index + 1 == config.shots_per_story:
                    finished_at[story_id] = now
        # same-time events first, then one scheduling pass
        if not events or events[0][0] > now:
            start(now)
    makespan = now
    bound = max(busy_s / config.gpus, max(chain_s.values()))
    placed = placements["affinity"] + placements["moved"]
    errors = [abs(finished_at[s] - eta[s]) for s in finished_at]
    rel = [abs(finished_at[s] - eta[s]) / finished_at[s] for s in finished_at if finished_at[s] > 0]
    hits = None if deadline is None else sum(1 for t in finished_at.values() if t <= deadline)
    return SimReport(
        makespan_s=round(makespan, 3), lower_bound_s=round(bound, 3),
        makespan_over_bound=round(makespan / bound, 5) if bound else 1.0,
        gpu_utilisation=round(busy_s / (config.gpus * makespan), 5) if makespan else 0.0,
        affinity_hit_rate=round(placements["affinity"] / placed, 5) if placed else 1.0,
        placements=placements, shots_run=shots_run, failed_attempts=failed_attempts, stories_finished=len(finished_at),
        failed_stories=failed_stories, deadline_hits=hits,
        deadline_hit_rate=None if hits is None else round(hits / config.stories, 5),
        eta_mean_abs_error_s=round(sum(errors) / len(errors), 3) if errors else 0.0,
        eta_mean_rel_error=round(sum(rel) / len(rel), 5) if rel else 0.0,
        policy=config.policy, stories=config.stories, shots_per_story=config.shots_per_story, gpus=config.gpus,
        wall_s=round(time.perf_counter() - started, 3),
    )


def project_finish(sched: Scheduler, cost: CostModel, pipeline: bool, now: float) -> dict[str, float]:
    """Each story's expected finish time: the scheduler's own state played forward with the cost
    model's times (no jitter, no failures). `sched` is not changed. The daemon's ETAs come from here."""
    import copy

    shadow = copy.deepcopy(sched)
    events: list[tuple] = []
    seq = 0
    finish: dict[str, float] = {}
    total = {sid: shadow._stories[sid].work.total_shots for sid in shadow.story_ids()}
    for worker in shadow._workers.values():  # shots already running end when the model says
        if not worker.idle and worker.story is not None:
            seq += 1
            heapq.heappush(events, (max(now, worker.busy_until), seq, worker.story, worker.id))

    def start(t: float) -> None:
        nonlocal seq
        for a in shadow.schedule(t).assignments:
            if pipeline:  # the pair takes its next shot once the high-noise half is done
                seq += 1
                heapq.heappush(events, (t + a.estimated_s * cost.high_noise_fraction, seq, None, a.worker_id))
            seq += 1
            heapq.heappush(events, (t + a.estimated_s, seq, a.story_id, a.worker_id))

    start(now)
    t = now
    while events:
        t, _, story_id, worker_id = heapq.heappop(events)
        if story_id is None:
            shadow.release_worker(worker_id)
            if not events or events[0][0] > t:
                start(t)
            continue
        index = shadow._stories[story_id].next_index
        shadow.shot_finished(story_id, "succeeded", release_worker=not pipeline)
        if index + 1 >= total[story_id]:
            finish[story_id] = t
        if not events or events[0][0] > t:
            start(t)
    return finish
