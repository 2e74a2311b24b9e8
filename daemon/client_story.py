"""Story files made ready to submit, read as `storyfarm render` reads them: the images a story names
come from beside the file and go with it.

Why its own module: a submit from the command line or the Python client sends a file's text and
its images as one request, and must name a missing image (file, field, path) before anything is
sent; the daemon takes image names, never paths of the client's disk, so a story naming
`images/hero.png` is sent naming its upload name `hero.png`. client_wire builds the request from
what this module returns.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import yaml

from storyfarm.story.fields import child
from storyfarm.story.references import REFERENCE_NAME

STORY_SUFFIXES = {".json": "story_json", ".yaml": "story_yaml", ".yml": "story_yaml"}


def story_path(story: str | Path) -> Path | None:
    """The story file `story` names, None when it is story text; FileNotFoundError when it looks
    like a file name (one line, a story suffix) but names no file."""
    text = str(story)
    looks_like_path = isinstance(story, Path) or ("\n" not in text and Path(text).suffix.lower() in STORY_SUFFIXES)
    if looks_like_path or ("\n" not in text and len(text) < 4096 and Path(text).is_file()):
        path = Path(text)
        if not path.is_file():
            raise FileNotFoundError(f"story file {path}: no such file")
        return path
    return None


def file_kind(path: Path, body: str) -> str:
    kind = STORY_SUFFIXES.get(path.suffix.lower())
    return kind or ("story_json" if body.lstrip().startswith("{") else "story_yaml")


class StoryFileError(ValueError):
    """A story file that cannot be submitted: `problems` are (field path, message) pairs, the
    path "" meaning the whole file. str() names the file and every problem, one per line."""

    def __init__(self, path: str | Path, problems: list[tuple[str, str]]):
        self.path, self.problems = str(path), list(problems)
        super().__init__("\n".join(f"{self.path}: {field}: {message}" if field else f"{self.path}: {message}"
                                   for field, message in self.problems))


@dataclass(frozen=True)
class StoryFile:
    """A story file made ready to submit, as `storyfarm render` would read it: `fields` is the
    request's story oneof and default_name; `references` maps upload names to image files, the
    images the story names first (read relative to the story's folder, unless an explicit
    reference of the same name replaces one), then the other explicit ones. When a story names an
    image by a path that is not a bare file name (`images/hero.png`), the text sent names it by
    its upload name instead (the daemon takes names, never paths)."""

    path: Path
    fields: dict[str, str]
    references: dict[str, Path]

    @property
    def text(self) -> str:
        return next(v for k, v in self.fields.items() if k != "default_name")


def _reference_slots(document: dict) -> Iterator[tuple[str, Any, Any]]:
    """(field path, container, key) of every image path a native or StoryMem document names:
    the story's `references`, and each shot's (under shots, or scenes[].shots); a references
    value is a list of paths or a mapping of character or place to a path or a list of them."""
    def walk_refs(value: Any, path: str) -> Iterator[tuple[str, Any, Any]]:
        if isinstance(value, list):
            for i, item in enumerate(value):
                if isinstance(item, str):
                    yield child(path, i), value, i
        elif isinstance(value, dict):
            for label, images in value.items():
                if isinstance(images, str):
                    yield child(path, label), value, label
                elif isinstance(images, list):
                    yield from walk_refs(images, child(path, label))

    def walk_shots(shots: Any, path: str) -> Iterator[tuple[str, Any, Any]]:
        for i, shot in enumerate(shots if isinstance(shots, list) else ()):
            if isinstance(shot, dict) and "references" in shot:
                yield from walk_refs(shot["references"], f"{child(path, i)}.references")

    if "references" in document:
        yield from walk_refs(document["references"], "references")
    yield from walk_shots(document.get("shots"), "shots")
    for s, scene in enumerate(document.get("scenes") if isinstance(document.get("scenes"), list) else ()):
        if isinstance(scene, dict):
            yield from walk_shots(scene.get("shots"), f"scenes[{s}].shots")


def _upload_name(written: str, taken: set[str]) -> str:
    """The name an image the story names is uploaded under: as written when that is a bare name
    the daemon accepts, else its file name made acceptable, made unique with -2, -3, ..."""
    normal = os.path.normpath(written)
    if REFERENCE_NAME.fullmatch(normal) and normal not in taken:
        return normal
    base = re.sub(r"[^A-Za-z0-9._-]", "_", os.path.basename(normal)) or "image"
    base = base if base[0].isalnum() else "r" + base
    stem, suffix = os.path.splitext(base)
    suffix = suffix[:20]
    for n in range(1, len(taken) + 2):
        name = f"{stem[:100 - len(suffix) - 6]}{'' if n == 1 else f'-{n}'}{suffix}"
        if name not in taken:
            return name
    raise AssertionError("unreachable: one of len(taken) + 1 names is free")


def read_story_file(path: str | Path, references: Mapping[str, str | Path] | None = None) -> StoryFile:
    """A story file and the images to upload with it (see StoryFile). Raises FileNotFoundError
    for a missing story file and StoryFileError naming the file, the field and the image path
    for an image it names that is not there (and no explicit reference of its name replaces).
    A file that does not parse is returned as it is: validation (or the daemon) says why."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"story file {path}: no such file")
    body = path.read_text(encoding="utf-8")
    kind = file_kind(path, body)
    explicit = {name: Path(p) for name, p in (references or {}).items()}
    try:
        document = json.loads(body) if kind == "story_json" else yaml.safe_load(body)
    except (ValueError, yaml.YAMLError, RecursionError):
        document = None
    folder = os.path.dirname(os.path.abspath(path))
    names: dict[str, str] = {}  # absolute image path -> upload name
    own: dict[str, Path] = {}
    problems: list[tuple[str, str]] = []
    rewrite = []
    for field_path, container, key in _reference_slots(document) if isinstance(document, dict) else ():
        written = container[key]
        if not written.strip() or "\x00" in written:
            continue  # validation names it
        image = os.path.abspath(os.path.join(folder, written))
        name = names.get(image) or _upload_name(written, set(names.values()))
        names[image] = name
        if name not in explicit:
            if not os.path.isfile(image):
                problems.append((field_path, f"reference image {written}: no such file ({image})"))
            own[name] = Path(image)
        if os.path.normpath(written) != name:
            rewrite.append((container, key, name))
    if problems:
        raise StoryFileError(path, problems)
    if rewrite:
        for container, key, name in rewrite:
            container[key] = name
        body = (json.dumps(document, ensure_ascii=False, indent=2) if kind == "story_json"
                else yaml.safe_dump(document, sort_keys=False, allow_unicode=True))
    uploads = {name: explicit.get(name, own.get(name)) for name in names.values()}
    uploads.update((name, p) for name, p in explicit.items() if name not in uploads)
    return StoryFile(path, {kind: body, "default_name": path.stem}, uploads)


def check_story_file(story_file: StoryFile) -> list[str]:
    """Validates a story file as the daemon will (its format and fields; not the daemon's preset,
    limits or the images' content): returns the warnings, raises StoryFileError naming every
    problem with its field path."""
    from storyfarm.story.format import StoryValidationError, parse_story

    fmt = "json" if "story_json" in story_file.fields else "yaml"
    with tempfile.TemporaryDirectory(prefix="storyfarm-check-") as folder:
        for name in story_file.references:  # the names the daemon will have: stand-ins suffice here
            if REFERENCE_NAME.fullmatch(name):  # any other name the daemon refuses, naming it
                Path(folder, name).touch()
        try:
            story = parse_story(story_file.text, source=str(story_file.path), base_dir=folder, fmt=fmt,
                                name=story_file.path.stem)
        except StoryValidationError as exc:
            raise StoryFileError(story_file.path, [(e.path, e.message) for e in exc.errors]) from None
    return list(story.warnings)
