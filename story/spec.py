"""What a story is once read, whatever file it came from: Story and ShotSpec, and the structural
rules both file formats share (scene numbers, the shot-count limit, the first shot is a cut).

Why a module of its own: the two readers (storymem.py for StoryMem's published JSON, format.py for
storyfarm's native YAML/JSON) build the same objects and must apply the same rules with the same
messages; keeping those here lets each reader live in its own module without importing the other.
Pure Python (no torch).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from storyfarm.story.fields import FieldErrors, child, describe, read_int, read_text
from storyfarm.story.modes import CsaOptions, FifoOptions
from storyfarm.story.numbering import shot_number

MAX_SHOTS = 1000
MAX_OVERVIEW_CHARS = 10_000
# The settings a shot may override; render settings are what ShotSpec.overrides() reports.
RENDER_SETTINGS = ("negative_prompt", "seed", "frames", "resolution", "steps", "guidance", "shift")


@dataclass(frozen=True)
class ShotSpec:
    index: int              # 0-based over the whole story (people see shot_number(index): story/numbering.py)
    scene: int              # StoryMem scene_num, or the scene's scene_num / 1-based position (native)
    shot: int               # 1-based within its scene
    path: str               # where it was written: "scenes[1].video_prompts[2]", "shots[3]"
    prompt: str
    first_frame_prompt: str | None
    cut: bool
    transition: str | None  # cuts: None; continuations: "first_frame" | "motion_frames" | None (engine's)
    negative_prompt: str | None = None
    seed: int | None = None
    frames: int | None = None        # filled from duration by check_against_model
    duration: float | None = None
    mode: str = "auto"  # "auto" (fifo when longer than the preset's native length), "m2v", "fifo"
    fifo: FifoOptions | None = None
    references: tuple[str, ...] = ()  # absolute paths: memory images added just before this shot
    reference_labels: tuple[str | None, ...] = ()  # the character or place of each reference, or None
    resolution: tuple[int, int] | None = None  # (width, height)
    steps: int | None = None
    guidance: tuple[float, float] | None = None  # (high_noise, low_noise)
    shift: float | None = None
    # (setting, path) for settings written somewhere other than this shot (story-level defaults).
    inherited_from: tuple[tuple[str, str], ...] = field(default=(), compare=False, repr=False)

    def overrides(self) -> dict:
        """The render settings this shot sets (its own or story-level), without the unset ones."""
        return {name: getattr(self, name) for name in RENDER_SETTINGS if getattr(self, name) is not None}

    def written_at(self, setting: str) -> str:
        """The path where this shot's value of `setting` was written."""
        return dict(self.inherited_from).get(setting, f"{self.path}.{setting}")

    @property
    def clip_file(self) -> str:
        """The shot's clip, relative to the story folder: what every worker (real or fake)
        publishes it as (names are made here, never by users)."""
        return f"shots/{shot_number(self.index):03d}_scene{self.scene:02d}_shot{self.shot:02d}.mp4"


@dataclass(frozen=True)
class Story:
    name: str
    overview: str
    format: str                    # "storymem" | "native"
    source: str                    # file path or "<inline>"
    seed: int | None
    references: tuple[str, ...]    # absolute paths: the story's initial memory (MR2V)
    shots: tuple[ShotSpec, ...]
    warnings: tuple[str, ...] = ()
    reference_labels: tuple[str | None, ...] = ()  # the character or place of each reference, or None
    csa: CsaOptions | None = None  # Consistent Self-Attention for the whole story, when asked for

    def shot_seed(self, shot: ShotSpec, base: int | None = None) -> int:
        """The seed `shot` renders with: its own, else the base seed (`base`, the command line's,
        over the story's, else 0) plus its index in the whole story, so seeds never repeat per scene."""
        if shot.seed is not None:
            return shot.seed
        return (base if base is not None else self.seed if self.seed is not None else 0) + shot.index


def read_story_text(document: dict, key: str, errors: FieldErrors, default: str, **rules) -> str:
    """A story-level text (name, overview): `default` when absent or unreadable."""
    if key not in document:
        return default
    return read_text(document[key], key, errors, **rules) or default


def read_scene_num(scene: dict, path: str, position: int, used: dict[int, str],
                   errors: FieldErrors, required: bool) -> int:
    """A scene's number (unique in the story), or its 1-based position when it has none."""
    if "scene_num" not in scene and required:
        errors.add(child(path, "scene_num"), "required field is missing")
    number = position
    if "scene_num" in scene:
        number = read_int(scene["scene_num"], child(path, "scene_num"), errors, minimum=1) or position
        if number in used:
            errors.add(child(path, "scene_num"), f"{number} is already used by {used[number]}")
    used.setdefault(number, path)
    return number


def checked_list(value: Any, path: str, errors: FieldErrors, what: str) -> list | None:
    if isinstance(value, list) and value:
        return value
    errors.add(path, f"expected a non-empty list of {what}, got {describe(value)}")
    return None


def too_many_shots(count: int, path: str, errors: FieldErrors) -> bool:
    if count > MAX_SHOTS:
        errors.add(path, f"the story has {count} shots; the limit is {MAX_SHOTS}")
    return count > MAX_SHOTS


def first_shot_cut(cut: bool | None, cut_path: str, warnings: list[str]) -> bool | None:
    """The first shot of a story is a cut whatever the file says (nothing comes before it)."""
    if cut is False:
        warnings.append(f"{cut_path}: the first shot of a story is always a cut; read as cut: true")
        return True
    return cut
