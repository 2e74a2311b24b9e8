"""A FIFO long shot end to end: the base render, the diagonal queue, and streaming decode.

Why apart from m2v.fifo: that module is the sampler (queue, windows, steps); this one connects it
to an Engine (prompts, memory latents, conditioning, expert residency, extra GPUs of a group) and
turns the popped latent frames into pixels as they come. Wan's VAE decoder is causal in time:
diffusers decodes a clip latent frame by latent frame, keeping a small cache of each causal
convolution's last inputs. `StreamingDecoder` runs that same loop across calls, so the memory held
is the cache (two frames per layer), never the clip; the first latent frame gives one pixel frame,
every later one `temporal_stride` frames, exactly as a whole-clip decode (tested). The shot's
frames are a generator: the caller encodes them as they arrive.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Iterator

import numpy as np
import torch
from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify

from storyfarm.m2v.model.components import load_components
from storyfarm.m2v.render.engine import Engine, ShotPlan, _Stopwatch
from storyfarm.m2v.render.fifo import FifoSampler, FifoSettings, StepCallback, WindowRunner
from storyfarm.m2v.model.vae import VideoVAE, to_uint8


class StreamingDecoder:
    """Push normalised latent frames [C, h, w] in order; get uint8 pixel frames [k, H, W, 3] back."""

    def __init__(self, vae: VideoVAE):
        self.vae = vae
        self._model = vae.vae
        self._cache: list = [None] * self._model._cached_conv_counts["decoder"]
        self._mean = vae._mean.to(vae.device)
        self._std = vae._std.to(vae.device)
        self.latent_frames = 0

    @torch.no_grad()
    def push(self, latent: torch.Tensor) -> np.ndarray:
        model = self._model
        z = latent.float().to(self.vae.device)[:, None] * self._std + self._mean  # [C, 1, h, w]
        x = model.post_quant_conv(z[None].to(self.vae.dtype))
        out = model.decoder(x, feat_cache=self._cache, feat_idx=[0], first_chunk=self.latent_frames == 0)
        if model.config.patch_size is not None:
            out = unpatchify(out, patch_size=model.config.patch_size)
        self.latent_frames += 1
        return to_uint8(out.clamp(-1.0, 1.0)[0])


def add_window_devices(engine: Engine, devices: list[str]) -> None:
    """Load a copy of the experts on each extra device of the worker's GPU group: the windows of a
    FIFO iteration are then spread over the engine's device and these."""
    for device in devices:
        components = load_components(engine.preset, device)
        engine.window_replicas.append((torch.device(device), components.m2v_experts, components.t2v_experts))


def window_runners(engine: Engine, use_t2v: bool) -> list[WindowRunner]:
    experts = engine.t2v_experts if use_t2v else engine.m2v_experts
    runners = [WindowRunner(engine.device, experts, engine.residency.activate)]
    for device, m2v, t2v in engine.window_replicas:
        runners.append(WindowRunner(device, t2v if use_t2v else m2v))
    return runners


@dataclass
class FifoRender:
    frames: Iterator[np.ndarray]  # uint8 [H, W, 3], one at a time, as they leave the queue
    model: str
    memory_ids: list[str]
    time_positions: list[int]  # of every window: memory, then 0..window-1
    settings: FifoSettings
    seconds: dict[str, float] = field(default_factory=dict)
    stats: dict = field(default_factory=dict)  # filled as the frames are consumed


def render_fifo_shot(engine: Engine, plan: ShotPlan, settings: FifoSettings, on_step: StepCallback | None = None,
                     on_stage=None) -> FifoRender:
    """Render `plan` (any length, 4n+1 frames) by FIFO-Diffusion over windows of the native length."""
    if plan.start_step:
        raise ValueError("edit strength: a FIFO shot always starts from noise; re-render it without a strength")
    native = (settings.window - 1) * engine.vae.temporal_stride + 1
    base_plan = replace(plan, frames=native)
    total = engine.vae.latent_frames(plan.frames)
    watch = _Stopwatch(on_stage)  # the engine's stage names: text_encode, memory_encode (then denoise, vae_decode)
    setup = engine.prepare(base_plan, watch)
    seconds = watch.seconds
    base_steps = setup.sampler.steps
    steps_total = base_steps + total

    def base_step(step, _total, timestep, expert):
        if on_step is not None:
            on_step(step, steps_total, timestep, expert)

    def fifo_step(step, _total, timestep, expert):
        if on_step is not None:
            on_step(base_steps + step, steps_total, timestep, expert)

    sampler = FifoSampler(
        settings, window_runners(engine, setup.use_t2v), text=setup.text, negative_text=setup.negative,
        guidance=setup.sampler.guidance, boundary_timestep=setup.sampler.boundary_timestep, shift=setup.sampler.shift,
        memory=setup.memory, window_clip=None if setup.use_t2v else engine.blank_clip(base_plan),
        window_pixel_frames=native, temporal_stride=engine.vae.temporal_stride,
        position_stride=engine.preset.memory.position_stride, seed=plan.seed + 1,
    )
    stats = {"window": settings.window, "partitions": settings.partitions, "lookahead": settings.lookahead,
             "levels": settings.levels, "latent_frames": total, "runners": len(sampler.runners)}

    def frames() -> Iterator[np.ndarray]:
        t = time.perf_counter()
        base = engine.denoise(setup, base_plan, base_step)[0, :, setup.num_memory:]
        seconds["denoise"] = time.perf_counter() - t
        decoder = StreamingDecoder(engine.vae)
        seconds.setdefault("vae_decode", 0.0)
        t = time.perf_counter()
        for latent in sampler.run(base, total, fifo_step):
            now = time.perf_counter()
            seconds["denoise"] += now - t
            pixels = decoder.push(latent)
            seconds["vae_decode"] += time.perf_counter() - now
            yield from pixels
            t = time.perf_counter()
        stats["model_calls"] = sampler.calls + base_steps

    return FifoRender(frames=frames(), model="t2v" if setup.use_t2v else "m2v",
                      memory_ids=[] if setup.use_t2v else [kid for kid, _ in plan.memory],
                      time_positions=sampler.positions, settings=settings, seconds=seconds, stats=stats)
