"""FIFO-Diffusion on the Wan M2V experts: shots longer than the model's native length, at constant memory.

Why: a one-pass shot holds every latent frame in one attention (cost grows with the square of its
length, memory with its length). FIFO-Diffusion (Kim et al., 2024) instead keeps a queue of latent
frames at increasing noise levels and denoises it diagonally; every model call sees a window of
the model's native length, so a shot of any length costs the same memory and a fixed number of
calls per output frame.

How (the invariants the tests check):
- The queue holds `partitions x window` latent frames (window = the native length in latent
  frames); slot j sits at noise level sigma[L-1-j] of an L-level flow-matching schedule (Wan's
  shifted sigmas), the head nearly clean, the tail pure noise.
- One iteration moves every slot one level down with one Euler flow-matching step (x += (sigma' -
  sigma) v; first order because each frame walks its own trajectory, so a multistep solver's
  history does not apply), then pops the clean head and pushes fresh noise at the tail. Each frame
  of a window gets its own timestep (per-frame, not per-token, embeddings: m2v.frame_timesteps).
- Latent partitioning: the L slots are cut into `partitions` windows, so one call spans only
  `window` noise levels. Lookahead denoising (optional, twice the calls): windows advance by half
  a window and only their noisier half is written back, so every frame is denoised with cleaner
  frames before it (the head's come from frames already popped).
- Every window is a native clip to the model: RoPE time positions 0..window-1 (window-local), the
  story memory before it at StoryMem's negative positions, the memory's latents and masks in the
  conditioning, the same text and CFG; memory frames of the noisy stream are the memory latents
  noised to the window's median level (the state a one-pass shot has them in at that level).
- The windows of one iteration read only the queue as it was before the iteration and write
  disjoint slots, so they are independent: with several runners (one per GPU of a group) they run
  concurrently, and the result does not depend on how many runners there are.
- The queue starts from a one-pass render of the first `window` latent frames (memory, MI2V/MM2V
  conditioning and all), re-noised along the diagonal: slot j holds base frame min(j, window-1).
  Output frames leave the queue one at a time and are handed on at once (decode, encode): nothing
  of size proportional to the shot is kept.
"""

from __future__ import annotations

import collections
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from storyfarm.m2v.model.conditioning import build_conditioning
from storyfarm.m2v.model.rope import memory_time_positions
from storyfarm.m2v.render.sampler import NUM_TRAIN_TIMESTEPS

StepCallback = Callable[[int, int, float, str], None]


@dataclass(frozen=True)
class FifoSettings:
    window: int  # latent frames per model call: the model's native length
    partitions: int = 2
    lookahead: bool = False

    def __post_init__(self):
        if self.window < 1:
            raise ValueError(f"fifo window: expected >= 1 latent frame, got {self.window}")
        if self.partitions < 1:
            raise ValueError(f"fifo.partitions: expected >= 1, got {self.partitions}")

    @property
    def levels(self) -> int:
        """Queue slots = noise levels = denoising steps every frame goes through."""
        return self.window * self.partitions


@dataclass(frozen=True)
class Window:
    start: int  # first queue slot the window reads; negative: popped clean frames before the head
    write_start: int  # slots [write_start, write_end) are written back
    write_end: int


def plan_windows(settings: FifoSettings, context: int = 0) -> list[Window]:
    """The windows of one iteration over a queue of `settings.levels` slots; `context` clean popped
    frames are available before the head (lookahead only)."""
    f, levels = settings.window, settings.levels
    if not settings.lookahead:
        return [Window(k * f, k * f, (k + 1) * f) for k in range(settings.partitions)]
    written = math.ceil(f / 2)
    windows = []
    for begin in range(0, levels, written):
        end = min(begin + written, levels)
        windows.append(Window(max(end - f, -context), begin, end))
    return windows


def fifo_sigmas(levels: int, shift: float) -> np.ndarray:
    """levels + 1 sigmas from (almost) pure noise down to 0: Wan's shifted flow-matching schedule."""
    u = np.linspace(1.0 - 1.0 / NUM_TRAIN_TIMESTEPS, 0.0, levels + 1)
    return shift * u / (1.0 + (shift - 1.0) * u)


class WindowRunner:
    """Runs windows on one device with its own copy of the experts (a GPU of a group). `activate`
    is called with the expert about to run (the engine's expert residency: swap mode moves it in)."""

    def __init__(self, device: torch.device | str, experts: tuple, activate: Callable | None = None):
        self.device = torch.device(device)
        self.experts = experts
        self.activate = activate


@dataclass
class _Job:
    window: Window
    latents: torch.Tensor  # [1, 16, M + f, h, w]
    timesteps: torch.Tensor  # [M + f]


class FifoSampler:
    """Diagonal denoising of one shot: `run` yields its clean latent frames [16, h, w] in order."""

    def __init__(
        self,
        settings: FifoSettings,
        runners: Sequence[WindowRunner],
        *,
        text: torch.Tensor,
        negative_text: torch.Tensor,
        guidance: tuple[float, float],
        boundary_timestep: float,
        shift: float,
        memory: torch.Tensor | None,  # [M, 16, h, w] clean memory latents, oldest first
        window_clip: torch.Tensor | None,  # [16, f, h, w] blank-clip latents of a native clip (None: T2V)
        window_pixel_frames: int,
        temporal_stride: int = 4,
        position_stride: int = 5,
        seed: int = 0,
    ):
        if not runners:
            raise ValueError("FIFO needs at least one window runner")
        self.settings, self.runners = settings, list(runners)
        self.guidance, self.boundary = guidance, boundary_timestep
        self.sigmas = fifo_sigmas(settings.levels, shift)
        self.num_memory = 0 if memory is None else memory.shape[0]
        self.positions = memory_time_positions(self.num_memory, settings.window, position_stride)
        self.generator = torch.Generator("cpu").manual_seed(seed)
        self.memory = memory
        self.memory_noise = None if memory is None else torch.randn(memory.shape, generator=self.generator)
        conditioning = None
        if window_clip is not None:
            conditioning = build_conditioning(memory, window_clip, window_pixel_frames, 0, temporal_stride)
        # everything a window needs, per runner device, made once
        self._per_device = {}
        for runner in self.runners:
            if runner.device not in self._per_device:
                text_batch = torch.cat([text, negative_text]).to(runner.device)
                self._per_device[runner.device] = (
                    text.to(runner.device), text_batch,
                    None if conditioning is None else conditioning.to(runner.device))
        self.calls = 0

    # -- the queue -------------------------------------------------------------------------------
    def _sigma(self, slot: int) -> float:
        return float(self.sigmas[self.settings.levels - 1 - slot])

    def _noise(self, shape) -> torch.Tensor:
        return torch.randn(shape, generator=self.generator)

    def initial_queue(self, base: torch.Tensor) -> torch.Tensor:
        """[L, 16, h, w]: base frames (clean [16, f, h, w]) re-noised along the diagonal."""
        f, levels = base.shape[1], self.settings.levels
        slots = []
        for j in range(levels):
            sigma = self._sigma(j)
            slots.append((1.0 - sigma) * base[:, min(j, f - 1)].float().cpu() + sigma * self._noise(base.shape[:1] + base.shape[2:]))
        return torch.stack(slots)

    # -- one window ------------------------------------------------------------------------------
    def _job(self, queue: torch.Tensor, context: Sequence[torch.Tensor], window: Window) -> _Job:
        frames, timesteps = [], []
        for slot in range(window.start, window.start + self.settings.window):
            if slot < 0:
                frames.append(context[len(context) + slot])
                timesteps.append(0.0)
            else:
                frames.append(queue[slot])
                timesteps.append(self._sigma(slot) * NUM_TRAIN_TIMESTEPS)
        video = torch.stack(frames, dim=1)  # [16, f, h, w]
        if self.num_memory:
            sigma = float(np.median([t / NUM_TRAIN_TIMESTEPS for t in timesteps]))
            noisy = (1.0 - sigma) * self.memory.float().cpu() + sigma * self.memory_noise
            video = torch.cat([noisy.permute(1, 0, 2, 3), video], dim=1)
            timesteps = [sigma * NUM_TRAIN_TIMESTEPS] * self.num_memory + timesteps
        return _Job(window, video[None], torch.tensor(timesteps, dtype=torch.float32))

    def _velocity(self, runner: WindowRunner, job: _Job) -> tuple[torch.Tensor, int]:
        """Guided flow prediction for the window's video frames [16, f, h, w], each frame from the
        expert its own noise level belongs to (a window that straddles the boundary runs both)."""
        text, text_batch, conditioning = self._per_device[runner.device]
        latents, timesteps = job.latents.to(runner.device), job.timesteps.to(runner.device)
        video_t = timesteps[self.num_memory:]
        written = slice(job.window.write_start - job.window.start, job.window.write_end - job.window.start)
        high_mask = video_t >= self.boundary
        out = torch.zeros(latents.shape[1:2] + latents.shape[2:], device=runner.device)[:, self.num_memory:]
        calls = 0
        for expert, scale, use in ((runner.experts[0], self.guidance[0], high_mask),
                                   (runner.experts[1], self.guidance[1], ~high_mask)):
            if not bool(use[written].any()):
                continue
            if runner.activate is not None:
                runner.activate(expert)
            if scale == 1.0:
                prediction = expert(latents, timesteps[None], text, self.positions, conditioning)[0]
            else:
                both = expert(latents.expand(2, *latents.shape[1:]), timesteps[None].expand(2, -1), text_batch,
                              self.positions, conditioning)
                prediction = both[1] + scale * (both[0] - both[1])
            calls += 1
            prediction = prediction[:, self.num_memory:]
            out[:, use] = prediction[:, use]
        return out.cpu(), calls

    # -- the loop --------------------------------------------------------------------------------
    def run(self, base: torch.Tensor, total: int, on_step: StepCallback | None = None) -> Iterator[torch.Tensor]:
        """Yield `total` clean latent frames [16, h, w]; `base` is the one-pass render [16, f, h, w]."""
        s = self.settings
        queue = self.initial_queue(base)
        context: collections.deque = collections.deque(maxlen=s.window - math.ceil(s.window / 2) if s.lookahead else 0)
        pool = ThreadPoolExecutor(len(self.runners)) if len(self.runners) > 1 else None
        try:
            for iteration in range(total):
                windows = plan_windows(s, len(context))
                jobs = [self._job(queue, context, w) for w in windows]  # all read the queue before any write
                if pool is None:
                    results = [self._velocity(self.runners[0], job) for job in jobs]
                else:
                    futures = [pool.submit(self._velocity, self.runners[n % len(self.runners)], job) for n, job in enumerate(jobs)]
                    results = [f.result() for f in futures]
                self.calls += sum(calls for _, calls in results)
                queue = queue.clone()
                for job, (velocity, _) in zip(jobs, results):
                    w = job.window
                    for slot in range(w.write_start, w.write_end):
                        step = float(self.sigmas[s.levels - slot]) - self._sigma(slot)
                        queue[slot] = queue[slot] + step * velocity[:, slot - w.start]
                clean = queue[0].clone()
                queue = torch.cat([queue[1:], self._noise(clean.shape)[None]])
                context.append(clean)
                if on_step is not None:
                    expert = self.runners[0].experts[1 if self._sigma(0) * NUM_TRAIN_TIMESTEPS < self.boundary else 0]
                    on_step(iteration + 1, total, self._sigma(0) * NUM_TRAIN_TIMESTEPS, expert.name)
                yield clean
        finally:
            if pool is not None:
                pool.shutdown(wait=True)
