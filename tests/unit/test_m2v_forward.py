"""The M2V forward: stock-equal at M=0, memory layout/mask/positions as StoryMem, two-expert CFG."""

import copy

import pytest
import torch
from diffusers import WanTransformer3DModel

from storyfarm.m2v.model.conditioning import build_conditioning, known_frames_mask
from storyfarm.m2v.model.frame_timesteps import install_wan_timesteps
from storyfarm.m2v.model.rope import memory_time_positions
from storyfarm.m2v.render.sampler import SamplerSettings, denoise
from storyfarm.m2v.model.transformer import M2VExpert

TINY = dict(
    patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=24, in_channels=36, out_channels=16,
    text_dim=32, freq_dim=32, ffn_dim=96, num_layers=2, cross_attn_norm=True, rope_max_seq_len=1024,
)


def tiny_model(seed=0, **over):
    torch.manual_seed(seed)
    return WanTransformer3DModel(**{**TINY, **over}).eval()


def test_m0_equals_stock_diffusers():
    """The rotary, block and attention seams change nothing at M=0; the sinusoid is Wan's float64 one
    on purpose (tests/unit/test_numerics.py), so the stock model gets it too."""
    stock = tiny_model()
    install_wan_timesteps(stock)
    expert = M2VExpert(copy.deepcopy(stock), "high_noise")
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(2, 16, 5, 6, 8, generator=g)
    cond = torch.randn(1, 20, 5, 6, 8, generator=g)
    text = torch.randn(2, 512, 32, generator=g)
    t = torch.tensor([950.0, 950.0])
    with torch.no_grad():
        want = stock(torch.cat([latents, cond.expand(2, -1, -1, -1, -1)], 1), t, text, return_dict=False)[0]
    got = expert(latents, t, text, memory_time_positions(0, 5), cond)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_memory_positions_change_the_output_and_are_the_ones_used():
    expert = M2VExpert(tiny_model(), "low_noise")
    g = torch.Generator().manual_seed(2)
    m, f = 3, 4
    latents = torch.randn(1, 16, m + f, 4, 4, generator=g)
    cond = torch.randn(1, 20, m + f, 4, 4, generator=g)
    text = torch.randn(1, 512, 32, generator=g)
    t = torch.tensor([500.0])
    storymem = expert(latents, t, text, memory_time_positions(m, f), cond)
    contiguous = expert(latents, t, text, list(range(m + f)), cond)
    assert not torch.allclose(storymem, contiguous)
    # the rope module saw exactly StoryMem's positions: -15, -10, -5, 0..3
    seen = {}
    original = type(expert.rope).forward

    def spy(self, hidden):
        seen["positions"] = self._positions
        return original(self, hidden)

    type(expert.rope).forward = spy
    try:
        expert(latents, t, text, memory_time_positions(m, f), cond)
    finally:
        type(expert.rope).forward = original
    assert seen["positions"] == (-15, -10, -5, 0, 1, 2, 3)


def test_memory_changes_the_video_prediction():
    expert = M2VExpert(tiny_model(), "low_noise")
    g = torch.Generator().manual_seed(3)
    f = 5
    clip = torch.randn(16, f, 4, 4, generator=g)
    video_latents = torch.randn(1, 16, f, 4, 4, generator=g)
    text = torch.randn(1, 512, 32, generator=g)
    t = torch.tensor([700.0])
    alone = expert(video_latents, t, text, memory_time_positions(0, f), build_conditioning(None, clip, 17))
    memory = torch.randn(2, 16, 4, 4, generator=g)
    noisy = torch.cat([torch.randn(1, 16, 2, 4, 4, generator=g), video_latents], dim=2)
    with_mem = expert(noisy, t, text, memory_time_positions(2, f), build_conditioning(memory, clip, 17))
    assert with_mem.shape == (1, 16, 2 + f, 4, 4)
    assert not torch.allclose(with_mem[:, :, 2:], alone, atol=1e-4)


def test_mask_channels_for_cut_mi2v_mm2v():
    cut = known_frames_mask(17, 0)
    assert cut.shape == (4, 5) and cut.sum() == 0
    mi2v = known_frames_mask(17, 1)
    assert mi2v[:, 0].tolist() == [1, 1, 1, 1] and mi2v[:, 1:].sum() == 0
    mm2v = known_frames_mask(17, 5)  # 5 motion frames: latent 0 (frame 0 x4) and latent 1 (frames 1-4)
    assert mm2v[:, :2].sum() == 8 and mm2v[:, 2:].sum() == 0
    partial = known_frames_mask(17, 3)  # frames 0,1,2: latent 1 holds frames 1..4 -> channels 0,1 only
    assert partial[:, 1].tolist() == [1, 1, 0, 0]
    with pytest.raises(ValueError, match="4n\\+1"):
        known_frames_mask(16, 0)


def test_conditioning_layout_memory_first_oldest_first():
    memory = torch.stack([torch.full((16, 2, 3), float(j + 1)) for j in range(3)])  # values 1,2,3 oldest->newest
    clip = torch.full((16, 5, 2, 3), -7.0)
    y = build_conditioning(memory, clip, 17, known_pixel_frames=1)
    assert y.shape == (1, 20, 8, 2, 3)
    mask, lat = y[0, :4], y[0, 4:]
    assert mask[:, :3].eq(1).all()  # memory: mask 1 on all four channels
    assert mask[:, 3].eq(1).all()  # MI2V: first video latent known
    assert mask[:, 4:].eq(0).all()
    assert [lat[:, j].unique().item() for j in range(3)] == [1.0, 2.0, 3.0]
    assert lat[:, 3:].eq(-7).all()
    with pytest.raises(ValueError):
        build_conditioning(torch.zeros(2, 16, 9, 9), clip, 17)


class RecordingExpert:
    def __init__(self, name, in_channels=36):
        self.name, self.in_channels, self.calls = name, in_channels, []

    def __call__(self, latents, t, text, positions, cond=None):
        self.calls.append((float(t[0]), latents.shape[0], text.shape[0]))
        return torch.zeros_like(latents) + (0.1 if self.name == "high" else -0.1)


def test_two_experts_switch_at_boundary_with_batched_cfg():
    high, low = RecordingExpert("high"), RecordingExpert("low")
    settings = SamplerSettings(steps=10, shift=4.0, guidance=(3.5, 2.0), boundary=0.9)
    noise = torch.randn(1, 16, 3, 2, 2)
    text, neg = torch.randn(1, 8, 4), torch.randn(1, 8, 4)
    denoise((high, low), noise, text, neg, [0, 1, 2], settings)
    assert len(high.calls) + len(low.calls) == 10  # one forward per step: CFG is batched, not two calls
    assert all(b == 2 and tb == 2 for _, b, tb in high.calls + low.calls)
    assert high.calls and low.calls
    assert all(t >= 900 for t, _, _ in high.calls) and all(t < 900 for t, _, _ in low.calls)


def test_guidance_one_skips_the_unconditional_branch():
    high, low = RecordingExpert("high"), RecordingExpert("low")
    denoise((high, low), torch.randn(1, 16, 1, 2, 2), torch.randn(1, 4, 4), torch.randn(1, 4, 4), [0],
            SamplerSettings(steps=4, guidance=(1.0, 1.0)))
    assert all(b == 1 for _, b, _ in high.calls + low.calls)


def test_cfg_combination_is_text_only_guidance():
    class TextEcho:
        name, in_channels = "e", 16

        def __call__(self, latents, t, text, positions, cond=None):
            return text[:, :1, :1, None, None].expand(-1, 16, *latents.shape[2:]).clone()

    e = TextEcho()
    settings = SamplerSettings(steps=1, guidance=(3.0, 3.0), solver="euler", shift=1.0)
    text, neg = torch.full((1, 2, 2), 2.0), torch.full((1, 2, 2), 1.0)
    out = denoise((e, e), torch.zeros(1, 16, 1, 1, 1), text, neg, [0], settings)
    # prediction = neg + 3*(text-neg) = 4; one Euler step from sigma 1 to 0: x - 1*4
    torch.testing.assert_close(out, torch.full_like(out, -4.0))


def test_unipc_schedule_is_wans():
    """Wan's FlowUniPC: sigmas linspace(1 - 1/1000, 0, N+1)[:-1], shifted s' = k*s / (1 + (k-1)*s),
    timesteps s' * 1000 (computed here by hand, independently of diffusers)."""
    from storyfarm.m2v.render.sampler import make_scheduler

    steps, shift = 40, 4.0
    base = torch.linspace(1 - 1 / 1000, 0, steps + 1, dtype=torch.float64)[:-1]
    shifted = shift * base / (1 + (shift - 1) * base)
    scheduler = make_scheduler(SamplerSettings(steps=steps, shift=shift))
    torch.testing.assert_close(scheduler.timesteps.double(), (shifted * 1000).round(), atol=1.0, rtol=0)
    torch.testing.assert_close(scheduler.sigmas[:-1].double(), shifted, atol=1e-6, rtol=0)
    assert scheduler.sigmas[-1] == 0
    assert sum(float(t) >= 900 for t in scheduler.timesteps) == 13  # steps on the high-noise expert


def test_prompts_are_cleaned_like_wans():
    from storyfarm.m2v.model.text import clean_prompt

    assert clean_prompt("  A cat&amp;dog \n\n  at   dusk ") == "A cat&dog at dusk"
