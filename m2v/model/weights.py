"""Checkpoint loading for the Wan2.2 experts, VAE and text encoder, from local files only.

Why it looks the way it does:
- A render farm loads files that operators copy around, so nothing here unpickles: `.pth`, `.pt`,
  `.bin`, `.ckpt` and `.pkl` are refused with a one-off conversion recipe. Every safetensors file
  has its header checked (length, JSON, dtypes, byte ranges inside the file) before a byte of
  tensor data is read, so a truncated copy fails with its name instead of a crash deep in a load.
- Both key layouts are accepted: diffusers' and Wan's original one (converted with diffusers' own
  converters, which are applied to key names first so missing or unexpected keys and wrong shapes
  are reported before any tensor is read).
- Experts are ~14B parameters: the model is built on the meta device and tensors are assigned,
  read straight onto the target device, so no weight is allocated twice. Loading is strict.
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass, field
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

PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".pkl")
MAX_HEADER_BYTES = 100 * 1024 * 1024
_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
             "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
             "F8_E4M3FNUZ": 1, "F8_E5M2FNUZ": 1, "C64": 8}
_ORIGINAL_PREFIX = "model.diffusion_model."
_EXPERT_DIRS = {"diffusers": ("transformer", "transformer_2"),
                "wan-original": ("high_noise_model", "low_noise_model")}


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded safely or does not fit the model it is meant for."""


# ---------------------------------------------------------------------------------------------
# Safe reading

@dataclass(frozen=True)
class SafetensorsHeader:
    path: Path
    tensors: dict[str, tuple[str, tuple[int, ...]]]  # name -> (safetensors dtype, shape)
    metadata: dict[str, str] = field(default_factory=dict)


def refuse_pickle(path: Path) -> None:
    """Raise for a pickle checkpoint, with the conversion to run once, outside the daemon."""
    raise CheckpointError(
        f"refusing to load {path}: {path.suffix} files are pickles, and unpickling can run arbitrary "
        "code. Convert it once, outside the daemon, e.g. python -c \"import torch; from "
        "safetensors.torch import save_file; sd = torch.load('IN', map_location='cpu', "
        "weights_only=True); save_file({k: v.contiguous() for k, v in sd.items()}, "
        "'OUT.safetensors')\" and point storyfarm at the .safetensors file (original Wan key "
        "names are fine).")


def read_safetensors_header(path: str | Path) -> SafetensorsHeader:
    """Validate a safetensors file's header against its size; read no tensor data."""
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        refuse_pickle(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: {size} bytes, too short to be a safetensors file")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES:
            raise CheckpointError(f"{path}: header length {n} bytes is absurd (limit "
                                  f"{MAX_HEADER_BYTES}); not a safetensors file or corrupt")
        if 8 + n > size:
            raise CheckpointError(f"{path}: header length {n} runs past the end of the "
                                  f"{size}-byte file (truncated?)")
        try:
            header = json.loads(f.read(n).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            raise CheckpointError(f"{path}: malformed safetensors header JSON ({type(e).__name__}: {e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise CheckpointError(f"{path}: __metadata__ is not a JSON object")
    data_size, tensors = size - 8 - n, {}
    for name, info in header.items():
        try:
            dtype, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
            ok = (dtype in _ITEMSIZE and all(isinstance(d, int) and d >= 0 for d in shape)
                  and isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end)
        except (TypeError, KeyError, ValueError):
            ok = False
        if not ok:
            raise CheckpointError(f"{path}: malformed header entry for tensor {name!r}: {info!r}")
        if end > data_size:
            raise CheckpointError(f"{path}: tensor {name!r} bytes [{begin}, {end}) run past the "
                                  f"end of the file's {data_size} data bytes (truncated?)")
        if end - begin != math.prod(shape) * _ITEMSIZE[dtype]:
            raise CheckpointError(f"{path}: tensor {name!r} declares {end - begin} bytes for "
                                  f"shape {list(shape)} of {dtype}")
        tensors[name] = (dtype, shape)
    return SafetensorsHeader(path, tensors, {str(k): str(v) for k, v in metadata.items()})


def read_safetensors(path: str | Path, *, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """All tensors of one validated safetensors file."""
    header = read_safetensors_header(path)
    with safe_open(str(header.path), framework="pt", device=str(device)) as f:
        return {k: _owned(f.get_tensor(k)) for k in header.tensors}


def _owned(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """`t` in `dtype`, copied when on the CPU. CPU tensors from safe_open are views of the mmapped
    file at unaligned offsets: a copy means a file replaced on disk cannot change or fault a loaded
    model, and GEMMs see aligned memory like any other tensor's (bit-identical results)."""
    return t.to(dtype or t.dtype, copy=t.device.type == "cpu")


def _weight_files(folder: Path) -> list[Path]:
    """The safetensors files holding one model: the index json's shards, else every file."""
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if len(indexes) > 1:
        raise CheckpointError(f"{folder}: several index files {[p.name for p in indexes]}")
    if indexes:
        try:
            weight_map = json.loads(indexes[0].read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{indexes[0]}: not a safetensors index ({e!r})") from None
        files = [folder / name for name in sorted(set(weight_map.values()))]
        for f in files:
            if not f.is_file():
                raise CheckpointError(f"{indexes[0]} names shard {f.name}, which is missing")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickles = [p for p in sorted(folder.iterdir()) if p.suffix.lower() in PICKLE_SUFFIXES]
        if pickles:
            refuse_pickle(pickles[0])
        raise CheckpointError(f"{folder}: no .safetensors weights found")
    return files


def _headers(files: list[Path]) -> dict[str, tuple[Path, tuple[int, ...]]]:
    """key -> (file, shape) over all shards; a key in two shards is an error."""
    where: dict[str, tuple[Path, tuple[int, ...]]] = {}
    for f in files:
        for key, (_, shape) in read_safetensors_header(f).tensors.items():
            if key in where:
                raise CheckpointError(f"tensor {key!r} is in both {where[key][0]} and {f}")
            where[key] = (f, shape)
    return where


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: malformed JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: not a JSON object")
    return data


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
                state[k] = _owned(t, (torch.float32 if fp32 else dtype)
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
# Layouts and configs

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


def _expert_config(cfg: Mapping[str, Any], keys, what: str) -> dict[str, Any]:
    if "num_attention_heads" in cfg:
        name = cfg.get("_class_name", "WanTransformer3DModel")
        if name != "WanTransformer3DModel":
            raise CheckpointError(f"{what}: config is for {name}, not WanTransformer3DModel")
        return {k: v for k, v in cfg.items() if not k.startswith("_")}
    if "dim" in cfg and "num_heads" in cfg:
        return _wan_to_diffusers_config(cfg, keys, what)
    raise CheckpointError(f"{what}: config is neither diffusers' WanTransformer3DModel config "
                          f"(num_attention_heads, ...) nor Wan's (dim, num_heads, ...)")


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
    files = _weight_files(path) if path.is_dir() else [path]
    what = str(path)
    where = _headers(files)
    keys = {k.removeprefix(_ORIGINAL_PREFIX): v for k, v in where.items()}
    cfg = config if isinstance(config, Mapping) else _read_json(Path(config or folder / "config.json"))
    diffusers_cfg = _expert_config(cfg, keys, what)
    original = "head.head.weight" in keys or any(".self_attn." in k for k in keys)
    # diffusers' converter also strips the optional model.diffusion_model. prefix.
    model = _materialise(WanTransformer3DModel, diffusers_cfg, where, original, convert_wan_transformer_to_diffusers,
                         to_wan_original_state_dict, dtype=dtype, device=device, what=what)
    # The rotary tables are non-persistent buffers (absent from checkpoints): compute them for real.
    c = model.config
    model.rope = WanRotaryPosEmbed(c.attention_head_dim, c.patch_size, c.rope_max_seq_len).to(device)
    _check_materialised(model, what)
    return model.eval()


def _expert_dirs(model_dir: Path) -> tuple[str, Path, Path]:
    layout = detect_layout(model_dir)
    high, low = (model_dir / d for d in _EXPERT_DIRS[layout])
    for d in (high, low):
        if not d.is_dir():
            raise CheckpointError(f"{model_dir}: {layout} layout but {d.name}/ is missing; a "
                                  "Wan2.2 A14B model needs both the high- and low-noise experts")
    return layout, high, low


def wan_pair_bytes(model_dir: str | Path, dtype: torch.dtype) -> int:
    """Bytes the two experts of a Wan2.2 A14B folder take once loaded as `dtype`, read from the
    safetensors headers alone (no weights are read): what deciding their placement needs."""
    _, high, low = _expert_dirs(Path(model_dir))
    itemsize = torch.empty((), dtype=dtype).element_size()
    return sum(math.prod(shape) * itemsize for d in (high, low) for f in _weight_files(d)
               for _, shape in read_safetensors_header(f).tensors.values())


def load_wan_pair(model_dir: str | Path, *, dtype: torch.dtype = torch.float32,
                  device: str | torch.device = "cpu"
                  ) -> tuple[WanTransformer3DModel, WanTransformer3DModel, dict[str, Any]]:
    """(high-noise expert, low-noise expert, info) of a Wan2.2 A14B model folder, either layout.

    info: layout, the two expert paths, and boundary_ratio when model_index.json has one.
    """
    model_dir = Path(model_dir)
    layout, high, low = _expert_dirs(model_dir)
    info: dict[str, Any] = {"layout": layout, "high_noise_path": str(high), "low_noise_path": str(low)}
    index = model_dir / "model_index.json"
    boundary = _read_json(index).get("boundary_ratio") if index.is_file() else None
    if boundary is not None:
        info["boundary_ratio"] = float(boundary)
    return (load_wan_expert(high, dtype=dtype, device=device),
            load_wan_expert(low, dtype=dtype, device=device), info)


def _vae_source(path: Path) -> tuple[list[Path], Path | None]:
    """(weight files, config.json or None) for a vae/ folder, a model root or one file."""
    if path.is_file() or path.suffix.lower() in (".safetensors", *PICKLE_SUFFIXES):
        return [path], None
    if (path / "config.json").is_file():
        return _weight_files(path), path / "config.json"
    if (path / "vae").is_dir():
        return _vae_source(path / "vae")
    for name in ("Wan2.1_VAE.safetensors", "Wan2.1_VAE.pth"):
        if (path / name).exists():
            return [path / name], None
    raise CheckpointError(f"{path}: no VAE found; expected a diffusers vae/ folder (config.json "
                          "+ safetensors) or Wan2.1_VAE.safetensors")


def _original_vae_res_blocks(where) -> int:
    """Residual blocks per level of an original-layout VAE, read off its flat encoder list.

    Wan's encoder is one Sequential: per level (4 with the default dim_mult) `num_res_blocks`
    residual blocks, then a resample between levels, so it has 4 * n + 3 entries.
    """
    entries = {int(k.split(".")[2]) for k in where if k.startswith("encoder.downsamples.")}
    count = max(entries) + 1 if entries else 0
    if count < 7 or (count - 3) % 4:
        raise KeyError("encoder.downsamples")
    return (count - 3) // 4


def load_wan_vae(path: str | Path, *, config: str | Path | Mapping[str, Any] | None = None,
                 dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu") -> AutoencoderKLWan:
    """The Wan VAE from diffusers' vae/ folder or an original-key safetensors file.

    Without a config, an original file gets AutoencoderKLWan's defaults (the Wan2.1 VAE that
    Wan2.2 A14B uses) with base_dim and z_dim read from the weights' shapes.
    """
    files, config_file = _vae_source(Path(path))
    where = _headers(files)
    what = str(files[0].parent if config_file else files[0])
    if isinstance(config, Mapping):
        cfg = dict(config)
    elif config is not None or config_file is not None:
        cfg = _read_json(Path(config or config_file))
    else:
        try:
            cfg = {"base_dim": where["encoder.conv1.weight"][1][0],
                   "z_dim": where["conv2.weight"][1][0],
                   "num_res_blocks": _original_vae_res_blocks(where)}
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
    _headers(_weight_files(enc_dir))  # validates every shard before transformers opens it
    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
    encoder = UMT5EncoderModel.from_pretrained(str(enc_dir), dtype=dtype, local_files_only=True,
                                               use_safetensors=True)
    return tokenizer, encoder.to(device).eval()


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
