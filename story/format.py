"""Story files: StoryMem's published JSON and storyfarm's native YAML/JSON, read into one Story.

A Story is what the daemon persists and the scheduler walks: an ordered tuple of ShotSpecs, each
with its own prompt (StoryMem conditions every shot on its own prompt only), whether it is a hard
cut (memory only) or continues the previous shot, and the render settings it overrides.
Invariants:
- for bad content, parse_story and load_story raise only StoryValidationError, listing every
  problem found (not the first), each at the field path where it was written;
- the first shot of a story is a cut (a file saying otherwise is read as a cut, with a warning);
- nothing is rounded or coerced silently; model-dependent rules (4n+1 frames, sides that are
  multiples of the VAE stride x patch) live in check_against_model, because they depend on the
  preset, and they too reject with the nearest valid values instead of adjusting;
- story-level settings are defaults that a shot's own value overrides; each shot remembers where
  each of its values was written, so a story-level value that breaks a model limit is reported
  once, at the story-level key;
- the story seed stays on the Story: the engine derives each shot's seed from it and the shot
  index (copying it onto every shot would repeat the same noise, a flaw of the official code).
- an unnamed story is named after its file (`lighthouse` for lighthouse.yaml) or by its caller
  (`name=`); never after where its text came from (an API field, a database row).
Pure Python (no torch): the daemon and the scheduler import it freely. Field readers and the
error types live in fields.py, the model-dependent rules in checks.py, Story and ShotSpec in
spec.py, StoryMem's JSON (and how it is told apart from the native format) in storymem.py.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import yaml

from storyfarm.story.checks import (
    ModelLimits, check_frames, check_references, check_resolution, check_steps, frames_of_duration,
    longest_shot, resolve_mode,
)
from storyfarm.story.fields import (
    MAX_NAME_CHARS, FieldError, FieldErrors, StoryValidationError, check_keys, child, describe,
    read_bool, read_choice, read_guidance, read_int, read_number, read_resolution, read_text,
)
from storyfarm.story.modes import (
    MODES, CsaOptions, FifoOptions, LabelledReferences, read_csa, read_fifo, read_labelled_references,
)
from storyfarm.story.spec import (
    MAX_OVERVIEW_CHARS, MAX_SHOTS, ShotSpec, Story, checked_list, first_shot_cut, read_scene_num,
    read_story_text, too_many_shots,
)
from storyfarm.story.storymem import NATIVE_NAMES, is_storymem, prompts_and_shots, read_storymem

__all__ = [
    "FieldError", "StoryValidationError", "ModelLimits", "ShotSpec", "Story", "FifoOptions", "CsaOptions",
    "load_story", "parse_story", "check_against_model", "MAX_STORY_BYTES", "MAX_SHOTS",
]

MAX_STORY_BYTES = 1 << 20
TRANSITIONS = ("first_frame", "motion_frames")


# --- reading text -------------------------------------------------------------------------

def load_story(path: str | os.PathLike) -> Story:
    """Read a story file; references resolve against its folder, and an unnamed story is named
    after the file (its stem). OSError if it cannot be read."""
    path = os.path.abspath(os.fspath(path))
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        if size > MAX_STORY_BYTES:  # before reading, let alone parsing
            raise StoryValidationError([FieldError("", _too_big(size))], path)
        raw = handle.read(MAX_STORY_BYTES + 1)
    fmt = {".json": "json", ".yaml": "yaml", ".yml": "yaml"}.get(Path(path).suffix.lower())
    return parse_story(raw, source=path, base_dir=os.path.dirname(path), fmt=fmt, name=Path(path).stem)


def parse_story(data: str | bytes | dict, *, source: str = "<inline>",
                base_dir: str | os.PathLike | None = None, fmt: str | None = None, name: str = "") -> Story:
    """Read a story from text (JSON or YAML, sniffed unless `fmt` says) or an already parsed dict.

    Relative reference paths resolve against base_dir (the current directory when None). `name`
    names a story whose text has no name (a file's stem; "" leaves it unnamed): `source` only says
    where the text came from in messages, so an API field or a database row never names a story.
    """
    if fmt not in (None, "json", "yaml"):
        raise ValueError(f"fmt must be 'json', 'yaml' or None, not {fmt!r}")
    errors = FieldErrors()
    document = _parse_text(data, fmt, errors) if isinstance(data, (str, bytes, bytearray)) else data
    errors.raise_if_any(source)
    base = os.path.abspath(os.fspath(base_dir)) if base_dir is not None else os.getcwd()
    story = _read_document(document, source, name, base, errors)
    errors.raise_if_any(source)
    return story


def _too_big(size: int) -> str:
    return f"the story is {size} bytes; the limit is {MAX_STORY_BYTES} bytes (1 MiB)"


def _parse_text(data: str | bytes | bytearray, fmt: str | None, errors: FieldErrors) -> Any:
    if isinstance(data, str):
        size = len(data) if len(data) > MAX_STORY_BYTES else len(data.encode("utf-8", "surrogatepass"))
    else:
        size = len(data)
    if size > MAX_STORY_BYTES:
        errors.add("", _too_big(size))
        return None
    if isinstance(data, str):
        text = data.removeprefix("\ufeff")
    else:
        try:
            text = bytes(data).decode("utf-8-sig")
        except UnicodeDecodeError as e:
            errors.add("", f"not valid UTF-8: byte 0x{data[e.start]:02x} at offset {e.start}")
            return None
    if fmt is None:
        fmt = "json" if text.lstrip()[:1] in ("{", "[") else "yaml"
    try:
        return json.loads(text) if fmt == "json" else yaml.safe_load(text)
    except json.JSONDecodeError as e:
        errors.add("", f"invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}")
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        errors.add("", f"invalid YAML{where}: {' '.join(str(e.problem or e.context).split())}")
    except RecursionError:
        errors.add("", f"invalid {fmt.upper()}: nested too deeply")
    except Exception as e:  # noqa: BLE001 - any parser failure on untrusted text is a bad story
        reason = " ".join(str(e).split())[:300]
        if "integer string conversion" in reason:  # Python's int() digit limit, not the user's concern
            reason = "a number has too many digits"
        errors.add("", f"invalid {fmt.upper()}: {reason}")
    return None


# --- reading documents ----------------------------------------------------------------------

def _read_document(document: Any, source: str, default_name: str, base: str, errors: FieldErrors) -> Story | None:
    if not isinstance(document, dict):
        errors.add("", "the story is empty" if document is None
                   else f"expected a mapping at the top level, got {describe(document)}")
        return None
    storymem_at, native_at = prompts_and_shots(document)
    if storymem_at and (native_at or "shots" in document):
        where = f"scenes[{native_at[0]}].shots" if native_at else "shots"
        errors.add(where, f"native shots mixed with StoryMem's video_prompts (scenes[{storymem_at[0]}]);"
                          " a story file uses one format")
        return None
    if is_storymem(document):
        return read_storymem(document, source, default_name, base, errors)
    return _read_native(document, source, default_name, base, errors)


# Native settings: key -> reader(value, path, errors, base_dir). Shared by the story level
# (defaults) and the shot level, so both accept exactly the same values.
_Reader = Callable[[Any, str, FieldErrors, str], Any]
SETTINGS: dict[str, _Reader] = {
    "negative_prompt": lambda v, p, e, b: read_text(v, p, e, allow_empty=True),
    "seed": lambda v, p, e, b: read_int(v, p, e, minimum=0, below=2**63, below_text="2**63"),
    "duration": lambda v, p, e, b: read_number(v, p, e, what="a number of seconds"),
    "frames": lambda v, p, e, b: read_int(v, p, e, minimum=1),
    "mode": lambda v, p, e, b: read_choice(v, p, e, MODES),
    "fifo": lambda v, p, e, b: read_fifo(v, p, e),
    "references": lambda v, p, e, b: read_labelled_references(v, p, e, b),
    "resolution": lambda v, p, e, b: read_resolution(v, p, e),
    "steps": lambda v, p, e, b: read_int(v, p, e, minimum=1),
    "guidance": lambda v, p, e, b: read_guidance(v, p, e),
    "shift": lambda v, p, e, b: read_number(v, p, e),
}
NATIVE_STORY_KEYS = ("name", "overview", "shots", "scenes", "csa", *SETTINGS)
NATIVE_SCENE_KEYS = ("name", "scene_num", "shots")
NATIVE_SHOT_KEYS = ("prompt", "first_frame_prompt", "cut", "transition", *SETTINGS)
_LENGTH_KEYS = ("duration", "frames")


def _read_settings(mapping: dict, path: str, base: str, errors: FieldErrors) -> dict[str, tuple[Any, str]]:
    """The settings written in `mapping`: name -> (value, path where written)."""
    if all(key in mapping for key in _LENGTH_KEYS):
        errors.add(child(path, "frames"), "duration is also set; use either duration or frames")
    settings = {}
    for key, reader in SETTINGS.items():
        if key in mapping:
            value = reader(mapping[key], child(path, key), errors, base)
            if value is not None:
                settings[key] = (value, child(path, key))
    return settings


def _read_native(document: dict, source: str, default_name: str, base: str, errors: FieldErrors) -> Story:
    check_keys(document, "", NATIVE_STORY_KEYS, errors, aliases=NATIVE_NAMES)
    name = read_story_text(document, "name", errors, default_name, limit=MAX_NAME_CHARS, one_line=True)
    overview = read_story_text(document, "overview", errors, "", limit=MAX_OVERVIEW_CHARS, allow_empty=True)
    story_settings = _read_settings(document, "", base, errors)
    seed = story_settings.pop("seed", (None, ""))[0]
    references = story_settings.pop("references", (LabelledReferences((), ()), ""))[0]
    csa = read_csa(document["csa"], "csa", errors) if "csa" in document else None

    scenes: list[tuple[int, str, Any]] = []  # (scene number, path of its shot list, shot list)
    if "shots" in document and "scenes" in document:
        errors.add("shots", "use either shots or scenes, not both")
    elif "shots" in document:
        scenes.append((1, "shots", document["shots"]))
    elif "scenes" in document:
        used: dict[int, str] = {}
        for s, scene in enumerate(checked_list(document["scenes"], "scenes", errors, "scenes") or ()):
            path = f"scenes[{s}]"
            if not isinstance(scene, dict):
                errors.add(path, f"expected a mapping with shots, got {describe(scene)}")
                continue
            check_keys(scene, path, NATIVE_SCENE_KEYS, errors)
            if "name" in scene:
                read_text(scene["name"], f"{path}.name", errors, limit=MAX_NAME_CHARS, one_line=True)
            scene_num = read_scene_num(scene, path, s + 1, used, errors, required=False)
            scenes.append((scene_num, f"{path}.shots", scene.get("shots")))
    else:
        errors.add("shots", "required field is missing (a story needs shots, or scenes with shots)")

    shot_lists = [(num, path, checked_list(raw, path, errors, "shots") or []) for num, path, raw in scenes]
    count = sum(len(shots) for _, _, shots in shot_lists)
    if too_many_shots(count, "shots" if "shots" in document else "scenes", errors):
        return None
    shots: list[ShotSpec] = []
    warnings: list[str] = []
    for scene_num, list_path, raw_shots in shot_lists:
        for i, raw in enumerate(raw_shots):
            shot = _read_native_shot(raw, f"{list_path}[{i}]", story_settings, base, errors, warnings,
                                     index=len(shots), scene=scene_num, number=i + 1)
            if shot is not None:
                shots.append(shot)
    return Story(name=name, overview=overview, format="native", source=source, seed=seed,
                 references=references.paths, reference_labels=references.labels, shots=tuple(shots),
                 warnings=tuple(warnings), csa=csa)


def _read_native_shot(raw: Any, path: str, story_settings: dict[str, tuple[Any, str]], base: str,
                      errors: FieldErrors, warnings: list[str], *, index: int, scene: int,
                      number: int) -> ShotSpec | None:
    if not isinstance(raw, dict):
        errors.add(path, f"expected a mapping with a prompt, got {describe(raw)}")
        return None
    check_keys(raw, path, NATIVE_SHOT_KEYS, errors)
    prompt = None
    if "prompt" in raw:
        prompt = read_text(raw["prompt"], f"{path}.prompt", errors)
    else:
        errors.add(f"{path}.prompt", "required field is missing")
    first_frame = None
    if "first_frame_prompt" in raw:
        first_frame = read_text(raw["first_frame_prompt"], f"{path}.first_frame_prompt", errors,
                                allow_empty=True) or None
    transition = None
    if "transition" in raw:
        transition = read_choice(raw["transition"], f"{path}.transition", errors, TRANSITIONS)
    # A shot is a cut unless it says cut: false, or names how it continues (a transition).
    cut = read_bool(raw["cut"], f"{path}.cut", errors) if "cut" in raw else "transition" not in raw
    if "transition" in raw and cut is True:
        errors.add(f"{path}.transition", "only continuation shots (cut: false) take a transition")
    elif index == 0 and "transition" in raw:
        errors.add(f"{path}.transition",
                   "the first shot of a story is a cut: there is no shot before it to continue")
    elif index == 0:
        cut = first_shot_cut(cut, f"{path}.cut", warnings)

    own = _read_settings(raw, path, base, errors)
    inherited = {key: value for key, value in story_settings.items()
                 if key not in own and not (key in _LENGTH_KEYS and any(k in own for k in _LENGTH_KEYS))}
    values = {key: value for key, (value, _) in {**inherited, **own}.items()}
    if "references" in values:
        values["references"], values["reference_labels"] = values.pop("references")
    return ShotSpec(index=index, scene=scene, shot=number, path=path, prompt=prompt,
                    first_frame_prompt=first_frame, cut=bool(cut),
                    transition=None if cut else transition,
                    inherited_from=tuple((key, where) for key, (_, where) in inherited.items()),
                    **values)


# --- model-dependent checks -------------------------------------------------------------------

def check_against_model(story: Story, limits: ModelLimits) -> Story:
    """Check frames, durations, resolutions and steps against a model preset's limits.

    Returns a Story whose shots have `frames` filled from `duration` and `mode` resolved (auto
    becomes fifo for shots longer than the model's native length, m2v otherwise); raises
    StoryValidationError listing every violation, each once, at the path where the offending value
    was written.
    """
    errors = FieldErrors()
    check_references(len(story.references), "references", limits, errors)
    shots = []
    for shot in story.shots:
        frames = shot.frames
        longest = longest_shot(shot.mode, limits)
        if shot.duration is not None:
            frames = frames_of_duration(shot.duration, shot.written_at("duration"), limits, errors, longest)
        elif shot.frames is not None:
            check_frames(shot.frames, shot.written_at("frames"), limits, errors, longest)
        if shot.resolution is not None:
            check_resolution(shot.resolution, shot.written_at("resolution"), limits, errors)
        if shot.steps is not None:
            check_steps(shot.steps, shot.written_at("steps"), limits, errors)
        shots.append(replace(shot, frames=frames, mode=resolve_mode(shot.mode, frames, limits)))
    errors.raise_if_any(story.source)
    return replace(story, shots=tuple(shots))
