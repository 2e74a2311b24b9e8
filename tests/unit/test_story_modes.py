"""Story options for render modes: FIFO long shots, CSA, labelled references, re-render edits.

Every bad value is refused at the path where it was written, with what is allowed.
"""

from __future__ import annotations

import pytest
from PIL import Image

from storyfarm.story.format import FifoOptions, ModelLimits, StoryValidationError, check_against_model, parse_story
from storyfarm.story.modes import CsaOptions, ShotEdit, read_edit

WAN = ModelLimits(native_frames=81, max_fifo_frames=4801, memory_slots=10)


def errors_of(data, limits: ModelLimits | None = None, **kw) -> list[str]:
    with pytest.raises(StoryValidationError) as caught:
        story = parse_story(data, **kw)
        if limits is not None:
            check_against_model(story, limits)
    return [str(e) for e in caught.value.errors]


def test_longer_than_native_becomes_fifo_and_m2v_keeps_the_one_pass_limit():
    story = check_against_model(parse_story({"shots": [
        {"prompt": "a"}, {"prompt": "b", "duration": 30}, {"prompt": "c", "frames": 81}, {"prompt": "d", "frames": 85},
        {"prompt": "e", "frames": 33, "mode": "fifo"}, {"prompt": "f", "frames": 161, "mode": "m2v"}]}), WAN)
    assert [(s.mode, s.frames) for s in story.shots] == [
        ("auto", None), ("fifo", 481), ("m2v", 81), ("fifo", 85), ("fifo", 33), ("m2v", 161)]
    assert errors_of({"shots": [{"prompt": "a", "duration": 30, "mode": "m2v"}, {"prompt": "b", "duration": 400},
                                {"prompt": "c", "frames": 4805}]}, WAN) == [
        "shots[0].duration: 30.0 s at 16 fps is 481 frames; the model allows at most 20.0 s (321 frames)",
        "shots[1].duration: 400.0 s at 16 fps is 6401 frames; the model allows at most 300.0 s (4801 frames)",
        "shots[2].frames: 4805 frames exceeds the model's maximum of 4801",
    ]
    # a model without a native length renders every shot in one pass, as before
    assert check_against_model(parse_story({"shots": [{"prompt": "a", "frames": 161}]}), ModelLimits()).shots[0].mode == "m2v"


def test_fifo_options_are_story_defaults_that_shots_override():
    story = parse_story({"fifo": {"partitions": 3}, "shots": [{"prompt": "a"}, {"prompt": "b", "fifo": {"lookahead": True}}]})
    assert [s.fifo for s in story.shots] == [FifoOptions(3, None), FifoOptions(None, True)]
    assert errors_of({"shots": [{"prompt": "a", "fifo": {"partitions": 0, "lookahed": True}},
                                {"prompt": "b", "fifo": {"partitions": 17, "lookahead": "yes"}}, {"prompt": "c", "fifo": 2}]}) == [
        'shots[0].fifo.lookahed: unknown key; allowed: partitions, lookahead; did you mean "lookahead"?',
        "shots[0].fifo.partitions: expected an integer >= 1, got 0",
        "shots[1].fifo.partitions: expected an integer < 17, got 17",
        'shots[1].fifo.lookahead: expected a boolean, got "yes"',
        "shots[2].fifo: expected a mapping with partitions and/or lookahead, got 2",
    ]


def test_csa_options_and_their_errors():
    assert parse_story({"csa": True, "shots": [{"prompt": "a"}]}).csa == CsaOptions()
    story = parse_story({"csa": {"rate": 0, "identity_shots": 2, "blocks": [8, 0], "steps": 10, "bank_tokens": 256,
                                 "memory": True}, "shots": [{"prompt": "a"}]})
    assert story.csa == CsaOptions(rate=0.0, identity_shots=2, blocks=(0, 8), steps=10, bank_tokens=256, memory=True)
    assert parse_story({"shots": [{"prompt": "a"}]}).csa is None
    assert errors_of({"csa": {"rate": 1.5, "blocks": [1, 1], "bank_tokens": 0, "speed": 1}, "shots": [{"prompt": "a"}]}) == [
        "csa.speed: unknown key; allowed: rate, identity_shots, blocks, steps, bank_tokens, memory",
        "csa.rate: expected a sampling rate from 0 to 1, got 1.5",
        "csa.bank_tokens: expected an integer >= 1, got 0",
        "csa.blocks: lists a block more than once",
    ]
    assert errors_of({"shots": [{"prompt": "a", "csa": True}]}) == [
        "shots[0].csa: unknown key; allowed: prompt, first_frame_prompt, cut, transition, negative_prompt, seed, "
        "duration, frames, mode, fifo, references, resolution, steps, guidance, shift"]


def png(path, size=(32, 32)):
    Image.new("RGB", size, (200, 30, 30)).save(path)
    return path.name


def test_references_per_character_with_labels(tmp_path):
    for name in ("lena_front.png", "lena_side.png", "harbour.png", "boat.png"):
        png(tmp_path / name)
    story = parse_story({"references": {"lena": ["lena_front.png", "lena_side.png"], "harbour": "harbour.png"},
                         "shots": [{"prompt": "a"}, {"prompt": "b", "references": {"boat": ["boat.png"]}}]},
                        base_dir=tmp_path)
    assert [p.rsplit("/", 1)[-1] for p in story.references] == ["lena_front.png", "lena_side.png", "harbour.png"]
    assert story.reference_labels == ("lena", "lena", "harbour")
    assert story.shots[1].reference_labels == ("boat",) and story.shots[0].references == ()
    listed = parse_story({"references": ["boat.png"], "shots": [{"prompt": "a"}]}, base_dir=tmp_path)
    assert listed.reference_labels == (None,)
    assert errors_of({"references": {"lena": [], "": "boat.png", "x": ["missing.png"]}, "shots": [{"prompt": "a"}]},
                     base_dir=tmp_path) == [
        "references.lena: expected one or more image paths, got an empty list",
        'references[""]: a character or place name must be 1 to 64 printable characters',
        f'references.x[0]: file not found: "{tmp_path}/missing.png"',
    ]
    # every reference stays in the memory window: at most memory_slots - 1 of them
    many = {"references": ["boat.png"] * 10, "shots": [{"prompt": "a"}]}
    assert errors_of(many, WAN, base_dir=tmp_path) == [
        "references: 10 reference images; the memory window holds 10 keyframes and keeps every reference, "
        "so at most 9 (one slot stays for recent shots)"]


def test_storymem_stories_may_name_their_references(tmp_path):
    png(tmp_path / "cat.png")
    doc = {"story_name": "cat", "story_overview": "", "references": ["cat.png"],
           "scenes": [{"scene_num": 1, "video_prompts": ["a cat"], "cut": [True]}]}
    story = parse_story(doc, base_dir=tmp_path)
    assert story.format == "storymem" and story.references == (str(tmp_path / "cat.png"),)


def test_edits_are_checked_like_story_fields():
    assert read_edit(None) is None
    assert read_edit({"prompt": "a storm", "strength": 0.4, "seed": 9}) == ShotEdit("a storm", 0.4, 9)
    assert read_edit({"prompt": None, "strength": 1}).as_dict() == {"strength": 1.0}
    with pytest.raises(StoryValidationError) as caught:
        read_edit({"prompt": "bad\x07", "strength": 0, "seed": -1, "cascade": True})
    assert [str(e) for e in caught.value.errors] == [
        "edit.cascade: unknown key; allowed: prompt, strength, seed",
        "edit.prompt: contains a control character (U+0007) at position 3; only newline and tab are allowed",
        "edit.strength: expected a strength > 0, got 0",
        "edit.seed: expected an integer >= 0, got -1",
    ]
