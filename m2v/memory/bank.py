"""A story's memory: every keyframe it has accumulated, and the window of them the next shot sees.

Role: StoryMem conditions each shot on a memory of earlier keyframes (reference images first, then
keyframes picked from each rendered shot). The bank holds all of them in order of addition and
persists them, so a story resumes after a crash from the bank on disk; `window` picks the keyframes
that condition a shot.

Invariants:
- Memory order is story order: the story's references, then per shot its references (they join
  just before it) and its keyframes (picked just after it). Ids are stable and readable:
  references `ref00`, `ref01`, ...; shot keyframes `s{shot number:03d}f{frame number:03d}`, both
  counting from 1 (`s001f001`: the first frame of shot 1; story/numbering.py). Records keep the
  0-based `shot_index` and `frame_index`.
- The memory a shot sees is a snapshot: `before(shot)` is every keyframe that stood before that
  shot (references, its own references, keyframes of earlier shots), computed from the bank
  without changing it. A retried or re-rendered shot replaces its own keyframes in place, at its
  position in story order, so later shots keep theirs and re-rendering a shot of an unchanged
  story with its prompt and seed reproduces it exactly (the same snapshot, the same window).
- The story's references (characters, places: several per character, labelled) are long-term
  memory: `window_ids` keeps all of them, never sliding them out for recent keyframes.
- On disk (`root_dir`): `<id>.png` per keyframe, `embeddings.safetensors` (one tensor per id) and
  `memory.json` (the ordered index). `memory.json` is the commit point and is
  written last when adding, first when removing, each file atomically. So at every instant the ids
  in `memory.json` have their PNG and embedding on disk; leftovers from an interrupted change are
  unreferenced and harmless.
- Embeddings are float32 (D,) on CPU; a reference may have none (it then takes no part in
  de-duplication). All embeddings of a bank share one D.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from storyfarm.story.files import atomic_output
from storyfarm.story.numbering import keyframe_id
from storyfarm.m2v.video import save_png

__all__ = ["Keyframe", "MemoryBank", "window"]

INDEX_FILE = "memory.json"
EMBEDDINGS_FILE = "embeddings.safetensors"
FORMAT_VERSION = 1
_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")

T = TypeVar("T")


@dataclass
class Keyframe:
    id: str
    source: str  # "reference" | "shot"
    shot_index: int | None
    frame_index: int | None
    image_path: str
    embedding: torch.Tensor | None  # (D,) float32; None only for a reference added without one
    label: str | None = None  # a reference's character or place ("lena"); None for shot keyframes

    @property
    def order(self) -> int:
        """Story-order key: story references, then per shot i its references (2i) and keyframes (2i+1)."""
        if self.shot_index is None:
            return -1
        return 2 * self.shot_index + (self.source == "shot")


def window(keyframes: Sequence[T], *, long_term: int = 3, max_size: int = 10) -> list[T]:
    """The memory a shot is conditioned on, oldest first.

    The first `long_term` keyframes of the story are kept for good; the rest of the `max_size`
    slots go to the most recent keyframes. When `long_term >= max_size` only the first `max_size`
    keyframes are kept. The unit is keyframes, not shots.
    """
    if long_term < 0:
        raise ValueError(f"long_term must be >= 0, got {long_term}")
    items = list(keyframes)
    if max_size <= 0:
        return []
    if len(items) <= max_size:
        return items
    if long_term >= max_size:
        return items[:max_size]
    recent = max_size - long_term
    return items[:long_term] + items[-recent:]


def shot_keyframe_id(shot_index: int, frame_index: int, existing: Sequence[Keyframe] = ()) -> str:
    """The id of a shot keyframe (story/numbering.py: shot and frame numbers from 1, `s001f001`).
    A bank written before ids counted from 1 (`s000f000` = shot index 0, frame index 0) keeps
    its old scheme, so a re-render of one of its shots cannot take a later shot's id."""
    legacy = any(k.source == "shot" and k.id == f"s{k.shot_index:03d}f{k.frame_index:03d}" for k in existing)
    return f"s{shot_index:03d}f{frame_index:03d}" if legacy else keyframe_id(shot_index, frame_index)


def _as_embedding(embedding: torch.Tensor | np.ndarray) -> torch.Tensor:
    emb = torch.as_tensor(embedding).detach().to("cpu", torch.float32).reshape(-1).contiguous()
    if emb.numel() == 0:
        raise ValueError("empty embedding")
    return emb


class MemoryBank:
    """All keyframes of one story, in order of addition, persisted under `root_dir`.

    `MemoryBank(root)` starts an empty bank (refusing a folder that already holds one);
    `MemoryBank.load(root)` resumes one; `MemoryBank.open(root)` does whichever applies.
    """

    def __init__(self, root_dir: str | os.PathLike):
        self.root = Path(root_dir)
        if (self.root / INDEX_FILE).exists():
            raise FileExistsError(f"{self.root} already holds a memory bank; use MemoryBank.load")
        self._keyframes: list[Keyframe] = []

    # ---- loading ---------------------------------------------------------------------------
    @classmethod
    def load(cls, root_dir: str | os.PathLike) -> MemoryBank:
        root = Path(root_dir)
        index = json.loads((root / INDEX_FILE).read_text())
        if index.get("version") != FORMAT_VERSION:
            raise ValueError(f"{root / INDEX_FILE}: unsupported memory format {index.get('version')!r}")
        emb_path = root / EMBEDDINGS_FILE
        tensors = load_safetensors(emb_path.read_bytes()) if emb_path.exists() else {}
        bank = cls.__new__(cls)
        bank.root, bank._keyframes = root, []
        for rec in index["keyframes"]:
            embedding = None
            if rec["has_embedding"]:
                if rec["id"] not in tensors:
                    raise ValueError(f"{emb_path}: no embedding for keyframe {rec['id']}")
                embedding = tensors[rec["id"]].to(torch.float32)
            bank._keyframes.append(
                Keyframe(rec["id"], rec["source"], rec["shot_index"], rec["frame_index"],
                         str(root / rec["image"]), embedding, rec.get("label"))
            )
        return bank

    @classmethod
    def open(cls, root_dir: str | os.PathLike) -> MemoryBank:
        return cls.load(root_dir) if (Path(root_dir) / INDEX_FILE).exists() else cls(root_dir)

    # ---- reading ---------------------------------------------------------------------------
    @property
    def keyframes(self) -> list[Keyframe]:
        return list(self._keyframes)

    def __len__(self) -> int:
        return len(self._keyframes)

    def snapshot(self) -> list[str]:
        """Ids of every keyframe, in memory order."""
        return [k.id for k in self._keyframes]

    def get(self, ids: Sequence[str]) -> list[Keyframe]:
        by_id = {k.id: k for k in self._keyframes}
        missing = [i for i in ids if i not in by_id]
        if missing:
            raise KeyError(f"unknown keyframe ids: {missing}")
        return [by_id[i] for i in ids]

    def before(self, shot_index: int) -> list[str]:
        """The memory snapshot of shot `shot_index`: ids of every keyframe that stands before it
        (story references, references that joined for shots up to it, keyframes of earlier shots)."""
        return [k.id for k in self._keyframes if k.order <= 2 * shot_index]

    def window_ids(self, long_term: int = 3, max_size: int = 10, *, shot_index: int | None = None) -> list[str]:
        """Ids of the memory window a shot is conditioned on, oldest first: over `before(shot_index)`,
        or over the whole bank (the next new shot) when it is None. The story's references count
        as long-term memory however many there are (they are the characters and places)."""
        ids = self.snapshot() if shot_index is None else self.before(shot_index)
        pinned = sum(1 for k in self._keyframes if k.source == "reference" and k.shot_index is None)
        return window(ids, long_term=max(long_term, pinned), max_size=max_size)

    def embeddings(self, ids: Sequence[str] | None = None) -> torch.Tensor | None:
        """[K, D] float32 embeddings of the given (default: all) keyframes that have one, or None."""
        keyframes = self._keyframes if ids is None else self.get(ids)
        rows = [k.embedding for k in keyframes if k.embedding is not None]
        return torch.stack(rows) if rows else None

    def images(self, ids: Sequence[str]) -> list[np.ndarray]:
        """The keyframe images (uint8 [H, W, 3]) of `ids`, in the order given."""
        images = []
        for k in self.get(ids):
            with Image.open(k.image_path) as img:
                images.append(np.array(img.convert("RGB")))  # a writable copy (torch.from_numpy warns on views)
        return images

    # ---- changing --------------------------------------------------------------------------
    def rewind(self, shot_index: int) -> int:
        """Forget everything added for shot `shot_index` or later (its references, its keyframes).

        A shot that is rendered again (a retry after a crash, a re-render) must see the memory as it
        stood before that shot; additions are chronological, so what stays is a prefix.
        Returns how many keyframes were dropped.
        """
        kept = [k for k in self._keyframes if k.shot_index is None or k.shot_index < shot_index]
        dropped = len(self._keyframes) - len(kept)
        if dropped:
            self._commit_remove(kept)
        return dropped

    def add_references(
        self,
        images: Sequence[np.ndarray],
        ids: Sequence[str] | None = None,
        embeddings: torch.Tensor | Sequence[torch.Tensor] | None = None,
        for_shot: int | None = None,
        labels: Sequence[str | None] | None = None,
    ) -> list[Keyframe]:
        """Add reference images (MR2V): a story's are its first memory entries (`for_shot` None);
        a shot's join the memory just before that shot (`for_shot` = its index, so snapshots and
        `rewind` know when they came). `labels` name each image's character or place.

        Pass `embeddings` (one per image, same embedder as the shot keyframes) so that shot
        keyframes duplicating a reference are de-duplicated against it.
        """
        if ids is None:
            start = sum(k.source == "reference" for k in self._keyframes)
            ids = [f"ref{start + n:02d}" for n in range(len(images))]
        labels = [None] * len(images) if labels is None else list(labels)
        if len(ids) != len(images) or len(labels) != len(images) or (
                embeddings is not None and len(embeddings) != len(images)):
            raise ValueError("images, ids, labels and embeddings must have the same length")
        embs = [None] * len(images) if embeddings is None else [_as_embedding(e) for e in embeddings]
        entries = [("reference", for_shot, None, i, img, e, label)
                   for i, img, e, label in zip(ids, images, embs, labels)]
        prepared = self._prepare(entries, self._keyframes)
        self._commit_add(prepared, self._keyframes)
        return [k for k, _ in prepared]

    def add_shot_keyframes(
        self, shot_index: int, keyframes: Sequence[tuple[int, np.ndarray, torch.Tensor]]
    ) -> list[Keyframe]:
        """Add the keyframes selected from one rendered shot: (frame_index, image, embedding).

        Adding keyframes for a shot that already has some (a retry after a crash, a re-render)
        replaces them in place, in story order: later shots keep their keyframes.
        """
        if shot_index < 0:
            raise ValueError(f"shot_index must be >= 0, got {shot_index}")
        kept = [k for k in self._keyframes if not (k.shot_index == shot_index and k.source == "shot")]
        entries = [
            ("shot", shot_index, int(f), shot_keyframe_id(shot_index, int(f), self._keyframes), img, _as_embedding(e), None)
            for f, img, e in keyframes
        ]
        prepared = self._prepare(entries, kept)  # validate before removing anything
        if len(kept) != len(self._keyframes):
            self._commit_remove(kept)
        self._commit_add(prepared, kept)
        return [k for k, _ in prepared]

    def _prepare(self, entries: list, existing: Sequence[Keyframe]) -> list[tuple[Keyframe, np.ndarray]]:
        taken = {k.id for k in existing}
        dims = {k.embedding.numel() for k in existing if k.embedding is not None}
        prepared = []
        for source, shot_index, frame_index, kid, image, emb, label in entries:
            if not _ID_PATTERN.fullmatch(kid) or kid in taken:
                raise ValueError(f"keyframe id {kid!r} is malformed or already in this memory bank")
            if emb is not None:
                dims.add(emb.numel())
            if len(dims) > 1:
                raise ValueError(f"keyframe {kid}: embedding sizes differ within one bank: {sorted(dims)}")
            image = np.asarray(image)
            if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
                raise ValueError(f"keyframe {kid}: image must be uint8 [H, W, 3], "
                                 f"got {image.dtype} {list(image.shape)}")
            taken.add(kid)
            path = self.root / f"{kid}.png"
            prepared.append((Keyframe(kid, source, shot_index, frame_index, str(path), emb, label), image))
        return prepared

    # Disk protocol (see module docstring): adding writes images, embeddings, then the index;
    # removing writes the index, embeddings, then deletes images. The in-memory list changes only
    # once the index is on disk.
    def _commit_add(self, prepared: list[tuple[Keyframe, np.ndarray]], existing: list[Keyframe]) -> None:
        """Insert `prepared` into `existing` at its place in story order (after everything of the
        same or an earlier order key, so additions at the tail keep their order of addition)."""
        for keyframe, image in prepared:
            save_png(keyframe.image_path, image)
        new = [k for k, _ in prepared]
        at = len(existing)
        if new:
            at = next((n for n, k in enumerate(existing) if k.order > new[0].order), len(existing))
        keyframes = existing[:at] + new + existing[at:]
        self._write_embeddings(keyframes)
        self._write_index(keyframes)
        self._keyframes = keyframes

    def _commit_remove(self, kept: list[Keyframe]) -> None:
        kept_ids = {k.id for k in kept}
        doomed = [k for k in self._keyframes if k.id not in kept_ids]
        self._write_index(kept)
        self._keyframes = list(kept)
        self._write_embeddings(kept)
        for k in doomed:
            Path(k.image_path).unlink(missing_ok=True)

    def _write_index(self, keyframes: Sequence[Keyframe]) -> None:
        records = [
            {"id": k.id, "source": k.source, "shot_index": k.shot_index, "frame_index": k.frame_index,
             "image": Path(k.image_path).relative_to(self.root).as_posix(),
             "has_embedding": k.embedding is not None, **({"label": k.label} if k.label else {})}
            for k in keyframes
        ]
        text = json.dumps({"version": FORMAT_VERSION, "keyframes": records}, indent=1)
        with atomic_output(self.root / INDEX_FILE) as tmp:
            tmp.write_text(text)

    def _write_embeddings(self, keyframes: Sequence[Keyframe]) -> None:
        tensors = {k.id: k.embedding for k in keyframes if k.embedding is not None}
        with atomic_output(self.root / EMBEDDINGS_FILE) as tmp:
            tmp.write_bytes(save_safetensors(tensors))
