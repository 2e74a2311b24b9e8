"""RoPE: stock-equal at positions 0..F-1, correct at StoryMem's negative memory positions."""

import pytest
import torch
from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

from storyfarm.kernels.rope import apply_rotary, grid_cos_sin
from storyfarm.m2v.model.rope import StoryRotaryPosEmbed, memory_time_positions


def wan_reference_rotary(positions, height, width, head_dim, theta=10000.0):
    """Wan's own formulation: complex128 polar frequencies per axis, concatenated (t, h, w)."""
    h_dim = w_dim = 2 * (head_dim // 6)
    t_dim = head_dim - h_dim - w_dim

    def polar(pos, dim):
        inv = 1.0 / torch.pow(theta, torch.arange(0, dim, 2, dtype=torch.float64).div(dim))
        return torch.polar(torch.ones(len(pos), dim // 2, dtype=torch.float64), torch.outer(torch.tensor(pos, dtype=torch.float64), inv))

    ft, fh, fw = polar(positions, t_dim), polar(list(range(height)), h_dim), polar(list(range(width)), w_dim)
    f = len(positions)
    grid = torch.cat(
        [
            ft.view(f, 1, 1, -1).expand(f, height, width, -1),
            fh.view(1, height, 1, -1).expand(f, height, width, -1),
            fw.view(1, 1, width, -1).expand(f, height, width, -1),
        ],
        dim=-1,
    ).reshape(f * height * width, -1)
    return grid  # complex [L, head_dim/2]


def test_memory_positions_follow_storymem():
    assert memory_time_positions(0, 5) == [0, 1, 2, 3, 4]
    assert memory_time_positions(3, 4) == [-15, -10, -5, 0, 1, 2, 3]
    assert memory_time_positions(10, 21)[:10] == [-50, -45, -40, -35, -30, -25, -20, -15, -10, -5]
    assert memory_time_positions(10, 21)[10:] == list(range(21))


@pytest.mark.parametrize("head_dim", [24, 128])
def test_story_rope_equals_stock_without_positions(head_dim):
    stock = WanRotaryPosEmbed(head_dim, (1, 2, 2), 1024)
    story = StoryRotaryPosEmbed(head_dim, (1, 2, 2), 1024)
    x = torch.zeros(1, 16, 7, 10, 14)
    for a, b in zip(stock(x), story(x)):
        assert a.shape == b.shape
        assert torch.equal(a, b)


def test_negative_positions_match_wan_complex_reference():
    head_dim, h, w = 24, 3, 4
    positions = memory_time_positions(4, 3)
    rope = StoryRotaryPosEmbed(head_dim, (1, 2, 2), 1024)
    with rope.time_positions(positions):
        cos, sin = rope(torch.zeros(1, 16, len(positions), 2 * h, 2 * w))
    ref = wan_reference_rotary(positions, h, w, head_dim)
    torch.testing.assert_close(cos[0, :, 0, 0::2].double(), ref.real, atol=1e-7, rtol=0)
    torch.testing.assert_close(sin[0, :, 0, 0::2].double(), ref.imag, atol=1e-7, rtol=0)
    # rotating a vector in real arithmetic equals Wan's complex multiplication
    x = torch.randn(1, len(positions) * h * w, 2, head_dim, dtype=torch.float64)
    got = apply_rotary(x.float(), cos, sin)
    xc = torch.view_as_complex(x.view(*x.shape[:-1], -1, 2))
    want = torch.view_as_real(xc * ref[None, :, None, :]).flatten(-2)
    torch.testing.assert_close(got.double(), want, atol=2e-6, rtol=0)


def test_positions_are_scoped_and_checked():
    rope = StoryRotaryPosEmbed(24, (1, 2, 2), 1024)
    x = torch.zeros(1, 16, 3, 4, 4)
    plain = rope(x)[0]
    with rope.time_positions([-5, 0, 1]):
        shifted = rope(x)[0]
        with pytest.raises(ValueError, match="3 positions for 4 latent frames"):
            rope(torch.zeros(1, 16, 4, 4, 4))
    assert not torch.equal(plain, shifted)
    assert torch.equal(rope(x)[0], plain)  # context restored


def test_grid_time_axis_uses_only_time_channels():
    cos, _ = grid_cos_sin(torch.tensor([-10, 0]), 2, 2, (8, 8, 8))
    # same (h, w) cell, different time: only the first 8 (time) channels differ
    a, b = cos[0], cos[4]
    assert not torch.equal(a[:8], b[:8])
    assert torch.equal(a[8:], b[8:])
