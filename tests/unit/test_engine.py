"""The engine on the tiny preset: determinism, memory split before decode, latent pool reuse."""

import numpy as np
import pytest
import torch

from storyfarm.m2v.render.engine import ShotPlan
from storyfarm.m2v.render.sampler import SamplerSettings


def plan(**over):
    base = dict(
        story_key="story:test", prompt="a lighthouse at dusk", negative_prompt="blurry", seed=11,
        width=64, height=32, frames=9, sampler=SamplerSettings(steps=3),
    )
    return ShotPlan(**{**base, **over})


def image(seed, h=32, w=64):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_same_seed_same_frames_other_seed_other_frames(tiny_engine):
    a = tiny_engine.render_shot(plan())
    b = tiny_engine.render_shot(plan())
    c = tiny_engine.render_shot(plan(seed=12))
    assert a.frames.shape == (9, 32, 64, 3) and a.frames.dtype == np.uint8
    assert np.array_equal(a.frames, b.frames)
    assert not np.array_equal(a.frames, c.frames)


def test_memory_is_split_off_before_decoding(tiny_engine, monkeypatch):
    decoded = []
    original = tiny_engine.vae.decode
    monkeypatch.setattr(tiny_engine.vae, "decode", lambda z: decoded.append(tuple(z.shape)) or original(z))
    memory = [(f"k{i}", image(i)) for i in range(4)]
    out = tiny_engine.render_shot(plan(memory=memory))
    assert decoded == [(16, 3, 4, 8)]  # 3 video latent frames, none of the 4 memory frames
    assert out.frames.shape[0] == 9
    assert out.time_positions == [-20, -15, -10, -5, 0, 1, 2]
    assert out.memory_ids == ["k0", "k1", "k2", "k3"] and out.model == "m2v"


def test_memory_changes_the_shot(tiny_engine):
    bare = tiny_engine.render_shot(plan(use_t2v=False))
    remembered = tiny_engine.render_shot(plan(memory=[("k0", image(0)), ("k1", image(1))]))
    assert not np.array_equal(bare.frames, remembered.frames)


def test_keyframe_latents_are_encoded_once(tiny_engine, monkeypatch):
    calls = []
    original = tiny_engine.vae.encode_images
    monkeypatch.setattr(tiny_engine.vae, "encode_images", lambda imgs, **kw: calls.append(len(imgs)) or original(imgs, **kw))
    key = "story:pool-reuse"
    tiny_engine.render_shot(plan(story_key=key, memory=[("a", image(0)), ("b", image(1))]))
    tiny_engine.render_shot(plan(story_key=key, memory=[("a", image(0)), ("b", image(1)), ("c", image(2))]))
    assert calls == [2, 1]  # the second shot encodes only the new keyframe
    assert tiny_engine.latent_pool.release(key) == 3 + 1  # 3 keyframe latents + the (same) prompt, story namespace


def test_first_shot_uses_t2v_pair_only_without_memory(tiny_engine):
    t2v = tiny_engine.render_shot(plan(use_t2v=True))
    assert t2v.model == "t2v" and t2v.time_positions == [0, 1, 2]
    with_refs = tiny_engine.render_shot(plan(use_t2v=True, memory=[("ref00", image(5))]))
    assert with_refs.model == "m2v" and with_refs.time_positions == [-5, 0, 1, 2]


def test_continuation_conditions_on_known_frames(tiny_engine):
    first = tiny_engine.render_shot(plan())
    mi2v = tiny_engine.render_shot(plan(known_frames=first.frames[-1:]))
    mm2v = tiny_engine.render_shot(plan(known_frames=first.frames[-5:]))
    assert not np.array_equal(mi2v.frames, first.frames)
    assert not np.array_equal(mi2v.frames, mm2v.frames)


def test_bad_sizes_are_refused(tiny_engine):
    with pytest.raises(ValueError, match="strides"):
        tiny_engine.render_shot(plan(frames=10))
    with pytest.raises(ValueError, match="strides"):
        tiny_engine.render_shot(plan(width=72))


def test_t2v_first_shot_samples_with_the_t2v_schedule(tiny_engine, monkeypatch):
    import storyfarm.m2v.render.engine as engine_module

    seen = []
    real = engine_module.denoise
    monkeypatch.setattr(engine_module, "denoise", lambda experts, *a, **kw: seen.append((experts, a[4])) or real(experts, *a, **kw))
    tiny_engine.render_shot(plan(use_t2v=True))
    tiny_engine.render_shot(plan(memory=[("k0", image(0))]))
    (t2v_experts, t2v_settings), (m2v_experts, m2v_settings) = seen
    render = tiny_engine.preset.render
    assert t2v_experts is tiny_engine.t2v_experts and m2v_experts is tiny_engine.m2v_experts
    assert (t2v_settings.shift, t2v_settings.boundary) == (render.t2v_shift, render.t2v_boundary) == (12.0, 0.875)
    assert (m2v_settings.shift, m2v_settings.boundary) == (4.0, 0.9)
