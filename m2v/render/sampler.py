"""Flow-matching sampling over Wan2.2's two experts, with both CFG branches in one forward.

Wan2.2-A14B splits the denoising trajectory at a boundary timestep: the high-noise expert runs
while t >= boundary, the low-noise expert below it, each with its own guidance scale. Guidance
is text-only: the conditional and unconditional branches share latents and conditioning (the
story memory is in both) and differ only in the text, so they are batched as one forward of
batch 2. `on_step` is called once per denoising step and is where progress is reported and
cancellation raised; nothing else in the loop talks to the outside.

A trajectory may start part-way (`start_step`, an edit's strength): the clean `init` latents are
noised to that step's sigma, x = (1 - sigma) init + sigma noise, and only the remaining steps run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

from storyfarm.m2v.model.transformer import M2VExpert

SOLVERS = ("unipc", "euler")
NUM_TRAIN_TIMESTEPS = 1000


@dataclass(frozen=True)
class SamplerSettings:
    steps: int = 40
    shift: float = 4.0
    guidance: tuple[float, float] = (3.5, 3.5)  # (high-noise expert, low-noise expert)
    boundary: float = 0.9  # as a fraction of the training timesteps: switch at t = 900
    solver: str = "unipc"

    def __post_init__(self):
        if self.solver not in SOLVERS:
            raise ValueError(f"solver: {self.solver!r} is not one of {', '.join(SOLVERS)}")
        if self.steps < 1:
            raise ValueError(f"steps: expected >= 1, got {self.steps}")

    @property
    def boundary_timestep(self) -> float:
        return self.boundary * NUM_TRAIN_TIMESTEPS


def make_scheduler(settings: SamplerSettings, device: torch.device | str = "cpu"):
    if settings.solver == "unipc":
        scheduler = UniPCMultistepScheduler(
            num_train_timesteps=NUM_TRAIN_TIMESTEPS,
            prediction_type="flow_prediction",
            use_flow_sigmas=True,
            flow_shift=settings.shift,
            solver_order=2,
            solver_type="bh2",
            predict_x0=True,
            lower_order_final=True,
            final_sigmas_type="zero",
        )
    else:
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, shift=settings.shift)
    if settings.solver == "unipc":
        # Wan's FlowUniPCMultistepScheduler starts from linspace(1 - 1/1000, 0, steps + 1) before
        # the shift; diffusers' default flow sigmas start at 1 and end at 1/1000, which moves the
        # timesteps the model sees by up to 4. Give diffusers Wan's sigmas (it applies the shift).
        sigmas = np.linspace(1.0 - 1.0 / NUM_TRAIN_TIMESTEPS, 0.0, settings.steps + 1)[:-1]
        scheduler.set_timesteps(sigmas=sigmas, device=device)
    else:
        scheduler.set_timesteps(settings.steps, device=device)
    return scheduler


StepCallback = Callable[[int, int, float, str], None]  # (step, total, timestep, expert name)


def denoise(
    experts: tuple[M2VExpert, M2VExpert],
    noise: torch.Tensor,
    text: torch.Tensor,
    negative_text: torch.Tensor,
    time_positions,
    settings: SamplerSettings,
    conditioning: torch.Tensor | None = None,
    on_step: StepCallback | None = None,
    on_expert: Callable[[M2VExpert], None] | None = None,
    start_step: int = 0,
    init: torch.Tensor | None = None,
) -> torch.Tensor:
    """Run the whole trajectory from `noise` [1,16,T,h,w]; returns the clean latents (float32).
    `on_expert` is called with the expert about to run each step (expert residency swaps there)."""
    high, low = experts
    scheduler = make_scheduler(settings, noise.device)
    if not 0 <= start_step < settings.steps:
        raise ValueError(f"start_step: expected 0 to {settings.steps - 1}, got {start_step}")
    if start_step and init is None:
        raise ValueError("start_step > 0 needs the init latents to start from")
    latents = noise.float()
    if start_step:  # an edit that starts from a previous render: noise it to this step's level
        sigma = float(scheduler.sigmas[start_step])
        latents = (1.0 - sigma) * init.to(latents) + sigma * latents
        scheduler.set_begin_index(start_step)
    timesteps = scheduler.timesteps[start_step:]
    text_batch = torch.cat([text, negative_text], dim=0)
    for i, t in enumerate(timesteps):
        expert, scale = (high, settings.guidance[0]) if float(t) >= settings.boundary_timestep else (low, settings.guidance[1])
        if on_expert is not None:
            on_expert(expert)
        if scale == 1.0:
            prediction = expert(latents, t.expand(1), text, time_positions, conditioning)
        else:
            both = expert(latents.expand(2, *latents.shape[1:]), t.expand(2), text_batch, time_positions, conditioning)
            cond, uncond = both.chunk(2)
            prediction = uncond + scale * (cond - uncond)
        latents = scheduler.step(prediction, t, latents, return_dict=False)[0]
        if on_step is not None:
            on_step(i + 1, len(timesteps), float(t), expert.name)
    return latents
