"""Shared pieces of the benchmarks: timing, environment, model builders, JSON results.

Benchmarks are scripts (`python bench/<name>.py`), not tests: they measure and write JSON under
bench/results/, and BENCHMARKS.md summarises them. Every figure that claims speed is a ratio or a
fraction measured in one process on one device (stock versus storyfarm, compiled versus eager,
achieved versus floor), never an absolute time compared across runs or machines.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"

# Wan2.2-I2V-A14B's transformer (each of its two experts), from its diffusers config.
A14B = dict(
    patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=36, out_channels=16,
    text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40, cross_attn_norm=True,
    qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024,
)
# A CPU-sized model with the same structure: 8 heads of 64, 4 blocks.
MID = dict(A14B, num_attention_heads=8, attention_head_dim=64, text_dim=512, freq_dim=256, ffn_dim=1536, num_layers=4)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timeit(fn, device: torch.device, repeats: int = 3, warmup: int = 1, clock=time.perf_counter) -> dict:
    """Median/min seconds of `fn()` after `warmup` calls (device synchronised around each).

    `clock`: wall time by default; CPU benchmarks on a shared machine pass time.thread_time with
    one intra-op thread, which counts only this thread's own work, not the time other processes
    hold the cores."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = clock()
        fn()
        sync(device)
        times.append(clock() - start)
    return {"median_s": statistics.median(times), "min_s": min(times), "runs": [round(t, 6) for t in times]}


def environment(device: torch.device) -> dict:
    env = {
        "date": _dt.date.today().isoformat(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "argv": sys.argv,
    }
    try:
        import diffusers

        env["diffusers"] = diffusers.__version__
    except ImportError:  # pragma: no cover
        pass
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(device=props.name, capability=list(torch.cuda.get_device_capability(device)),
                   device_memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda)
    else:
        env["device"] = f"CPU ({platform.processor() or platform.machine()}), {torch.get_num_threads()} threads"
    return env


def write_result(name: str, payload: dict, out: str | None = None) -> Path:
    path = Path(out) if out else RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, sort_keys=False, default=str) + "\n")
    print(f"wrote {path}")
    return path


def random_wan(config: dict, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """A WanTransformer3DModel with random weights built on the meta device and materialised on
    `device` (no CPU copy of a 14B model); rotary tables rebuilt for real."""
    from diffusers import WanTransformer3DModel
    from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

    with torch.device("meta"):
        model = WanTransformer3DModel(**config).to(dtype)  # materialised in `dtype`: no fp32 copy of 14B
    model = model.to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif p.ndim == 1 or "norm" in name:
                p.fill_(1.0)
            elif "scale_shift_table" in name:
                p.normal_(0.0, (config["num_attention_heads"] * config["attention_head_dim"]) ** -0.5, generator=g)
            else:
                fan_in = p[0].numel()
                p.normal_(0.0, fan_in**-0.5, generator=g)
    # diffusers keeps these in float32 (rotary tables, norms, time embedder, modulation tables)
    for name in ("time_embedder", "scale_shift_table", "norm1", "norm2", "norm3"):
        for module_name, module in model.named_modules():
            if module_name.endswith(name):
                module.float()
        for param_name, p in model.named_parameters():
            if param_name.endswith(name):
                p.data = p.data.float()
    model.rope = WanRotaryPosEmbed(config["attention_head_dim"], config["patch_size"], config["rope_max_seq_len"]).to(device)
    return model.eval()


def expert_inputs(config: dict, batch: int, memory: int, frames: int, height: int, width: int, device, dtype, seed=0):
    """Noisy latents, conditioning, text, timestep for one CFG-batched M2V forward (latent sizes)."""
    g = torch.Generator("cpu").manual_seed(seed)
    total = memory + frames
    latents = torch.randn(batch, 16, total, height, width, generator=g).to(device)
    conditioning = torch.randn(1, config["in_channels"] - 16, total, height, width, generator=g).to(device)
    text = torch.randn(batch, 512, config["text_dim"], generator=g).to(device, dtype)
    timestep = torch.full((batch,), 900.0, device=device)
    return latents, conditioning, text, timestep
