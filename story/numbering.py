"""Shot numbers: the one convention for counting shots (and a shot's frames) everywhere.

The rule:
- people count from 1. Everything a person reads or types names a shot by its *number*, 1 for the
  story's first shot: the CLI's arguments (`render --shot N`, `retry-shot STORY N`, `rerender
  STORY N`), its text output (`get`'s SHOT column, `watch`'s bars and lines, `render`'s bars and
  summary), clip file names (`001_scene01_shot01.mp4`), contact-sheet labels, keyframe ids and the
  daemon's error messages;
- programs count from 0. A shot's *index* is its position in the story's list of shots: the
  gRPC API (`shot_index`, `Shot.index`), `--json` output (`index`, with `number` beside it), the
  store, manifests and the memory bank's records keep it;
- a keyframe id names the shot's number and the frame's number within the published clip, both
  from 1: `s001f001` is shot 1's first frame (shot index 0, frame index 0);
- where a message names the wire field it gives both: "shot_index 5 (shot 6)".

Conversions between the two happen only through this module. Pure Python (no torch).
"""

from __future__ import annotations

import re

__all__ = ["shot_number", "shot_index", "shot_label", "wire_shot", "keyframe_id", "keyframe_indices"]

_KEYFRAME_ID = re.compile(r"s(\d{3,})f(\d{3,})")


def shot_number(index: int) -> int:
    """The number people see for the shot at 0-based `index`."""
    return index + 1


def shot_index(number: int, count: int | None = None, *, name: str = "shot") -> int:
    """The 0-based index of shot `number` (counting from 1). ValueError naming `name` (the argument
    as the user wrote it, e.g. "--shot") and the allowed range when `number` is below 1 or, given
    the story's shot `count`, above it."""
    if number < 1 or (count is not None and number > count):
        allowed = f"this story has shots 1 to {count}" if count else "the first shot is 1"
        raise ValueError(f"{name} {number}: shot numbers count from 1; {allowed}")
    return number - 1


def shot_label(index: int, count: int | None = None, scene: int | None = None, shot: int | None = None) -> str:
    """"shot 6", "shot 6 of 6", "shot 3 (scene 1.3)" or "shot 6 of 6 (scene 1.3)" for the shot at
    0-based `index`; `scene`.`shot` is its place in its scene (both already count from 1)."""
    text = f"shot {shot_number(index)}" + (f" of {count}" if count else "")
    return text + (f" (scene {scene}.{shot})" if scene is not None and shot is not None else "")


def wire_shot(index: int) -> str:
    """A shot as a message that names the API's field calls it: "shot_index 5 (shot 6)"."""
    return f"shot_index {index} (shot {shot_number(index)})"


def keyframe_id(shot_index: int, frame_index: int) -> str:
    """The id of the keyframe taken from frame `frame_index` (0-based, of the published clip) of the
    shot at `shot_index` (0-based): numbers from 1, `s001f001` for shot 1's first frame."""
    if shot_index < 0 or frame_index < 0:
        raise ValueError(f"keyframe of shot index {shot_index}, frame index {frame_index}: indices count from 0")
    return f"s{shot_number(shot_index):03d}f{frame_index + 1:03d}"


def keyframe_indices(keyframe: str) -> tuple[int, int] | None:
    """(shot index, frame index), both 0-based, of a shot keyframe's id; None for any other id
    (a reference such as `ref00`)."""
    match = _KEYFRAME_ID.fullmatch(keyframe)
    if match is None or int(match[1]) < 1 or int(match[2]) < 1:
        return None
    return int(match[1]) - 1, int(match[2]) - 1
