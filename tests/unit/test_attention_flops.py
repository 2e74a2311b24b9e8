"""FLOP model of a Wan forward: the split the benchmark floor uses, checked against DESIGN.md §7."""

import pytest

from storyfarm.kernels.flops import WanShape, attention_flops, floor_seconds, forward_flops, tokens


def test_a14b_480p_forward_matches_the_design_figures():
    seq = tokens(81, 480, 832)
    assert seq == 32760
    f = forward_flops(WanShape(), seq)
    assert f["linear"] / 1e15 == pytest.approx(0.79, abs=0.01)
    assert f["self_attention"] / 1e15 == pytest.approx(0.88, abs=0.01)
    assert f["cross_attention"] / 1e15 == pytest.approx(0.01, abs=0.005)
    assert f["total"] == f["linear"] + f["attention"]
    assert forward_flops(WanShape(), seq, batch=2)["total"] == 2 * f["total"]


def test_memory_frames_scale_the_work_and_the_floor_like_the_design_says():
    base = forward_flops(WanShape(), tokens(81, 480, 832))["total"]
    ratios = [forward_flops(WanShape(), tokens(81, 480, 832, m))["total"] / base for m in (3, 5, 10)]
    assert ratios == pytest.approx([1.23, 1.39, 1.84], abs=0.01)
    shot = forward_flops(WanShape(), tokens(81, 480, 832, 5), batch=2)  # one CFG-batched step
    assert 40 * shot["total"] / 1e15 == pytest.approx(187, abs=1)
    assert 40 * floor_seconds(shot, gemm_tflops=790, attention_tflops=650) == pytest.approx(266, abs=1)


def test_config_and_attention_call_helpers():
    tiny = WanShape.from_config({"num_attention_heads": 2, "attention_head_dim": 24, "ffn_dim": 96, "num_layers": 2,
                                 "in_channels": 36, "out_channels": 16, "text_dim": 32, "freq_dim": 32,
                                 "patch_size": (1, 2, 2)})
    assert (tiny.dim, tiny.ffn_dim, tiny.num_layers, tiny.patch_volume) == (48, 96, 2, 4)
    assert attention_flops(1, 10, 20, 2, 8) == 4 * 10 * 20 * 2 * 8
