"""The simulator drives the real policy: makespan against its lower bound, affinity, ETAs, and the
`storyfarm simulate` command's JSON."""

import json
import subprocess
import sys

import pytest

from storyfarm.scheduler.policy import CostModel, PolicyConfig, Scheduler, StoryWork
from storyfarm.scheduler.simulate import SimConfig, project_finish, simulate


def test_thousand_uniform_stories_on_eight_gpus_near_the_lower_bound():
    report = simulate(SimConfig(stories=1000, shots_per_story=10, gpus=8))
    assert report.shots_run == 10_000
    assert report.makespan_s <= 1.05 * report.lower_bound_s
    assert report.makespan_s >= report.lower_bound_s  # a bound that the schedule beat would be wrong
    assert report.affinity_hit_rate >= 0.99
    assert report.placements["new"] == 1000
    assert report.gpu_utilisation > 0.95
    assert report.wall_s < 10


@pytest.mark.parametrize("policy", ["swap", "pipeline"])
def test_every_expert_placement_runs_the_same_batch(policy):
    both = simulate(SimConfig(stories=80, gpus=4, swap_s=5.0))
    other = simulate(SimConfig(stories=80, gpus=4, swap_s=5.0, policy=policy))
    assert other.shots_run == both.shots_run == 800
    assert other.makespan_s <= 1.05 * other.lower_bound_s
    if policy == "swap":  # two swaps per shot: 10 s on a ~60-100 s shot shows in the makespan
        assert other.makespan_s > both.makespan_s * 1.05


def test_failures_are_retried_and_poison_stories_do_not_block_others():
    report = simulate(SimConfig(stories=100, gpus=4, failure_rate=0.3, seed=4))
    assert report.failed_attempts > 0
    assert report.failed_stories >= 1  # some shot failed 3 times in a row
    assert report.stories_finished + report.failed_stories == 100
    assert report.stories_finished > 50


def test_deadlines_are_met_when_capacity_allows_and_counted_when_not():
    roomy = simulate(SimConfig(stories=40, gpus=4, deadline_s=1e6))
    assert roomy.deadline_hits == 40 and roomy.deadline_hit_rate == 1.0
    tight = simulate(SimConfig(stories=40, gpus=4, deadline_s=3600))
    assert 0 < tight.deadline_hits < 40


def test_eta_accounts_for_memory_growth():
    cost = CostModel(base_s=10.0, growth_per_memory_frame=0.1, max_memory_frames=10)
    sched = Scheduler(PolicyConfig(), cost)
    sched.add_worker("w0")
    sched.add_story(StoryWork("a", total_shots=4))
    sched.add_story(StoryWork("b", total_shots=2, submitted_at=1))
    eta = project_finish(sched, cost, False, now=100.0)
    a = 10 + 11 + 12 + 13
    assert eta == pytest.approx({"a": 100 + a, "b": 100 + a + 10 + 11})
    assert sched.schedule(0).assignments  # the projection left the scheduler untouched


def test_eta_error_small_with_jitter_only():
    report = simulate(SimConfig(stories=64, gpus=8, jitter=0.1))
    assert 0 < report.eta_mean_rel_error < 0.05


def test_bad_configuration_names_every_field():
    with pytest.raises(ValueError) as err:
        simulate(SimConfig(stories=0, gpus=3, policy="pipeline", failure_rate=1.5))
    text = str(err.value)
    for part in ("stories must be at least 1", "gpus must be even", "failure_rate must be in [0, 1)"):
        assert part in text


def test_simulate_command_prints_the_documented_json_keys(repo):
    out = subprocess.run([sys.executable, "-m", "storyfarm.daemon.cli", "simulate", "--stories", "50", "--gpus", "4",
                          "--json"], capture_output=True, text=True, check=True, cwd=repo)
    report = json.loads(out.stdout)
    for key in ("makespan_s", "lower_bound_s", "gpu_utilisation", "affinity_hit_rate", "deadline_hits",
                "eta_mean_abs_error_s"):
        assert key in report
    bad = subprocess.run([sys.executable, "-m", "storyfarm.daemon.cli", "simulate", "--gpus", "0"],
                         capture_output=True, text=True, cwd=repo)
    assert bad.returncode == 2 and "gpus must be at least 1" in bad.stdout
