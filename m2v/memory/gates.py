"""Aesthetic gates of keyframe selection: which frames of a shot are good enough to remember.

Why a module of its own: StoryMem's gate is HPSv3, a 7B reward model; storyfarm makes it pluggable
(HPSv3 when its weights are configured, a cheap image-quality score otherwise, or off: DESIGN.md
section 4), and the gates share nothing with the similarity walk but the frames they are given.
Every gate scores frames independently of each other, so a shot may be gated in batches of any size.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F

HPSV3_WEIGHTS_FIELD = "weights.hpsv3"  # the config field named in errors
GATE_KINDS = ("hpsv3", "quality", "off")


def as_frames(frames: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 [T, H, W, 3] (numpy or torch) -> uint8 torch tensor, validated."""
    x = frames if isinstance(frames, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(frames))
    if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 [T, H, W, 3], got {x.dtype} {list(x.shape)}")
    return x


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
        return [0.0] * as_frames(frames).shape[0]


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
        x = as_frames(frames).permute(0, 3, 1, 2).float()
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

        x = as_frames(frames).cpu().numpy()
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
