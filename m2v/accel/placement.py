"""Where the two experts live while a shot renders: both on the device, or one at a time.

Wan2.2-A14B's two 14B experts do not both fit in bf16 on one 80 GB GPU next to the text encoder
(DESIGN.md §6). `swap` keeps only the active expert on the device and parks the other in CPU
memory, moving weights at the expert boundary (twice per shot); `both` keeps them resident. The
two-GPU pipeline (high-noise expert on one GPU, low-noise on another) is a scheduling choice the
simulator models; a worker runs `both` or `swap`. `low_memory` is what an out-of-memory retry
uses: swap plus VAE tiling where the VAE offers it.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

EXPERT_RESIDENCY = ("both", "swap")
# Beside resident experts: umT5-XXL (about 11 GiB in bf16), the VAE, and a 480p shot's activations.
RESIDENT_HEADROOM_BYTES = 20 << 30


def experts_of(engine) -> list:
    """Every expert of an engine: the M2V pair, then the T2V pair where the preset has one."""
    return [e for pair in (engine.m2v_experts, engine.t2v_experts) if pair for e in pair]


def expert_load_device(device: torch.device | str, mode: str) -> str:
    """Where experts are loaded: straight onto the device when they stay there (`both`), into CPU
    memory when they are swapped in one at a time (`swap`), so that a model whose experts do not
    all fit on the GPU never tries to put them all there."""
    return "cpu" if mode == "swap" else str(device)


def check_resident_fit(mode: str, expert_bytes: int, free_bytes: int, device, experts: int) -> None:
    """Refuse `both` before loading when the experts and the headroom exceed the device's free memory."""
    if mode != "both" or expert_bytes + RESIDENT_HEADROOM_BYTES <= free_bytes:
        return
    gib = 1 << 30
    raise ValueError(
        f"scheduler.expert_placement: 'both' keeps all {experts} experts resident ({expert_bytes / gib:.1f} GiB) "
        f"plus {RESIDENT_HEADROOM_BYTES / gib:.0f} GiB for the text encoder, VAE and activations, but {device} has "
        f"{free_bytes / gib:.1f} GiB free; use 'swap' (one expert on the GPU at a time) or runtime.fp8: true "
        "(half the expert bytes)")


class ExpertResidency:
    def __init__(self, device: torch.device | str, mode: str = "both"):
        if mode not in EXPERT_RESIDENCY:
            raise ValueError(f"expert_placement must be one of {', '.join(EXPERT_RESIDENCY)}, got {mode!r}")
        self.device = torch.device(device)
        self.mode = mode
        self.swaps = 0
        self._active = None

    def park(self, experts) -> None:
        """Swap mode: every expert waits in CPU memory until it is activated."""
        if self.mode != "swap":
            return
        for expert in experts:
            expert.model.to("cpu")
        self._active = None

    def activate(self, expert) -> None:
        if self.mode != "swap" or expert is self._active:
            return
        if self._active is not None:
            self._active.model.to("cpu")
        expert.model.to(self.device)
        self._active = expert
        self.swaps += 1
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def set_expert_placement(engine, mode: str) -> None:
    """Switch a loaded engine between `both` and `swap`."""
    experts = experts_of(engine)
    residency = ExpertResidency(engine.device, mode)
    if mode == "both":
        for expert in experts:
            expert.model.to(engine.device)
    residency.park(experts)
    engine.residency = residency


@contextmanager
def low_memory(engine):
    """Render with the least device memory this engine can: experts swapped, VAE tiled."""
    previous = getattr(engine, "residency", None)
    previous_mode = previous.mode if previous is not None else "both"
    vae = engine.vae if hasattr(engine.vae, "enable_tiling") else getattr(engine.vae, "vae", None)
    tiling = hasattr(vae, "enable_tiling") and hasattr(vae, "disable_tiling")
    set_expert_placement(engine, "swap")
    if tiling:
        vae.enable_tiling()
    try:
        yield
    finally:
        if tiling:
            vae.disable_tiling()
        set_expert_placement(engine, previous_mode)
