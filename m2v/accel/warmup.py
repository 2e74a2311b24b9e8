"""Warm-up at worker start: run the forwards a worker will run before it takes its first shot.

The first forward of a shape pays for everything that is lazy: torch.compile graphs (one per shape
bucket), cuDNN/cuBLAS heuristics, the caching allocator's pools, the text encoder on the negative
prompt (cached in the latent pool for every later shot). Doing it at start moves that cost out of
the first shot's latency and out of its ETA, and it makes the attention backend that actually ran
known (and logged) before any work arrives.

What runs: for each expert pair (M2V, and T2V when present), each memory count of
`runtime.warmup_memory` (T2V: none), and each CFG batch the preset's guidance implies (2, or 1 for
guidance 1.0), one forward at the preset's default resolution and frame count on random inputs.
"""

from __future__ import annotations

import logging
import time

import torch

from storyfarm.kernels import attention
from storyfarm.m2v.model.rope import memory_time_positions

log = logging.getLogger(__name__)


def _batches(guidance: tuple[float, float]) -> list[int]:
    return sorted({1 if g == 1.0 else 2 for g in guidance})


def warm_up(engine, memory_counts=None) -> dict:
    """Run the warm-up forwards on `engine`; returns a report (also logged)."""
    preset = engine.preset
    counts = tuple(preset.runtime.warmup_memory if memory_counts is None else memory_counts)
    if any(int(m) < 0 for m in counts):
        raise ValueError(f"warm-up memory counts must be >= 0, got {counts}")
    width, height = preset.render.resolution
    s = engine.vae.spatial_stride
    frames = engine.vae.latent_frames(preset.render.frames)
    text = engine._text(preset.render.negative_prompt, "shared")  # the cached negative prompt
    generator = torch.Generator("cpu").manual_seed(0)
    residency = getattr(engine, "residency", None)
    start, forwards = time.perf_counter(), 0
    pairs = [(engine.m2v_experts, counts)]
    if engine.t2v_experts is not None:
        pairs.append((engine.t2v_experts, (0,)))
    for pair, memory in pairs:
        for expert in pair:
            if residency is not None:
                residency.activate(expert)
            for m in memory:
                for batch in _batches(preset.render.guidance):
                    shape = (batch, engine.vae.channels, m + frames, height // s, width // s)
                    latents = torch.randn(shape, generator=generator).to(engine.device)
                    conditioning = None
                    if expert.takes_conditioning:
                        conditioning = torch.randn((1, 4 + engine.vae.channels, *shape[2:]), generator=generator).to(engine.device)
                    timestep = torch.full((batch,), 900.0, device=engine.device)
                    expert(latents, timestep, text.expand(batch, -1, -1), memory_time_positions(m, frames), conditioning)
                    forwards += 1
    if engine.device.type == "cuda":
        torch.cuda.synchronize(engine.device)
    report = {
        "seconds": round(time.perf_counter() - start, 3),
        "forwards": forwards,
        "memory_counts": list(counts),
        "attention": attention.describe(),
        "runtime": engine.runtime.as_dict() if getattr(engine, "runtime", None) else None,
        "compile": {e.name: e.regions.stats.as_dict() for pair, _ in pairs for e in pair if e.regions is not None},
    }
    log.info("warm-up: %d forwards in %.1f s; attention ran: %s", forwards, report["seconds"], attention.backend_label())
    return report
