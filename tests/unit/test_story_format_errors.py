"""Which format a story file is read as, and what its errors then say (issue 14).

A StoryMem JSON missing a field must be reported as a StoryMem JSON missing that field (not as
native keys it does not have), and a native file that borrows a StoryMem key gets the native key
it meant. Unnamed stories are named after their file, never after the API field they came in.
"""

from __future__ import annotations

import copy
import json

import pytest

from storyfarm.story.format import NATIVE_STORY_KEYS, StoryValidationError, load_story, parse_story


def errors_of(data, **kwargs) -> list[str]:
    with pytest.raises(StoryValidationError) as caught:
        parse_story(data, **kwargs)
    return [str(e) for e in caught.value.errors]


NATIVE_ALLOWED = ", ".join(NATIVE_STORY_KEYS)


# --- a StoryMem file missing a field ------------------------------------------------------------

def test_storymem_missing_video_prompts_names_the_field():
    doc = {"story_name": "cat", "story_overview": "a cat's day",
           "scenes": [{"scene_num": 1, "first_frame_prompt": ["a cat wakes"], "cut": [True]}]}
    assert errors_of(doc) == ["scenes[0].video_prompts: required field is missing"]


def test_storymem_is_told_by_its_scene_keys_alone():
    """No story-level StoryMem key, but scenes with `cut` / `first_frame_prompt` lists."""
    assert errors_of({"scenes": [{"scene_num": 1, "cut": [True]}]}) == [
        "scenes[0].video_prompts: required field is missing"]
    assert errors_of({"scenes": [{"first_frame_prompt": ["x"]}]}) == [
        "scenes[0].scene_num: required field is missing",
        "scenes[0].video_prompts: required field is missing"]


def test_storymem_missing_scenes_names_the_field():
    assert errors_of({"story_name": "cat", "story_overview": "a cat's day"}) == [
        "scenes: required field is missing"]
    assert errors_of({"story_name": "cat", "scenes": "none"}) == [
        'scenes: expected a non-empty list of scenes, got "none"']


def test_storymem_with_a_native_key_gets_the_storymem_one():
    doc = {"name": "cat", "story_overview": "o",
           "scenes": [{"scene_num": 1, "video_prompts": ["a"], "cut": [True]}]}
    [error] = errors_of(doc)
    assert error.startswith("name: unknown key; allowed: story_name, story_overview, scenes, references")
    assert error.endswith('did you mean "story_name"?')


def test_a_stbench_script_missing_video_prompts_names_it(stbench):
    doc = json.loads((stbench / "cat.json").read_text())
    broken = copy.deepcopy(doc)
    del broken["scenes"][1]["video_prompts"]
    assert errors_of(broken) == ["scenes[1].video_prompts: required field is missing"]
    assert parse_story(doc).format == "storymem"


# --- a native file borrowing a StoryMem key -----------------------------------------------------

@pytest.mark.parametrize(("key", "meant"), [("story_name", "name"), ("story_overview", "overview")])
def test_native_file_with_a_storymem_key_gets_the_native_one(key, meant):
    [error] = errors_of({key: "kite", "shots": [{"prompt": "a"}]})
    assert error == f'{key}: unknown key; allowed: {NATIVE_ALLOWED}; did you mean "{meant}"?'


def test_native_scenes_with_a_storymem_story_key_stay_native():
    [error] = errors_of({"story_name": "kite", "scenes": [{"shots": [{"prompt": "a"}]}]})
    assert error == f'story_name: unknown key; allowed: {NATIVE_ALLOWED}; did you mean "name"?'


def test_mixed_formats_are_still_refused():
    assert errors_of({"story_name": "s", "shots": [{"prompt": "a"}],
                      "scenes": [{"video_prompts": ["a"], "cut": [True]}]}) == [
        "shots: native shots mixed with StoryMem's video_prompts (scenes[0]); a story file uses one format"]


# --- unnamed stories ----------------------------------------------------------------------------

def test_an_unnamed_story_is_named_after_its_file(tmp_path):
    path = tmp_path / "lighthouse.yaml"
    path.write_text("shots:\n  - prompt: a\n")
    assert load_story(path).name == "lighthouse"
    (tmp_path / "cat.json").write_text(json.dumps({"scenes": [{"scene_num": 1, "video_prompts": ["a"], "cut": [True]}]}))
    assert load_story(tmp_path / "cat.json").name == "cat"


@pytest.mark.parametrize("source", ["story_yaml", "story_json", "story st_0123456789abcdef", "<inline>"])
def test_a_source_that_is_no_file_does_not_name_the_story(source):
    assert parse_story("shots: [{prompt: a}]", source=source).name == ""


def test_a_given_name_names_an_unnamed_story_only():
    assert parse_story("shots: [{prompt: a}]", source="story_yaml", name="lighthouse").name == "lighthouse"
    assert parse_story("name: Keeper\nshots: [{prompt: a}]", name="lighthouse").name == "Keeper"
    assert parse_story({"story_name": "Cat", "scenes": [{"scene_num": 1, "video_prompts": ["a"], "cut": [True]}]},
                       name="cat").name == "Cat"
