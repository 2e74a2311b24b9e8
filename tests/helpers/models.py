"""The small real model the kernel tests share: the `tiny` preset's Wan transformer with seeded
random weights, on any device and dtype."""

from __future__ import annotations

import torch


def tiny_wan(seed: int = 0, device="cpu", dtype=torch.float32, **over):
    """The tiny preset's WanTransformer3DModel (`over` replaces config keys), eval mode."""
    from diffusers import WanTransformer3DModel

    from storyfarm.story.presets import load_preset

    torch.manual_seed(seed)
    config = {**load_preset("tiny").architecture.transformer, **over}
    return WanTransformer3DModel(**config).eval().to(device, dtype)
