"""The artifact store: the files of each story under `<data_dir>/stories/<story_id>/`.

Layout (names made by the daemon, never taken from a client): `shots/003_scene01_shot03.mp4`,
`story.mp4`, `keyframes/<id>.png`, `contact_sheet.png`, `manifest.json`.

Invariants:
- every name matches ARTIFACT_NAME_PATTERN (an allowlist: known folders, one plain file name, a
  known extension), so no `..`, absolute path, backslash or NUL can reach the file system, and no
  published name starts with a dot;
- no symlink on the way: every existing component below `<data_dir>/stories` is lstat-checked and
  the file itself is opened with O_NOFOLLOW, so a planted link cannot redirect a write or a read
  (`data_dir` itself may be a link: the operator chose it);
- publication is atomic (story.files.atomic_output: a temporary in the destination folder, fsync,
  os.replace, fsync of the folder; new folders are fsynced into their parents): a crash leaves the
  old file or the new one under a name, never half of one, and at most a temporary behind;
- temporaries are dot-files named `.<name>.<random>.tmp<ext>`; `sweep_temporaries` removes them
  and half-removed story folders (`stories/.rm-*`) after a crash. Run it before workers start,
  or with `older_than` while they run;
- the sha256 and size returned by `publish` are those of the bytes written, computed while writing;
- a read is pinned to one version: `open_version` hands out an open file only when its bytes have
  the sha256 the caller expects (the job store's record). A worker publishes a take's files before
  the job store records them, so during a re-render the file under a name can be newer than the
  record for a while; a reader then gets ArtifactChanged, never the new bytes under the old hash.
  What was opened stays that version to its last byte: a republish replaces the name, not the file.
The store is a folder, not a database: the job store records which artifacts a story has.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import stat
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from storyfarm.story.files import atomic_output, fsync_dir

STORY_ID_PATTERN = re.compile(r"st_[0-9a-f]{16}")  # the job store's ids; use .fullmatch
ARTIFACT_NAME_PATTERN = re.compile(
    r"(?:(?:shots|keyframes)/)?[A-Za-z0-9][A-Za-z0-9_-]{0,127}\.(?:mp4|png|json)"
)
TEMPORARY_PATTERN = re.compile(r"\..+\.tmp(?:\.[A-Za-z0-9]+)?")  # atomic_output's and older `.x.tmp`
REMOVAL_PREFIX = ".rm-"
CHUNK = 1 << 20
HASHES_KEPT = 4096  # file versions whose sha256 open_version remembers (a few hundred bytes each)


class ArtifactError(Exception):
    """Base of the store's errors; the message is safe to show a client."""


class InvalidName(ArtifactError, ValueError):
    pass


class ArtifactNotFound(ArtifactError, LookupError):
    pass


class OffsetOutOfRange(ArtifactError, ValueError):
    pass


class ArtifactChanged(ArtifactError):
    """The file under the name is not the version expected: it is being republished (a re-render)."""


class UnsafePath(ArtifactError):
    """A symlink or a non-regular file where the store expects its own folders and files."""


@dataclass(frozen=True)
class ArtifactInfo:
    name: str  # as published, e.g. "shots/003_scene01_shot03.mp4"
    relative_path: str  # from data_dir, e.g. "stories/st_0123456789abcdef/shots/003_scene01_shot03.mp4"
    size: int
    sha256: str


def check_story_id(story_id: str) -> str:
    if not isinstance(story_id, str) or not STORY_ID_PATTERN.fullmatch(story_id):
        raise InvalidName(f"story id {story_id!r}: expected 'st_' followed by 16 lower-case hex digits")
    return story_id


def check_name(name: str) -> str:
    if not isinstance(name, str) or not ARTIFACT_NAME_PATTERN.fullmatch(name):
        raise InvalidName(f"artifact name {name!r}: expected story.mp4, contact_sheet.png, manifest.json, "
                          "shots/<name>.mp4 or keyframes/<id>.png (letters, digits, '_' and '-')")
    return name


class ArtifactStore:
    def __init__(self, data_dir: str | os.PathLike):
        self.data_dir = Path(data_dir).resolve()
        self.root = self.data_dir / "stories"
        self.root.mkdir(parents=True, exist_ok=True)
        self._check_components(self.root)
        self._hashes: OrderedDict[tuple[int, ...], str] = OrderedDict()  # file identity -> sha256
        self._hashes_lock = threading.Lock()

    # -- paths -------------------------------------------------------------------------------

    def _check_components(self, path: Path) -> None:
        """lstat every existing component from data_dir down to `path`: none may be a symlink.
        Folders must be folders; a missing tail is fine (publish creates it)."""
        current = self.data_dir
        for part in path.relative_to(self.data_dir).parts:
            current = current / part
            try:
                st = os.lstat(current)
            except FileNotFoundError:
                return
            if stat.S_ISLNK(st.st_mode):
                raise UnsafePath(f"{current.relative_to(self.data_dir)} is a symlink; the artifact store does not follow links")
            if current != path and not stat.S_ISDIR(st.st_mode):
                raise UnsafePath(f"{current.relative_to(self.data_dir)} is not a folder")

    def story_dir(self, story_id: str) -> Path:
        """`<data_dir>/stories/<story_id>` (not created)."""
        path = self.root / check_story_id(story_id)
        self._check_components(path)
        return path

    def _path(self, story_id: str, name: str) -> Path:
        path = self.story_dir(story_id) / check_name(name)
        self._check_components(path)
        return path

    def _make_dirs(self, folder: Path) -> None:
        """Create missing folders below data_dir, each fsynced into its parent."""
        missing = []
        while not folder.exists():
            missing.append(folder)
            folder = folder.parent
        for new in reversed(missing):
            try:
                new.mkdir()
            except FileExistsError:  # a concurrent publish made it
                pass
            fsync_dir(new.parent)
        self._check_components(missing[0] if missing else folder)

    # -- writing -----------------------------------------------------------------------------

    def publish(self, story_id: str, name: str, source: str | os.PathLike | bytes | bytearray | memoryview) -> ArtifactInfo:
        """Copy `source` (a file path or the bytes themselves) to the artifact `name` of the story,
        atomically, replacing an earlier version."""
        final = self._path(story_id, name)
        self._make_dirs(final.parent)
        digest, size = hashlib.sha256(), 0
        with atomic_output(final) as tmp:
            with open(tmp, "wb") as out:
                if isinstance(source, (bytes, bytearray, memoryview)):
                    data = memoryview(source).cast("B")
                    out.write(data)
                    digest.update(data)
                    size = data.nbytes
                else:
                    with open(source, "rb") as src:
                        while chunk := src.read(CHUNK):
                            out.write(chunk)
                            digest.update(chunk)
                            size += len(chunk)
        return ArtifactInfo(name, final.relative_to(self.data_dir).as_posix(), size, digest.hexdigest())

    def remove_story(self, story_id: str) -> bool:
        """Delete the story's folder; False if there was none. The folder is first renamed aside,
        so a crash midway leaves a `.rm-*` folder for `sweep_temporaries`, not half a story."""
        folder = self.story_dir(story_id)
        try:
            st = os.lstat(folder)
        except FileNotFoundError:
            return False
        if not stat.S_ISDIR(st.st_mode):
            raise UnsafePath(f"stories/{story_id} is not a folder")
        aside = self.root / f"{REMOVAL_PREFIX}{story_id}-{uuid.uuid4().hex[:8]}"
        os.replace(folder, aside)
        fsync_dir(self.root)
        shutil.rmtree(aside)
        return True

    def sweep_temporaries(self, older_than: float = 0.0) -> list[Path]:
        """Remove temporaries left by a crash (older than `older_than` seconds); return them."""
        removed: list[Path] = []
        cutoff = time.time() - older_than
        for entry in os.scandir(self.root):
            if entry.name.startswith(REMOVAL_PREFIX) and entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
                removed.append(Path(entry.path))
        for dirpath, _dirnames, filenames in os.walk(self.root):  # does not descend into links
            for fname in filenames:
                path = Path(dirpath, fname)
                if TEMPORARY_PATTERN.fullmatch(fname) and os.lstat(path).st_mtime <= cutoff:
                    path.unlink()
                    removed.append(path)
        return removed

    # -- reading -----------------------------------------------------------------------------

    def open_range(self, story_id: str, name: str, offset: int = 0) -> tuple[BinaryIO, int]:
        """The artifact opened for reading at `offset`, and its size. `offset == size` is allowed
        (a download that was already complete resumes with nothing to send)."""
        path = self._path(story_id, name)
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            raise ArtifactNotFound(f"story {story_id} has no artifact {name}") from None
        except OSError as exc:  # ELOOP: the file is a symlink
            raise UnsafePath(f"{name}: cannot open without following a link ({exc.strerror})") from None
        f = os.fdopen(fd, "rb")
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise UnsafePath(f"{name} is not a regular file")
            if not 0 <= offset <= st.st_size:
                raise OffsetOutOfRange(f"offset {offset} is outside {name} (size {st.st_size}); resume from 0..{st.st_size}")
            f.seek(offset)
        except BaseException:
            f.close()
            raise
        return f, st.st_size

    def open_version(self, story_id: str, name: str, sha256: str, offset: int = 0) -> tuple[BinaryIO, int]:
        """open_range, refused with ArtifactChanged unless the opened file's bytes hash to `sha256`.
        Each file version is hashed once (publication makes a new inode, so the key changes)."""
        handle, size = self.open_range(story_id, name, offset)
        try:
            actual = self._sha256_of(handle.fileno())
            if actual != sha256:
                raise ArtifactChanged(f"{name} was republished: the file is sha256 {actual[:12]}..., "
                                      f"the story records {sha256[:12]}...")
        except BaseException:
            handle.close()
            raise
        return handle, size

    def _sha256_of(self, fd: int) -> str:
        st = os.fstat(fd)
        key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        with self._hashes_lock:
            if key in self._hashes:
                self._hashes.move_to_end(key)
                return self._hashes[key]
        digest, position = hashlib.sha256(), 0
        while block := os.pread(fd, CHUNK, position):  # pread: the caller's read position is kept
            digest.update(block)
            position += len(block)
        with self._hashes_lock:
            self._hashes[key] = digest.hexdigest()
            while len(self._hashes) > HASHES_KEPT:
                self._hashes.popitem(last=False)
        return digest.hexdigest()
