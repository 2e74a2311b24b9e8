"""Wan's two on-disk layouts: which one a folder is, how its configs and key names translate.

Why it exists: Wan2.2 models come in diffusers' layout (transformer/, transformer_2/, vae/, ...)
and in Wan's original one (high_noise_model/, low_noise_model/, Wan2.1_VAE.safetensors), each with
its own config terms and tensor names. Everything that knows those differences lives here, so the
loaders (m2v.model.wan_loaders) only build and fill models. Invariants:
- Reading is header-only (through m2v.model.checkpoint_files): nothing here reads tensor data.
- Original-to-diffusers key names use diffusers' own converters (in the loaders); the mappings
  here (to_wan_original_*) are their exact inverses: the loaders quote a file's own key names in
  errors with them, and tests write original-layout checkpoints with them.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping

import torch

from storyfarm.m2v.model.checkpoint_files import PICKLE_SUFFIXES, CheckpointError, weight_files

ORIGINAL_PREFIX = "model.diffusion_model."
_EXPERT_DIRS = {"diffusers": ("transformer", "transformer_2"),
                "wan-original": ("high_noise_model", "low_noise_model")}


# ---------------------------------------------------------------------------------------------
# Which layout a folder is, and its configs in diffusers' terms

def detect_layout(model_dir: str | Path) -> str:
    """'diffusers' (transformer/ + transformer_2/) or 'wan-original' (high/low_noise_model/)."""
    model_dir = Path(model_dir)
    for layout, dirs in _EXPERT_DIRS.items():
        if any((model_dir / d).is_dir() for d in dirs):
            return layout
    found = sorted(p.name for p in model_dir.iterdir()) if model_dir.is_dir() else "not a directory"
    raise CheckpointError(
        f"{model_dir}: unknown model layout; expected diffusers' (transformer/, transformer_2/, "
        f"vae/, text_encoder/, tokenizer/, model_index.json) or Wan's original "
        f"(high_noise_model/, low_noise_model/, Wan2.1_VAE.safetensors); found {found}")


def _wan_to_diffusers_config(cfg: Mapping[str, Any], keys, what: str) -> dict[str, Any]:
    """Translate Wan's own config.json terms (dim, num_heads, in_dim, ...) to diffusers'."""
    try:
        dim, heads = int(cfg["dim"]), int(cfg["num_heads"])
        out = {"num_attention_heads": heads, "attention_head_dim": dim // heads,
               "in_channels": int(cfg["in_dim"]), "out_channels": int(cfg["out_dim"]),
               "ffn_dim": int(cfg["ffn_dim"]), "freq_dim": int(cfg["freq_dim"]),
               "num_layers": int(cfg["num_layers"]), "eps": float(cfg.get("eps", 1e-6)),
               "text_dim": int(cfg.get("text_dim", 4096)),
               "patch_size": tuple(cfg.get("patch_size", (1, 2, 2))),
               "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads"}
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{what}: Wan config lacks or mangles {e}: {dict(cfg)}") from None
    if dim % heads:
        raise CheckpointError(f"{what}: Wan config dim {dim} is not a multiple of num_heads {heads}")
    # Wan2.1 I2V has a CLIP image branch (img_emb, k_img/v_img); Wan2.2's experts do not.
    image = keys.get("img_emb.proj.0.weight")
    out["image_dim"] = image[1][0] if image else None
    out["added_kv_proj_dim"] = dim if any(".k_img." in k for k in keys) else None
    return out


def expert_config(cfg: Mapping[str, Any], keys, what: str) -> dict[str, Any]:
    """An expert's config in diffusers' terms, from either diffusers' or Wan's config.json."""
    if "num_attention_heads" in cfg:
        name = cfg.get("_class_name", "WanTransformer3DModel")
        if name != "WanTransformer3DModel":
            raise CheckpointError(f"{what}: config is for {name}, not WanTransformer3DModel")
        return {k: v for k, v in cfg.items() if not k.startswith("_")}
    if "dim" in cfg and "num_heads" in cfg:
        return _wan_to_diffusers_config(cfg, keys, what)
    raise CheckpointError(f"{what}: config is neither diffusers' WanTransformer3DModel config "
                          f"(num_attention_heads, ...) nor Wan's (dim, num_heads, ...)")


def expert_dirs(model_dir: Path) -> tuple[str, Path, Path]:
    """(layout, high-noise expert folder, low-noise expert folder); both must exist."""
    layout = detect_layout(model_dir)
    high, low = (model_dir / d for d in _EXPERT_DIRS[layout])
    for d in (high, low):
        if not d.is_dir():
            raise CheckpointError(f"{model_dir}: {layout} layout but {d.name}/ is missing; a "
                                  "Wan2.2 A14B model needs both the high- and low-noise experts")
    return layout, high, low


def vae_source(path: Path) -> tuple[list[Path], Path | None]:
    """(weight files, config.json or None) for a vae/ folder, a model root or one file."""
    if path.is_file() or path.suffix.lower() in (".safetensors", *PICKLE_SUFFIXES):
        return [path], None
    if (path / "config.json").is_file():
        return weight_files(path), path / "config.json"
    if (path / "vae").is_dir():
        return vae_source(path / "vae")
    for name in ("Wan2.1_VAE.safetensors", "Wan2.1_VAE.pth"):
        if (path / name).exists():
            return [path / name], None
    raise CheckpointError(f"{path}: no VAE found; expected a diffusers vae/ folder (config.json "
                          "+ safetensors) or Wan2.1_VAE.safetensors")


def original_vae_res_blocks(where) -> int:
    """Residual blocks per level of an original-layout VAE, read off its flat encoder list.

    Wan's encoder is one Sequential: per level (4 with the default dim_mult) `num_res_blocks`
    residual blocks, then a resample between levels, so it has 4 * n + 3 entries.
    """
    entries = {int(k.split(".")[2]) for k in where if k.startswith("encoder.downsamples.")}
    count = max(entries) + 1 if entries else 0
    if count < 7 or (count - 3) % 4:
        raise KeyError("encoder.downsamples")
    return (count - 3) // 4


# ---------------------------------------------------------------------------------------------
# Writing the original layout (inverse of diffusers' converters)

_TO_ORIGINAL = [  # on "."-framed keys, in order
    (".condition_embedder.time_embedder.linear_1.", ".time_embedding.0."),
    (".condition_embedder.time_embedder.linear_2.", ".time_embedding.2."),
    (".condition_embedder.text_embedder.linear_1.", ".text_embedding.0."),
    (".condition_embedder.text_embedder.linear_2.", ".text_embedding.2."),
    (".condition_embedder.time_proj.", ".time_projection.1."),
    (".condition_embedder.image_embedder.norm1.", ".img_emb.proj.0."),
    (".condition_embedder.image_embedder.ff.net.0.proj.", ".img_emb.proj.1."),
    (".condition_embedder.image_embedder.ff.net.2.", ".img_emb.proj.3."),
    (".condition_embedder.image_embedder.norm2.", ".img_emb.proj.4."),
    (".attn1.", ".self_attn."), (".attn2.", ".cross_attn."),
    (".to_q.", ".q."), (".to_k.", ".k."), (".to_v.", ".v."), (".to_out.0.", ".o."),
    (".add_k_proj.", ".k_img."), (".add_v_proj.", ".v_img."), (".norm_added_k.", ".norm_k_img."),
    (".ffn.net.0.proj.", ".ffn.0."), (".ffn.net.2.", ".ffn.2."),
    (".proj_out.", ".head.head."),
    # Wan's norm3 is the cross-attention norm that diffusers calls norm2 (and vice versa).
    (".norm2.", ".norm__swap."), (".norm3.", ".norm2."), (".norm__swap.", ".norm3."),
]


def to_wan_original_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A WanTransformer3DModel state dict in Wan's original key names (no prefix)."""
    out = {}
    for key, value in state_dict.items():
        k = f".{key}."
        for old, new in _TO_ORIGINAL:
            k = k.replace(old, new)
        k = k.replace(".scale_shift_table.", ".modulation." if k.startswith(".blocks.")
                      else ".head.modulation.")
        out[k[1:-1]] = value
    return out


_VAE_RESNET = (("norm1.", "residual.0."), ("conv1.", "residual.2."), ("norm2.", "residual.3."),
               ("conv2.", "residual.6."), ("conv_shortcut.", "shortcut."))


def _vae_resnet(rest: str) -> str:
    for old, new in _VAE_RESNET:
        if rest.startswith(old):
            return new + rest[len(old):]
    return rest


def to_wan_original_vae_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An AutoencoderKLWan (Wan2.1 VAE) state dict in Wan's original key names.

    Decoder blocks are flattened four to a stage (three resnets, one upsampler), as in Wan and
    in diffusers' converter, which assumes num_res_blocks=2.
    """
    rules = [
        (r"(quant_conv)\.(.*)", lambda m: f"conv1.{m[2]}"),
        (r"(post_quant_conv)\.(.*)", lambda m: f"conv2.{m[2]}"),
        (r"(encoder|decoder)\.conv_in\.(.*)", lambda m: f"{m[1]}.conv1.{m[2]}"),
        (r"(encoder|decoder)\.norm_out\.(.*)", lambda m: f"{m[1]}.head.0.{m[2]}"),
        (r"(encoder|decoder)\.conv_out\.(.*)", lambda m: f"{m[1]}.head.2.{m[2]}"),
        (r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.*)",
         lambda m: f"{m[1]}.middle.{2 * int(m[2])}.{_vae_resnet(m[3])}"),
        (r"(encoder|decoder)\.mid_block\.attentions\.0\.(.*)", lambda m: f"{m[1]}.middle.1.{m[2]}"),
        (r"encoder\.down_blocks\.(\d+)\.(.*)",
         lambda m: f"encoder.downsamples.{m[1]}.{_vae_resnet(m[2])}"),
        (r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)",
         lambda m: f"decoder.upsamples.{4 * int(m[1]) + int(m[2])}.{_vae_resnet(m[3])}"),
        (r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.*)",
         lambda m: f"decoder.upsamples.{4 * int(m[1]) + 3}.{m[2]}"),
    ]
    out = {}
    for key, value in state_dict.items():
        for pattern, fn in rules:
            m = re.fullmatch(pattern, key)
            if m:
                key = fn(m)
                break
        out[key] = value
    return out
