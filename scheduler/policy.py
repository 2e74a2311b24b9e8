"""Placement policy: which runnable shot goes to which idle worker, and which stories wait.

Pure: no I/O, no torch, no clock (every call takes `now`), no randomness, so the same calls give
the same decisions. The daemon rebuilds a Scheduler from its store each turn; the simulator and the
tests drive one incrementally. The contract is the one a farm needs: add work (stories, workers),
schedule (assignments for idle workers, stories preempted at a shot boundary), apply results
(shot finished, worker freed or gone), finish (a story leaves when its last shot succeeds).

Why these rules (DESIGN.md §3, §6):
- Shots of one story run in order, so a story has at most one runnable shot; parallelism comes from
  running different stories at once.
- A story's memory lives on the worker that rendered its last shot (its holder). Moving it costs a
  reload and re-encode, so a story whose holder is busy waits for it, but only while that wait is
  shorter than the move would cost, nobody of lower rank would take the idle worker meanwhile and
  no deadline slips; a story whose holder is gone moves at once.
- Rank: priority first (an integer that may change after submit), then stories that can still meet
  their deadline, earliest deadline and least remaining work first (so the most stories of an
  overnight batch finish by its deadline), then everything else first come, first served.
- Projects: a guaranteed number of workers first, then burst up to a cap while workers are idle,
  and a cap on stories in progress at once.
- Preemption happens only between shots: a worker that finishes a shot is handed to higher-ranked
  work instead of the story whose memory it holds; a running shot is never interrupted.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field
from typing import Iterator, Literal, Mapping

ExpertPlacement = Literal["both", "swap", "pipeline"]
EXPERT_PLACEMENTS = ("both", "swap", "pipeline")


@dataclass(frozen=True)
class ProjectQuota:
    guaranteed: int = 0  # workers the project gets before burst work of anyone else
    burst: int | None = None  # most workers at once; None: no cap
    max_concurrent_stories: int | None = None  # stories started and not finished; None: no cap


@dataclass(frozen=True)
class CostModel:
    """Seconds a shot takes on one worker: a base time that grows with the story's memory size,
    plus expert swaps when the two experts do not stay resident. The daemon learns `base_s` from
    finished shots; the ETA and the simulator both use it."""

    base_s: float = 60.0  # a shot with no memory frames, both experts resident
    growth_per_memory_frame: float = 0.06  # 10 memory frames: about 48% more tokens, attention grows faster
    memory_frames_per_shot: float = 1.0  # keyframes a shot adds to the story's memory, on average
    max_memory_frames: int = 10  # the preset's memory window (memory.max_size): the daemon sets it from the preset
    swap_s: float = 0.0  # moving one expert's weights onto the device
    high_noise_fraction: float = 0.5  # share of a shot's steps on the high-noise expert

    def memory_frames(self, index: int, references: int = 0) -> int:
        return min(self.max_memory_frames, references + int(round(index * self.memory_frames_per_shot)))

    def shot_seconds(self, index: int, references: int = 0, placement: ExpertPlacement = "both") -> float:
        seconds = self.base_s * (1.0 + self.growth_per_memory_frame * self.memory_frames(index, references))
        return seconds + (2 * self.swap_s if placement == "swap" else 0.0)

    def remaining_seconds(self, next_index: int, total: int, references: int = 0,
                          placement: ExpertPlacement = "both") -> float:
        return sum(self.shot_seconds(i, references, placement) for i in range(next_index, total))

    def learned(self, memory_frames: int, seconds: float, weight: float = 0.2) -> CostModel:
        """This model with `base_s` moved toward what a finished shot showed."""
        observed = seconds / (1.0 + self.growth_per_memory_frame * memory_frames)
        base = (1 - weight) * self.base_s + weight * observed
        return CostModel(base, self.growth_per_memory_frame, self.memory_frames_per_shot,
                         self.max_memory_frames, self.swap_s, self.high_noise_fraction)


def remaining_shot_s(estimate_s: float, elapsed_s: float, step: int = 0, total: int = 0) -> float:
    """Seconds until a running shot finishes: the cost model's estimate less the time spent, until
    its denoising steps are counted; from then on, the remaining steps at the pace of the attempt so
    far (elapsed per step done). The one shot ETA: GetStory, WatchStory and the story projection."""
    if step > 0 and total > 0:
        return max(0.0, elapsed_s / step * (total - step))
    return max(0.0, estimate_s - elapsed_s)


@dataclass(frozen=True)
class PolicyConfig:
    expert_placement: ExpertPlacement = "both"
    move_cost_s: float = 20.0  # what moving a story's memory to another worker costs
    projects: Mapping[str, ProjectQuota] = field(default_factory=dict)
    default_quota: ProjectQuota = ProjectQuota()

    def quota(self, project: str) -> ProjectQuota:
        return self.projects.get(project, self.default_quota)


@dataclass(frozen=True)
class StoryWork:
    """A story as the policy sees it: identity, rank inputs and where it stands."""

    id: str
    project: str = "default"
    priority: int = 0
    deadline: float | None = None
    submitted_at: float = 0.0
    total_shots: int = 1
    next_index: int = 0  # the next shot to render
    references: int = 0  # reference images: the memory it starts with
    holder: str | None = None  # the worker holding its memory, if any
    started: bool = False  # a shot of it ran before (counts toward max_concurrent_stories)
    held: bool = False  # paused: keeps its place, gets no worker


@dataclass(frozen=True)
class Assignment:
    story_id: str
    shot_index: int
    worker_id: str
    placement: str  # affinity | moved | new
    estimated_s: float


@dataclass(frozen=True)
class Preemption:
    story_id: str  # waits: its holder went to higher-ranked work
    worker_id: str
    by_story_id: str


@dataclass(frozen=True)
class Decision:
    assignments: tuple[Assignment, ...] = ()
    preemptions: tuple[Preemption, ...] = ()


@dataclass
class _Story:
    work: StoryWork
    next_index: int
    holder: str | None
    started: bool
    held: bool
    priority: int
    running_on: str | None = None
    done: bool = False
    version: int = 0


@dataclass
class _Worker:
    id: str
    idle: bool = True
    story: str | None = None  # the story whose shot it runs
    busy_until: float = 0.0
    holds: set = field(default_factory=set)  # stories whose memory it holds


class Scheduler:
    def __init__(self, config: PolicyConfig | None = None, cost: CostModel | None = None):
        self.config = config or PolicyConfig()
        self.cost = cost or CostModel()
        self._stories: dict[str, _Story] = {}
        self._workers: dict[str, _Worker] = {}
        self._heap: list[tuple] = []
        self._running_by_project: dict[str, int] = {}
        self._active_by_project: dict[str, int] = {}  # started, not finished

    # -- work --------------------------------------------------------------------------------
    def add_worker(self, worker_id: str, *, busy_with: str | None = None, busy_until: float = 0.0) -> None:
        """A worker that can take shots; `busy_with` a story id when it already runs one of its shots."""
        if worker_id in self._workers:
            raise ValueError(f"worker {worker_id!r} is already known")
        worker = _Worker(worker_id)
        self._workers[worker_id] = worker
        for story in self._stories.values():
            if story.holder == worker_id:
                worker.holds.add(story.work.id)
        if busy_with is not None:
            story = self._stories[busy_with]
            self._start(story, worker, busy_until)

    def remove_worker(self, worker_id: str) -> str | None:
        """The worker is gone (died, replaced, out of service): the memory it held is lost; returns
        the story whose shot it was running (the caller re-queues that shot)."""
        worker = self._workers.pop(worker_id)
        for story_id in worker.holds:
            story = self._stories.get(story_id)
            if story is not None and story.holder == worker_id:
                story.holder = None
                self._push(story)
        if worker.story is not None:
            story = self._stories[worker.story]
            story.running_on = None
            self._running_by_project[story.work.project] -= 1
            self._push(story)
            return story.work.id
        return None

    def add_story(self, work: StoryWork) -> None:
        if work.id in self._stories:
            raise ValueError(f"story {work.id!r} is already known")
        if not 0 <= work.next_index <= work.total_shots:
            raise ValueError(f"story {work.id!r}: next_index {work.next_index} outside 0..{work.total_shots}")
        story = _Story(work, work.next_index, work.holder, work.started, work.held, work.priority)
        story.done = story.next_index >= work.total_shots
        self._stories[work.id] = story
        if story.holder is not None and story.holder in self._workers:
            self._workers[story.holder].holds.add(work.id)
        if story.started and not story.done:
            self._active_by_project[work.project] = self._active_by_project.get(work.project, 0) + 1
        self._push(story)

    def set_priority(self, story_id: str, priority: int) -> None:
        story = self._stories[story_id]
        story.priority = priority
        self._push(story)

    def hold(self, story_id: str, held: bool = True) -> None:
        """Pause (held) or resume a story: a held story keeps its place but gets no worker."""
        story = self._stories[story_id]
        story.held = held
        self._push(story)

    def remove_story(self, story_id: str) -> None:
        """A story cancelled or failed for good: it leaves the queue and frees its memory."""
        story = self._stories.pop(story_id)
        if story.started and not story.done:
            self._active_by_project[story.work.project] -= 1
        if story.holder in self._workers:
            self._workers[story.holder].holds.discard(story_id)
        story.version += 1  # its heap entries become stale

    # -- results -----------------------------------------------------------------------------
    def shot_finished(self, story_id: str, outcome: str, *, release_worker: bool = True) -> None:
        """`outcome`: succeeded (the story moves to its next shot), failed/lost/cancelled (the shot
        runs again when the caller says so by leaving the story queued). With release_worker=False
        the worker was already freed (`release_worker`), as in a two-GPU expert pipeline."""
        story = self._stories[story_id]
        worker = self._workers.get(story.running_on) if story.running_on else None
        if story.running_on is not None:
            self._running_by_project[story.work.project] -= 1
            story.running_on = None
        if worker is not None and release_worker and worker.story == story_id:
            worker.idle, worker.story = True, None
        if outcome == "succeeded":
            story.next_index += 1
            if story.next_index >= story.work.total_shots:
                story.done = True
                self._active_by_project[story.work.project] -= 1
                if story.holder in self._workers:
                    self._workers[story.holder].holds.discard(story_id)
                return
        self._push(story)

    def release_worker(self, worker_id: str) -> None:
        """The worker can take another shot while its last one finishes elsewhere (pipeline)."""
        worker = self._workers[worker_id]
        worker.idle, worker.story = True, None

    # -- placement ---------------------------------------------------------------------------
    def remaining_s(self, story: _Story) -> float:
        return self.cost.remaining_seconds(story.next_index, story.work.total_shots, story.work.references,
                                           self.config.expert_placement)

    def _runnable(self, story: _Story) -> bool:
        return not story.done and not story.held and story.running_on is None

    def _key(self, story: _Story, now: float) -> tuple:
        remaining = self.remaining_s(story)
        deadline = story.work.deadline
        if deadline is not None and now + remaining <= deadline:
            return (-story.priority, 0, deadline, remaining, story.work.submitted_at, story.work.id)
        return (-story.priority, 1, 0.0, 0.0, story.work.submitted_at, story.work.id)

    def _push(self, story: _Story, now: float = -math.inf) -> None:
        story.version += 1
        if self._runnable(story):
            heapq.heappush(self._heap, (self._key(story, now), story.version, story.work.id))

    def _ranked(self, now: float) -> Iterator[_Story]:
        """Runnable stories, best first, popped lazily from the heap (stale entries skipped; a story
        whose deadline became unreachable since it was pushed goes back in its new place)."""
        while self._heap:
            key, version, story_id = heapq.heappop(self._heap)
            story = self._stories.get(story_id)
            if story is None or story.version != version or not self._runnable(story):
                continue
            fresh = self._key(story, now)
            if fresh != key:
                story.version += 1
                heapq.heappush(self._heap, (fresh, story.version, story_id))
                continue
            yield story

    def _start(self, story: _Story, worker: _Worker, busy_until: float) -> None:
        if story.holder is not None and story.holder != worker.id and story.holder in self._workers:
            self._workers[story.holder].holds.discard(story.work.id)
        story.holder, story.running_on = worker.id, worker.id
        worker.idle, worker.story, worker.busy_until = False, story.work.id, busy_until
        worker.holds.add(story.work.id)
        project = story.work.project
        self._running_by_project[project] = self._running_by_project.get(project, 0) + 1
        if not story.started:
            story.started = True
            self._active_by_project[project] = self._active_by_project.get(project, 0) + 1
        story.version += 1

    def _admits(self, story: _Story, phase: str) -> bool:
        quota = self.config.quota(story.work.project)
        running = self._running_by_project.get(story.work.project, 0)
        if phase == "guaranteed" and running >= quota.guaranteed:
            return False
        if quota.burst is not None and running >= quota.burst:
            return False
        if not story.started and quota.max_concurrent_stories is not None:
            return self._active_by_project.get(story.work.project, 0) < quota.max_concurrent_stories
        return True

    def _waits_for_holder(self, story: _Story, now: float) -> bool:
        holder = self._workers.get(story.holder) if story.holder else None
        if holder is None or holder.idle:
            return False
        wait = max(0.0, holder.busy_until - now)
        if wait > self.config.move_cost_s:
            return False
        deadline = story.work.deadline
        if deadline is not None:
            remaining = self.remaining_s(story)
            if now + remaining <= deadline < now + wait + remaining:
                return False  # waiting would miss a deadline that moving still meets
        return True

    def schedule(self, now: float) -> Decision:
        idle = sorted(w.id for w in self._workers.values() if w.idle)
        if not idle:
            return Decision()
        guaranteed = self.config.default_quota.guaranteed or any(q.guaranteed for q in self.config.projects.values())
        assignments: list[Assignment] = []
        preemptions: list[Preemption] = []
        seen: list[_Story] = []  # popped from the heap; pushed back unless placed
        waiting: list[_Story] = []  # stories waiting for their busy holder, best first

        def popped():
            for story in self._ranked(now):
                seen.append(story)
                yield story

        source = popped()

        def place(story: _Story, worker_id: str) -> None:
            worker = self._workers[worker_id]
            for other_id in sorted(worker.holds):
                other = self._stories.get(other_id)
                if other is not None and other is not story and self._runnable(other):
                    preemptions.append(Preemption(other_id, worker_id, story.work.id))
            placement = "affinity" if story.holder == worker_id else ("moved" if story.started else "new")
            estimate = self.cost.shot_seconds(story.next_index, story.work.references, self.config.expert_placement)
            first_stage = estimate * (self.cost.high_noise_fraction if self.config.expert_placement == "pipeline" else 1.0)
            self._start(story, worker, now + first_stage)
            idle.remove(worker_id)
            assignments.append(Assignment(story.work.id, story.next_index, worker_id, placement, estimate))

        for phase in (("guaranteed", "burst") if guaranteed else ("burst",)):
            for story in _chain(list(seen), source):
                if not idle:
                    break
                if not self._runnable(story) or not self._admits(story, phase):
                    continue
                worker_id = self._choose(story, idle, now, waiting)
                if worker_id is None:
                    continue
                # A waiting story of higher priority never lets lower-priority work take a worker:
                # it moves instead (its wait would break priority).
                while waiting and worker_id != story.holder and waiting[0].priority > story.priority:
                    mover = waiting.pop(0)
                    if self._runnable(mover) and self._admits(mover, phase):
                        place(mover, worker_id)
                        worker_id = self._choose(story, idle, now, []) if idle else None
                        if worker_id is None:
                            break
                if worker_id is not None:
                    place(story, worker_id)
        for story in seen:
            if self._runnable(story):
                self._push(story, now)
        return Decision(tuple(assignments), tuple(preemptions))

    def _choose(self, story: _Story, idle: list[str], now: float, waiting: list[_Story]) -> str | None:
        if story.holder in idle:
            return story.holder
        if self._waits_for_holder(story, now):
            waiting.append(story)
            return None

        def holds_runnable(worker_id: str) -> int:  # prefer workers whose own stories are not waiting
            return sum(1 for s in self._workers[worker_id].holds
                       if s in self._stories and self._runnable(self._stories[s]))
        return min(idle, key=lambda w: (holds_runnable(w), w))

    # -- views -------------------------------------------------------------------------------
    def wait_reason(self, story_id: str, now: float) -> str | None:
        """Why a story whose next shot is not running gets no worker now, in the words `storyfarm
        get` shows (None: running, finished, or unknown). A held story's reason is the caller's
        (paused, or its next shot waits for the one before it): "held" here."""
        story = self._stories.get(story_id)
        if story is None or story.done or story.running_on is not None:
            return None
        if story.held:
            return "held"
        project = story.work.project
        quota = self.config.quota(project)
        running = self._running_by_project.get(project, 0)
        if quota.burst is not None and running >= quota.burst:
            return f"quota: project {project} runs {running} shot(s), its burst limit"
        active = self._active_by_project.get(project, 0)
        if not story.started and quota.max_concurrent_stories is not None and active >= quota.max_concurrent_stories:
            return f"quota: project {project} has {active} stories started, its max_concurrent_stories"
        if self._waits_for_holder(story, now):
            holder = self._workers[story.holder]
            return (f"affinity: waiting about {max(0.0, holder.busy_until - now):.0f} s for worker {holder.id}, "
                    "which holds its memory")
        if not self._workers:
            return "no worker is up"
        if any(w.idle for w in self._workers.values()):
            return "about to start"
        key = self._key(story, now)
        ahead = sum(1 for s in self._stories.values() if s is not story and self._runnable(s) and self._key(s, now) < key)
        return f"every worker is busy; {ahead} runnable stories rank ahead of it (priority, deadline, then age)"

    def runnable_count(self) -> int:
        return sum(1 for s in self._stories.values() if self._runnable(s))

    def running(self) -> dict[str, int]:
        """Workers busy per project (quota use)."""
        return {p: n for p, n in sorted(self._running_by_project.items()) if n}

    def holder(self, story_id: str) -> str | None:
        story = self._stories.get(story_id)
        return None if story is None else story.holder

    def story_ids(self) -> list[str]:
        return sorted(self._stories)


def _chain(first: list, rest: Iterator) -> Iterator:
    yield from first
    yield from rest
