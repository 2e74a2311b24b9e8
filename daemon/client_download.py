"""A story's artifacts into a folder: what to fetch, what is already there, what is not ours to touch.

`storyfarm download` and `StoryfarmClient.download_all` write into folders that may already hold
files: an earlier download of the same story (complete, half done, or of an older take), a local
render's take, anything a person put there. StoryfarmClient.download fetches one file; this module
decides, for a whole folder, which files a download may write or remove.

Invariants:
- a file already under an artifact's name with the size and sha256 the daemon lists now is that
  artifact: kept, not fetched again;
- any other file under an artifact's name is replaced only with `force`. Without it nothing at all
  is written and DownloadConflict names every file in the way and why;
- the folder keeps a record, `.storyfarm-download.json` ({"story_id", "files": {name: sha256}}), of
  what downloads of one story wrote there, updated after every file. A download of the whole story
  (no `names`) leaves exactly its current artifacts: a recorded file the story no longer has (a
  keyframe of an older take) is removed with `force` and refused without it; a file under `shots/`
  or `keyframes/` that no download of this story wrote would mix two takes, so a download that
  writes anything is refused without `force`, and with it the file is left alone (reported in
  `kept`: not ours to delete). A recorded file changed since it was written is no longer ours;
- names asked for that the story lacks fail NOT_FOUND (naming what it has) before anything is written,
  and so does a daemon's name that would leave the folder (DATA_LOSS);
- the listing is read again once every file is in: an artifact republished meanwhile (a re-render
  finishing) is fetched again, so the folder ends with the files of one listing. Files this call
  wrote are its own to replace. After ROUNDS listings that kept changing: ABORTED (ARTIFACT_CHANGED).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterable, Iterator

import grpc

from storyfarm.daemon.artifacts import ARTIFACT_NAME_PATTERN
from storyfarm.daemon.client_wire import StoryfarmError
from storyfarm.story.files import sha256_file, write_json

RECORD = ".storyfarm-download.json"
ROUNDS = 3
TAKE_FOLDERS = ("shots", "keyframes")  # where another take's files have other names
SHA256 = re.compile(r"[0-9a-f]{64}")

OLDER_TAKE = "an earlier download of this story, of another take than the one it has now"
NOT_OURS = "not written by a download of this story (a local render, another story, or edited since)"
NO_LONGER = "an earlier download's file that the story no longer has (an older take)"
MIXED = "not part of the story's current take and not written by a download of it: it would be mixed in"


class DownloadConflict(ValueError):
    """Files a download would replace, or leave mixed in with the story's take, without `force`;
    `problems` holds (path, why) pairs. None of them was touched."""

    def __init__(self, story_id: str, problems: list[tuple[Path, str]]):
        self.story_id, self.problems = story_id, problems
        lines = "".join(f"\n  {path}: {why}" for path, why in problems)
        super().__init__(f"{len(problems)} file(s) in the way of story {story_id}'s download, none touched "
                         f"(force=True replaces them):{lines}")


@dataclass
class StoryDownload:
    """What a download left: `files` as StoryfarmClient.download returns them (fetched or already
    complete), `removed` an earlier download's files the story no longer has, `kept` files that no
    download of the story wrote, left where they are."""

    files: list[dict[str, Any]] = field(default_factory=list)
    removed: list[Path] = field(default_factory=list)
    kept: list[Path] = field(default_factory=list)


def safe_parts(name: str) -> tuple[str, ...]:
    """An artifact name as path parts under the output folder; refuses anything that could leave it."""
    parts = PurePosixPath(name).parts
    if not parts or PurePosixPath(name).is_absolute() or any(p in ("", ".", "..") or "\\" in p for p in parts):
        raise StoryfarmError(grpc.StatusCode.DATA_LOSS, f"the daemon sent an unsafe artifact name {name!r}")
    return parts


class _Record:
    """The folder's `.storyfarm-download.json`; a record of another story, or one that does not
    parse, holds nothing of this story (nothing is ours: refusals, never removals)."""

    def __init__(self, folder: Path, story_id: str):
        self.path, self.story_id = folder / RECORD, story_id
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            data = None
        files = data.get("files") if isinstance(data, dict) and data.get("story_id") == story_id else None
        self.files: dict[str, str] = {n: s for n, s in (files if isinstance(files, dict) else {}).items()
                                      if isinstance(n, str) and ARTIFACT_NAME_PATTERN.fullmatch(n)
                                      and isinstance(s, str) and SHA256.fullmatch(s)}
        self.saved = dict(self.files)

    def ours(self, name: str, path: Path, digest: Callable[[Path], str]) -> bool:
        return name in self.files and path.is_file() and digest(path) == self.files[name]

    def save(self) -> None:
        if self.files != self.saved:
            write_json(self.path, {"story_id": self.story_id, "files": dict(sorted(self.files.items()))})
            self.saved = dict(self.files)


@dataclass
class _Plan:
    fetch: list[tuple[dict, Path]] = field(default_factory=list)
    complete: list[tuple[dict, Path]] = field(default_factory=list)
    stale: list[tuple[str, Path]] = field(default_factory=list)  # ours, no longer listed
    kept: list[Path] = field(default_factory=list)  # neither listed nor ours, under shots/ or keyframes/
    problems: list[tuple[Path, str]] = field(default_factory=list)  # files this download would replace or remove


def download_story(client, story_id: str, out_dir: str | Path, *, names: Iterable[str] | None = None,
                   force: bool = False, on_progress: Callable[[str, int, int], None] | None = None) -> StoryDownload:
    """Every artifact of the story (or those in `names`) under out_dir by the daemon's names
    (out_dir/shots/001_scene01_shot01.mp4), by the rules of this module."""
    folder, wanted = Path(out_dir), None if names is None else list(dict.fromkeys(names))
    record, written, result = _Record(folder, story_id), set(), StoryDownload()
    listing = client.artifacts(story_id)
    for _ in range(ROUNDS):
        plan = _plan(folder, _choose(story_id, listing, wanted), record, written, whole=wanted is None)
        mixing = plan.kept if plan.fetch or plan.stale else []  # writing nothing mixes nothing in
        if (plan.problems or mixing) and not force:
            raise DownloadConflict(story_id, plan.problems + [(path, MIXED) for path in mixing])
        got = {}
        for artifact, dest in plan.complete:
            record.files[artifact["name"]] = artifact["sha256"]  # e.g. fetched before the folder had a record
            got[artifact["name"]] = {"name": artifact["name"], "path": str(dest), "size": artifact["size"],
                                     "sha256": artifact["sha256"]}
        for artifact, dest in plan.fetch:
            name = artifact["name"]
            report = (lambda done, total, n=name: on_progress(n, done, total)) if on_progress else None
            got[name] = client.download(story_id, name, dest, sha256=artifact["sha256"], on_progress=report)
            record.files[name] = got[name]["sha256"]
            written.add(name)
            record.save()
        for name, path in plan.stale:
            path.unlink()
            del record.files[name]
            result.removed.append(path)
        record.save()
        result.files, result.kept = [got[a["name"]] for a in listing if a["name"] in got], plan.kept
        latest = client.artifacts(story_id)
        if _versions(latest, wanted) == _versions(listing, wanted):
            return result
        listing = latest
    raise StoryfarmError(grpc.StatusCode.ABORTED, f"story {story_id}'s artifacts changed {ROUNDS} times while they "
                         "downloaded (a re-render is publishing); download again once it has finished",
                         reason="ARTIFACT_CHANGED")


def _versions(listing: list[dict], wanted: list[str] | None) -> dict[str, str]:
    return {a["name"]: a["sha256"] for a in listing if wanted is None or a["name"] in wanted}


def _choose(story_id: str, listing: list[dict], wanted: list[str] | None) -> list[tuple[dict, Path]]:
    """(artifact, path under the folder) for each artifact asked for; every name is checked first."""
    by_name = {a["name"]: a for a in listing}
    missing = [n for n in wanted or () if n not in by_name]
    if missing:
        raise StoryfarmError(grpc.StatusCode.NOT_FOUND, f"story {story_id} has no artifact {', '.join(missing)}; "
                             f"it has {_brief(sorted(by_name))}", reason="ARTIFACT_NOT_FOUND",
                             resource=("artifact", f"{story_id}/{missing[0]}"))
    return [(a, Path(*safe_parts(a["name"]))) for a in listing if wanted is None or a["name"] in wanted]


def _brief(names: list[str]) -> str:
    """story.mp4, manifest.json, 3 in shots/ (shots/001_scene01_shot01.mp4, ...): what a story has, in a line."""
    top = [n for n in names if "/" not in n]
    folders: dict[str, list[str]] = {}
    for n in names:
        if "/" in n:
            folders.setdefault(n.split("/", 1)[0], []).append(n)
    held = [f"{len(inside)} in {f}/ ({inside[0]}, ...)" for f, inside in folders.items()]
    return ", ".join(top + held) or "no artifacts yet"


def _plan(folder: Path, chosen: list[tuple[dict, Path]], record: _Record, written: set[str], *, whole: bool) -> _Plan:
    """What to fetch, keep, remove and refuse. Forgets record entries whose file is gone or edited."""
    digests: dict[Path, str] = {}

    def digest(path: Path) -> str:
        if path not in digests:
            digests[path] = sha256_file(path)
        return digests[path]

    plan = _Plan()
    for artifact, relative in chosen:
        name, dest = artifact["name"], folder / relative
        if not os.path.lexists(dest):
            plan.fetch.append((artifact, dest))
        elif dest.is_file() and dest.stat().st_size == artifact["size"] and digest(dest) == artifact["sha256"]:
            plan.complete.append((artifact, dest))
        else:
            plan.fetch.append((artifact, dest))
            if name not in written:
                plan.problems.append((dest, OLDER_TAKE if record.ours(name, dest, digest) else NOT_OURS))
    if not whole:
        return plan
    listed = {artifact["name"] for artifact, _ in chosen}
    for name in sorted(set(record.files) - listed):
        path = folder.joinpath(*name.split("/"))  # the record's names matched ARTIFACT_NAME_PATTERN
        if not record.ours(name, path, digest):
            del record.files[name]
        else:
            plan.stale.append((name, path))
            if name not in written:
                plan.problems.append((path, NO_LONGER))
    plan.kept = [folder.joinpath(*n.split("/")) for n in _take_files(folder) if n not in listed and n not in record.files]
    return plan


def _take_files(folder: Path) -> Iterator[str]:
    """The names of the files under shots/ and keyframes/ that look like artifacts (no part files,
    no temporaries, no links)."""
    for sub in TAKE_FOLDERS:
        try:
            entries = sorted(os.scandir(folder / sub), key=lambda e: e.name)
        except OSError:
            continue
        for entry in entries:
            if ARTIFACT_NAME_PATTERN.fullmatch(f"{sub}/{entry.name}") and entry.is_file(follow_symlinks=False):
                yield f"{sub}/{entry.name}"
