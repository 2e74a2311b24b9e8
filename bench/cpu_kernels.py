"""CPU benchmark: storyfarm's forward against stock diffusers, attention backends, eager vs compiled.

    .venv/bin/python bench/cpu_kernels.py [--out bench/results/cpu-kernels.json] [--repeats 5] [--threads 1]

Three measurements, each a ratio taken in this one process:
1. overhead: the M2V expert (story RoPE, story blocks, registry attention processors) versus the
   stock diffusers WanTransformer3DModel on the same weights and inputs at M = 0 (target: within
   5%), for the `tiny` preset's transformer and a mid-size one (8x64 heads, 4 blocks); the runs
   alternate so that load from other processes hits both alike.
2. attention: every backend available here versus a float64 reference (max error) and versus the
   `math` backend (time), for self-attention and cross-attention shapes, float32 and bfloat16.
3. compile: regional torch.compile (inductor) versus eager on the mid-size expert, M = 0 and 2.

Clock: with `--threads 1` (the default) every figure is the calling thread's CPU time
(time.thread_time): all work runs on that thread, and time other processes hold the shared cores
is not counted, so ratios stay stable on a busy machine. With more threads it is wall time.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from benchlib import MID, environment, expert_inputs, timeit, write_result

from storyfarm.kernels import attention
from storyfarm.kernels.flops import WanShape, attention_flops, forward_flops
from storyfarm.m2v.accel.compile import compile_expert
from storyfarm.story.presets import load_preset
from storyfarm.m2v.model.rope import memory_time_positions
from storyfarm.m2v.model.transformer import M2VExpert

CPU = torch.device("cpu")


def build(config: dict, seed: int = 0):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    return WanTransformer3DModel(**config).eval()


CLOCK = {"fn": time.thread_time, "name": "thread_time"}


def alternating(fns: dict, repeats: int) -> dict:
    """Fastest seconds per callable, running them in turn `repeats` times after one warm-up each.

    The minimum, not the median: on a shared CPU other processes only ever add time, so the
    fastest run of deterministic work is the best estimate of its own cost."""
    clock = CLOCK["fn"]
    times = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(repeats):
        for name, fn in fns.items():
            start = clock()
            fn()
            times[name].append(clock() - start)
    return {name: min(t) for name, t in times.items()}


def overhead(name: str, config: dict, frames: int, height: int, width: int, repeats: int) -> dict:
    """Fastest of `repeats` alternating runs each (see `alternating`)."""
    stock = build(config)
    expert = M2VExpert(copy.deepcopy(stock), name)
    latents, cond, text, t = expert_inputs(config, 2, 0, frames, height, width, CPU, torch.float32)
    positions = memory_time_positions(0, frames)

    def run_stock():  # the caller of stock diffusers builds the 36-channel input too
        with torch.no_grad():
            model_input = torch.cat([latents, cond.expand(2, -1, -1, -1, -1)], 1)
            return stock(model_input, t, text, return_dict=False)[0]

    def run_ours():
        return expert(latents, t, text, positions, cond)

    error = (run_ours() - run_stock()).abs().max().item()
    medians = alternating({"stock": run_stock, "storyfarm": run_ours}, repeats)
    seq = frames * (height // 2) * (width // 2)
    return {
        "config": name, "batch": 2, "tokens": seq, "latent": [frames, height, width],
        "gflop": round(forward_flops(WanShape.from_config(config), seq, 512, batch=2)["total"] / 1e9, 2),
        "stock_s": round(medians["stock"], 5), "storyfarm_s": round(medians["storyfarm"], 5),
        "storyfarm_over_stock": round(medians["storyfarm"] / medians["stock"], 4),
        "max_abs_diff": error, "attention_backend": attention.backend_label(),
    }


def attention_table(repeats: int) -> list[dict]:
    rows = []
    shapes = [("self", 1, 2240, 2240, 8, 64), ("self", 1, 4096, 4096, 8, 64), ("cross", 2, 2240, 512, 8, 64)]
    for kind, b, sq, sk, h, d in shapes:
        g = torch.Generator().manual_seed(sq + sk)
        q64, k64, v64 = (torch.randn(b, s, h, d, generator=g, dtype=torch.float64) for s in (sq, sk, sk))
        want = attention.attend(q64, k64, v64, backend="math")  # float64 reference
        for dtype in (torch.float32, torch.bfloat16):
            q, k, v = q64.to(dtype), k64.to(dtype), v64.to(dtype)
            math_s = timeit(lambda: attention.attend(q, k, v, backend="math"), CPU, repeats, clock=CLOCK["fn"])["min_s"]
            for name in attention.available_backends("cpu", dtype, d):
                got = attention.attend(q, k, v, backend=name)
                seconds = timeit(lambda n=name: attention.attend(q, k, v, backend=n), CPU, repeats, clock=CLOCK["fn"])["min_s"]
                rows.append({
                    "kind": kind, "shape": [b, sq, sk, h, d], "dtype": str(dtype).removeprefix("torch."), "backend": name,
                    "max_abs_error_vs_fp64": (got.double() - want).abs().max().item(),
                    "seconds": round(seconds, 5), "speed_vs_math": round(math_s / seconds, 3),
                    "gflop_per_s": round(attention_flops(b, sq, sk, h, d) / seconds / 1e9, 1),
                })
    return rows


def compiled_vs_eager(frames: int, height: int, width: int, memories, repeats: int) -> dict:
    model = build(MID, seed=1)
    eager = M2VExpert(copy.deepcopy(model), "eager")
    compiled = M2VExpert(model, "compiled")
    regions = compile_expert(compiled, backend="inductor", shapes="static", max_buckets=4)
    rows = []
    for memory in memories:
        latents, cond, text, t = expert_inputs(MID, 2, memory, frames, height, width, CPU, torch.float32, seed=memory)
        positions = memory_time_positions(memory, frames)
        start = time.perf_counter()
        first = compiled(latents, t, text, positions, cond)
        first_call = time.perf_counter() - start
        error = (first - eager(latents, t, text, positions, cond)).abs().max().item()
        medians = alternating({
            "eager": lambda: eager(latents, t, text, positions, cond),
            "compiled": lambda: compiled(latents, t, text, positions, cond),
        }, repeats)
        rows.append({"memory": memory, "eager_s": round(medians["eager"], 4), "compiled_s": round(medians["compiled"], 4),
                     "eager_over_compiled": round(medians["eager"] / medians["compiled"], 3),
                     "first_call_s": round(first_call, 2), "max_abs_diff": error})
    return {"config": "mid", "backend": "inductor", "rows": rows, "compile": regions.stats.as_dict()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--parts", default="overhead,attention,compile")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    parts = set(args.parts.split(","))
    torch.set_grad_enabled(False)
    torch.set_num_threads(args.threads)
    if args.threads != 1:
        CLOCK.update(fn=time.perf_counter, name="perf_counter")
    tiny = load_preset("tiny").architecture.transformer
    result = {"benchmark": "cpu_kernels", "environment": environment(CPU), "clock": CLOCK["name"],
              "estimator": "minimum over alternating runs"}
    if "overhead" in parts:
        result["overhead"] = [
            overhead("tiny", tiny, 5, 12, 20, 20 * args.repeats),  # the tiny preset's 160x96, 17 frames
            overhead("mid", MID, 5, 32, 56, 2 * args.repeats),  # 448x256, 17 frames: 2240 tokens
        ]
        print(result["overhead"])
    if "attention" in parts:
        result["attention"] = attention_table(args.repeats)
        for row in result["attention"]:
            print(row)
    if "compile" in parts:
        result["compile"] = compiled_vs_eager(5, 32, 56, (0, 2), 2 * args.repeats)
        print(result["compile"])
    write_result("cpu-kernels", result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
