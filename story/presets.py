"""Model presets: which weights, which architecture, and the render defaults that go with them.

A preset is a YAML file in configs/models/ (or any path). It is the bottom of the configuration
merge: story/shot values first, then operator overrides, then the preset. Validation names the
field and what is allowed; unknown keys are errors (a typo must not silently fall back to a
default). Paths may use ${VAR} and ${VAR:-default}; relative paths are relative to the preset file.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from storyfarm.story.config import deep_merge, expand_vars, format_validation_errors, read_mapping
from storyfarm.story.kernel_choices import COMPILE_BACKENDS, COMPILE_MODES, COMPILE_SHAPES, ROPE_KERNELS, VAE_TILING, check_attention_choice
from storyfarm.story.format import ModelLimits

WAN_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"
    "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，"
    "手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)


class PresetError(ValueError):
    pass


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RenderDefaults(_Strict):
    resolution: tuple[int, int] = (832, 480)  # width, height
    frames: int = 81
    fps: int = 16
    steps: int = Field(40, ge=1)
    shift: float = Field(4.0, gt=0)
    guidance: tuple[float, float] = (3.5, 3.5)  # high-noise, low-noise expert
    boundary: float = Field(0.9, gt=0, lt=1)
    t2v_boundary: float = Field(0.875, gt=0, lt=1)
    t2v_shift: float = Field(12.0, gt=0)  # Wan2.2-T2V-A14B's sampling shift, used for T2V first shots
    solver: Literal["unipc", "euler"] = "unipc"
    negative_prompt: str = WAN_NEGATIVE_PROMPT
    continuation: Literal["first_frame", "motion_frames"] = "first_frame"
    motion_frames: int = Field(5, ge=1)
    first_shot: Literal["t2v", "m2v"] = "t2v"
    # FIFO-Diffusion for shots longer than `frames` (the native length): the queue holds
    # partitions x native latent frames, one noise level each; lookahead doubles the model calls.
    fifo_partitions: int = Field(2, ge=1, le=16)
    fifo_lookahead: bool = False


class MemorySettings(_Strict):
    long_term: int = Field(3, ge=0)
    max_size: int = Field(10, ge=0)
    position_stride: int = Field(5, ge=1)


class KeyframeSettings(_Strict):
    threshold: float = Field(0.9, gt=0, le=1)
    max_per_shot: int = Field(3, ge=1)
    step: float = Field(0.01, gt=0)
    dedupe_threshold: float = Field(0.9, gt=0, le=1)
    gate: Literal["hpsv3", "quality", "off"] = "quality"
    gate_threshold: float | None = None  # None: the gate's own default


class LimitSettings(_Strict):
    max_frames: int = Field(321, ge=1)
    max_side: int = Field(1920, ge=16)
    max_steps: int = Field(200, ge=1)
    max_fifo_frames: int = Field(4801, ge=1)  # FIFO long shots: 5 min at 16 fps


class PoolSettings(_Strict):
    device_budget_mb: int = Field(1024, ge=0)
    cpu_budget_mb: int = Field(4096, ge=0)


class RuntimeSettings(_Strict):
    """Kernel and speed choices; the names come from storyfarm.story.kernel_choices (torch-free)."""

    allow_approximate: bool = False  # opt-in for approximate attention kernels (sage)
    attention: str = "auto"  # auto picks the best exact backend for the device
    rope: Literal[ROPE_KERNELS] = "auto"  # auto: fused Triton RMSNorm+RoPE on CUDA in eager mode
    compile: Literal[COMPILE_MODES] = "off"
    compile_backend: Literal[COMPILE_BACKENDS] = "inductor"
    compile_shapes: Literal[COMPILE_SHAPES] = "static"  # static: one graph per shape bucket
    max_shape_buckets: int = Field(12, ge=1)  # beyond this many buckets, new shapes run eager
    cuda_graphs: bool = False
    warmup_memory: tuple[Annotated[int, Field(ge=0)], ...] = (0,)  # memory counts compiled at warm-up
    fp8: bool = False  # FP8 weights (torchao, Hopper/Ada CUDA only)
    vae_tiling: Literal[VAE_TILING] = "auto"  # auto: tiled decode on CUDA
    vae_dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # auto: as loaded

    @field_validator("compile", "vae_tiling", mode="before")
    @classmethod
    def _yaml_off(cls, v, info):  # YAML 1.1 reads a bare off/on as a boolean
        if isinstance(v, bool) and (info.field_name == "vae_tiling" or not v):
            return ("on" if v else "off")
        return v

    @field_validator("attention")
    @classmethod
    def _attention_ok(cls, v: str, info):
        return check_attention_choice(v, info.data.get("allow_approximate", False), field=None)


class LoraSettings(_Strict):
    high_noise: str
    low_noise: str
    variant: Literal["mi2v", "mm2v"] = "mi2v"
    strength: float = 1.0
    alpha: float | None = None
    merge: bool = True


class WeightPaths(_Strict):
    base: str  # Wan2.2-I2V-A14B folder, diffusers or original layout
    vae: str | None = None  # default: inside base
    text_encoder: str | None = None  # diffusers-layout folder holding text_encoder/ and tokenizer/
    t2v: str | None = None  # Wan2.2-T2V-A14B folder for a story's first shot
    lora: LoraSettings | None = None
    clip: str | None = None  # local CLIP ViT-B/32 (transformers layout)
    hpsv3: str | None = None  # HPSv3 reward model weights


class Architecture(_Strict):
    """Random-weight models built in code (source: random)."""

    transformer: dict[str, Any]
    t2v_transformer: dict[str, Any] | None = None
    vae: dict[str, Any]
    text_encoder: dict[str, Any]
    text_len: int = Field(512, ge=1)
    clip_seed: int = 0


class Preset(_Strict):
    name: str
    description: str = ""
    source: Literal["random", "local"]
    seed: int = 0  # weight seed for source: random
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    architecture: Architecture | None = None
    weights: WeightPaths | None = None
    render: RenderDefaults = RenderDefaults()
    memory: MemorySettings = MemorySettings()
    keyframes: KeyframeSettings = KeyframeSettings()
    limits: LimitSettings = LimitSettings()
    pool: PoolSettings = PoolSettings()
    runtime: RuntimeSettings = RuntimeSettings()
    origin: str = "<inline>"

    @field_validator("render")
    @classmethod
    def _render_ok(cls, v: RenderDefaults):
        w, h = v.resolution
        if w % 16 or h % 16:
            raise ValueError(f"resolution {w}x{h}: width and height must be multiples of 16")
        if (v.frames - 1) % 4:
            raise ValueError(f"frames {v.frames}: the model needs 4n+1 frames")
        return v

    def model_limits(self) -> ModelLimits:
        return ModelLimits(
            spatial_multiple=16,
            temporal_stride=4,
            fps=self.render.fps,
            max_frames=self.limits.max_frames,
            max_side=self.limits.max_side,
            max_steps=self.limits.max_steps,
            native_frames=self.render.frames,
            max_fifo_frames=self.limits.max_fifo_frames,
            memory_slots=self.memory.max_size,
        )


def expand_path(value: str, base_dir: Path, where: str, origin: str) -> str:
    """A weight path from a preset: `${VAR}` expanded (strictly, as the daemon config does), `~`
    expanded, and relative paths taken from the preset file's folder."""
    expanded = os.path.expanduser(expand_vars(value, where, origin, PresetError))
    return str((base_dir / expanded).resolve()) if not os.path.isabs(expanded) else expanded


def _expand_weight_paths(data: dict, base_dir: Path, origin: str) -> dict:
    weights = data.get("weights")
    if not isinstance(weights, dict):
        return data
    out = dict(weights)
    for key in ("base", "vae", "text_encoder", "t2v", "clip", "hpsv3"):
        if isinstance(out.get(key), str):
            out[key] = expand_path(out[key], base_dir, f"weights.{key}", origin)
    if isinstance(out.get("lora"), dict):
        lora = dict(out["lora"])
        for key in ("high_noise", "low_noise"):
            if isinstance(lora.get(key), str):
                lora[key] = expand_path(lora[key], base_dir, f"weights.lora.{key}", origin)
        out["lora"] = lora
    return {**data, "weights": out}


def packaged_presets() -> list[str]:
    folder = resources.files("storyfarm.configs") / "models"
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def _read_preset(name_or_path: str, seen: tuple[str, ...] = ()) -> tuple[dict, str]:
    """One preset's mapping with its weight paths made absolute, `extends:` resolved.

    `extends: NAME|PATH` starts from another preset (packaged name, or a path relative to this
    file) and deep-merges this file's keys on top, so a variant (another size, other steps) keeps
    the base's architecture and weights in one home instead of a copy."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise PresetError(f"preset: no such file {name_or_path}")
        text, origin, base_dir = path.read_text(), str(path), path.resolve().parent
    else:
        res = resources.files("storyfarm.configs") / "models" / f"{name_or_path}.yaml"
        if not res.is_file():
            raise PresetError(f"preset: unknown preset {name_or_path!r}; packaged presets: {', '.join(packaged_presets())}")
        text, origin, base_dir = res.read_text(), f"preset {name_or_path}", Path(str(res)).parent
    data = _expand_weight_paths(read_mapping(text, origin, PresetError), base_dir, origin)
    parent = data.pop("extends", None)
    if parent is None:
        return data, origin
    if not isinstance(parent, str) or not parent:
        raise PresetError(f"{origin}: extends: expected a preset name or a YAML path, got {parent!r}")
    if origin in seen:
        raise PresetError(f"{origin}: extends: cycle through {' -> '.join(seen + (origin,))}")
    local = base_dir / parent
    base, _ = _read_preset(str(local) if local.suffix in (".yaml", ".yml") or local.exists() else parent, seen + (origin,))
    for key in ("name", "description"):  # a variant is its own preset, never the base under another file
        base.pop(key, None)
    return deep_merge(base, data), origin


def load_preset(name_or_path: str, overrides: dict | None = None) -> Preset:
    """A packaged preset by name (`tiny`) or a YAML file path; `overrides` is deep-merged on top."""
    data, origin = _read_preset(name_or_path)
    if overrides:
        data = deep_merge(data, overrides)
    data["origin"] = origin
    try:
        preset = Preset.model_validate(data)
    except ValidationError as exc:
        raise PresetError(format_validation_errors(exc, origin)) from None
    if preset.source == "random" and preset.architecture is None:
        raise PresetError(f"{origin}: architecture: required when source is random")
    if preset.source == "local" and preset.weights is None:
        raise PresetError(f"{origin}: weights: required when source is local")
    return preset
