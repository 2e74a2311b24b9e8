"""The placement policy with fake workers and stories: affinity, priorities, preemption at shot
boundaries, quotas, deadlines, failure paths and determinism. No processes, no clock."""

import random

import pytest

from storyfarm.scheduler.policy import (
    Assignment, CostModel, PolicyConfig, Preemption, ProjectQuota, Scheduler, StoryWork,
)

COST = CostModel(base_s=100.0, growth_per_memory_frame=0.0)


def farm(workers=("w0", "w1"), **config) -> Scheduler:
    sched = Scheduler(PolicyConfig(**config), COST)
    for w in workers:
        sched.add_worker(w)
    return sched


def placed(decision) -> dict[str, str]:
    return {a.story_id: a.worker_id for a in decision.assignments}


def test_a_story_stays_on_the_worker_that_holds_its_memory():
    sched = farm()
    sched.add_story(StoryWork("a", total_shots=3, submitted_at=1))
    sched.add_story(StoryWork("b", total_shots=3, submitted_at=2))
    first = sched.schedule(0)
    assert [(a.story_id, a.worker_id, a.placement) for a in first.assignments] == [("a", "w0", "new"), ("b", "w1", "new")]
    # b finishes first; the idle worker w1 must not take a's next shot (a is still running)
    sched.shot_finished("b", "succeeded")
    assert placed(sched.schedule(100)) == {"b": "w1"}
    sched.shot_finished("a", "succeeded")
    decision = sched.schedule(110)
    assert [(a.story_id, a.worker_id, a.placement) for a in decision.assignments] == [("a", "w0", "affinity")]


def test_a_story_moves_when_its_worker_is_gone():
    sched = farm()
    sched.add_story(StoryWork("a", total_shots=3))
    sched.schedule(0)
    sched.shot_finished("a", "succeeded")
    assert sched.holder("a") == "w0"
    sched.remove_worker("w0")
    decision = sched.schedule(1)
    assert [(a.story_id, a.worker_id, a.placement) for a in decision.assignments] == [("a", "w1", "moved")]


def test_removing_a_busy_worker_hands_back_its_story():
    sched = farm()
    sched.add_story(StoryWork("a", total_shots=2))
    sched.schedule(0)
    assert sched.remove_worker("w0") == "a"
    assert placed(sched.schedule(1)) == {"a": "w1"}


def test_higher_priority_first_and_priority_changes_after_submit():
    sched = farm(workers=("w0",))
    sched.add_story(StoryWork("low", priority=0, submitted_at=1))
    sched.add_story(StoryWork("high", priority=5, submitted_at=2))
    sched.add_story(StoryWork("later", priority=0, submitted_at=3))
    assert placed(sched.schedule(0)) == {"high": "w0"}
    sched.set_priority("later", 9)
    sched.shot_finished("high", "succeeded")
    assert placed(sched.schedule(1)) == {"later": "w0"}


def test_preemption_only_at_a_shot_boundary():
    sched = farm(workers=("w0",))
    sched.add_story(StoryWork("low", priority=0, total_shots=3))
    sched.schedule(0)
    sched.add_story(StoryWork("urgent", priority=10, total_shots=1))
    assert sched.schedule(10).assignments == ()  # the running shot is never interrupted
    sched.shot_finished("low", "succeeded")
    decision = sched.schedule(100)
    assert placed(decision) == {"urgent": "w0"}
    assert decision.preemptions == (Preemption("low", "w0", "urgent"),)
    sched.shot_finished("urgent", "succeeded")
    assert [(a.story_id, a.placement) for a in sched.schedule(200).assignments] == [("low", "affinity")]


def test_a_story_moves_when_its_busy_holder_frees_up_later_than_a_move_would_cost():
    sched = farm(move_cost_s=30.0)
    sched.add_story(StoryWork("a", total_shots=3, submitted_at=1))
    sched.add_story(StoryWork("x", total_shots=3, submitted_at=2))
    assert placed(sched.schedule(0)) == {"a": "w0", "x": "w1"}
    sched.shot_finished("a", "succeeded")
    sched.add_story(StoryWork("b", priority=1, total_shots=1, submitted_at=3))
    assert placed(sched.schedule(50)) == {"b": "w0"}  # b outranks a at the shot boundary
    # x's shot ends at 60; a's holder w0 is busy until 150, more than 30 s away: a moves to w1,
    # which held x: x is preempted (a ranks first: submitted earlier)
    sched.shot_finished("x", "succeeded")
    decision = sched.schedule(60)
    assert [(a.story_id, a.worker_id, a.placement) for a in decision.assignments] == [("a", "w1", "moved")]
    assert decision.preemptions == (Preemption("x", "w1", "a"),)


def test_a_short_wait_keeps_affinity_and_lets_the_idle_worker_take_other_work():
    sched = farm(move_cost_s=30.0)
    sched.add_story(StoryWork("a", total_shots=3, submitted_at=1))
    sched.add_story(StoryWork("b", total_shots=3, submitted_at=2))
    sched.schedule(0)  # a on w0 until 100, b on w1 until 100
    sched.shot_finished("a", "succeeded")
    sched.add_story(StoryWork("c", total_shots=1, submitted_at=3))
    assert placed(sched.schedule(0)) == {"a": "w0"}
    sched.shot_finished("a", "succeeded")  # a is runnable; pretend w0 got other work first:
    sched.add_story(StoryWork("d", priority=1, total_shots=1, submitted_at=4))
    assert placed(sched.schedule(80)) == {"d": "w0"}  # higher priority takes w0 at the boundary
    sched.shot_finished("b", "succeeded")
    # w1 is idle at t=170 and w0 frees at 180 (10 s): a (rank 1) waits for w0; b keeps w1 by affinity
    decision = sched.schedule(170)
    assert placed(decision) == {"b": "w1"}
    sched.shot_finished("d", "succeeded")
    assert [(a.story_id, a.placement) for a in sched.schedule(180).assignments] == [("a", "affinity")]


def test_a_waiting_story_of_higher_priority_moves_rather_than_let_lower_priority_work_run():
    sched = farm(move_cost_s=1000.0)  # waiting would always be cheaper than moving...
    sched.add_story(StoryWork("hi", priority=5, total_shots=3, submitted_at=1))
    sched.add_story(StoryWork("top", priority=9, total_shots=1, submitted_at=2))
    sched.add_story(StoryWork("lo", priority=0, total_shots=1, submitted_at=3))
    sched.remove_worker("w1")
    sched.schedule(0)  # top on w0
    sched.shot_finished("top", "succeeded")
    sched.schedule(1)  # hi on w0
    sched.shot_finished("hi", "succeeded")
    sched.add_story(StoryWork("top2", priority=9, total_shots=1, submitted_at=4))
    assert placed(sched.schedule(2)) == {"top2": "w0"}  # hi now waits for w0
    sched.add_worker("w1")
    # ...but the idle w1 would otherwise go to "lo" (priority 0): hi moves instead
    decision = sched.schedule(3)
    assert [(a.story_id, a.worker_id, a.placement) for a in decision.assignments] == [("hi", "w1", "moved")]


def test_guaranteed_share_comes_before_higher_priority_burst_work():
    quotas = {"ads": ProjectQuota(guaranteed=1), "film": ProjectQuota(guaranteed=0)}
    sched = farm(workers=("w0", "w1"), projects=quotas)
    for i in range(3):
        sched.add_story(StoryWork(f"film{i}", project="film", priority=10, submitted_at=i))
    sched.add_story(StoryWork("ads0", project="ads", priority=0, submitted_at=9))
    assert placed(sched.schedule(0)) == {"ads0": "w0", "film0": "w1"}
    assert sched.running() == {"ads": 1, "film": 1}


def test_burst_cap_and_concurrent_story_cap():
    quotas = {"p": ProjectQuota(burst=1), "q": ProjectQuota(max_concurrent_stories=1)}
    sched = farm(workers=("w0", "w1", "w2"), projects=quotas)
    sched.add_story(StoryWork("p1", project="p", submitted_at=1))
    sched.add_story(StoryWork("p2", project="p", submitted_at=2))
    sched.add_story(StoryWork("q1", project="q", total_shots=2, submitted_at=3))
    sched.add_story(StoryWork("q2", project="q", total_shots=2, submitted_at=4))
    decision = sched.schedule(0)
    assert placed(decision) == {"p1": "w0", "q1": "w1"}  # w2 stays idle: both caps bind
    sched.shot_finished("q1", "succeeded")  # q1 still in progress (1 of 2): q2 may not start
    assert placed(sched.schedule(1)) == {"q1": "w1"}
    sched.shot_finished("q1", "succeeded")  # q1 done
    assert placed(sched.schedule(2)) == {"q2": "w1"}


def test_deadlines_earliest_first_and_hopeless_ones_yield():
    sched = farm(workers=("w0",))
    sched.add_story(StoryWork("late", deadline=10_000, submitted_at=1))
    sched.add_story(StoryWork("soon", deadline=500, submitted_at=2))
    sched.add_story(StoryWork("hopeless", deadline=50, submitted_at=0))  # needs 100 s, 50 s left
    sched.add_story(StoryWork("none", submitted_at=-1))
    order = []
    now = 0.0
    for _ in range(4):
        (a,) = sched.schedule(now).assignments
        order.append(a.story_id)
        now += 100
        sched.shot_finished(a.story_id, "succeeded")
    assert order == ["soon", "late", "none", "hopeless"]  # feasible deadlines first, then FCFS


def test_least_remaining_work_first_under_one_batch_deadline():
    sched = farm(workers=("w0",))
    sched.add_story(StoryWork("long", total_shots=5, deadline=1e6, submitted_at=1))
    sched.add_story(StoryWork("short", total_shots=2, deadline=1e6, submitted_at=2))
    assert placed(sched.schedule(0)) == {"short": "w0"}


def test_a_story_moves_when_waiting_would_miss_its_deadline():
    sched = farm(move_cost_s=1000.0)
    sched.add_story(StoryWork("a", total_shots=2, deadline=260, submitted_at=1))
    sched.add_story(StoryWork("b", total_shots=3, submitted_at=2))
    sched.schedule(0)  # a on w0, b on w1
    sched.shot_finished("a", "succeeded")
    sched.add_story(StoryWork("c", priority=9, total_shots=1, submitted_at=3))
    assert placed(sched.schedule(100)) == {"c": "w0"}  # c outranks a: w0 busy until 200
    sched.shot_finished("b", "succeeded")
    # a needs 100 s; waiting for w0 (free at 200) would finish at 300 > 260, moving now at 110: 210
    decision = sched.schedule(110)
    assert [(x.story_id, x.worker_id, x.placement) for x in decision.assignments] == [("a", "w1", "moved")]


def test_failures_pauses_and_cancels():
    sched = farm(workers=("w0",))
    sched.add_story(StoryWork("a", total_shots=2, submitted_at=1))
    sched.add_story(StoryWork("b", total_shots=1, submitted_at=2))
    sched.schedule(0)
    sched.shot_finished("a", "failed")  # a content failure: the same shot runs again, same worker
    assert [(x.story_id, x.shot_index, x.placement) for x in sched.schedule(1).assignments] == [("a", 0, "affinity")]
    sched.shot_finished("a", "lost")
    sched.hold("a")  # paused: b goes first although a ranks higher
    assert placed(sched.schedule(2)) == {"b": "w0"}
    sched.shot_finished("b", "succeeded")
    assert sched.schedule(3).assignments == ()
    sched.hold("a", False)
    assert placed(sched.schedule(4)) == {"a": "w0"}
    sched.shot_finished("a", "failed")
    sched.remove_story("a")  # failed for good: it blocks nobody
    sched.add_story(StoryWork("c", submitted_at=5))
    assert placed(sched.schedule(5)) == {"c": "w0"}
    assert sched.story_ids() == ["b", "c"]


def test_bad_calls_are_refused_with_names():
    sched = farm()
    sched.add_story(StoryWork("a"))
    with pytest.raises(ValueError, match="story 'a' is already known"):
        sched.add_story(StoryWork("a"))
    with pytest.raises(ValueError, match="worker 'w0' is already known"):
        sched.add_worker("w0")
    with pytest.raises(ValueError, match="next_index 5 outside 0..2"):
        sched.add_story(StoryWork("z", total_shots=2, next_index=5))


def _trace(order: list[int], seed: int) -> list[tuple]:
    rng = random.Random(seed)
    stories = [StoryWork(f"s{i}", project=f"p{i % 3}", priority=rng.randint(0, 3), total_shots=rng.randint(1, 4),
                         deadline=rng.choice([None, rng.uniform(100, 3000)]), submitted_at=i) for i in range(30)]
    sched = Scheduler(PolicyConfig(projects={"p0": ProjectQuota(guaranteed=1), "p1": ProjectQuota(burst=2)}), COST)
    for w in ("w2", "w0", "w1", "w3"):
        sched.add_worker(w)
    for i in order:
        sched.add_story(stories[i])
    trace, now, running = [], 0.0, {}
    for _ in range(200):
        decision = sched.schedule(now)
        trace.append((now, decision))
        for a in decision.assignments:
            running[a.story_id] = now + a.estimated_s * (1 + (hash(a.story_id) % 3) / 10)
        if not running:
            break
        story_id = min(running, key=lambda s: (running[s], s))
        now = running.pop(story_id)
        sched.shot_finished(story_id, "succeeded")
    return trace


def test_deterministic_for_the_same_input_whatever_the_insertion_order():
    forward = _trace(list(range(30)), seed=3)
    shuffled = list(range(30))
    random.Random(9).shuffle(shuffled)
    assert _trace(shuffled, seed=3) == forward
    assert sum(len(d.assignments) for _, d in forward) > 30
    assert all(isinstance(a, Assignment) for _, d in forward for a in d.assignments)


def test_cost_grows_with_memory_and_learns_from_finished_shots():
    cost = CostModel(base_s=10.0, growth_per_memory_frame=0.1, max_memory_frames=3)
    assert [cost.shot_seconds(i) for i in range(5)] == pytest.approx([10, 11, 12, 13, 13])
    assert cost.shot_seconds(0, placement="swap") == 10  # swap_s 0
    learned = cost.learned(memory_frames=2, seconds=24.0, weight=1.0)
    assert learned.base_s == pytest.approx(20.0)


def test_a_running_shot_is_its_estimate_until_its_steps_show_their_pace():
    from storyfarm.scheduler.policy import remaining_shot_s

    assert remaining_shot_s(60.0, 15.0) == 45.0  # no step yet: the cost model's estimate less the time spent
    assert remaining_shot_s(60.0, 90.0) == 0.0  # late: never negative
    assert remaining_shot_s(60.0, 20.0, step=10, total=40) == 60.0  # 2 s a step so far, 30 steps left
    assert remaining_shot_s(60.0, 80.0, step=40, total=40) == 0.0


def test_the_cost_model_stops_growing_at_the_presets_memory_window():
    from storyfarm.daemon.config import load_config
    from storyfarm.daemon.farm import cost_model
    from storyfarm.story.presets import load_preset

    cost = cost_model(load_config(None), load_preset("tiny", overrides={"memory": {"max_size": 4}}))
    assert cost.max_memory_frames == 4
    assert cost.shot_seconds(20) == cost.shot_seconds(4) > cost.shot_seconds(3)


def test_every_waiting_story_has_a_reason_in_words():
    sched = farm(workers=("w0",), move_cost_s=30.0,
                 projects={"ads": ProjectQuota(guaranteed=0, burst=1, max_concurrent_stories=1)})
    assert sched.wait_reason("nosuch", 0) is None
    sched.add_story(StoryWork("a", project="ads", total_shots=2, submitted_at=1))
    assert sched.wait_reason("a", 0) == "about to start"  # an idle worker: the next turn places it
    sched.schedule(0)  # a runs on w0 until 100
    assert sched.wait_reason("a", 0) is None  # running
    sched.add_story(StoryWork("b", project="ads", total_shots=1, submitted_at=2))
    assert sched.wait_reason("b", 0) == "quota: project ads runs 1 shot(s), its burst limit"
    sched.add_story(StoryWork("c", total_shots=1, submitted_at=3))
    sched.add_story(StoryWork("d", total_shots=1, submitted_at=4))
    assert sched.wait_reason("d", 0) == ("every worker is busy; 2 runnable stories rank ahead of it "
                                         "(priority, deadline, then age)")  # b (held back by its quota) and c
    sched.add_story(StoryWork("p", total_shots=1, held=True))
    assert sched.wait_reason("p", 0) == "held"
    sched.shot_finished("a", "succeeded")
    sched.add_worker("w1")
    sched.schedule(10)
    # w0 is idle at a's shot boundary: a stays there (affinity), c takes w1
    assert sched.wait_reason("a", 10) is None and sched.wait_reason("c", 10) is None
    assert sched.wait_reason("b", 10) == "quota: project ads runs 1 shot(s), its burst limit"
