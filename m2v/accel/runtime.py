"""A preset's `runtime:` section applied to a loaded engine: kernels, FP8, compilation, VAE.

One place decides, at load and in a fixed order, how the experts run: FP8 weights (LoRA is
already merged by the loader), the attention backend (process-wide, so Consistent Self-Attention
and the Wan processors agree) and the RoPE prologue kernel, then regional compilation, then the
VAE's dtype and tiling. A choice that cannot run here (a named attention backend whose package is
missing, FP8 on a CPU, the Triton prologue without CUDA) fails the load with the preset field in
the message; nothing falls back silently. The result (`RuntimeState`) is what a worker logs at
start and reports in its metrics.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import torch

from storyfarm.kernels import attention
from storyfarm.kernels.rope import prologue_uses_triton
from storyfarm.m2v.accel.compile import compile_expert
from storyfarm.m2v.accel.fp8 import quantize_expert_fp8
from storyfarm.m2v.accel.placement import experts_of

log = logging.getLogger(__name__)

VAE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class RuntimeState:
    attention_requested: str
    attention_backend: str  # the concrete backend `auto` (or the named one) resolves to here
    rope_kernel: str  # "triton" | "torch" (eager); compiled blocks always fuse in inductor
    fp8_layers: int
    compile: str
    vae_tiling: bool
    vae_dtype: str

    def as_dict(self) -> dict:
        return asdict(self)


def apply_runtime(engine) -> RuntimeState:
    rt = engine.preset.runtime
    device = engine.device
    experts = experts_of(engine)
    attention.configure(rt.attention, allow_approximate=rt.allow_approximate)
    try:
        rope_triton = prologue_uses_triton(rt.rope, device)
    except ValueError as exc:
        raise ValueError(f"runtime.{exc}") from None
    fp8_layers = 0
    if rt.fp8:
        residency = getattr(engine, "residency", None)
        if residency is not None and residency.mode == "swap":
            raise ValueError("runtime.fp8: FP8 experts are quantised on the GPU and stay there; with "
                             "scheduler.expert_placement 'swap' they would wait in CPU memory. FP8 halves the "
                             "expert bytes: use 'both'")
        for expert in experts:
            fp8_layers += quantize_expert_fp8(expert.model, device)
    first = experts[0]
    head_dim = first.model.config.attention_head_dim
    try:
        backend = attention.resolve(rt.attention, device, first.dtype, head_dim)
    except attention.AttentionUnavailable as exc:
        raise ValueError(f"runtime.attention: {exc}") from None
    for expert in experts:
        expert.set_attention(None, rt.rope)  # None: the process default configured above
        if rt.compile == "regional":
            compile_expert(expert, backend=rt.compile_backend, shapes=rt.compile_shapes,
                           max_buckets=rt.max_shape_buckets, cuda_graphs=rt.cuda_graphs)
    tiling = rt.vae_tiling == "on" or (rt.vae_tiling == "auto" and device.type == "cuda")
    engine.vae.configure(tiling=tiling, dtype=VAE_DTYPES.get(rt.vae_dtype))
    state = RuntimeState(
        attention_requested=rt.attention,
        attention_backend=backend,
        rope_kernel="triton" if rope_triton else "torch",
        fp8_layers=fp8_layers,
        compile=rt.compile if rt.compile == "off" else f"{rt.compile}/{rt.compile_backend}/{rt.compile_shapes}",
        vae_tiling=tiling,
        vae_dtype=str(engine.vae.dtype).removeprefix("torch."),
    )
    log.info("runtime: %s", state.as_dict())
    return state
