"""Safe reading of checkpoint files: safetensors headers, shards and JSON configs, never a pickle.

Why it exists: a render farm loads files that operators copy around, so every byte that reaches a
model passes through here first. Invariants:
- Nothing is unpickled: `.pth`, `.pt`, `.bin`, `.ckpt` and `.pkl` are refused with a one-off
  conversion recipe.
- A safetensors file has its header checked (length, JSON, dtypes, byte ranges inside the file)
  before a byte of tensor data is read, so a truncated copy fails with its name instead of a crash
  deep in a load. Every failure is a CheckpointError naming the file.
- Tensors read onto the CPU are owned copies, never views of the mmapped file.

Turning these files into models (key layouts, configs, meta-device builds) is m2v.model.wan_layouts'
and m2v.model.wan_loaders' job.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".pkl")
MAX_HEADER_BYTES = 100 * 1024 * 1024
_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
             "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
             "F8_E4M3FNUZ": 1, "F8_E5M2FNUZ": 1, "C64": 8}


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded safely or does not fit the model it is meant for."""


# ---------------------------------------------------------------------------------------------
# One file: its header checked before any tensor data is read

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
        return {k: owned_tensor(f.get_tensor(k)) for k in header.tensors}


def owned_tensor(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """`t` in `dtype`, copied when on the CPU. CPU tensors from safe_open are views of the mmapped
    file at unaligned offsets: a copy means a file replaced on disk cannot change or fault a loaded
    model, and GEMMs see aligned memory like any other tensor's (bit-identical results)."""
    return t.to(dtype or t.dtype, copy=t.device.type == "cpu")


# ---------------------------------------------------------------------------------------------
# One model's files: its shards and its JSON

def weight_files(folder: Path) -> list[Path]:
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


def index_shards(files: list[Path]) -> dict[str, tuple[Path, tuple[int, ...]]]:
    """key -> (file, shape) over all shards; a key in two shards is an error."""
    where: dict[str, tuple[Path, tuple[int, ...]]] = {}
    for f in files:
        for key, (_, shape) in read_safetensors_header(f).tensors.items():
            if key in where:
                raise CheckpointError(f"tensor {key!r} is in both {where[key][0]} and {f}")
            where[key] = (f, shape)
    return where


def read_json_object(path: Path) -> dict[str, Any]:
    """A config or index file's JSON object; anything else is a CheckpointError naming it."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: malformed JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: not a JSON object")
    return data
