"""Loading a preset's model set: random-weight builds or local checkpoints, plus keyframe tools.

This is the one place that turns a Preset into live modules, so the engine and (later) workers
never care where weights came from. Local loading goes through m2v.model.wan_loaders
(safetensors only, both diffusers and original Wan key layouts) and m2v.model.lora (StoryMem's
per-expert rsLoRA files).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from storyfarm.m2v.accel.placement import check_resident_fit, expert_load_device
from storyfarm.story.presets import Preset
from storyfarm.m2v.model.text import TextEncoder
from storyfarm.m2v.model.transformer import M2VExpert
from storyfarm.m2v.model.vae import VideoVAE

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Components:
    m2v_experts: tuple[M2VExpert, M2VExpert]
    t2v_experts: tuple[M2VExpert, M2VExpert] | None
    vae: VideoVAE
    text: TextEncoder
    embedder: object  # keyframes.FrameEmbedder
    gate: object  # keyframes.AestheticGate
    lora: dict | None = None


def _pair(high, low, prefix: str, device, dtype) -> tuple[M2VExpert, M2VExpert]:
    def place(model):
        # Loaders already produce `dtype`; a blanket .to(dtype) would also cast the modules
        # diffusers keeps in float32 (norms, time embedder), so only cast random builds.
        model = model.to(device)
        if model.patch_embedding.weight.dtype != dtype:
            model = model.to(dtype=dtype)
        return model

    return M2VExpert(place(high), f"{prefix}high_noise"), M2VExpert(place(low), f"{prefix}low_noise")


def _gate(preset: Preset, device: str):
    from storyfarm.m2v.memory.keyframes import make_gate

    k = preset.keyframes
    opts = {}
    if k.gate_threshold is not None:
        opts["threshold"] = k.gate_threshold
    if k.gate == "hpsv3":
        weights = preset.weights.hpsv3 if preset.weights else None
        if not weights:
            raise ValueError(f"{preset.origin}: keyframes.gate is hpsv3 but weights.hpsv3 is not set")
        opts["weights_path"] = weights
        opts["device"] = device
    return make_gate(k.gate, **opts)


def _random_components(preset: Preset, device, dtype, expert_device) -> Components:
    from storyfarm.m2v.memory.keyframes import build_tiny_clip_embedder
    from storyfarm.m2v.model.tiny import build_tiny_components

    arch = preset.architecture
    built = build_tiny_components(arch, preset.seed)
    tokenizer, text_model = built["text"]
    t2v = None
    if "t2v_high_noise" in built:
        t2v = _pair(built["t2v_high_noise"], built["t2v_low_noise"], "t2v_", expert_device, dtype)
    return Components(
        m2v_experts=_pair(built["high_noise"], built["low_noise"], "", expert_device, dtype),
        t2v_experts=t2v,
        vae=VideoVAE(built["vae"].to(device), device),
        text=TextEncoder(tokenizer, text_model.to(device), arch.text_len, device),
        embedder=build_tiny_clip_embedder(arch.clip_seed),
        gate=_gate(preset, device),
    )


def _check_fit(preset: Preset, device: str, dtype, expert_placement: str) -> None:
    """On CUDA, refuse a `both` placement whose experts cannot all be resident, before loading any."""
    from storyfarm.m2v.model.wan_loaders import wan_pair_bytes

    if not device.startswith("cuda") or expert_placement != "both":
        return
    folders = [preset.weights.base] + ([preset.weights.t2v] if preset.weights.t2v else [])
    expert_bytes = sum(wan_pair_bytes(folder, dtype) for folder in folders)
    if preset.runtime.fp8:
        expert_bytes //= 2  # the block linears (nearly all of an expert) become 1-byte weights
    free, _ = torch.cuda.mem_get_info(torch.device(device))
    check_resident_fit(expert_placement, expert_bytes, free, device, 2 * len(folders))


def _local_components(preset: Preset, device, dtype, expert_device) -> Components:
    from storyfarm.m2v.memory.keyframes import TransformersCLIPEmbedder
    from storyfarm.m2v.model.lora import load_storymem_lora
    from storyfarm.m2v.model.wan_loaders import load_text_encoder, load_wan_pair, load_wan_vae

    paths = preset.weights
    high, low, info = load_wan_pair(paths.base, dtype=dtype, device=expert_device)
    lora_info = None
    if paths.lora is not None:
        lora = paths.lora
        lora_info = {
            "high_noise": load_storymem_lora(high, lora.high_noise, strength=lora.strength, alpha=lora.alpha, merge=lora.merge),
            "low_noise": load_storymem_lora(low, lora.low_noise, strength=lora.strength, alpha=lora.alpha, merge=lora.merge),
            "variant": lora.variant,
        }
    t2v = None
    if paths.t2v:
        t_high, t_low, _ = load_wan_pair(paths.t2v, dtype=dtype, device=expert_device)
        t2v = _pair(t_high, t_low, "t2v_", expert_device, dtype)
    vae_path = paths.vae or paths.base  # load_wan_vae finds vae/ or Wan2.1_VAE.safetensors
    vae = load_wan_vae(vae_path, dtype=torch.float32 if device == "cpu" else dtype, device=device)
    tokenizer, text_model = load_text_encoder(paths.text_encoder or paths.base, dtype=dtype, device=device)
    if not paths.clip:
        raise ValueError(f"{preset.origin}: weights.clip: a local CLIP ViT-B/32 folder is required for keyframe selection")
    return Components(
        m2v_experts=_pair(high, low, "", expert_device, dtype),
        t2v_experts=t2v,
        vae=VideoVAE(vae, device),
        text=TextEncoder(tokenizer, text_model, 512, device),
        embedder=TransformersCLIPEmbedder.from_pretrained(paths.clip),
        gate=_gate(preset, device),
        lora=lora_info,
    )


def load_components(preset: Preset, device: str | torch.device = "cpu", expert_placement: str = "both") -> Components:
    """Everything a preset names, on `device`; the experts where `expert_placement` keeps them
    (m2v.placement): on the device for `both`, in CPU memory for `swap`."""
    device = str(device)
    dtype = DTYPES[preset.dtype]
    expert_device = expert_load_device(device, expert_placement)
    if preset.source == "random":
        return _random_components(preset, device, dtype, expert_device)
    _check_fit(preset, device, dtype, expert_placement)
    return _local_components(preset, device, dtype, expert_device)
