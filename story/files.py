"""Atomic file writes and file hashes: what storyfarm publishes is either the whole new file or the
old one, and its sha256 is read back the same way everywhere.

Every writer of a published file (clips, keyframes, manifests, memory banks, daemon artifacts)
goes through `atomic_output`: a temporary file in the destination folder, fsynced, renamed over
the final name, then the folder fsynced, so a crash never leaves half a file under a final name.
Temporaries are named `.<name>.<random>.tmp<suffix>` so a start-up sweep can recognise them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

PathLike = str | os.PathLike
# A test seam, None in production: storyfarm.scheduler.gpu_pool.faults sets it inside a worker whose
# environment asks for a crash mid-write, and it is called with (temporary, final) just before the rename.
before_replace = None


def fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some filesystems do not let a folder be opened; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_output(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success fsync it and move it onto `path`.

    The temporary keeps the final suffix so format-sniffing writers (PyAV, Pillow) still work.
    On any exception the temporary is removed and `path` is left as it was.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}.", suffix=f".tmp{final.suffix}")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        if before_replace is not None:
            before_replace(tmp, final)
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(final.parent)


def write_json(path: PathLike, data) -> None:
    """JSON (UTF-8, indented) written atomically."""
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False), encoding="utf-8")


def sha256_file(path: PathLike) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
