"""The `scheduler:` section of the daemon config reaches the policy and the executor, and its
mistakes are errors naming the field."""

import pytest

from storyfarm.daemon.config import ConfigError, load_config
from storyfarm.daemon.farm import build_executor, cost_model, policy_config
from storyfarm.scheduler.policy import ProjectQuota


def write(tmp_path, text: str) -> str:
    path = tmp_path / "farm.yaml"
    path.write_text(text)
    return str(path)


def test_quotas_expert_placement_and_cost_reach_the_policy(tmp_path):
    config = load_config(write(tmp_path, """
scheduler:
  expert_placement: swap
  move_cost_s: 5
  projects:
    ads: {guaranteed: 2, burst: 4, max_concurrent_stories: 10}
  default_project: {burst: 1}
  cost: {base_s: 300, swap_s: 7}
"""))
    policy = policy_config(config)
    assert policy.expert_placement == "swap" and policy.move_cost_s == 5
    assert policy.quota("ads") == ProjectQuota(2, 4, 10)
    assert policy.quota("anyone-else") == ProjectQuota(0, 1, None)
    from storyfarm.story.presets import load_preset

    cost = cost_model(config, load_preset("tiny"))
    assert cost.base_s == 300 and cost.shot_seconds(0, placement="swap") == 314
    assert cost.max_memory_frames == load_preset("tiny").memory.max_size


@pytest.mark.parametrize("text, expected", [
    ("scheduler:\n  executor: slurm\n", "scheduler.executor"),
    ("scheduler:\n  projects:\n    'bad name': {guaranteed: 1}\n", "scheduler.projects"),
    ("scheduler:\n  projects:\n    ads: {guaranteed: -1}\n", "scheduler.projects.ads.guaranteed"),
    ("scheduler:\n  heartbeat_timeout_s: 0\n", "scheduler.heartbeat_timeout_s"),
    ("scheduler:\n  expert_placement: pipeline\n", "scheduler.expert_placement"),
    ("scheduler:\n  hearbeat_timeout_s: 10\n", "scheduler.hearbeat_timeout_s"),
    ("scheduler:\n  worker: mock\n", "scheduler.worker: Input should be 'render' or 'fake'"),
])
def test_mistakes_name_the_field(tmp_path, text, expected):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, text))
    assert expected in str(err.value)


def test_cpu_machine_gets_the_configured_number_of_mp_workers(tmp_path):
    config = load_config(None, {"device": "cpu", "workers": 3, "data_dir": str(tmp_path)})
    executor = build_executor(config)
    assert executor.kind == "mp" and [g.device for g in executor.groups] == ["cpu"] * 3
    assert executor.supervision.heartbeat_timeout_s == config.scheduler.heartbeat_timeout_s


def test_the_worker_key_picks_what_the_workers_run_by_dotted_path(tmp_path):
    default = build_executor(load_config(None, {"device": "cpu", "data_dir": str(tmp_path)}))
    assert default.worker_factory == "storyfarm.scheduler.gpu_pool.worker:WorkerRuntime"
    fake = build_executor(load_config(write(tmp_path, "scheduler:\n  worker: fake\n"),
                                      {"device": "cpu", "data_dir": str(tmp_path)}))
    assert fake.worker_factory == "storyfarm.scheduler.gpu_pool.fake:FakeWorker"
