"""Latent pool: LRU within a device budget, spill to CPU, drop past the CPU budget, release by story."""

import pytest
import torch

from storyfarm.m2v.memory.latent_pool import LatentPool


def mb(n):  # a float32 tensor of n MiB
    return torch.zeros(n * (1 << 18))


def test_hits_and_misses_are_counted():
    pool = LatentPool(budget_bytes=4 << 20)
    made = []
    make = lambda: made.append(1) or mb(1)
    pool.get_or_create(("s1", "kf", "a"), make)
    pool.get_or_create(("s1", "kf", "a"), make)
    pool.get_or_create(("s1", "kf", "b"), make)
    assert len(made) == 2
    assert (pool.stats.hits, pool.stats.misses) == (1, 2)


def test_lru_spills_then_drops():
    pool = LatentPool(budget_bytes=2 << 20, cpu_budget_bytes=1 << 20)
    pool.put(("s", "a"), mb(1))
    pool.put(("s", "b"), mb(1))
    pool.get(("s", "a"))  # a is now most recent
    pool.put(("s", "c"), mb(1))  # over 2 MiB: b (least recent) spills
    assert pool.stats.spills == 1 and pool.stats.device_bytes == 2 << 20
    assert ("s", "b") in pool
    pool.put(("s", "d"), mb(1))  # a spills; CPU now over 1 MiB -> b dropped
    assert pool.stats.drops == 1
    assert ("s", "b") not in pool and ("s", "a") in pool
    assert pool.get(("s", "a")) is not None  # comes back from the CPU tier: a hit
    assert pool.stats.hits == 2


def test_release_drops_one_story_only():
    pool = LatentPool(budget_bytes=8 << 20)
    pool.put(("story:1", "kf", "a"), mb(1))
    pool.put(("story:2", "kf", "a"), mb(1))
    pool.put(("shared", "blank"), mb(1))
    assert pool.release("story:1") == 1
    assert ("story:2", "kf", "a") in pool and ("shared", "blank") in pool
    assert pool.stats.entries == 2 and pool.stats.device_bytes == 2 << 20


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device to check residency on the GPU")
def test_entries_live_on_the_device():
    pool = LatentPool("cuda", budget_bytes=1 << 20)
    assert pool.put(("s", "a"), mb(1)[:10]).device.type == "cuda"
