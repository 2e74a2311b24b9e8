"""Opt-in FP8 weights for an expert's transformer blocks (torchao), on GPUs with FP8 tensor cores.

A 14B expert is 28 GB in bf16 and 14 GB in FP8: FP8 lets both Wan2.2 experts stay resident on one
80 GB GPU and roughly doubles GEMM throughput on Hopper. It changes the numbers, so it is never a
default: `runtime.fp8: true` asks for it, and the GPU benchmark (bench/gpu_expert.py) measures the
deviation of an FP8 forward from the bf16 one on the same inputs.

What is quantised: the nn.Linear layers inside the repeated blocks (attention q/k/v/o, FFN), with
dynamic per-row activation scales and per-row weight scales (torchao's
Float8DynamicActivationFloat8WeightConfig). Embeddings, the time/text projections, norms and the
output projection stay in their dtype: they are a rounding error of the FLOPs and sensitive.
Apply after merging LoRA and before torch.compile.
"""

from __future__ import annotations

import importlib

import torch

FP8_MIN_CAPABILITY = (8, 9)  # Ada / Hopper FP8 tensor cores


def fp8_layer_filter(module: torch.nn.Module, fqn: str) -> bool:
    """True for the block linears FP8 applies to (dims multiples of 16, as FP8 GEMMs need)."""
    return (
        isinstance(module, torch.nn.Linear)
        and fqn.startswith("blocks.")
        and module.in_features % 16 == 0
        and module.out_features % 16 == 0
    )


def fp8_unavailable_reason(device: str | torch.device) -> str | None:
    """None when FP8 weights can be used on `device`, else why not."""
    device = torch.device(device)
    try:
        importlib.import_module("torchao.quantization")
    except Exception as exc:  # noqa: BLE001 - any import failure means unusable
        return f"torchao is not importable ({type(exc).__name__}: {exc}); install the 'gpu' extra"
    if device.type != "cuda":
        return f"FP8 weights need a CUDA device, got {device}"
    capability = torch.cuda.get_device_capability(device)
    if tuple(capability) < FP8_MIN_CAPABILITY:
        return f"FP8 needs compute capability 8.9+ (Ada/Hopper), got {capability[0]}.{capability[1]}"
    return None


def quantize_expert_fp8(model: torch.nn.Module, device: str | torch.device) -> int:
    """Quantise `model`'s block linears to FP8 in place; returns how many layers now hold FP8
    weights, counted after the fact (torchao leaves a weight it cannot convert as it was, silently),
    and fails when none do."""
    reason = fp8_unavailable_reason(device)
    if reason is not None:
        raise ValueError(f"runtime.fp8: {reason}")
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, Float8Tensor, PerRow, quantize_

    wanted = sum(1 for name, m in model.named_modules() if fp8_layer_filter(m, name))
    # set_inductor_config=False: torchao would otherwise change inductor's settings process-wide
    # (coordinate-descent tuning), making every later compile of the worker much slower
    config = Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(), set_inductor_config=False)
    quantize_(model, config, filter_fn=fp8_layer_filter)
    converted = sum(1 for name, m in model.named_modules()
                    if fp8_layer_filter(m, name) and isinstance(m.weight, Float8Tensor))
    if converted == 0 and wanted:
        raise ValueError(f"runtime.fp8: torchao converted none of the {wanted} block linears (weights must be "
                         f"bfloat16 with dims that FP8 GEMMs take); got {next(model.parameters()).dtype}")
    return converted
