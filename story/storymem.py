"""StoryMem's published JSON: telling it apart from storyfarm's native format, and reading it.

A StoryMem script is `{story_name, story_overview, scenes: [{scene_num, video_prompts: [...],
first_frame_prompt: [...], cut: [...]}]}` (one entry per shot in each per-shot list). The format
is told by its keys, not by the one key that happens to be complete: a StoryMem file missing
`video_prompts` must be reported as such (`scenes[0].video_prompts: required field is missing`),
not read as a native file full of unknown keys. The two formats name the same things differently,
so a key of one used in the other gets the other's name as its suggestion (NATIVE_NAMES).
Pure Python (no torch).
"""

from __future__ import annotations

from storyfarm.story.fields import (
    MAX_NAME_CHARS, FieldErrors, check_keys, describe, read_bool, read_text,
)
from storyfarm.story.modes import LabelledReferences, read_labelled_references
from storyfarm.story.spec import (
    MAX_OVERVIEW_CHARS, ShotSpec, Story, checked_list, first_shot_cut, read_scene_num, read_story_text,
    too_many_shots,
)

# `references` is storyfarm's addition (the images' names, in memory order): the daemon adds it to a
# StoryMem story submitted with reference images; StoryMem's own files never have it.
STORYMEM_STORY_KEYS = ("story_name", "story_overview", "scenes", "references")
STORYMEM_SCENE_KEYS = ("scene_num", "video_prompts", "first_frame_prompt", "cut")
# StoryMem key -> the native key for the same thing (and back): the "did you mean" of either format.
NATIVE_NAMES = {"story_name": "name", "story_overview": "overview"}
STORYMEM_NAMES = {native: storymem for storymem, native in NATIVE_NAMES.items()}
# Keys only StoryMem has: its story-level texts, and its scenes' per-shot lists.
_STORY_MARKERS = tuple(NATIVE_NAMES)
_SCENE_MARKERS = ("video_prompts", "first_frame_prompt", "cut")


def _scenes(document: dict) -> list:
    scenes = document.get("scenes")
    return scenes if isinstance(scenes, list) else []


def prompts_and_shots(document: dict) -> tuple[list[int], list[int]]:
    """Positions of the scenes holding StoryMem's video_prompts, and of those holding native shots."""
    scenes = _scenes(document)
    return ([i for i, s in enumerate(scenes) if isinstance(s, dict) and "video_prompts" in s],
            [i for i, s in enumerate(scenes) if isinstance(s, dict) and "shots" in s])


def is_storymem(document: dict) -> bool:
    """StoryMem's format, told by its keys: scenes with video_prompts; otherwise, unless native shots
    say it is storyfarm's format, any key only StoryMem has (story_name, story_overview, a scene's
    first_frame_prompt or cut list)."""
    prompts, native_scenes = prompts_and_shots(document)
    if prompts:
        return True
    if native_scenes or "shots" in document:
        return False
    return any(key in document for key in _STORY_MARKERS) or any(
        isinstance(scene, dict) and key in scene for scene in _scenes(document) for key in _SCENE_MARKERS)


def read_storymem(document: dict, source: str, default_name: str, base: str, errors: FieldErrors) -> Story | None:
    check_keys(document, "", STORYMEM_STORY_KEYS, errors, aliases=STORYMEM_NAMES)
    references = LabelledReferences((), ())
    if "references" in document:
        references = read_labelled_references(document["references"], "references", errors, base) or references
    name = read_story_text(document, "story_name", errors, default_name, limit=MAX_NAME_CHARS, one_line=True)
    overview = read_story_text(document, "story_overview", errors, "", limit=MAX_OVERVIEW_CHARS,
                               allow_empty=True)
    if "scenes" not in document:
        errors.add("scenes", "required field is missing")
        return None
    scenes = checked_list(document["scenes"], "scenes", errors, "scenes") or []
    count = sum(len(s["video_prompts"]) for s in scenes
                if isinstance(s, dict) and isinstance(s.get("video_prompts"), list))
    if too_many_shots(count, "scenes", errors):
        return None
    shots: list[ShotSpec] = []
    warnings: list[str] = []
    used: dict[int, str] = {}
    for s, scene in enumerate(scenes):
        path = f"scenes[{s}]"
        if not isinstance(scene, dict):
            errors.add(path, f"expected a mapping with video_prompts, got {describe(scene)}")
            continue
        check_keys(scene, path, STORYMEM_SCENE_KEYS, errors)
        scene_num = read_scene_num(scene, path, s + 1, used, errors, required=True)
        if "video_prompts" not in scene:  # the per-shot lists have nothing to match: say what is missing
            errors.add(f"{path}.video_prompts", "required field is missing")
            continue
        prompts = checked_list(scene["video_prompts"], f"{path}.video_prompts", errors, "prompts")
        if prompts is None:
            continue
        cuts = _parallel_list(scene, "cut", path, len(prompts), errors, required=True)
        first_frames = _parallel_list(scene, "first_frame_prompt", path, len(prompts), errors, required=False)
        for i, raw_prompt in enumerate(prompts):
            prompt = read_text(raw_prompt, f"{path}.video_prompts[{i}]", errors)
            cut = read_bool(cuts[i], f"{path}.cut[{i}]", errors) if cuts else None
            if not shots:
                cut = first_shot_cut(cut, f"{path}.cut[{i}]", warnings)
            first_frame = None
            if first_frames:
                first_frame = read_text(first_frames[i], f"{path}.first_frame_prompt[{i}]", errors,
                                        allow_empty=True) or None
            shots.append(ShotSpec(index=len(shots), scene=scene_num, shot=i + 1,
                                  path=f"{path}.video_prompts[{i}]", prompt=prompt,
                                  first_frame_prompt=first_frame, cut=bool(cut), transition=None))
    return Story(name=name, overview=overview, format="storymem", source=source, seed=None,
                 references=references.paths, reference_labels=references.labels, shots=tuple(shots),
                 warnings=tuple(warnings))


def _parallel_list(scene: dict, key: str, path: str, length: int, errors: FieldErrors,
                   required: bool) -> list | None:
    """A StoryMem per-shot list (cut, first_frame_prompt): one entry per video prompt."""
    if key not in scene:
        if required:
            errors.add(f"{path}.{key}", "required field is missing")
        return None
    value = scene[key]
    if not isinstance(value, list):
        errors.add(f"{path}.{key}", f"expected a list, got {describe(value)}")
        return None
    if len(value) != length:
        errors.add(f"{path}.{key}", f"has {len(value)} entries; video_prompts has {length}")
        return None
    return value
