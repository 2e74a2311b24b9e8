"""Expert residency (both resident, or swapped at the boundary), the low-memory mode an
out-of-memory retry uses, and how the worker classifies failures."""

import numpy as np
import pytest
import torch

from storyfarm.m2v.render.engine import Engine, ShotPlan
from storyfarm.m2v.accel.placement import ExpertResidency, low_memory, set_expert_placement
from storyfarm.m2v.render.sampler import SamplerSettings
from storyfarm.scheduler.gpu_pool.worker import classify


def plan(**over) -> ShotPlan:
    base = dict(story_key="story:placement", prompt="a red kite over the dunes", negative_prompt="blurry", seed=3,
                width=64, height=32, frames=9, sampler=SamplerSettings(steps=4))
    return ShotPlan(**{**base, **over})


@pytest.fixture()
def engine(tiny_preset):
    return Engine(tiny_preset)


def test_swap_renders_the_same_frames_with_two_swaps_per_shot(engine):
    both = engine.render_shot(plan()).frames
    set_expert_placement(engine, "swap")
    assert all(p.device.type == "cpu" for e in engine.m2v_experts for p in e.model.parameters())
    moves = []
    for expert in engine.m2v_experts:
        real = expert.model.to
        expert.model.to = lambda *a, _real=real, _name=expert.name, **k: (moves.append((_name, str(a[0]))), _real(*a, **k))[1]
    swapped = engine.render_shot(plan()).frames
    assert np.array_equal(both, swapped)
    assert engine.residency.swaps == 2  # high-noise expert on, then the low-noise one
    high, low = (e.name for e in engine.m2v_experts)
    assert [name for name, _ in moves] == [high, high, low]  # high on; at the boundary high off, low on
    engine.render_shot(plan(seed=4))
    assert engine.residency.swaps == 4


def test_low_memory_mode_is_undone_afterwards(engine):
    reference = engine.render_shot(plan()).frames
    with low_memory(engine):
        assert engine.residency.mode == "swap"
        frames = engine.render_shot(plan()).frames
    assert engine.residency.mode == "both"
    assert np.abs(frames.astype(int) - reference.astype(int)).max() <= 2  # tiled VAE decode may differ by rounding


def test_residency_refuses_unknown_modes():
    with pytest.raises(ValueError, match="expert_placement must be one of both, swap, got 'pipeline'"):
        ExpertResidency("cpu", "pipeline")


class OutOfMemoryError(RuntimeError):
    pass


@pytest.mark.parametrize("exc, reason", [
    (OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), "out_of_memory"),
    (RuntimeError("CUDA error: an illegal memory access was encountered"), "cuda_error"),
    (RuntimeError("CUBLAS_STATUS_EXECUTION_FAILED when calling cublasGemmEx"), "cuda_error"),
    (ValueError("injected content failure"), "content"),
    (ZeroDivisionError("bad math"), "content"),
])
def test_failures_are_classified_for_the_daemon(exc, reason):
    assert classify(exc) == reason


def test_story_errors_are_never_retried():
    from storyfarm.story.format import parse_story

    with pytest.raises(Exception) as err:
        parse_story({"shots": []})
    assert classify(err.value) == "story"
    from storyfarm.m2v.render.observe import Cancelled

    assert classify(Cancelled()) == "cancelled"
    assert torch.get_num_threads() >= 1


def test_an_engine_built_for_swap_loads_its_experts_into_cpu_memory(tiny_preset, engine):
    swapped = Engine(tiny_preset, expert_placement="swap")
    assert swapped.residency.mode == "swap"
    assert np.array_equal(swapped.render_shot(plan()).frames, engine.render_shot(plan()).frames)
    assert swapped.residency.swaps == 2


def test_both_fits_or_is_refused_naming_the_field():
    from storyfarm.m2v.accel.placement import RESIDENT_HEADROOM_BYTES, check_resident_fit

    gib = 1 << 30
    check_resident_fit("both", 57 * gib, 79 * gib, "cuda:0", 2)  # one A14B pair on an H100: fits
    check_resident_fit("swap", 114 * gib, 79 * gib, "cuda:0", 4)  # swap never needs them all
    with pytest.raises(ValueError, match=r"'both' keeps all 4 experts resident \(114.0 GiB\) plus 20 GiB .* "
                                         r"cuda:0 has 79.0 GiB free; use 'swap'"):
        check_resident_fit("both", 114 * gib, 79 * gib, "cuda:0", 4)
    assert RESIDENT_HEADROOM_BYTES == 20 * gib
