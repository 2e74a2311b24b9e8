"""Consistent Self-Attention: rate 0 is plain attention, a positive rate changes later shots through a
bounded bank, and a CSA story renders, persists its bank and re-renders a shot identically."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from storyfarm.m2v.render.csa import CsaBank, CsaSession, consistent_self_attention
from storyfarm.m2v.render.driver import StoryRenderer
from storyfarm.m2v.render.engine import ShotPlan
from storyfarm.m2v.render.sampler import SamplerSettings
from storyfarm.story.format import check_against_model, parse_story
from storyfarm.story.modes import CsaOptions


def plan(index: int, **over) -> ShotPlan:
    return ShotPlan(story_key="story:csa", prompt=f"shot {index}: the same girl in a red coat", negative_prompt="",
                    seed=10 + index, width=64, height=32, frames=9, sampler=SamplerSettings(steps=3), use_t2v=True, **over)


def experts(engine):
    return [*engine.m2v_experts, *engine.t2v_experts]


def render(engine, index, options=None, bank=None):
    if options is None:
        return engine.render_shot(plan(index)).frames, None
    session = CsaSession(options, bank, index, num_blocks=2, num_steps=3, seed=1)

    def advance(*_):
        session.step += 1

    with consistent_self_attention(experts(engine), session):
        frames = engine.render_shot(plan(index), on_step=advance).frames
    return frames, session


def test_rate_zero_is_plain_attention_and_a_positive_rate_changes_later_shots(tiny_engine):
    plain = [render(tiny_engine, i)[0] for i in range(2)]
    zero_bank = CsaBank()
    every = dict(blocks=(0, 1), steps=3)
    for i in range(2):
        frames, session = render(tiny_engine, i, CsaOptions(rate=0.0, **every), zero_bank)
        assert np.array_equal(frames, plain[i])  # the CSA path ran (every block, every step), nothing changed
    assert zero_bank.nbytes == 0

    bank = CsaBank()
    first, s0 = render(tiny_engine, 0, CsaOptions(rate=0.5, bank_tokens=16, **every), bank)
    assert np.array_equal(first, plain[0])  # the first identity shot only writes the bank
    assert s0.writes and s0.stats["banked_tokens"] == 2 * 3 * 12  # blocks x steps x min(0.5 x 24 tokens, 16)
    second, s1 = render(tiny_engine, 1, CsaOptions(rate=0.5, bank_tokens=16, **every), bank)
    assert not np.array_equal(second, plain[1])
    assert s1.stats["extra_keys"] == 12  # shot 0's banked tokens, per call
    # bounded: identity shots x steps x blocks x tokens x (K, V) x CFG batch x heads x head dim x 4 bytes
    bound = s1.bound_bytes(batch=2, heads=2, head_dim=24, element_size=4)
    assert 0 < bank.nbytes <= bound == 3 * 3 * 2 * 16 * 2 * 2 * 2 * 24 * 4
    assert bank.shots() == [0, 1]
    capped = CsaBank()
    _, s = render(tiny_engine, 0, CsaOptions(rate=1.0, bank_tokens=5, **every), capped)
    assert s.stats["banked_tokens"] == 2 * 3 * 5  # every token sampled, at most bank_tokens kept
    # processors are restored afterwards
    assert all(type(b.attn1.processor).__name__ != "ConsistentSelfAttention" for e in experts(tiny_engine) for b in e.model.blocks)


def test_sessions_choose_blocks_and_steps_and_refuse_bad_blocks():
    session = CsaSession(CsaOptions(), CsaBank(), 0, num_blocks=40, num_steps=40)
    assert sorted(session.blocks) == [0, 8, 16, 24, 32] and session.steps == 10
    assert session.active(8) and not session.active(9)
    session.step = 10
    assert not session.active(8)
    # Wan2.2-A14B with CFG in bf16: the default bank is bounded at about 1.6 GB
    assert session.bound_bytes(batch=2, heads=40, head_dim=128, element_size=2) == 3 * 10 * 5 * 256 * 2 * 2 * 5120 * 2
    later = CsaSession(CsaOptions(identity_shots=2), CsaBank(), 2, num_blocks=40, num_steps=40)
    assert not later.writes  # shot 2 reads the bank of shots 0 and 1, writes nothing
    with pytest.raises(ValueError, match=r"csa.blocks: \[40\] out of range; the model has blocks 0 to 39"):
        CsaSession(CsaOptions(blocks=(0, 40)), CsaBank(), 0, num_blocks=40, num_steps=40)


def test_bank_round_trip_and_snapshot_before_a_shot(tmp_path):
    bank = CsaBank()
    for shot in range(3):
        bank.add(shot, 0, 0, torch.full((2, 4, 2, 3), float(shot)), torch.full((2, 4, 2, 3), -float(shot)))
    keys, values = bank.tokens(0, 0, before_shot=2)
    assert keys.shape == (2, 8, 2, 3) and keys[0, :4].eq(0).all() and keys[0, 4:].eq(1).all()
    assert bank.tokens(0, 0, before_shot=0) is None and bank.tokens(1, 0, before_shot=3) is None
    bank.save(tmp_path / "bank.safetensors")
    loaded = CsaBank.load(tmp_path / "bank.safetensors")
    assert loaded.shots() == [0, 1, 2] and loaded.nbytes == bank.nbytes
    loaded.drop_from(1)
    assert loaded.shots() == [0]


def test_a_csa_story_renders_without_memory_and_rerenders_a_shot_identically(tiny_engine, tmp_path):
    doc = {"seed": 3, "resolution": "64x32", "frames": 9, "steps": 3, "csa": {"rate": 0.5, "bank_tokens": 16},
           "shots": [{"prompt": "a girl in a red coat at the station"}, {"prompt": "the girl boards the train"},
                     {"prompt": "she looks out of the window", "cut": False}]}
    story = check_against_model(parse_story(doc), tiny_engine.preset.model_limits())
    out = tmp_path / "story"
    manifest = StoryRenderer(tiny_engine).render(story, out)
    shots = manifest["shots"]
    assert [s["model"] for s in shots] == ["t2v", "t2v", "m2v"]  # plain weights: T2V cuts, I2V continuation
    assert all(s["memory_keyframes"] == [] for s in shots)  # no StoryMem memory without its LoRA
    assert [s["csa"]["identity"] for s in shots] == [True, True, True]
    assert shots[0]["csa"]["extra_keys"] == 0 and shots[1]["csa"]["extra_keys"] > 0
    assert all(s["csa"]["bank_bytes"] <= s["csa"]["bank_bound_bytes"] for s in shots)
    assert (out / "csa" / "bank.safetensors").is_file()
    # plain rendering of the same story differs from shot 1 on
    plain = StoryRenderer(tiny_engine).render(
        check_against_model(parse_story({**doc, "csa": {"rate": 0}}), tiny_engine.preset.model_limits()), tmp_path / "plain")
    assert plain["shots"][0]["sha256"] == shots[0]["sha256"]
    assert plain["shots"][1]["sha256"] != shots[1]["sha256"]
    # re-rendering shot 1 in a fresh renderer sees the bank as it stood before it: the same take
    again = StoryRenderer(tiny_engine).render_shot(story, story.shots[1], out)
    assert again["sha256"] == shots[1]["sha256"]


def test_csa_refuses_fifo_shots(tiny_engine, tmp_path):
    story = check_against_model(parse_story({"csa": True, "resolution": "64x32", "steps": 2,
                                             "shots": [{"prompt": "a", "frames": 33}]}), tiny_engine.preset.model_limits())
    with pytest.raises(ValueError, match=r"shots\[0\]: csa is not available for FIFO"):
        StoryRenderer(tiny_engine).render(story, tmp_path / "x")
