"""A shot rendered again, in a fresh renderer, from the story folder alone gives the same shot.

This is what a daemon worker does after a crash, and what a re-render builds on: the shot sees its
memory snapshot (the bank as it stood before the shot, computed without changing the bank), the
continuation frames are read from the previous shot's published clip, the result is byte-identical
and its keyframes replace the old ones in place.
"""

import json

from storyfarm.m2v.render.driver import RenderSettings, StoryRenderer
from storyfarm.m2v.memory.bank import MemoryBank
from storyfarm.story.format import check_against_model, parse_story

STORY = {
    "seed": 21,
    "references": [],
    "shots": [
        {"prompt": "a lighthouse on a cliff at dusk"},
        {"prompt": "the keeper climbs the stairs", "cut": False},
        {"prompt": "the lamp turns on over the sea"},
        {"prompt": "a gull lands on the rail", "cut": False, "transition": "motion_frames"},
    ],
}


def test_rerendering_a_middle_shot_reproduces_it(tiny_engine, tmp_path):
    settings = RenderSettings(frames=9, resolution=(64, 32), steps=2)
    story = check_against_model(parse_story(STORY), tiny_engine.preset.model_limits())
    out = tmp_path / "story"
    manifest = StoryRenderer(tiny_engine, settings).render(story, out)
    bank_before = json.loads((out / "keyframes" / "memory.json").read_text())
    shots = manifest["shots"]
    assert [s["transition"] for s in shots] == [None, "first_frame", None, "motion_frames"]
    assert [s["frames"] for s in shots] == [9, 8, 9, 4]  # repeated conditioning frames dropped

    # shot 2 rendered again in a fresh renderer (a retry, a re-render without an edit): it sees its
    # memory snapshot (what stood before it, not the later shots' keyframes) and gives the same take
    fresh = StoryRenderer(tiny_engine, settings)
    again = fresh.render_shot(story, story.shots[1], out)
    for key in ("sha256", "memory_keyframes", "rope_time_positions", "new_keyframes", "seed", "frames"):
        assert again[key] == shots[1][key], key
    # its keyframes were replaced in place: the later shots keep theirs, in story order
    assert json.loads((out / "keyframes" / "memory.json").read_text()) == bank_before
    bank = MemoryBank.load(out / "keyframes")
    known_before_2 = [k["id"] for k in bank_before["keyframes"] if k["shot_index"] is None or k["shot_index"] < 1]
    assert bank.before(1) == known_before_2
    # and the rest of the story continues from there exactly as before
    for shot in story.shots[2:]:
        redo = fresh.render_shot(story, shot, out)
        assert redo["sha256"] == shots[shot.index]["sha256"]
    assert json.loads((out / "keyframes" / "memory.json").read_text()) == bank_before


def test_memory_latents_persist_with_the_story(tiny_engine, tmp_path, monkeypatch):
    """A shot rendered by a worker that never saw the story encodes no keyframe: the latents of
    the story's memory are on disk next to its keyframes, keyed by id and pixels."""
    settings = RenderSettings(frames=9, resolution=(64, 32), steps=2)
    story = check_against_model(parse_story(STORY), tiny_engine.preset.model_limits())
    out = tmp_path / "story"
    manifest = StoryRenderer(tiny_engine, settings).render(story, out)  # releases the story's pool entries at the end
    assert list((out / "keyframes").glob("latents-tiny-64x32.safetensors"))
    encoded = []
    real = tiny_engine.vae.encode_images
    monkeypatch.setattr(tiny_engine.vae, "encode_images", lambda imgs, **kw: encoded.append(len(imgs)) or real(imgs, **kw))
    again = StoryRenderer(tiny_engine, settings).render_shot(story, story.shots[3], out)
    assert encoded == []  # every memory keyframe came from disk
    assert again["sha256"] == manifest["shots"][3]["sha256"]
    assert len(again["memory_keyframes"]) > 0
