"""The render engine: one loaded model set that renders one shot at a time.

An Engine owns the experts (M2V pair, optional T2V pair for first shots), the VAE, the text encoder
and the latent pool. It knows nothing about stories or files: the story driver (or a worker) hands
it a fully resolved ShotPlan and gets frames back. Everything that can be reused across shots goes
through the latent pool (keyframe latents, the blank conditioning clip, the negative prompt), so a
shot pays only for what is new: its prompt, keyframes the pool has not seen, and its MI2V/MM2V clip.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np
import torch

from storyfarm.kernels import attention
from storyfarm.m2v.model.components import Components, load_components
from storyfarm.m2v.model.conditioning import build_conditioning
from storyfarm.m2v.memory.latent_pool import LatentPool
from storyfarm.m2v.accel.placement import ExpertResidency, experts_of
from storyfarm.story.presets import Preset
from storyfarm.m2v.model.rope import memory_time_positions
from storyfarm.m2v.accel.runtime import apply_runtime
from storyfarm.m2v.render.sampler import SamplerSettings, StepCallback, denoise
from storyfarm.m2v.model.vae import fit_image

SHARED = "shared"


@dataclass
class ShotPlan:
    """Everything one shot needs, already merged (shot > story > operator > preset)."""

    story_key: str
    prompt: str
    negative_prompt: str
    seed: int
    width: int
    height: int
    frames: int
    sampler: SamplerSettings
    memory: list[tuple[str, np.ndarray]] = field(default_factory=list)  # (keyframe id, uint8 HWC), oldest first
    known_frames: np.ndarray | None = None  # MI2V (1 frame) / MM2V (motion frames), uint8 [k,H,W,3]
    use_t2v: bool = False
    # An edit with a strength starts from the previous take instead of pure noise: its frames
    # (uint8 [frames,H,W,3], as rendered) are encoded and noised to step `start_step`'s level.
    start_step: int = 0
    init_frames: np.ndarray | None = None


@dataclass
class ShotSetup:
    """What denoising a shot needs, resolved once: text, experts, conditioning, positions (one-pass
    and FIFO rendering share it)."""

    text: torch.Tensor
    negative: torch.Tensor
    experts: tuple
    sampler: SamplerSettings
    conditioning: torch.Tensor | None  # [1, 20, M + F, h, w] on the device; None for T2V experts
    memory: torch.Tensor | None  # [M, C, h, w] clean memory latents
    num_memory: int
    latent_frames: int
    height: int  # latent grid
    width: int
    positions: list[int]
    use_t2v: bool


@dataclass
class ShotRender:
    frames: np.ndarray  # uint8 [F,H,W,3]
    model: str  # "m2v" | "t2v"
    memory_ids: list[str]
    time_positions: list[int]
    seconds: dict[str, float]


class _Stopwatch:
    """Seconds per render stage; `on_enter(stage)` is told as each stage begins (ShotFeed.enter)."""

    def __init__(self, on_enter: Callable[[str], None] | None = None):
        self.seconds: dict[str, float] = {}
        self.on_enter = on_enter

    def stage(self, name):
        watch = self

        class _Stage:
            def __enter__(self):
                if watch.on_enter is not None:
                    watch.on_enter(name)
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                watch.seconds[name] = watch.seconds.get(name, 0.0) + time.perf_counter() - self.t0

        return _Stage()


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


class Engine:
    def __init__(self, preset: Preset, device: str = "cpu", components: Components | None = None,
                 expert_placement: str = "both"):
        self.preset = preset
        self.device = torch.device(device)
        self.components = components or load_components(preset, device, expert_placement)
        c = self.components
        self.m2v_experts = c.m2v_experts
        self.t2v_experts = c.t2v_experts
        self.vae = c.vae
        # swap: experts were loaded into CPU memory and wait there (set_expert_placement() switches later)
        self.residency = ExpertResidency(self.device, expert_placement)
        self.residency.park(experts_of(self))
        self.text = c.text
        self.window_replicas: list = []  # (device, m2v experts, t2v experts) per extra GPU for FIFO windows
        self.latent_pool = LatentPool(
            self.device,
            budget_bytes=preset.pool.device_budget_mb << 20,
            cpu_budget_bytes=preset.pool.cpu_budget_mb << 20,
        )
        self.runtime = apply_runtime(self)  # attention backend, RoPE kernel, FP8, compile, VAE (preset runtime:)

    @property
    def attention_backend(self) -> str:
        """The attention backend(s) that ran in this process, else the one configured to run."""
        ran = attention.describe()["ran"]
        return "+".join(ran) if ran else self.runtime.attention_backend

    def recompiles(self) -> int:
        """Graphs torch.compile has built for this engine's experts so far (0 when not compiled)."""
        return sum(e.regions.stats.compiles for e in experts_of(self) if e.regions is not None)

    def warm_up(self, memory_counts=None) -> dict:
        """Compile and warm the forwards a worker will run (m2v.warmup); call once after loading."""
        from storyfarm.m2v.accel.warmup import warm_up

        return warm_up(self, memory_counts)

    @property
    def has_t2v(self) -> bool:
        return self.t2v_experts is not None

    def _text(self, prompt: str, namespace: str) -> torch.Tensor:
        return self.latent_pool.get_or_create((namespace, "text", _digest(prompt)), lambda: self.text.encode([prompt]))

    @staticmethod
    def latent_name(kid: str, image: np.ndarray) -> str:
        """A keyframe latent's identity: its id and its pixels (a re-rendered shot may reuse an id
        for a different image; its old latent must never be used for the new one)."""
        return f"{kid}:{hashlib.sha256(np.ascontiguousarray(image).tobytes()).hexdigest()[:16]}"

    def _keyframe_keys(self, plan: ShotPlan) -> list[tuple]:
        return [(plan.story_key, "keyframe", self.latent_name(kid, img), plan.width, plan.height) for kid, img in plan.memory]

    def export_memory_latents(self, plan: ShotPlan) -> dict[str, torch.Tensor]:
        """The plan's keyframe latents the pool holds, by latent_name, on the CPU (to persist)."""
        out = {}
        for key in self._keyframe_keys(plan):
            if key in self.latent_pool:
                out[key[2]] = self.latent_pool.get(key).detach().to("cpu")
        return out

    def import_memory_latents(self, plan: ShotPlan, latents: dict[str, torch.Tensor]) -> int:
        """Seed the pool with persisted latents of the plan's keyframes; returns how many were used."""
        used = 0
        for key in self._keyframe_keys(plan):
            if key not in self.latent_pool and key[2] in latents:
                self.latent_pool.put(key, latents[key[2]])
                used += 1
        return used

    def memory_latents(self, plan: ShotPlan) -> torch.Tensor | None:
        """[M, C, h, w] for the plan's memory window; encodes only keyframes the pool lacks."""
        if not plan.memory:
            return None
        keys = self._keyframe_keys(plan)
        found = [self.latent_pool.get(k) for k in keys]
        missing = [i for i, t in enumerate(found) if t is None]
        if missing:
            images = [fit_image(plan.memory[i][1], plan.width, plan.height) for i in missing]
            for i, latent in zip(missing, self.vae.encode_images(images)):
                found[i] = self.latent_pool.put(keys[i], latent)
        return torch.stack(found)

    def blank_clip(self, plan: ShotPlan) -> torch.Tensor:
        key = (SHARED, "blank_clip", plan.width, plan.height, plan.frames)
        return self.latent_pool.get_or_create(key, lambda: self.vae.encode_blank_clip(plan.frames, plan.width, plan.height))

    def render_shot(self, plan: ShotPlan, on_step: StepCallback | None = None,
                    on_stage: Callable[[str], None] | None = None) -> ShotRender:
        watch = _Stopwatch(on_stage)
        setup = self.prepare(plan, watch)
        with watch.stage("denoise"):
            latents = self.denoise(setup, plan, on_step)
        with watch.stage("vae_decode"):
            frames = self.vae.decode(latents[0, :, setup.num_memory:])  # memory latents are never decoded
        return ShotRender(
            frames=frames,
            model="t2v" if setup.use_t2v else "m2v",
            memory_ids=[kid for kid, _ in plan.memory] if not setup.use_t2v else [],
            time_positions=setup.positions,
            seconds=watch.seconds,
        )

    def denoise(self, setup: ShotSetup, plan: ShotPlan, on_step: StepCallback | None = None) -> torch.Tensor:
        """The shot's latents [1, 16, M + F, h, w] from the plan's seed (and previous take)."""
        generator = torch.Generator("cpu").manual_seed(plan.seed)
        noise = torch.randn(1, self.vae.channels, setup.num_memory + setup.latent_frames, setup.height, setup.width,
                            generator=generator)
        init = None
        if plan.start_step:
            if plan.init_frames is None or len(plan.init_frames) != plan.frames:
                got = "none" if plan.init_frames is None else len(plan.init_frames)
                raise ValueError(f"edit strength: the previous take must have the shot's {plan.frames} frames, got {got}")
            video = self.vae.encode_clip(np.stack([fit_image(f, plan.width, plan.height) for f in plan.init_frames]))
            init = video[None] if setup.memory is None else torch.cat([setup.memory.permute(1, 0, 2, 3), video], 1)[None]
        return denoise(
            setup.experts,
            noise.to(self.device),
            setup.text,
            setup.negative,
            setup.positions,
            setup.sampler,
            conditioning=setup.conditioning,
            on_step=on_step,
            on_expert=self.residency.activate,
            start_step=plan.start_step,
            init=None if init is None else init.to(self.device),
        )

    def prepare(self, plan: ShotPlan, watch: _Stopwatch | None = None) -> ShotSetup:
        """Encode the prompts and the memory, build the conditioning: everything but the noise."""
        watch = watch or _Stopwatch()
        s = self.vae.spatial_stride
        if plan.width % (2 * s) or plan.height % (2 * s) or (plan.frames - 1) % self.vae.temporal_stride:
            raise ValueError(f"shot size {plan.width}x{plan.height}x{plan.frames} breaks the model's strides")
        use_t2v = plan.use_t2v and self.has_t2v and not plan.memory and plan.known_frames is None
        with watch.stage("text_encode"):
            text = self._text(plan.prompt, plan.story_key)
            negative = self._text(plan.negative_prompt, SHARED)
        latent_frames = self.vae.latent_frames(plan.frames)
        h, w = plan.height // s, plan.width // s
        sampler = plan.sampler
        if use_t2v:
            experts, conditioning, num_memory, memory = self.t2v_experts, None, 0, None
            sampler = replace(sampler, boundary=self.preset.render.t2v_boundary, shift=self.preset.render.t2v_shift)
        else:
            with watch.stage("memory_encode"):
                memory = self.memory_latents(plan)
                num_memory = 0 if memory is None else memory.shape[0]
                if plan.known_frames is not None and len(plan.known_frames):
                    known = np.stack([fit_image(f, plan.width, plan.height) for f in plan.known_frames])
                    clip = self.vae.encode_blank_clip(plan.frames, plan.width, plan.height, known=known)
                    known_count = len(known)
                else:
                    clip, known_count = self.blank_clip(plan), 0
                conditioning = build_conditioning(memory, clip, plan.frames, known_count, self.vae.temporal_stride)
            experts = self.m2v_experts
        positions = memory_time_positions(num_memory, latent_frames, self.preset.memory.position_stride)
        return ShotSetup(
            text=text, negative=negative, experts=experts, sampler=sampler,
            conditioning=None if conditioning is None else conditioning.to(self.device),
            memory=None if use_t2v else memory, num_memory=num_memory, latent_frames=latent_frames,
            height=h, width=w, positions=positions, use_t2v=use_t2v,
        )
