"""Loading the Wan2.2 experts, VAE and text encoder from local checkpoints, strictly.

Why it exists: this is the one entry point that turns checked files (m2v.model.checkpoint_files)
in either layout (m2v.model.wan_layouts) into live diffusers/transformers modules. Invariants:
- Experts are ~14B parameters: the model is built on the meta device and tensors are assigned,
  read straight onto the target device, so no weight is allocated twice.
- Original-layout key names are converted with diffusers' own converters, applied to the names
  first, so missing or unexpected keys and wrong shapes are reported (in the file's own names)
  before any tensor is read. Loading is strict: no tensor may be left on the meta device.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping

import torch
from diffusers import AutoencoderKLWan, WanTransformer3DModel
from diffusers.loaders.single_file_utils import (
    convert_wan_transformer_to_diffusers,
    convert_wan_vae_to_diffusers,
)
from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed
from safetensors import safe_open

from storyfarm.m2v.model.checkpoint_files import (
    CheckpointError,
    index_shards,
    owned_tensor,
    read_json_object,
    read_safetensors_header,
    weight_files,
)
from storyfarm.m2v.model.wan_layouts import (
    ORIGINAL_PREFIX,
    expert_config,
    expert_dirs,
    original_vae_res_blocks,
    to_wan_original_state_dict,
    to_wan_original_vae_state_dict,
    vae_source,
)


# ---------------------------------------------------------------------------------------------
# Building a model from (converted) key names, then reading tensors straight into it

def _name_map(keys, converter, what: str) -> dict[str, str]:
    """new key -> key in the file, by running a diffusers converter on the names alone."""
    converted = converter({k: k for k in keys})
    if len(converted) != len(keys):
        lost = sorted(set(keys) - set(converted.values()))
        raise CheckpointError(f"{what}: keys collide after conversion (e.g. the same tensor with "
                              f"and without a prefix): {lost[:5]}")
    return converted


def _load_into(model: torch.nn.Module, where, name_map: Mapping[str, str], *, dtype, device,
               what: str, file_names=None) -> None:
    """Strictly fill a meta-device `model` from the files in `where` (file keys via name_map).

    file_names turns model key names into the file's naming, for messages about missing keys."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict(keep_vars=True).items()}
    missing = sorted(set(expected) - set(name_map))
    if file_names is not None:
        missing = sorted(file_names(dict.fromkeys(missing)))
    unexpected = sorted(name_map[k] for k in set(name_map) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{what} does not fit the model: {len(missing)} missing keys {missing[:5]}, "
            f"{len(unexpected)} unexpected keys {unexpected[:5]}")
    wrong = [f"{name_map[k]} {list(where[name_map[k]][1])} != {list(s)}"
             for k, s in expected.items() if where[name_map[k]][1] != s]
    if wrong:
        raise CheckpointError(f"{what}: {len(wrong)} tensors have the wrong shape: {wrong[:5]}")
    keep_fp32 = getattr(model, "_keep_in_fp32_modules", None) or []
    low_precision = dtype.is_floating_point and dtype.itemsize < 4
    by_file: dict[Path, list[str]] = {}
    for new_key, file_key in name_map.items():
        by_file.setdefault(where[file_key][0], []).append(new_key)
    state: dict[str, torch.Tensor] = {}
    for path, new_keys in by_file.items():
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            for k in new_keys:
                t = f.get_tensor(name_map[k])
                fp32 = low_precision and any(m in k.split(".") for m in keep_fp32)
                state[k] = owned_tensor(t, (torch.float32 if fp32 else dtype)
                                        if t.is_floating_point() else None)
    model.load_state_dict(state, strict=True, assign=True)


def _materialise(model_cls, cfg, where, original: bool, to_diffusers, to_original, *, dtype, device, what: str):
    """Build `model_cls` on the meta device and load the checked files into it; original-layout
    files are renamed with diffusers' converter (and errors quote the files' own names)."""
    name_map = _name_map(list(where), to_diffusers, what) if original else {k: k for k in where}
    with torch.device("meta"):
        model = model_cls.from_config(cfg)
    _load_into(model, where, name_map, dtype=dtype, device=device, what=what,
               file_names=to_original if original else None)
    return model


def _check_materialised(model: torch.nn.Module, what: str) -> None:
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise CheckpointError(f"{what}: tensors left on the meta device: {left[:5]}")


# ---------------------------------------------------------------------------------------------
# Public loaders

def load_wan_expert(path: str | Path, *, config: str | Path | Mapping[str, Any] | None = None,
                    dtype: torch.dtype = torch.float32,
                    device: str | torch.device = "cpu") -> WanTransformer3DModel:
    """One expert from a diffusers or original-layout folder, or a .safetensors file + config.

    `config` defaults to config.json in the folder (or next to the file); it may be diffusers'
    or Wan's own terms, independently of which key layout the weights use.
    """
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    files = weight_files(path) if path.is_dir() else [path]
    what = str(path)
    where = index_shards(files)
    keys = {k.removeprefix(ORIGINAL_PREFIX): v for k, v in where.items()}
    cfg = config if isinstance(config, Mapping) else read_json_object(Path(config or folder / "config.json"))
    diffusers_cfg = expert_config(cfg, keys, what)
    original = "head.head.weight" in keys or any(".self_attn." in k for k in keys)
    # diffusers' converter also strips the optional model.diffusion_model. prefix.
    model = _materialise(WanTransformer3DModel, diffusers_cfg, where, original, convert_wan_transformer_to_diffusers,
                         to_wan_original_state_dict, dtype=dtype, device=device, what=what)
    # The rotary tables are non-persistent buffers (absent from checkpoints): compute them for real.
    c = model.config
    model.rope = WanRotaryPosEmbed(c.attention_head_dim, c.patch_size, c.rope_max_seq_len).to(device)
    _check_materialised(model, what)
    return model.eval()


def wan_pair_bytes(model_dir: str | Path, dtype: torch.dtype) -> int:
    """Bytes the two experts of a Wan2.2 A14B folder take once loaded as `dtype`, read from the
    safetensors headers alone (no weights are read): what deciding their placement needs."""
    _, high, low = expert_dirs(Path(model_dir))
    itemsize = torch.empty((), dtype=dtype).element_size()
    return sum(math.prod(shape) * itemsize for d in (high, low) for f in weight_files(d)
               for _, shape in read_safetensors_header(f).tensors.values())


def load_wan_pair(model_dir: str | Path, *, dtype: torch.dtype = torch.float32,
                  device: str | torch.device = "cpu"
                  ) -> tuple[WanTransformer3DModel, WanTransformer3DModel, dict[str, Any]]:
    """(high-noise expert, low-noise expert, info) of a Wan2.2 A14B model folder, either layout.

    info: layout, the two expert paths, and boundary_ratio when model_index.json has one.
    """
    model_dir = Path(model_dir)
    layout, high, low = expert_dirs(model_dir)
    info: dict[str, Any] = {"layout": layout, "high_noise_path": str(high), "low_noise_path": str(low)}
    index = model_dir / "model_index.json"
    boundary = read_json_object(index).get("boundary_ratio") if index.is_file() else None
    if boundary is not None:
        info["boundary_ratio"] = float(boundary)
    return (load_wan_expert(high, dtype=dtype, device=device),
            load_wan_expert(low, dtype=dtype, device=device), info)


def load_wan_vae(path: str | Path, *, config: str | Path | Mapping[str, Any] | None = None,
                 dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu") -> AutoencoderKLWan:
    """The Wan VAE from diffusers' vae/ folder or an original-key safetensors file.

    Without a config, an original file gets AutoencoderKLWan's defaults (the Wan2.1 VAE that
    Wan2.2 A14B uses) with base_dim and z_dim read from the weights' shapes.
    """
    files, config_file = vae_source(Path(path))
    where = index_shards(files)
    what = str(files[0].parent if config_file else files[0])
    if isinstance(config, Mapping):
        cfg = dict(config)
    elif config is not None or config_file is not None:
        cfg = read_json_object(Path(config or config_file))
    else:
        try:
            cfg = {"base_dim": where["encoder.conv1.weight"][1][0],
                   "z_dim": where["conv2.weight"][1][0],
                   "num_res_blocks": original_vae_res_blocks(where)}
        except KeyError:
            raise CheckpointError(f"{what}: no config given and the weights are not an "
                                  "original-layout Wan VAE (no encoder.conv1/conv2 weights)") from None
        if cfg["z_dim"] != 16:
            raise CheckpointError(f"{what}: z_dim {cfg['z_dim']} needs an explicit config "
                                  "(latents_mean/std are only known for 16 channels)")
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
    original = "decoder.middle.0.residual.0.gamma" in where  # diffusers' own marker for it
    model = _materialise(AutoencoderKLWan, cfg, where, original, convert_wan_vae_to_diffusers,
                         to_wan_original_vae_state_dict, dtype=dtype, device=device, what=what)
    _check_materialised(model, what)
    return model.eval()


def load_text_encoder(model_dir: str | Path, *, dtype: torch.dtype = torch.float32,
                      device: str | torch.device = "cpu"):
    """(tokenizer, UMT5EncoderModel) from a diffusers-layout model's text_encoder/ + tokenizer/.

    `model_dir` is the model root or its text_encoder/ folder (tokenizer/ beside it).

    Wan's original umT5 checkpoint is a pickle with its own module names; use the diffusers
    text_encoder/ (the same umT5-XXL encoder) instead.
    """
    from transformers import AutoTokenizer, UMT5EncoderModel

    model_dir = Path(model_dir)
    enc_dir, tok_dir = model_dir / "text_encoder", model_dir / "tokenizer"
    if (model_dir / "config.json").is_file():  # pointed at text_encoder/ itself
        enc_dir, tok_dir = model_dir, model_dir.parent / "tokenizer"
    if not enc_dir.is_dir() or not tok_dir.is_dir():
        original = sorted(p.name for p in model_dir.glob("models_t5_*"))
        hint = (f" (found Wan's original {original}: a pickle in Wan's own key names; use a "
                "diffusers text_encoder/ + tokenizer/ of the same umT5-XXL)") if original else ""
        raise CheckpointError(f"{model_dir}: expected text_encoder/ and tokenizer/ folders{hint}")
    index_shards(weight_files(enc_dir))  # validates every shard before transformers opens it
    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
    encoder = UMT5EncoderModel.from_pretrained(str(enc_dir), dtype=dtype, local_files_only=True,
                                               use_safetensors=True)
    return tokenizer, encoder.to(device).eval()
