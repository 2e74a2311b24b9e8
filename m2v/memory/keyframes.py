"""Keyframe selection: which frames of a rendered shot join the story's memory (StoryMem).

Role: after each shot, embed every one of its frames with CLIP, drop frames an aesthetic gate
(m2v.memory.gates) rejects, keep frames that differ enough from the last kept one (tightening until
at most `max_keyframes` remain), and skip those the story's memory already holds. The decision
itself (`select_keyframes`) is a pure function on tensors; embedders and gates are pluggable objects
around it; `ShotScan` applies it to a shot fed frame batch by frame batch.

Invariants:
- Embeddings are float32 [T, D] with L2-normalised rows, so a dot product is a cosine similarity.
  CLIP preprocessing is done here in torch (no torchvision, no image-processor class).
- Every frame is walked, as StoryMem does (a sample of evenly spaced frames misses short events: a
  character crossing the frame between two samples never becomes a keyframe). Frames are embedded
  in bounded batches and a streamed shot is never held whole: only its embeddings and the images
  of the frames that can still be chosen.
- Expensive models (the CLIP tower, HPSv3's 7B reward model) are loaded once, at construction, and
  reused for every shot; optional backends are imported lazily with an error saying what to set.
- An empty selection is a valid answer; callers must cope with it.
- Differences from the official code, on purpose: the walk goes on right after the first accepted
  frame (the official loop always resumed at frame 2, skipping frame 1 or revisiting frames before
  the first keyframe), and the adaptive threshold loop is bounded.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F

from storyfarm.m2v.memory.gates import (  # the gates stay importable from here (__all__)
    GATE_KINDS, HPSV3_WEIGHTS_FIELD, AestheticGate, HPSv3Gate, NoGate, QualityGate, as_frames, make_gate,
)

__all__ = [
    "GATE_KINDS", "HPSV3_WEIGHTS_FIELD", "AestheticGate", "FrameEmbedder", "HPSv3Gate", "KeyframeSelector", "NoGate", "OpenCLIPEmbedder",
    "QualityGate", "SelectionStats", "ShotScan", "TransformersCLIPEmbedder", "build_tiny_clip_embedder",
    "make_gate", "select_keyframes",
]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# ---- embedders -------------------------------------------------------------------------------
@runtime_checkable
class FrameEmbedder(Protocol):
    def embed(self, frames: np.ndarray) -> torch.Tensor: ...


def clip_pixels(frames: torch.Tensor, image_size: int) -> torch.Tensor:
    """CLIP preprocessing of uint8 [T, H, W, 3] as StoryMem's keyframe selection does it: the whole
    frame resized (bilinear, antialiased) to image_size x image_size — no centre crop, which would
    hide a 16:9 frame's sides (pans, characters entering) from the similarity test — then scaled
    to [0, 1] and normalised. -> float32 [T, 3, S, S]."""
    x = frames.permute(0, 3, 1, 2).float()
    if tuple(x.shape[-2:]) != (image_size, image_size):
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=True)
    x = x.clamp(0, 255) / 255.0
    mean = torch.tensor(CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


class _BatchedImageEmbedder:
    """Shared loop: preprocess a batch, run the image tower, L2-normalise, return float32 on CPU."""

    model: torch.nn.Module
    image_size: int
    batch_size: int = 32

    def _encode(self, pixels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _device_dtype(self) -> tuple[torch.device, torch.dtype]:
        p = next(self.model.parameters())
        return p.device, p.dtype

    @torch.no_grad()
    def embed(self, frames: np.ndarray | torch.Tensor) -> torch.Tensor:
        x = as_frames(frames)
        device, dtype = self._device_dtype()
        out = []
        for start in range(0, x.shape[0], self.batch_size):
            pixels = clip_pixels(x[start:start + self.batch_size].to(device), self.image_size)
            out.append(F.normalize(self._encode(pixels.to(dtype)).float(), dim=-1).cpu())
        return torch.cat(out) if out else torch.empty(0, 0)


class TransformersCLIPEmbedder(_BatchedImageEmbedder):
    """CLIP image embeddings from transformers' `CLIPModel` or `CLIPVisionModelWithProjection`."""

    def __init__(self, model, image_size: int | None = None, batch_size: int = 32):
        self.model = model.eval()
        config = getattr(model.config, "vision_config", model.config)
        self.image_size = int(image_size or config.image_size)
        self.batch_size = batch_size

    @classmethod
    def from_pretrained(cls, local_dir: str, **kwargs) -> TransformersCLIPEmbedder:
        """Load the vision tower and projection only, from a vision-with-projection or a full CLIP
        checkpoint. A full checkpoint keeps its projection size at the top level of its config,
        so the vision config is patched with it; any missing or mis-sized weight is an error
        (transformers would otherwise re-initialise it at random, silently)."""
        from transformers import AutoConfig, CLIPConfig, CLIPVisionModelWithProjection

        config = AutoConfig.from_pretrained(str(local_dir), local_files_only=True)
        if isinstance(config, CLIPConfig):
            vision_config = config.vision_config
            vision_config.projection_dim = config.projection_dim
            config = vision_config
        if not any(Path(local_dir).glob("*.safetensors")):
            raise ValueError(f"{local_dir}: no .safetensors weights; storyfarm loads safetensors only (never pickles)")
        model, info = CLIPVisionModelWithProjection.from_pretrained(
            str(local_dir), config=config, local_files_only=True, output_loading_info=True, use_safetensors=True)
        bad = sorted(info.get("missing_keys", ())) + sorted(map(str, info.get("mismatched_keys", ())))
        if bad:
            raise ValueError(f"{local_dir}: not a CLIP image tower with projection; missing or mis-sized: {bad}")
        return cls(model, **kwargs)

    def _encode(self, pixels):
        pooled = self.model.vision_model(pixel_values=pixels).pooler_output
        return self.model.visual_projection(pooled)


def build_tiny_clip_embedder(seed: int = 0) -> TransformersCLIPEmbedder:
    """A random-weight CLIP vision tower (32 px, patch 8, width 32, 2 layers): the `tiny` preset.

    Initialised 10x wider than CLIP's training init (std 0.2, not 0.02): at the narrow init a random
    tower maps every image to nearly the same direction (cosine > 0.99 between unrelated shots), so
    StoryMem's 0.9 thresholds would never admit a second shot's keyframes; the wider init gives
    input-sensitive random features on which the selection rules behave as on real footage.
    """
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    config = CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                              num_hidden_layers=2, num_attention_heads=2, projection_dim=32,
                              initializer_range=0.2, initializer_factor=10.0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPVisionModelWithProjection(config)
    return TransformersCLIPEmbedder(model)


class OpenCLIPEmbedder(_BatchedImageEmbedder):
    """Optional open_clip backend (the official StoryMem used OpenAI's ViT-B/32); needs torchvision."""

    def __init__(self, model_name: str = "ViT-B-32", pretrained: str | None = None, device: str = "cpu",
                 batch_size: int = 32):
        try:
            import open_clip
        except Exception as exc:  # ImportError, or torchvision failing inside it
            raise ImportError("open_clip does not import (it needs torchvision, absent on CPU-only "
                              "installs); use the transformers CLIP embedder instead") from exc
        if not pretrained:
            raise ValueError("OpenCLIPEmbedder needs `pretrained`: a local checkpoint path")
        self.model = open_clip.create_model(model_name, pretrained=str(pretrained), device=device).eval()
        size = getattr(self.model.visual, "image_size", 224)
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        self.batch_size = batch_size

    def _encode(self, pixels):
        return self.model.encode_image(pixels)


# ---- the decision ----------------------------------------------------------------------------
MAX_ROUNDS = 10_000  # thresholds of the adaptive loop (0.9 in steps of 0.01 down to 0 is 91)


@dataclass
class _Decision:
    keyframes: list[int]
    threshold: float  # the similarity threshold the walk ended at
    duplicates: list[int]  # accepted but dropped as already in memory


def _thresholds(threshold: float, step: float) -> list[float]:
    """The adaptive loop's thresholds: threshold - k * step for k = 0, 1, ... up to the first <= 0."""
    if step <= 0:
        raise ValueError(f"step must be positive, got {step}")
    last = max(0, math.ceil(threshold / step) - 1)  # then exact on the float test the loop makes
    while threshold - last * step > 0:
        last += 1
    while last > 0 and threshold - (last - 1) * step <= 0:
        last -= 1
    if last >= MAX_ROUNDS:
        raise ValueError(f"step {step}: the adaptive loop would walk {last + 1} thresholds (at most {MAX_ROUNDS})")
    return [threshold - k * step for k in range(last + 1)]  # no accumulated float drift


class _Walks:
    """Every walk of StoryMem's adaptive loop at once, one frame at a time.

    The loop walks the frames at threshold t, then t - step, ... until a walk accepts at most `limit`
    frames (at a threshold <= 0 it keeps that walk's first `limit`). Walked one after another the
    thresholds need every frame again; walked side by side (one row per threshold) each frame is
    seen once, so a shot streamed past is decided from its embeddings alone, and a walk that has
    accepted more than `limit` frames is out of the running. `needed` names the frames a walk still
    in the running holds: the only frames whose images the answer can need.
    """

    def __init__(self, threshold: float, step: float, limit: int):
        values = _thresholds(threshold, step)
        self.thresholds = torch.tensor(values, dtype=torch.float32)  # compared as the float32 sims are
        self.values, self.limit = values, limit
        self.accepted = torch.full((len(values), limit + 1), -1, dtype=torch.long)
        self.count = torch.zeros(len(values), dtype=torch.long)
        self.rows: list[torch.Tensor] = []  # every frame's normalised embedding, in order

    def push(self, embedding: torch.Tensor, passes: bool) -> None:
        """Frame len(rows): accepted by a walk still accepting if it passes the gate and is the walk's
        first, or less similar than the walk's threshold to the walk's last accepted frame."""
        index = len(self.rows)
        self.rows.append(embedding)
        walking = self.count <= self.limit  # a walk stops once it has accepted limit + 1
        if not passes or not walking.any():
            return
        accept = walking.clone()
        compare = walking & (self.count > 0)
        if compare.any():
            last = self.accepted[compare, self.count[compare] - 1]
            unique, inverse = last.unique(return_inverse=True)
            sims = torch.stack([self.rows[j] for j in unique.tolist()]) @ embedding
            accept[compare] = sims[inverse] < self.thresholds[compare]
        rows = accept.nonzero().squeeze(1)
        self.accepted[rows, self.count[rows]] = index
        self.count[rows] += 1

    def _answer(self) -> int:
        open_ = (self.count <= self.limit).nonzero()
        return int(open_[0]) if len(open_) else len(self.values) - 1

    def needed(self) -> set[int]:
        in_running = self.count <= self.limit
        in_running[-1] = True  # the last walk's first `limit` are the answer if every walk overflows
        held = self.accepted[in_running, : self.limit]
        return set(held[held >= 0].tolist())

    def decide(self, memory_embeddings: torch.Tensor | None, dedupe_threshold: float) -> _Decision:
        """The answer's frames, less those more similar than `dedupe_threshold` to a memory keyframe."""
        k = self._answer()
        accepted = self.accepted[k, : min(int(self.count[k]), self.limit)].tolist()
        if memory_embeddings is None or not memory_embeddings.numel() or not accepted:
            return _Decision(accepted, self.values[k], [])
        memory = F.normalize(memory_embeddings.float().cpu(), dim=-1)
        worst = (torch.stack([self.rows[i] for i in accepted]) @ memory.T).max(dim=1).values
        duplicates = [i for i, s in zip(accepted, worst.tolist()) if s > dedupe_threshold]
        return _Decision([i for i in accepted if i not in duplicates], self.values[k], duplicates)


def _decide(embeddings, passes, memory_embeddings, *, threshold, max_keyframes, step, dedupe_threshold) -> _Decision:
    if len(passes) != embeddings.shape[0]:
        raise ValueError(f"{len(passes)} gate results for {embeddings.shape[0]} frames")
    walks = _Walks(threshold, step, max(max_keyframes, 0))
    if embeddings.shape[0] == 0 or max_keyframes <= 0:
        return _Decision([], threshold, [])
    for row, ok in zip(F.normalize(embeddings.float(), dim=-1).cpu(), passes):
        walks.push(row, bool(ok))
    return walks.decide(memory_embeddings, dedupe_threshold)


def select_keyframes(
    embeddings: torch.Tensor,
    passes: Sequence[bool],
    memory_embeddings: torch.Tensor | None,
    *,
    threshold: float = 0.9,
    max_keyframes: int = 3,
    step: float = 0.01,
    dedupe_threshold: float = 0.9,
) -> list[int]:
    """StoryMem's keyframe rule on [T, D] embeddings; returns frame indices in order (maybe none).

    Walk the frames: the first passing frame is accepted, then every passing frame whose cosine
    similarity to the last accepted keyframe is below `threshold`. While more than `max_keyframes`
    are accepted, lower the threshold by `step` and walk again (at threshold <= 0, keep the first
    `max_keyframes`). Finally drop those more similar than `dedupe_threshold` to any memory keyframe.
    """
    return _decide(embeddings, passes, memory_embeddings, threshold=threshold, max_keyframes=max_keyframes,
                   step=step, dedupe_threshold=dedupe_threshold).keyframes


@dataclass
class SelectionStats:
    frames: int  # every frame of the shot is embedded and walked, as StoryMem does
    selected: int
    duplicates: int
    threshold: float
    embed_s: float
    gate_s: float
    total_s: float


class ShotScan:
    """One shot's keyframe selection, fed its frames in order as they come (`add`), decided at the end
    (`finish`). Frames are embedded and gated in batches of the selector's `batch_size`, so the
    float copies CLIP and the gate make stay bounded; the scan keeps every frame's embedding but the
    image of only those frames some walk still in the running holds (see `_Walks`), so a FIFO shot
    of any length is scanned while it streams to the encoder, never held whole. Frame indices
    count the frames added (the published clip's)."""

    def __init__(self, selector: KeyframeSelector):
        self.selector = selector
        self._walks = _Walks(selector.threshold, selector.step, max(selector.max_keyframes, 0))
        self._pending: list[np.ndarray | torch.Tensor] = []
        self._images: dict[int, torch.Tensor] = {}
        self.embed_s = self.gate_s = self.seconds = 0.0  # seconds: all time spent in add and finish

    def add(self, frames: np.ndarray | torch.Tensor) -> None:
        """Frames uint8 [k, H, W, 3], the next ones of the shot."""
        start = time.perf_counter()
        self._pending.append(as_frames(frames))
        if sum(len(p) for p in self._pending) >= self.selector.batch_size:
            self._flush()
        self.seconds += time.perf_counter() - start

    def _flush(self) -> None:
        pending, self._pending = self._pending, []
        if not pending:
            return
        batch = pending[0] if len(pending) == 1 else torch.cat(pending)  # a shot held whole is not copied
        for at in range(0, len(batch), self.selector.batch_size):
            self._scan(batch[at:at + self.selector.batch_size])

    def _scan(self, batch: torch.Tensor) -> None:
        t0 = time.perf_counter()
        embeddings = F.normalize(self.selector.embedder.embed(batch).float(), dim=-1).cpu()
        t1 = time.perf_counter()
        passes = self.selector.gate.passes(batch)
        self.embed_s, self.gate_s = self.embed_s + t1 - t0, self.gate_s + time.perf_counter() - t1
        first = len(self._walks.rows)
        for row, ok in zip(embeddings, passes):
            self._walks.push(row, bool(ok))
        needed = self._walks.needed()
        self._images = {i: im for i, im in self._images.items() if i in needed}
        self._images.update({i: batch[i - first].clone() for i in needed if i >= first})  # not a view of the batch

    def finish(self, memory_embeddings: torch.Tensor | None = None) -> list[tuple[int, np.ndarray, torch.Tensor]]:
        """The shot's keyframes (frame index, image uint8 [H, W, 3], embedding), in order, after
        dropping those `memory_embeddings` (the story's memory) already hold."""
        start = time.perf_counter()
        self._flush()
        s = self.selector
        decision = _Decision([], s.threshold, [])
        if self._walks.rows and s.max_keyframes > 0:
            decision = self._walks.decide(memory_embeddings, s.dedupe_threshold)
        self.seconds += time.perf_counter() - start
        s.last_stats = SelectionStats(
            frames=len(self._walks.rows), selected=len(decision.keyframes), duplicates=len(decision.duplicates),
            threshold=decision.threshold, embed_s=self.embed_s, gate_s=self.gate_s, total_s=self.seconds)
        return [(i, self._images[i].numpy(), self._walks.rows[i]) for i in decision.keyframes]


class KeyframeSelector:
    """Embedder + gate + rule: picks a shot's keyframes among all its frames (`scan` for a shot fed
    as it comes, `select` for one held whole)."""

    def __init__(self, embedder: FrameEmbedder, gate: AestheticGate | None = None, *, threshold: float = 0.9,
                 max_keyframes: int = 3, step: float = 0.01, dedupe_threshold: float = 0.9, batch_size: int = 16):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        _thresholds(threshold, step)  # a bad step fails here, not after a shot is rendered
        self.embedder, self.gate = embedder, gate or NoGate()
        self.threshold, self.max_keyframes, self.step = threshold, max_keyframes, step
        self.dedupe_threshold, self.batch_size = dedupe_threshold, batch_size
        self.last_stats: SelectionStats | None = None

    def scan(self) -> ShotScan:
        return ShotScan(self)

    def select(self, frames: np.ndarray | torch.Tensor,
               memory_embeddings: torch.Tensor | None = None) -> list[tuple[int, torch.Tensor]]:
        """(frame index, embedding) of the keyframes of a shot held whole, uint8 [T, H, W, 3]."""
        scan = self.scan()
        scan.add(frames)
        return [(i, emb) for i, _, emb in scan.finish(memory_embeddings)]
