"""The folder a local render writes (`storyfarm render STORY --out DIR`): when a render may start,
resume or replace another there, and what a re-render of one shot needs from it.

Why: manifest.json is written once every shot is done, so a render stopped by Ctrl-C (or a crash)
leaves published shots and the memory they made but no manifest. Those shots are worth keeping:
the memory bank on disk is the render's state (StoryRenderer.render_shot is safe in a fresh process
for any shot whose predecessors are published, and a shot rendered again sees exactly the memory
it saw the first time), so running the same command again resumes after the last published shot
and ends with the files an uninterrupted render makes. What marks a folder as a storyfarm render
from its first moment is `render.json`, written atomically before the first shot: what the shots
depend on (the story, the preset, the command line's settings) and each shot's manifest entry,
added as the shot is published.

Invariants:
- a folder that is neither new, empty, a finished render (manifest.json) nor holds a render.json of
  ours is refused untouched, and so is an interrupted render of another story, preset or settings
  (the error names --out and what differs); nothing is deleted before these checks pass;
- a finished render, or an interrupted one with no shot published, is replaced;
- a shot counts as published only when render.json holds its entry and its clip still has the
  recorded sha256; a render resumes at the first shot that is not, after rewinding the memory bank
  to the memory that stood before it;
- every check here reads files only, so the CLI makes them before any model loads.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path

from storyfarm.m2v.memory.bank import MemoryBank
from storyfarm.story.files import sha256_file, write_json
from storyfarm.story.format import Story
from storyfarm.story.numbering import shot_number
from storyfarm.story.presets import Preset

MARKER = "render.json"
MARKER_FORMAT = "storyfarm-render"
MARKER_VERSION = 1
# Everything a render writes; the only names it ever deletes.
OWNED = ("shots", "keyframes", "csa", "story.mp4", "contact_sheet.png", "manifest.json", MARKER)


def render_identity(story: Story, preset: Preset, settings) -> dict:
    """What a render's shots depend on: the story's content (its shots, settings and reference
    images' bytes; not where its file lies or what it is called), the preset's whole definition,
    and the command line's `settings` (a RenderSettings). Plain JSON values, as render.json holds them."""
    content = dataclasses.asdict(dataclasses.replace(story, name="", source="", warnings=()))
    content["references"] = [sha256_file(p) for p in story.references]
    for shot, spec in zip(content["shots"], story.shots):
        shot.pop("inherited_from")  # where a value was written, not what it is
        shot["references"] = [sha256_file(p) for p in spec.references]
    identity = {
        "story_sha256": _sha256_json(content),
        "preset": preset.name,
        "preset_sha256": _sha256_json(preset.model_dump(mode="json")),
        "settings": dataclasses.asdict(settings),
    }
    return json.loads(json.dumps(identity))  # tuples as lists: compares equal to what render.json holds


def _sha256_json(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=list).encode()).hexdigest()


def check_output(out_dir: str | os.PathLike, identity: dict) -> list[dict]:
    """Refuse, before any work, a folder this render may not write (FileExistsError); return the
    manifest entries of the shots an interrupted render of the same story published, in order (the
    render resumes after them), or [] when it starts afresh."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out}: exists and is not a folder")
    if not out.is_dir() or not any(out.iterdir()) or (out / "manifest.json").is_file():
        return []  # new, empty, or a finished render (replaced)
    marker = _read_marker(out)
    if marker is None:
        raise FileExistsError(f"--out {out}: folder is not empty and holds no storyfarm render (no manifest.json "
                              f"or {MARKER}); choose an empty folder")
    done = _published(out, marker)
    differs = _differences(marker, identity)
    if done and differs:
        raise FileExistsError(
            f"--out {out}: holds an interrupted render ({len(done)} shot(s) published) of {'; '.join(differs)}. "
            "Run the command of that render again to resume it, or choose another folder; nothing was changed")
    return done


def prepare_output(out_dir: str | os.PathLike, identity: dict) -> list[dict]:
    """Make `out_dir` ready for a render (checked as check_output) and return the entries of the
    shots it resumes after. A fresh start marks the folder first, then clears what an earlier
    render left; a resume forgets the memory of shots past the published ones."""
    out = Path(out_dir)
    done = check_output(out, identity)
    out.mkdir(parents=True, exist_ok=True)
    record_shots(out, identity, done)  # from here on, an interruption leaves a folder we recognise
    if done:
        MemoryBank.open(out / "keyframes").rewind(len(done))
        return done
    for p in (out / name for name in OWNED if name != MARKER):  # all but the marker just written
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
    (out / "shots").mkdir()
    (out / "keyframes").mkdir()
    return []


def record_shots(out_dir: str | os.PathLike, identity: dict, entries: list[dict]) -> None:
    """render.json with the manifest entries of the shots published so far (atomically)."""
    write_json(Path(out_dir) / MARKER, {"format": MARKER_FORMAT, "version": MARKER_VERSION, **identity,
                                        "shots": entries})


def earlier_render(out_dir: str | os.PathLike, story: Story, index: int) -> dict[int, dict]:
    """The manifest entries (by shot index) of the finished render of `story` in `out_dir` whose
    shot `index` a re-render replaces; FileNotFoundError or ValueError when there is none to re-render."""
    out = Path(out_dir)
    if not 0 <= index < len(story.shots):
        raise ValueError(f"shot index {index} (shot {shot_number(index)}): the story has shots 1 to {len(story.shots)}")
    if not (out / "manifest.json").is_file():
        hint = "; an interrupted render resumes with its own command, without --shot" if _read_marker(out) else ""
        raise FileNotFoundError(f"--out {out}: no manifest.json of an earlier render to re-render a shot of{hint}")
    try:
        previous = json.loads((out / "manifest.json").read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"--out {out}: its manifest.json cannot be read ({exc})") from None
    entries = {e["index"]: e for e in previous.get("shots", [])}
    if sorted(entries) != list(range(len(story.shots))):
        raise ValueError(f"--out {out}: its manifest has shots {[shot_number(i) for i in sorted(entries)]}, "
                         f"the story has {len(story.shots)}")
    return entries


def _read_marker(out: Path) -> dict | None:
    try:
        marker = json.loads((out / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and marker.get("format") == MARKER_FORMAT else None


def _published(out: Path, marker: dict) -> list[dict]:
    """The leading shots whose entry is recorded and whose clip is still the one recorded."""
    done: list[dict] = []
    for entry in marker.get("shots") or []:
        clip = out / str(entry.get("file", ""))
        if entry.get("index") != len(done) or not clip.is_file() or sha256_file(clip) != entry.get("sha256"):
            break
        done.append(entry)
    return done


def _differences(marker: dict, identity: dict) -> list[str]:
    """What the interrupted render in the folder had that this one has not, in the user's words."""
    said = []
    if marker.get("story_sha256") != identity["story_sha256"]:
        said.append("another story (its shots, their settings or its reference images differ)")
    if marker.get("preset") != identity["preset"]:
        said.append(f"preset {marker.get('preset')} (this command: {identity['preset']})")
    elif marker.get("preset_sha256") != identity["preset_sha256"]:
        said.append(f"preset {identity['preset']} as it was defined then (it has changed since)")
    before = marker.get("settings") or {}
    for key, value in identity["settings"].items():
        if before.get(key) != value:
            said.append(f"--{key} {_option(before.get(key))} (this command: {_option(value)})")
    return said


def _option(value) -> str:
    if value is None:
        return "unset"
    return "x".join(map(str, value)) if isinstance(value, list) else str(value)
