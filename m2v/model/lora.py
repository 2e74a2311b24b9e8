"""StoryMem's LoRA on a Wan2.2 expert: original Wan module names mapped onto diffusers', via peft.

Invariants:
- The scale is rsLoRA's, alpha / sqrt(r) (StoryMem trains with use_rslora=True, r = alpha = 128,
  so 11.31, not 1.0), times the caller's `strength`.
- Every tensor in the file must be a lora_A/lora_B weight of a linear layer that exists in the
  expert, with matching ranks; anything else is an error naming the file and the key, because a
  silently skipped key is a silently different model.
- Merged (the default) leaves a plain WanTransformer3DModel with plain nn.Linear layers: no peft
  wrapper, no per-step cost. Unmerged keeps peft's layers so `set_strength` can change the scale.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import WanTransformer3DModel
from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers
from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
from peft.tuners.lora import LoraLayer

from storyfarm.m2v.model.checkpoint_files import CheckpointError, read_safetensors, read_safetensors_header

_PREFIXES = ("base_model.model.", "model.diffusion_model.", "diffusion_model.")
_KEY = re.compile(r"(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.(?P<adapter>[^.]+))?\.weight")


@dataclass(frozen=True)
class LoraInfo:
    path: str
    adapter_name: str
    rank: int
    alpha: float
    scale: float  # alpha / sqrt(rank), before strength
    strength: float
    modules: tuple[str, ...]  # diffusers module names
    merged: bool

    @property
    def effective_scale(self) -> float:
        return self.scale * self.strength


def _module_name(key: str, path: Path) -> tuple[str, str]:
    """(diffusers module name, 'A' | 'B') for one file key."""
    for prefix in _PREFIXES:
        if key.startswith(prefix):
            key = key[len(prefix):]
            break
    m = _KEY.fullmatch(key)
    if not m:
        raise CheckpointError(f"{path}: key {key!r} is not a LoRA lora_A/lora_B weight")
    # Reuse diffusers' own Wan renames (self_attn.q -> attn1.to_q, ffn.0 -> ffn.net.0.proj, ...).
    (converted,) = convert_wan_transformer_to_diffusers({m["module"] + ".weight": None})
    return converted.removesuffix(".weight"), m["ab"]


def _alpha_from_metadata(metadata: dict[str, str]) -> float | None:
    for k in ("lora_alpha", "alpha"):
        if k in metadata:
            return float(metadata[k])
    for value in metadata.values():  # e.g. a JSON adapter config stored as one entry
        try:
            blob = json.loads(value)
        except (json.JSONDecodeError, TypeError):
            continue
        if isinstance(blob, dict) and "lora_alpha" in blob:
            return float(blob["lora_alpha"])
    return None


def _lora_layers(expert: torch.nn.Module, adapter_name: str):
    return [(n, m) for n, m in expert.named_modules()
            if isinstance(m, LoraLayer) and adapter_name in m.lora_A]


def load_storymem_lora(expert: WanTransformer3DModel, path: str | Path, *, strength: float = 1.0,
                       alpha: float | None = None, merge: bool = True,
                       adapter_name: str = "storymem") -> LoraInfo:
    """Apply one StoryMem LoRA file (backbone_{high,low}_noise.safetensors) to `expert` in place.

    alpha: the argument, else the file's metadata (lora_alpha), else the rank (StoryMem's alpha == r).
    """
    path = Path(path)
    header = read_safetensors_header(path)
    if not header.tensors:
        raise CheckpointError(f"{path}: no tensors, so no LoRA keys")
    if _lora_layers(expert, adapter_name):
        raise CheckpointError(f"{path}: the expert already has an unmerged adapter {adapter_name!r}")
    if not any(".lora_A." in k or ".lora_B." in k for k in header.tensors):
        raise CheckpointError(f"{path}: no LoRA keys (lora_A/lora_B); first keys: "
                              f"{sorted(header.tensors)[:3]}")
    linears = {n: m for n, m in expert.named_modules() if isinstance(m, torch.nn.Linear)}
    pairs: dict[str, dict[str, str]] = {}
    for key in header.tensors:
        module, ab = _module_name(key, path)
        if module not in linears:
            raise CheckpointError(f"{path}: key {key!r} targets {module!r}, which is not a linear "
                                  "layer of this expert")
        if ab in pairs.setdefault(module, {}):
            raise CheckpointError(f"{path}: key {key!r} duplicates {pairs[module][ab]!r}")
        pairs[module][ab] = key
    rank = None
    for module, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise CheckpointError(f"{path}: key {next(iter(ab.values()))!r} has no lora_"
                                  f"{'B' if 'A' in ab else 'A'} partner")
        (_, a_shape), (_, b_shape) = header.tensors[ab["A"]], header.tensors[ab["B"]]
        lin = linears[module]
        if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] != b_shape[1]:
            raise CheckpointError(f"{path}: rank mismatch between {ab['A']!r} {list(a_shape)} "
                                  f"and {ab['B']!r} {list(b_shape)}")
        if a_shape[1] != lin.in_features or b_shape[0] != lin.out_features:
            raise CheckpointError(f"{path}: key {ab['A']!r} shapes {list(a_shape)}/{list(b_shape)} "
                                  f"do not fit {module} ({lin.in_features} -> {lin.out_features})")
        if rank is None:
            rank = a_shape[0]
        elif a_shape[0] != rank:
            raise CheckpointError(f"{path}: key {ab['A']!r} has rank {a_shape[0]}, others {rank}; "
                                  "mixed ranks in one file are not supported")
    if alpha is None:
        alpha = _alpha_from_metadata(header.metadata)
    alpha = float(rank if alpha is None else alpha)

    tensors = read_safetensors(path)
    state = {f"{module}.lora_{x}.weight": tensors[key]
             for module, ab in pairs.items() for x, key in ab.items()}
    config = LoraConfig(r=rank, lora_alpha=alpha, use_rslora=True, lora_dropout=0.0,
                        target_modules=sorted(pairs))
    inject_adapter_in_model(config, expert, adapter_name=adapter_name, low_cpu_mem_usage=True)
    result = set_peft_model_state_dict(expert, state, adapter_name=adapter_name,
                                       low_cpu_mem_usage=True)
    if result.unexpected_keys:  # pragma: no cover - guarded by the checks above
        raise CheckpointError(f"{path}: peft did not place {result.unexpected_keys[:5]}")
    layers = _lora_layers(expert, adapter_name)
    if sorted(n for n, _ in layers) != sorted(pairs):  # pragma: no cover - same
        raise CheckpointError(f"{path}: peft adapted {len(layers)} layers, the file has {len(pairs)}")
    set_strength(expert, strength, adapter_name=adapter_name)
    if merge:
        _merge_and_unload(expert, layers, adapter_name)
    return LoraInfo(str(path), adapter_name, rank, alpha, alpha / math.sqrt(rank), float(strength),
                    tuple(sorted(pairs)), merge)


def set_strength(expert: torch.nn.Module, strength: float, *, adapter_name: str = "storymem") -> None:
    """Change an unmerged adapter's strength: scale = strength * alpha / sqrt(r)."""
    layers = _lora_layers(expert, adapter_name)
    if not layers:
        raise ValueError(f"no unmerged LoRA adapter {adapter_name!r} on this expert (a merged "
                         "adapter is part of the weights; reload the expert to change it)")
    for _, layer in layers:
        layer.set_scale(adapter_name, float(strength))  # peft applies the rsLoRA alpha/sqrt(r)


def _merge_and_unload(expert: torch.nn.Module, layers, adapter_name: str) -> None:
    for name, layer in layers:
        layer.merge(safe_merge=True, adapter_names=[adapter_name])
        parent_name, _, child = name.rpartition(".")
        setattr(expert.get_submodule(parent_name) if parent_name else expert, child,
                layer.get_base_layer())
    configs = getattr(expert, "peft_config", None)
    if isinstance(configs, dict):
        configs.pop(adapter_name, None)
        if not configs:
            del expert.peft_config
