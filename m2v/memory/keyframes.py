"""Keyframe selection: which frames of a rendered shot join the story's memory (StoryMem).

Role: after each shot, embed its frames with CLIP, drop frames an aesthetic gate rejects, keep frames
that differ enough from the last kept one (tightening until at most `max_keyframes` remain), and
skip those the story's memory already holds. The decision itself (`select_keyframes`) is a pure
function on tensors; embedders and gates are pluggable objects around it.

Invariants:
- Embeddings are float32 [T, D] with L2-normalised rows, so a dot product is a cosine similarity.
  CLIP preprocessing is done here in torch (no torchvision, no image-processor class).
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

__all__ = [
    "AestheticGate", "FrameEmbedder", "HPSv3Gate", "KeyframeSelector", "NoGate", "OpenCLIPEmbedder",
    "QualityGate", "SelectionStats", "TransformersCLIPEmbedder", "build_tiny_clip_embedder",
    "candidate_indices", "make_gate", "select_keyframes",
]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HPSV3_WEIGHTS_FIELD = "weights.hpsv3"  # the config field named in errors
GATE_KINDS = ("hpsv3", "quality", "off")


def _as_frames(frames: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 [T, H, W, 3] (numpy or torch) -> uint8 torch tensor, validated."""
    x = frames if isinstance(frames, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(frames))
    if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 [T, H, W, 3], got {x.dtype} {list(x.shape)}")
    return x


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
        x = _as_frames(frames)
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


# ---- aesthetic gates -------------------------------------------------------------------------
@runtime_checkable
class AestheticGate(Protocol):
    name: str
    threshold: float

    def scores(self, frames: np.ndarray) -> list[float]: ...

    def passes(self, frames: np.ndarray) -> list[bool]: ...


class _ThresholdGate:
    name = "gate"
    threshold = 0.0

    def scores(self, frames) -> list[float]:
        raise NotImplementedError

    def passes(self, frames) -> list[bool]:
        """A frame passes when its score is at least the threshold (the official `score >= 3.0`)."""
        return [s >= self.threshold for s in self.scores(frames)]


class NoGate(_ThresholdGate):
    """Every frame passes."""

    name = "off"
    threshold = -math.inf

    def scores(self, frames) -> list[float]:
        return [0.0] * _as_frames(frames).shape[0]


class QualityGate(_ThresholdGate):
    """A cheap no-reference image-quality score in 0..10 (HPSv3's usual range), for when HPSv3 is absent.

    On luma Y (BT.601, 0..255) of the frame downscaled to a short side of at most `analysis_size`
    (so the score does not depend on the render resolution):
      sharpness = min(1, log(1 + var(Laplacian(Y))) / log(1 + 1000))
      contrast  = min(1, std(Y) / 50)
      exposure  = (1 - (2 * mean(Y) / 255 - 1) ** 2) * (1 - fraction of pixels with Y <= 3 or >= 252)
      score     = 10 * sharpness * contrast ** 0.25 * exposure ** 0.25
    A product, so a frame failing any one criterion outright (flat, black, blown out) scores near 0,
    while a sharp, well-exposed textured frame scores near 10. Sharpness weighs most because blur
    (motion blur, fades) is what generated frames fail on: at the default threshold 3.0 a frame with a
    Laplacian variance below about 7 fails even with full contrast and exposure.
    """

    name = "quality"

    def __init__(self, threshold: float = 3.0, analysis_size: int = 256):
        self.threshold = float(threshold)
        self.analysis_size = analysis_size

    def components(self, frames) -> dict[str, torch.Tensor]:
        x = _as_frames(frames).permute(0, 3, 1, 2).float()
        if min(x.shape[-2:]) > self.analysis_size:
            scale = self.analysis_size / min(x.shape[-2:])
            x = F.interpolate(x, scale_factor=scale, mode="area")
        luma = (x * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
        kernel = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]]).view(1, 1, 3, 3)
        laplacian = F.conv2d(luma, kernel).flatten(1)
        luma = luma.flatten(1)
        mean = luma.mean(1) / 255.0
        clipped = ((luma <= 3) | (luma >= 252)).float().mean(1)
        return {
            "sharpness": (torch.log1p(laplacian.var(1)) / math.log1p(1000.0)).clamp(0, 1),
            "contrast": (luma.std(1) / 50.0).clamp(0, 1),
            "exposure": ((1 - (2 * mean - 1) ** 2) * (1 - clipped)).clamp(0, 1),
        }

    def scores(self, frames) -> list[float]:
        c = self.components(frames)
        score = 10 * c["sharpness"] * c["contrast"] ** 0.25 * c["exposure"] ** 0.25
        return score.tolist()


class HPSv3Gate(_ThresholdGate):
    """HPSv3 reward (the official gate, score >= 3.0), loaded once and reused for every shot.

    Frames are scored with an empty prompt, as the official pipeline does.
    """

    name = "hpsv3"

    def __init__(self, weights_path: str | None, threshold: float = 3.0, device: str = "cpu", *,
                 config_path: str | None = None, batch_size: int = 4):
        if not weights_path or not Path(weights_path).is_file():
            raise FileNotFoundError(f"HPSv3 weights not found at {weights_path!r}: set {HPSV3_WEIGHTS_FIELD} to "
                                    "the local HPSv3 checkpoint, or choose the 'quality' or 'off' gate")
        try:
            from hpsv3 import HPSv3RewardInferencer
        except Exception as exc:
            raise ImportError(f"{HPSV3_WEIGHTS_FIELD} is set but the `hpsv3` package does not import; install "
                              "it or choose the 'quality' or 'off' gate") from exc
        self.threshold = float(threshold)
        self.batch_size = batch_size
        self._inferencer = HPSv3RewardInferencer(config_path=config_path, checkpoint_path=str(weights_path),
                                                 device=device)

    def scores(self, frames) -> list[float]:
        from PIL import Image

        x = _as_frames(frames).cpu().numpy()
        out: list[float] = []
        for start in range(0, len(x), self.batch_size):
            images = [Image.fromarray(f) for f in x[start:start + self.batch_size]]
            with torch.no_grad():
                rewards = self._inferencer.reward(image_paths=images, prompts=[""] * len(images))
            out.extend(float(r[0]) for r in rewards)  # mu of the reward head, as upstream
        return out


def make_gate(kind: str, **opts) -> AestheticGate:
    """Build an aesthetic gate by config name: "hpsv3" | "quality" | "off"."""
    if kind == "hpsv3":
        return HPSv3Gate(**opts)
    if kind == "quality":
        return QualityGate(**opts)
    if kind == "off":
        return NoGate()
    raise ValueError(f"unknown aesthetic gate {kind!r}; allowed: {', '.join(GATE_KINDS)}")


# ---- the decision ----------------------------------------------------------------------------
@dataclass
class _Decision:
    keyframes: list[int]
    threshold: float  # the similarity threshold the walk ended at
    duplicates: list[int]  # accepted but dropped as already in memory


def _walk(similarity: torch.Tensor, passes: Sequence[bool], threshold: float, limit: int) -> list[int]:
    """Accept the first passing frame, then each passing frame less similar than `threshold` to
    the last accepted one. Stops early once more than `limit` are accepted."""
    accepted: list[int] = []
    for i in range(similarity.shape[0]):
        if passes[i] and (not accepted or similarity[accepted[-1], i] < threshold):
            accepted.append(i)
            if len(accepted) > limit:
                break
    return accepted


def _decide(embeddings, passes, memory_embeddings, *, threshold, max_keyframes, step, dedupe_threshold) -> _Decision:
    if len(passes) != embeddings.shape[0]:
        raise ValueError(f"{len(passes)} gate results for {embeddings.shape[0]} frames")
    if step <= 0:
        raise ValueError(f"step must be positive, got {step}")
    if embeddings.shape[0] == 0 or max_keyframes <= 0:
        return _Decision([], threshold, [])
    emb = F.normalize(embeddings.float(), dim=-1)
    similarity = (emb @ emb.T).cpu()
    rounds = 0
    while True:
        current = threshold - rounds * step  # no accumulated float drift
        accepted = _walk(similarity, passes, current, max_keyframes)
        if len(accepted) <= max_keyframes:
            break
        if current <= 0:  # bounded: keep the first ones rather than loop on
            accepted = accepted[:max_keyframes]
            break
        rounds += 1
    duplicates: list[int] = []
    if memory_embeddings is not None and memory_embeddings.numel() and accepted:
        memory = F.normalize(memory_embeddings.float().to(emb.device), dim=-1)
        worst = (emb[accepted] @ memory.T).max(dim=1).values.cpu()
        duplicates = [i for i, s in zip(accepted, worst.tolist()) if s > dedupe_threshold]
        accepted = [i for i in accepted if i not in duplicates]
    return _Decision(accepted, current, duplicates)


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


def candidate_indices(num_frames: int, max_candidates: int = 32) -> list[int]:
    """Evenly spaced frame indices to score, at most `max_candidates`, always the first and last."""
    if num_frames <= max_candidates:
        return list(range(num_frames))
    return sorted({int(round(v)) for v in np.linspace(0, num_frames - 1, max(2, max_candidates))})


@dataclass
class SelectionStats:
    frames: int
    candidates: int
    selected: int
    duplicates: int
    threshold: float
    embed_s: float
    gate_s: float
    total_s: float


class KeyframeSelector:
    """Embedder + gate + rule: picks a shot's keyframes, returning (frame index, embedding) pairs."""

    def __init__(self, embedder: FrameEmbedder, gate: AestheticGate | None = None, *, threshold: float = 0.9,
                 max_keyframes: int = 3, step: float = 0.01, dedupe_threshold: float = 0.9,
                 max_candidates: int = 32):
        self.embedder, self.gate = embedder, gate or NoGate()
        self.threshold, self.max_keyframes, self.step = threshold, max_keyframes, step
        self.dedupe_threshold, self.max_candidates = dedupe_threshold, max_candidates
        self.last_stats: SelectionStats | None = None

    def select(self, frames: np.ndarray | torch.Tensor,
               memory_embeddings: torch.Tensor | None = None) -> list[tuple[int, torch.Tensor]]:
        start = time.perf_counter()
        x = _as_frames(frames)
        candidates = candidate_indices(x.shape[0], self.max_candidates)
        subset = x[candidates]
        embeddings = self.embedder.embed(subset) if candidates else torch.empty(0, 0)
        embedded = time.perf_counter()
        passes = self.gate.passes(subset) if candidates else []
        gated = time.perf_counter()
        decision = _decide(embeddings, passes, memory_embeddings, threshold=self.threshold,
                           max_keyframes=self.max_keyframes, step=self.step,
                           dedupe_threshold=self.dedupe_threshold)
        self.last_stats = SelectionStats(
            frames=x.shape[0], candidates=len(candidates), selected=len(decision.keyframes),
            duplicates=len(decision.duplicates), threshold=decision.threshold, embed_s=embedded - start,
            gate_s=gated - embedded, total_s=time.perf_counter() - start,
        )
        return [(candidates[i], embeddings[i]) for i in decision.keyframes]
