"""Story files: both formats, every validation rule with its exact message, model limits, the
shipped example stories, ST-Bench's 30 published scripts (when ../shared is present) and a
property test that no input makes the reader fail with anything but StoryValidationError."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from storyfarm.story.format import (
    MAX_SHOTS, MAX_STORY_BYTES, NATIVE_SHOT_KEYS, NATIVE_STORY_KEYS, FieldError, ModelLimits,
    ShotSpec, Story, StoryValidationError, check_against_model, load_story, parse_story,
)

REPO = Path(__file__).resolve().parents[2]
STORIES = REPO / "configs" / "stories"
LIMITS = ModelLimits()


def errors_of(data, **kwargs) -> list[str]:
    with pytest.raises(StoryValidationError) as caught:
        parse_story(data, **kwargs)
    return [str(e) for e in caught.value.errors]


def model_errors_of(data, limits: ModelLimits = LIMITS, **kwargs) -> list[str]:
    story = parse_story(data, **kwargs)
    with pytest.raises(StoryValidationError) as caught:
        check_against_model(story, limits)
    return [str(e) for e in caught.value.errors]


def storymem(*scenes: dict, **top) -> dict:
    return {"story_name": "s", "story_overview": "o", "scenes": list(scenes), **top}


def scene(num: int, prompts: list, cut: list, **extra) -> dict:
    return {"scene_num": num, "video_prompts": prompts, "cut": cut, **extra}


# --- StoryMem format ----------------------------------------------------------------------------

def test_storymem_shots_keep_their_scene_numbers_paths_and_cuts():
    story = parse_story(storymem(
        scene(1, ["a", "b"], [True, False], first_frame_prompt=["fa", "fb"]),
        scene(3, ["c"], [False]),
    ))
    assert story.format == "storymem" and story.name == "s" and story.overview == "o"
    assert [(s.index, s.scene, s.shot, s.cut, s.transition) for s in story.shots] == [
        (0, 1, 1, True, None), (1, 1, 2, False, None), (2, 3, 1, False, None)]
    assert [s.path for s in story.shots] == [
        "scenes[0].video_prompts[0]", "scenes[0].video_prompts[1]", "scenes[1].video_prompts[0]"]
    assert [s.prompt for s in story.shots] == ["a", "b", "c"]
    assert [s.first_frame_prompt for s in story.shots] == ["fa", "fb", None]
    assert story.seed is None and story.references == () and story.warnings == ()


def test_storymem_first_shot_marked_as_continuation_is_read_as_cut_with_a_warning():
    story = parse_story(storymem(scene(1, ["a", "b"], [False, False])))
    assert [s.cut for s in story.shots] == [True, False]
    assert story.warnings == (
        "scenes[0].cut[0]: the first shot of a story is always a cut; read as cut: true",)


def test_storymem_cut_must_be_a_real_boolean():
    errors = errors_of(storymem(scene(1, ["a"], [True]), scene(2, ["b", "c"], ["False", 1])))
    assert errors == ['scenes[1].cut[0]: expected a boolean, got "False"',
                      "scenes[1].cut[1]: expected a boolean, got 1"]


def test_storymem_parallel_lists_must_match_video_prompts():
    errors = errors_of(storymem(
        scene(1, ["a", "b"], [True], first_frame_prompt=["x", "y", "z"]),
        {"scene_num": 2, "video_prompts": ["c"]},
    ))
    assert errors == ["scenes[0].cut: has 1 entries; video_prompts has 2",
                      "scenes[0].first_frame_prompt: has 3 entries; video_prompts has 2",
                      "scenes[1].cut: required field is missing"]


def test_storymem_scene_numbers_and_keys():
    errors = errors_of(storymem(scene(1, ["a"], [True]), scene(1, ["b"], [True], seed=3), seed=1))
    assert errors == [
        "seed: unknown key; allowed: story_name, story_overview, scenes, references",
        "scenes[1].seed: unknown key; allowed: scene_num, video_prompts, first_frame_prompt, cut",
        "scenes[1].scene_num: 1 is already used by scenes[0]",
    ]


# --- native format ------------------------------------------------------------------------------

def test_native_minimal_shots_are_cuts_in_scene_one():
    story = parse_story({"shots": [{"prompt": "a"}, {"prompt": "b"}]})
    assert story.format == "native" and story.name == "" and story.seed is None
    assert [(s.scene, s.shot, s.path, s.cut, s.transition, s.mode) for s in story.shots] == [
        (1, 1, "shots[0]", True, None, "auto"), (1, 2, "shots[1]", True, None, "auto")]
    assert story.shots[0].overrides() == {}


def test_native_scenes_number_by_position_or_scene_num():
    story = parse_story({"scenes": [
        {"name": "one", "shots": [{"prompt": "a"}]},
        {"scene_num": 7, "shots": [{"prompt": "b"}, {"prompt": "c", "cut": False}]},
    ]})
    assert [(s.index, s.scene, s.shot, s.path) for s in story.shots] == [
        (0, 1, 1, "scenes[0].shots[0]"), (1, 7, 1, "scenes[1].shots[0]"), (2, 7, 2, "scenes[1].shots[1]")]


def test_story_level_settings_are_defaults_that_shots_override():
    story = parse_story({
        "seed": 5, "negative_prompt": "blur", "steps": 30, "guidance": 4, "resolution": "832x480",
        "shots": [{"prompt": "a"}, {"prompt": "b", "steps": 10, "guidance": [5, 3.5], "seed": 9,
                                     "resolution": [480, 832], "negative_prompt": ""}],
    })
    first, second = story.shots
    assert story.seed == 5
    assert first.overrides() == {"negative_prompt": "blur", "steps": 30, "guidance": (4.0, 4.0),
                                 "resolution": (832, 480)}
    assert first.seed is None  # the engine derives it from the story seed and the shot index
    assert second.overrides() == {"negative_prompt": "", "seed": 9, "steps": 10,
                                  "guidance": (5.0, 3.5), "resolution": (480, 832)}


def test_transition_implies_a_continuation_and_is_refused_on_cuts():
    story = parse_story({"shots": [{"prompt": "a"}, {"prompt": "b", "transition": "motion_frames"},
                                   {"prompt": "c", "cut": False}]})
    assert [(s.cut, s.transition) for s in story.shots] == [
        (True, None), (False, "motion_frames"), (False, None)]
    errors = errors_of({"shots": [{"prompt": "a", "transition": "first_frame"},
                                  {"prompt": "b", "cut": True, "transition": "first_frame"},
                                  {"prompt": "c", "transition": "fade"}]})
    assert errors == [
        "shots[0].transition: the first shot of a story is a cut: there is no shot before it to continue",
        "shots[1].transition: only continuation shots (cut: false) take a transition",
        'shots[2].transition: expected one of: first_frame, motion_frames, got "fade"',
    ]


def test_native_first_shot_continuation_is_read_as_cut_with_a_warning():
    story = parse_story({"shots": [{"prompt": "a", "cut": False}]})
    assert story.shots[0].cut is True
    assert story.warnings == ("shots[0].cut: the first shot of a story is always a cut; read as cut: true",)


def test_mode_is_auto_m2v_or_fifo():
    story = parse_story({"mode": "fifo", "shots": [{"prompt": "a"}, {"prompt": "b", "mode": "m2v"}]})
    assert [s.mode for s in story.shots] == ["fifo", "m2v"]
    assert errors_of({"shots": [{"prompt": "a", "mode": "sdxl"}]}) == [
        'shots[0].mode: expected one of: auto, m2v, fifo, got "sdxl"',
    ]


@pytest.mark.parametrize("value, message", [
    (-1, "expected an integer >= 0, got -1"),
    (True, "expected an integer >= 0, got true"),
    ("7", 'expected an integer >= 0, got "7"'),
    (7.0, "expected an integer >= 0, got 7.0"),
    (2**63, "expected an integer < 2**63, got 9223372036854775808"),
])
def test_seed_must_be_a_non_negative_63_bit_integer(value, message):
    shots = [{"prompt": "a"}] * 3 + [{"prompt": "b", "seed": value}]
    assert errors_of({"shots": shots}) == [f"shots[3].seed: {message}"]


@pytest.mark.parametrize("key, value, message", [
    ("duration", 0, "expected a number of seconds > 0, got 0"),
    ("duration", float("nan"), "expected a number of seconds > 0, got nan"),
    ("frames", 0, "expected an integer >= 1, got 0"),
    ("steps", 2.5, "expected an integer >= 1, got 2.5"),
    ("shift", -1, "expected a number > 0, got -1"),
    ("guidance", "high", 'expected a number >= 0 or a [high_noise, low_noise] pair, got "high"'),
    ("resolution", "832*480", 'expected "WIDTHxHEIGHT" (e.g. "832x480") or [width, height], got "832*480"'),
    ("negative_prompt", 3, "expected a string, got 3"),
    ("references", "a.png", 'expected a list of image paths, got "a.png"'),
])
def test_setting_type_errors_name_the_scene_shot_path(key, value, message):
    data = {"scenes": [{"shots": [{"prompt": "a"}]}, {"shots": [{"prompt": "b"}, {"prompt": "c", key: value}]}]}
    assert errors_of(data) == [f"scenes[1].shots[1].{key}: {message}"]


def test_pair_settings_report_each_element():
    assert errors_of({"shots": [{"prompt": "a", "guidance": [3, "x"], "resolution": [832, False]}]}) == [
        'shots[0].resolution[1]: expected an integer >= 1, got false',
        'shots[0].guidance[1]: expected a number >= 0, got "x"',
    ]


def test_duration_and_frames_on_one_level_conflict_but_a_shot_overrides_the_story():
    assert errors_of({"duration": 5, "frames": 81, "shots": [{"prompt": "a", "duration": 1, "frames": 17}]}) == [
        "frames: duration is also set; use either duration or frames",
        "shots[0].frames: duration is also set; use either duration or frames",
    ]
    story = parse_story({"duration": 5, "shots": [{"prompt": "a", "frames": 17}, {"prompt": "b"}]})
    assert [(s.frames, s.duration) for s in story.shots] == [(17, None), (None, 5.0)]


def test_unknown_keys_list_the_allowed_keys_and_suggest_the_intended_one():
    errors = errors_of({"shots": [{"promt": "a"}], "sed": 1})
    allowed_shot = ", ".join(NATIVE_SHOT_KEYS)
    assert errors == [
        f'sed: unknown key; allowed: {", ".join(NATIVE_STORY_KEYS)}; did you mean "seed"?',
        f'shots[0].promt: unknown key; allowed: {allowed_shot}; did you mean "prompt"?',
        "shots[0].prompt: required field is missing",
    ]
    assert allowed_shot.startswith("prompt, first_frame_prompt, cut, transition, negative_prompt, seed")


def test_all_errors_are_collected_and_raised_once():
    with pytest.raises(StoryValidationError) as caught:
        parse_story({"seed": -1, "shots": [{"prompt": " "}, {"prompt": "b", "cut": "true"},
                                           {"prompt": "c", "steps": 0}]}, source="x.yaml")
    error = caught.value
    assert error.source == "x.yaml"
    assert error.errors == [
        FieldError("seed", "expected an integer >= 0, got -1"),
        FieldError("shots[0].prompt", "must not be empty or whitespace"),
        FieldError("shots[1].cut", 'expected a boolean, got "true"'),
        FieldError("shots[2].steps", "expected an integer >= 1, got 0"),
    ]
    assert str(error).splitlines() == [f"{e.path}: {e.message}" for e in error.errors]
    assert isinstance(error, ValueError)
    again = pickle.loads(pickle.dumps(error))
    assert (again.errors, again.source, str(again)) == (error.errors, error.source, str(error))


def test_a_flood_of_errors_is_listed_up_to_100_then_counted():
    errors = errors_of({"shots": [{"prompt": "a"}], **{f"k{i}": 1 for i in range(150)}})
    assert len(errors) == 101 and errors[0].startswith("k0: unknown key; allowed: name, overview, shots")
    assert errors[-1] == "... and 50 more errors"


@pytest.mark.parametrize("prompt, message", [
    ("a\x07b", "contains a control character (U+0007) at position 1; only newline and tab are allowed"),
    ("\x1b[2J", "contains a control character (U+001B) at position 0; only newline and tab are allowed"),
    ("ab\rc", "contains a control character (U+000D) at position 2; only newline and tab are allowed"),
    ("x\u202eevil", "contains a Unicode bidirectional override (U+202E) at position 1"),
    ("\u2066x", "contains a Unicode bidirectional override (U+2066) at position 0"),
    ("ab\u200fc", "contains an invisible Unicode bidirectional mark (U+200F) at position 2"),
    ("a\U000e0041\U000e0042", "contains an invisible Unicode tag character (U+E0041) at position 1"),
    ("x\ud800", "contains an unpaired surrogate (U+D800) at position 1"),
    ("", "must not be empty or whitespace"),
    (" \n\t ", "must not be empty or whitespace"),
    ("x" * 4001, "is 4001 characters long; the limit is 4000"),
])
def test_prompt_text_rules(prompt, message):
    assert errors_of({"shots": [{"prompt": prompt}]}) == [f"shots[0].prompt: {message}"]


def test_prompts_may_hold_newlines_tabs_unicode_and_4000_characters():
    for prompt in ("line one\n\tline two", "雨の港、赤い船", "x" * 4000):
        assert parse_story({"shots": [{"prompt": prompt}]}).shots[0].prompt == prompt


def test_error_messages_escape_what_they_quote():
    [error] = errors_of({"shots": [{"prompt": "a", "mode": "x\u202e\n"}]})
    assert error == 'shots[0].mode: expected one of: auto, m2v, fifo, got "x\\u202e\\n"'


def test_shot_count_is_capped():
    assert len(parse_story({"shots": [{"prompt": "a"}] * MAX_SHOTS}).shots) == MAX_SHOTS
    assert errors_of({"shots": [{"prompt": ""}] * (MAX_SHOTS + 1)}) == [
        "shots: the story has 1001 shots; the limit is 1000"]
    big = storymem(scene(1, ["a"] * 600, [True] * 600), scene(2, ["b"] * 401, [True] * 401))
    assert errors_of(big) == ["scenes: the story has 1001 shots; the limit is 1000"]


def test_size_is_capped_before_parsing(tmp_path):
    # Not JSON at all: only the size is reported, so it was checked before parsing.
    assert errors_of(b"{" * (MAX_STORY_BYTES + 1)) == [
        "the story is 1048577 bytes; the limit is 1048576 bytes (1 MiB)"]
    assert errors_of("é" * (MAX_STORY_BYTES // 2 + 1)) == [
        "the story is 1048578 bytes; the limit is 1048576 bytes (1 MiB)"]
    body = json.dumps({"shots": [{"prompt": "a"}]})
    exact = tmp_path / "exact.json"
    exact.write_text(body + " " * (MAX_STORY_BYTES - len(body)))
    assert len(load_story(exact).shots) == 1
    too_big = tmp_path / "big.yaml"
    too_big.write_bytes(b"[" * (MAX_STORY_BYTES + 1))
    with pytest.raises(StoryValidationError) as caught:
        load_story(too_big)
    assert caught.value.source == str(too_big)
    assert [str(e) for e in caught.value.errors] == [
        "the story is 1048577 bytes; the limit is 1048576 bytes (1 MiB)"]


@pytest.mark.parametrize("text, message", [
    ("!!python/object/apply:os.system ['true']", "invalid YAML"),
    ('{"shots": [}', "invalid JSON at line 1, column 12: Expecting value"),
    ("shots: [a\n  - b", "invalid YAML at line"),
    ("- prompt: a", "expected a mapping at the top level, got a list of 1 item"),
    ("", "the story is empty"),
    (b"shots: [{prompt: \xff}]", "not valid UTF-8: byte 0xff at offset 17"),
    ("[" * 100_000, "invalid JSON: nested too deeply"),
])
def test_unparseable_or_non_mapping_documents(text, message):
    [error] = errors_of(text)
    assert error.startswith(message)


def test_text_formats_are_sniffed_or_named():
    yaml_text = "name: n\nshots:\n  - prompt: a\n"
    json_text = '\ufeff{"name": "n", "shots": [{"prompt": "a"}]}'
    for text, fmt in ((yaml_text, None), (yaml_text, "yaml"), (json_text, None), (json_text.encode(), "json")):
        assert parse_story(text, fmt=fmt).name == "n"
    with pytest.raises(ValueError, match="fmt must be"):
        parse_story(yaml_text, fmt="toml")


def test_mixed_formats_are_refused():
    assert errors_of({"shots": [{"prompt": "a"}], "scenes": [{"video_prompts": ["a"], "cut": [True]}]}) == [
        "shots: native shots mixed with StoryMem's video_prompts (scenes[0]); a story file uses one format"]
    assert errors_of({"scenes": [{"video_prompts": ["a"], "cut": [True]}, {"shots": [{"prompt": "b"}]}]}) == [
        "scenes[1].shots: native shots mixed with StoryMem's video_prompts (scenes[0]);"
        " a story file uses one format"]
    assert errors_of({"shots": [{"prompt": "a"}], "scenes": []}) == ["shots: use either shots or scenes, not both"]
    assert errors_of({"name": "n"}) == [
        "shots: required field is missing (a story needs shots, or scenes with shots)"]


def test_references_resolve_against_the_story_folder(tmp_path):
    (tmp_path / "refs").mkdir()
    for name in ("hero.png", "boat.png"):
        (tmp_path / "refs" / name).write_bytes(b"not checked here")
    story_file = tmp_path / "s.yaml"
    story_file.write_text("references: [refs/hero.png]\n"
                          "shots:\n  - prompt: a\n  - {prompt: b, references: [refs/boat.png]}\n")
    story = load_story(story_file)
    assert story.name == "s" and story.source == str(story_file)
    assert story.references == (str(tmp_path / "refs" / "hero.png"),)
    assert story.shots[0].references == () and story.shots[1].references == (str(tmp_path / "refs" / "boat.png"),)
    assert errors_of({"shots": [{"prompt": "a", "references": ["refs/missing.png", "refs", "a\x00b", 3]}]},
                     base_dir=tmp_path) == [
        f'shots[0].references[0]: file not found: "{tmp_path}/refs/missing.png"',
        f'shots[0].references[1]: not a file: "{tmp_path}/refs"',
        "shots[0].references[2]: contains a NUL character",
        "shots[0].references[3]: expected an image path, got 3",
    ]


def test_load_story_propagates_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_story(tmp_path / "nope.yaml")


# --- model-dependent checks ---------------------------------------------------------------------

def test_durations_become_4n_plus_1_frames():
    story = check_against_model(parse_story({"shots": [
        {"prompt": "a", "duration": 5}, {"prompt": "b", "duration": 5.25}, {"prompt": "c", "frames": 17},
        {"prompt": "d"}]}), LIMITS)
    assert [(s.frames, s.duration) for s in story.shots] == [(81, 5.0), (85, 5.25), (17, None), (None, None)]
    assert story.shots[0].overrides() == {"frames": 81}
    assert check_against_model(story, LIMITS) == story  # idempotent


def test_durations_off_the_frame_grid_are_refused_with_valid_neighbours():
    shots = [{"prompt": "a"}, {"prompt": "b"}, {"prompt": "c", "duration": 5.1}, {"prompt": "d", "duration": 0.1},
             {"prompt": "e", "duration": 30}, {"prompt": "f", "duration": 5.0625}]
    assert model_errors_of({"shots": shots}) == [
        "shots[2].duration: 5.1 s at 16 fps is 82.6 frames; the model needs 4n+1 frames: "
        "use 5.0 s (81 frames) or 5.25 s (85 frames)",
        "shots[3].duration: 0.1 s at 16 fps is 2.6 frames; the model needs 4n+1 frames: use 0.25 s (5 frames)",
        "shots[4].duration: 30.0 s at 16 fps is 481 frames; the model allows at most 20.0 s (321 frames)",
        "shots[5].duration: 5.0625 s at 16 fps is 82 frames; the model needs 4n+1 frames: "
        "use 5.0 s (81 frames) or 5.25 s (85 frames)",
    ]
    # At 24 fps no short decimal lands on 4n+1 frames near 1.1 s: suggest frame counts instead.
    assert model_errors_of({"shots": [{"prompt": "a", "duration": 1.1}]}, ModelLimits(fps=24)) == [
        "shots[0].duration: 1.1 s at 24 fps is 27.4 frames; the model needs 4n+1 frames: use 1.0 s (25 frames) "
        "or frames: 29"]


def test_frame_counts_must_be_4n_plus_1_within_the_maximum():
    assert model_errors_of({"shots": [{"prompt": "a", "frames": 80}, {"prompt": "b", "frames": 400},
                                      {"prompt": "c", "frames": 2}]}) == [
        "shots[0].frames: 80 is not 4n+1 frames: use 77 or 81",
        "shots[1].frames: 400 frames exceeds the model's maximum of 321",
        "shots[2].frames: 2 is not 4n+1 frames: use 5",
    ]


def test_resolution_is_refused_with_the_nearest_valid_sizes():
    assert model_errors_of({"shots": [{"prompt": "a", "resolution": "830x480"},
                                      {"prompt": "b", "resolution": [8, 2000]}]}) == [
        "shots[0].resolution: 830x480 does not fit the model: width 830 is not a multiple of 16 "
        "(nearest valid: 816 or 832)",
        "shots[1].resolution: 8x2000 does not fit the model: width 8 is below the minimum of 16 "
        "(nearest valid: 16); height 2000 is above the maximum of 1920 (nearest valid: 1920)",
    ]


def test_story_level_values_are_reported_once_where_written():
    errors = model_errors_of({"resolution": "832x481", "steps": 201, "duration": 4.9,
                              "scenes": [{"shots": [{"prompt": "a"}, {"prompt": "b"}]},
                                         {"shots": [{"prompt": "c", "steps": 300, "frames": 81}]}]})
    assert errors == [
        "duration: 4.9 s at 16 fps is 79.4 frames; the model needs 4n+1 frames: "
        "use 4.75 s (77 frames) or 5.0 s (81 frames)",
        "resolution: 832x481 does not fit the model: "
        "height 481 is not a multiple of 16 (nearest valid: 480 or 496)",
        "steps: 201 steps exceeds the model's maximum of 200",
        "scenes[1].shots[0].steps: 300 steps exceeds the model's maximum of 200",
    ]


# --- shipped stories and ST-Bench ---------------------------------------------------------------

def test_example_lighthouse_story():
    story = check_against_model(load_story(STORIES / "lighthouse.yaml"), LIMITS)
    assert story.format == "native" and story.seed is not None and story.warnings == ()
    assert [(s.scene, s.shot) for s in story.shots] == [(1, 1), (1, 2), (1, 3), (2, 1), (2, 2), (2, 3)]
    assert {s.cut for s in story.shots} == {True, False}
    assert [s.transition for s in story.shots].count("first_frame") == 1
    assert sorted(key for s in story.shots for key in s.overrides()) == ["negative_prompt", "seed"]
    assert all(s.frames is None and s.resolution is None for s in story.shots)  # preset defaults apply


def test_example_minimal_and_storymem_stories():
    minimal = load_story(STORIES / "minimal.yaml")
    assert minimal.format == "native" and len(minimal.shots) == 3
    assert set((STORIES / "minimal.yaml").read_text().split()) >= {"shots:", "prompt:"}
    harbor = check_against_model(load_story(STORIES / "harbor_storymem.json"), LIMITS)
    assert harbor.format == "storymem" and len(harbor.shots) == 5
    assert sorted({s.scene for s in harbor.shots}) == [1, 2] and not all(s.cut for s in harbor.shots)


def test_all_stbench_scripts_load(stbench):  # the fixture skips, with its reason, without ../shared
    stories = [load_story(path) for path in sorted(stbench.glob("*.json"))]
    assert len(stories) == 30
    shots = [shot for story in stories for shot in story.shots]
    assert all(story.format == "storymem" and story.warnings == () for story in stories)
    assert all(7 <= len(story.shots) <= 12 and 1 <= len({s.scene for s in story.shots}) <= 4 for story in stories)
    assert (len(shots), sum(s.cut for s in shots), sum(not s.cut for s in shots)) == (300, 176, 124)
    assert all(s.first_frame_prompt for s in shots)
    for story in stories:
        check_against_model(story, LIMITS)


# --- no input breaks the reader -----------------------------------------------------------------

_text = st.text(st.characters(exclude_categories=()), max_size=12) | st.sampled_from(
    ["832x480", "first_frame", "m2v", "fifo", "", " ", "True", "a.png", "."])
_scalars = (st.none() | st.booleans() | st.integers() | st.integers(-5, 400) | st.floats() | _text)
_values = st.recursive(
    _scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_text, inner, max_size=3), max_leaves=8)
_keys = st.sampled_from([*NATIVE_STORY_KEYS, *NATIVE_SHOT_KEYS, "video_prompts", "scene_num", "story_name",
                         "story_overview", "first_frame_prompt"]) | _text | st.integers(0, 3)
_prompt = st.text(st.characters(categories=["L", "N", "P", "Zs"]), min_size=1, max_size=20) | _text
_setting = (st.integers(-1, 400) | st.floats(-1, 30) | st.sampled_from([0.25, 5.0, 5.1, 81, "832x480", "830x480"])
            | st.lists(st.integers(0, 2000), min_size=2, max_size=2) | _scalars)
_plausible_shot = st.builds(lambda prompt, extra: {**extra, "prompt": prompt}, _prompt,
                           st.dictionaries(st.sampled_from(NATIVE_SHOT_KEYS[1:]), _setting, max_size=2))
_shot = st.dictionaries(_keys, _values | st.just("a prompt"), max_size=6) | _plausible_shot
_native = st.builds(lambda shots, extra: {**extra, "shots": shots},
                    st.lists(_plausible_shot, min_size=1, max_size=4) | st.lists(_shot | _values, max_size=4),
                    st.dictionaries(st.sampled_from(NATIVE_STORY_KEYS), _setting | _values, max_size=2))
_storymem_scene = st.integers(1, 3).flatmap(lambda n: st.fixed_dictionaries(
    {"video_prompts": st.lists(_prompt, min_size=n, max_size=n) | _values}, optional={
        "cut": st.lists(st.booleans(), min_size=n, max_size=n) | st.lists(st.booleans() | _scalars, max_size=3),
        "first_frame_prompt": st.lists(_prompt, min_size=n, max_size=n) | _values,
        "scene_num": st.integers(0, 3) | _scalars, "shots": _values}))
_storymem = st.fixed_dictionaries({"scenes": st.lists(_storymem_scene | _shot, max_size=3)}, optional={
    "story_name": _prompt | _values, "story_overview": _prompt | _values, "shots": _values})
_documents = _native | _storymem | st.dictionaries(_keys, _values, max_size=5) | _values


@settings(max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(_documents)
def test_any_document_yields_a_story_or_a_story_validation_error(document):
    try:
        story = check_against_model(parse_story(document), LIMITS)
    except StoryValidationError as e:
        assert e.errors and all(isinstance(err, FieldError) and "\n" not in err.message for err in e.errors)
        assert len(str(e).splitlines()) == len(e.errors)
        return
    assert isinstance(story, Story) and story.shots and story.shots[0].cut
    assert all(isinstance(s, ShotSpec) and s.prompt.strip() for s in story.shots)


@settings(max_examples=100, deadline=None, database=None)
@given(st.binary(max_size=64) | st.text(max_size=64))
def test_any_text_yields_a_story_or_a_story_validation_error(data):
    try:
        parse_story(data)
    except StoryValidationError as e:
        assert len(str(e).splitlines()) == len(e.errors)


def test_prompts_are_normalised_to_nfc():
    decomposed = "Cafe\u0301 at dawn"  # e + combining acute
    story = parse_story({"shots": [{"prompt": decomposed}]})
    assert story.shots[0].prompt == "Caf\u00e9 at dawn"
