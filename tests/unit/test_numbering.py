"""story/numbering.py: people count shots (and a shot's frames) from 1, the API counts from 0."""

from __future__ import annotations

import pytest

from storyfarm.story.format import parse_story
from storyfarm.story.numbering import keyframe_id, keyframe_indices, shot_index, shot_label, shot_number, wire_shot


def test_numbers_and_indices():
    assert [shot_number(i) for i in range(3)] == [1, 2, 3]
    assert [shot_index(n, 3) for n in (1, 2, 3)] == [0, 1, 2]
    assert shot_index(7) == 6  # no count: only the lower bound is known (the daemon checks the rest)


@pytest.mark.parametrize("number, count, said", [
    (0, 3, "--shot 0: shot numbers count from 1; this story has shots 1 to 3"),
    (4, 3, "--shot 4: shot numbers count from 1; this story has shots 1 to 3"),
    (0, None, "--shot 0: shot numbers count from 1; the first shot is 1"),
    (-2, None, "--shot -2: shot numbers count from 1"),
])
def test_a_number_out_of_range_names_the_argument_and_the_range(number, count, said):
    with pytest.raises(ValueError) as err:
        shot_index(number, count, name="--shot")
    assert said in str(err.value)


def test_labels():
    assert shot_label(5) == "shot 6"
    assert shot_label(5, 6) == "shot 6 of 6"
    assert shot_label(2, scene=1, shot=3) == "shot 3 (scene 1.3)"
    assert shot_label(5, 6, 1, 3) == "shot 6 of 6 (scene 1.3)"
    assert wire_shot(5) == "shot_index 5 (shot 6)"


def test_keyframe_ids_count_shots_and_frames_from_1():
    assert keyframe_id(0, 0) == "s001f001"  # shot 1's first frame
    assert keyframe_id(11, 40) == "s012f041"
    assert keyframe_indices("s001f001") == (0, 0) and keyframe_indices("s012f041") == (11, 40)
    assert all(keyframe_indices(keyframe_id(s, f)) == (s, f) for s in (0, 5, 999) for f in (0, 80))
    assert [keyframe_indices(k) for k in ("ref00", "s000f001", "s001f000", "fake-001")] == [None] * 4
    with pytest.raises(ValueError):
        keyframe_id(-1, 0)


def test_the_clip_file_carries_the_shot_number():
    story = parse_story({"shots": [{"prompt": "a"}, {"prompt": "b"}, {"prompt": "c"}]})
    assert [s.clip_file for s in story.shots] == [f"shots/{n:03d}_scene01_shot{n:02d}.mp4" for n in (1, 2, 3)]
