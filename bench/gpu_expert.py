"""GPU benchmark: one Wan2.2-A14B expert (random bf16 weights) at 832x480, 81 frames, M memory frames.

    python bench/gpu_expert.py --parts gemm,attention,stock,expert --out bench/results/gpu-expert-<device>.json
    python bench/gpu_expert.py --parts gemm,attention,compile,fp8 --memory 5 --out ...
    python bench/gpu_expert.py --parts vae,shot --shot-steps 40 --out ...

Runs as-is on a CUDA machine with the project installed (`pip install --no-deps .`, diffusers
present). Each part fits one 10-minute command on an H100/H200; the floor inputs (gemm,
attention) are cheap and re-measured by every command that reports a fraction of the floor.

Parts (all in one process, on one device, so every ratio compares like with like):
- gemm: the bf16 GEMM rate (best of a large square product and the expert's own GEMM shapes).
- attention: every installed exact backend on a large self-attention problem (32,760 tokens,
  40 heads of 128): TFLOP/s, and max error against the registry's reference on a smaller one.
  The attention floor rate is max(650 TFLOP/s, the best rate measured here).
- stock: the stock diffusers WanTransformer3DModel forward (its default attention processor) on
  the same weights and inputs, CFG batch 2, per M (positions 0..M+F-1: stock cannot express
  StoryMem's negative memory positions; the FLOPs are identical).
- expert: storyfarm's M2V expert (registry attention, fused prologue), eager, per M: seconds,
  achieved TFLOP/s, percent of the floor, peak memory, speed-up over stock, and at M = 0 the
  max difference from stock.
- compile: the same with regional torch.compile (inductor, dynamic shapes: one graph for all M).
- fp8: torchao FP8 weights (Ada/Hopper): deviation from the bf16 output and speed.
- vae: Wan VAE decode of 81 frames at 832x480 in bf16, untiled and tiled: seconds, peak memory.
- shot: a whole CFG shot at M = 5 through storyfarm's sampler (the expert serves both the high-
  and the low-noise role: same FLOPs as two experts, half the memory), `--shot-steps` steps.

For a CPU smoke run of the code paths: `--device cpu --config mid --frames 5 --height 64 --width 64`.
"""

from __future__ import annotations

import argparse
import gc
import time

import torch
from benchlib import A14B, MID, environment, expert_inputs, random_wan, sync, timeit, write_result

from storyfarm.kernels import attention
from storyfarm.kernels.flops import WanShape, attention_flops, floor_seconds, forward_flops
from storyfarm.m2v.model.rope import memory_time_positions

ATTENTION_FLOOR_TFLOPS = 650.0
CONFIGS = {"a14b": A14B, "mid": MID}
PARTS = ("gemm", "attention", "stock", "expert", "compile", "vae", "shot", "fp8")  # run order: fp8 quantises in place


def peak_gib(device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None


def reset_peak(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def gemm_rate(device, dtype, config, tokens) -> dict:
    d, f = config["num_attention_heads"] * config["attention_head_dim"], config["ffn_dim"]
    shapes = [(8192, 8192, 8192), (2 * tokens, d, f), (2 * tokens, f, d), (2 * tokens, d, d)]
    if device.type == "cpu":
        shapes = [(1024, 1024, 1024)]
    rows = []
    for m, k, n in shapes:
        a, b = torch.randn(m, k, device=device, dtype=dtype), torch.randn(k, n, device=device, dtype=dtype)
        seconds = timeit(lambda: a @ b, device, repeats=5, warmup=2)["min_s"]
        rows.append({"shape": [m, k, n], "tflops": round(2 * m * k * n / seconds / 1e12, 1)})
        del a, b
    return {"shapes": rows, "best_tflops": max(r["tflops"] for r in rows)}


def attention_rates(device, dtype, tokens, heads, head_dim) -> dict:
    g = torch.Generator("cpu").manual_seed(0)
    if device.type == "cpu":
        tokens = min(tokens, 2048)
    q, k, v = (torch.randn(1, tokens, heads, head_dim, generator=g).to(device, dtype) for _ in range(3))
    small = [t[:, :2048] for t in (q, k, v)]  # the math reference materialises its scores
    reference = attention.attend(*(t.float() for t in small), backend="math").float()
    previous = attention.describe()
    attention.configure("auto", allow_approximate=True)  # measure sage too, reported apart
    rows = []
    try:
        for name in attention.available_backends(device, dtype, head_dim):
            if name == "math":
                continue
            seconds = timeit(lambda n=name: attention.attend(q, k, v, backend=n), device, repeats=5, warmup=2)["min_s"]
            error = (attention.attend(*small, backend=name).float() - reference).abs().max().item()
            rows.append({"backend": name, "exact": attention.BACKENDS[name].exact,
                         "tflops": round(attention_flops(1, tokens, tokens, heads, head_dim) / seconds / 1e12, 1),
                         "seconds": round(seconds, 5), "max_abs_error_vs_math_fp32": error})
    finally:
        attention.configure(previous["requested"], allow_approximate=previous["allow_approximate"])
    best = max((r["tflops"] for r in rows if r["exact"]), default=0.0)
    return {"tokens": tokens, "heads": heads, "head_dim": head_dim, "backends": rows,
            "best_exact_tflops": best, "floor_tflops": max(ATTENTION_FLOOR_TFLOPS, best)}


class Bench:
    def __init__(self, args):
        self.args = args
        self.device = torch.device(args.device)
        self.dtype = torch.bfloat16
        self.config = dict(CONFIGS[args.config])
        self.shape = WanShape.from_config(self.config)
        self.frames, self.h, self.w = (args.frames - 1) // 4 + 1, args.height // 8, args.width // 8
        self.tokens_per_frame = (self.h // 2) * (self.w // 2)
        self.result = {"benchmark": "gpu_expert", "environment": environment(self.device), "config": args.config,
                       "video": {"width": args.width, "height": args.height, "frames": args.frames},
                       "cfg_batch": 2, "memory": args.memory}
        self.model = None
        self.expert = None
        self.stock_m0 = None

    def flops(self, memory: int) -> dict:
        return forward_flops(self.shape, (memory + self.frames) * self.tokens_per_frame, 512, batch=2)

    def floor_rates(self) -> tuple[float, float]:
        if "gemm" not in self.result:
            self.result["gemm"] = gemm_rate(self.device, self.dtype, self.config, (5 + self.frames) * self.tokens_per_frame)
        if "attention" not in self.result:
            self.result["attention"] = attention_rates(self.device, self.dtype, self.frames * self.tokens_per_frame,
                                                       self.config["num_attention_heads"], self.config["attention_head_dim"])
        return self.result["gemm"]["best_tflops"], self.result["attention"]["floor_tflops"]

    def inputs(self, memory: int):
        return expert_inputs(self.config, 2, memory, self.frames, self.h, self.w, self.device, self.dtype, seed=memory)

    def load(self):
        if self.model is None:
            start = time.perf_counter()
            self.model = random_wan(self.config, self.device, self.dtype)
            sync(self.device)
            self.result["load_seconds"] = round(time.perf_counter() - start, 1)
        return self.model

    def wrap(self):
        from storyfarm.m2v.model.transformer import M2VExpert

        if self.expert is None:
            attention.configure(self.args.attention)
            self.expert = M2VExpert(self.load(), "high_noise", rope=self.args.rope)
        return self.expert

    def row(self, memory: int, seconds: float, extra: dict | None = None) -> dict:
        gemm, attn = self.floor_rates()
        flops = self.flops(memory)
        floor = floor_seconds(flops, gemm, attn)
        return {"memory": memory, "tokens": (memory + self.frames) * self.tokens_per_frame, "seconds": round(seconds, 4),
                "pflop": round(flops["total"] / 1e15, 3), "tflops": round(flops["total"] / seconds / 1e12, 1),
                "floor_seconds": round(floor, 4), "percent_of_floor": round(100 * floor / seconds, 1),
                "peak_gib": peak_gib(self.device), **(extra or {})}

    def part_stock(self):
        model = self.load()
        rows = []
        for memory in self.args.memory:
            latents, cond, text, t = self.inputs(memory)
            model_input = torch.cat([latents, cond.expand(2, -1, -1, -1, -1)], 1).to(self.dtype)
            reset_peak(self.device)

            def run():
                with torch.no_grad():
                    return model(model_input, t, text, return_dict=False)[0]

            timing = timeit(run, self.device, self.args.repeats)
            if memory == 0:
                self.stock_m0 = run().float().cpu()
            rows.append(self.row(memory, timing["median_s"], {"runs": timing["runs"]}))
            print("stock", rows[-1], flush=True)
        self.result["stock"] = rows

    def _expert_rows(self, name: str, expert) -> list[dict]:
        attention.reset_record()
        rows = []
        for memory in self.args.memory:
            latents, cond, text, t = self.inputs(memory)
            positions = memory_time_positions(memory, self.frames)
            reset_peak(self.device)
            start = time.perf_counter()
            out = expert(latents, t, text, positions, cond)
            sync(self.device)
            first = time.perf_counter() - start
            timing = timeit(lambda: expert(latents, t, text, positions, cond), self.device, self.args.repeats, warmup=0)
            extra = {"first_call_s": round(first, 2), "runs": timing["runs"], "attention": attention.backend_label()}
            stock = {r["memory"]: r["seconds"] for r in self.result.get("stock", [])}
            if memory in stock:
                extra["speedup_vs_stock"] = round(stock[memory] / timing["median_s"], 3)
            if memory == 0 and self.stock_m0 is not None:
                extra["max_abs_diff_vs_stock"] = (out.cpu() - self.stock_m0).abs().max().item()
            rows.append(self.row(memory, timing["median_s"], extra))
            print(name, rows[-1], flush=True)
        return rows

    def part_expert(self):
        self.result["expert"] = self._expert_rows("expert", self.wrap())
        self.result["attention_ran"] = attention.describe()

    def part_compile(self):
        from storyfarm.m2v.accel.compile import compile_expert

        expert = self.wrap()
        regions = compile_expert(expert, backend="inductor", shapes="dynamic", max_buckets=16,
                                 cuda_graphs=self.args.cuda_graphs)
        self.result["compile"] = self._expert_rows("compiled", expert)
        self.result["compile_stats"] = regions.stats.as_dict()
        regions.remove()
        expert.regions = None

    def part_fp8(self):
        from storyfarm.m2v.accel.fp8 import fp8_unavailable_reason, quantize_expert_fp8

        reason = fp8_unavailable_reason(self.device)
        if reason is not None:
            self.result["fp8"] = {"skipped": reason}
            print("fp8 skipped:", reason)
            return
        expert = self.wrap()
        memory = 5 if 5 in self.args.memory else self.args.memory[0]
        latents, cond, text, t = self.inputs(memory)
        positions = memory_time_positions(memory, self.frames)
        bf16 = expert(latents, t, text, positions, cond)
        bf16_s = timeit(lambda: expert(latents, t, text, positions, cond), self.device, self.args.repeats)["median_s"]
        layers = quantize_expert_fp8(expert.model, self.device)
        reset_peak(self.device)
        fp8 = expert(latents, t, text, positions, cond)
        fp8_s = timeit(lambda: expert(latents, t, text, positions, cond), self.device, self.args.repeats)["median_s"]
        cos = torch.nn.functional.cosine_similarity(fp8.flatten(), bf16.flatten(), dim=0).item()
        self.result["fp8"] = {
            "memory": memory, "layers": layers, "bf16_s": round(bf16_s, 4), "fp8_s": round(fp8_s, 4),
            "speedup": round(bf16_s / fp8_s, 3), "relative_l2_error": ((fp8 - bf16).norm() / bf16.norm()).item(),
            "max_abs_error": (fp8 - bf16).abs().max().item(), "cosine": cos, "peak_gib": peak_gib(self.device),
        }
        print("fp8", self.result["fp8"], flush=True)

    def part_vae(self):
        from diffusers import AutoencoderKLWan

        from storyfarm.m2v.model.vae import VideoVAE

        torch.manual_seed(0)
        vae_model = AutoencoderKLWan() if self.args.config == "a14b" else AutoencoderKLWan(base_dim=16)
        vae = VideoVAE(vae_model.to(self.device, self.dtype).eval(), self.device)
        latents = torch.randn(16, self.frames, self.h, self.w)
        rows = []
        for tiling in (False, True):
            vae.configure(tiling=tiling)
            reset_peak(self.device)
            timing = timeit(lambda: vae.decode_video(latents), self.device, repeats=max(1, self.args.repeats - 1))
            rows.append({"tiling": tiling, "seconds": round(timing["median_s"], 3), "peak_gib": peak_gib(self.device)})
            print("vae", rows[-1], flush=True)
        self.result["vae"] = {"dtype": "bfloat16", "latent": [16, self.frames, self.h, self.w], "rows": rows}
        del vae, vae_model

    def part_shot(self):
        from storyfarm.m2v.render.sampler import SamplerSettings, denoise

        expert = self.wrap()
        memory = 5 if 5 in self.args.memory else self.args.memory[0]
        latents, cond, text, _ = self.inputs(memory)
        steps = self.args.shot_steps
        settings = SamplerSettings(steps=steps)
        gemm, attn = self.floor_rates()
        step_floor = floor_seconds(self.flops(memory), gemm, attn)
        reset_peak(self.device)
        start = time.perf_counter()

        def progress(step, total, timestep, expert_name):
            # every 5 steps the JSON holds the shot so far: a run stopped at its time limit keeps them
            if step % 5 == 0 and step < total:
                sync(self.device)
                elapsed = time.perf_counter() - start
                self.result["shot_progress"] = {"memory": memory, "steps_done": step, "steps": total,
                                                "seconds": round(elapsed, 2),
                                                "percent_of_floor": round(100 * step * step_floor / elapsed, 1)}
                write_result("gpu-expert", self.result, self.args.out)

        denoise((expert, expert), latents[:1], text[:1], text[1:], memory_time_positions(memory, self.frames), settings,
                conditioning=cond, on_step=progress)
        sync(self.device)
        seconds = time.perf_counter() - start
        self.result.pop("shot_progress", None)
        floor = steps * step_floor
        self.result["shot"] = {"memory": memory, "steps": steps, "seconds": round(seconds, 2),
                               "seconds_per_step": round(seconds / steps, 3), "floor_seconds": round(floor, 2),
                               "percent_of_floor": round(100 * floor / seconds, 1), "peak_gib": peak_gib(self.device)}
        print("shot", self.result["shot"], flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", default="gemm,attention,stock,expert", help=f"comma list of {', '.join(PARTS)}")
    ap.add_argument("--memory", default="0,3,5,10", help="memory frame counts")
    ap.add_argument("--config", default="a14b", choices=sorted(CONFIGS))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--width", type=int, default=832)
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--attention", default="auto", help="attention backend for the storyfarm expert")
    ap.add_argument("--rope", default="auto", choices=("auto", "torch", "triton"))
    ap.add_argument("--cuda-graphs", action="store_true", help="compile part: inductor CUDA graphs")
    ap.add_argument("--shot-steps", type=int, default=40)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    args.memory = [int(m) for m in args.memory.split(",")]
    parts = [p for p in args.parts.split(",") if p]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        ap.error(f"--parts: unknown {unknown}; allowed: {', '.join(PARTS)}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device here (use --device cpu for a smoke run)")
    torch.set_grad_enabled(False)
    bench = Bench(args)
    started = time.perf_counter()
    for part in PARTS:  # fixed order: stock runs before the model is wrapped, fp8 last
        if part not in parts:
            continue
        if part in ("gemm", "attention"):
            bench.floor_rates()
        else:
            getattr(bench, f"part_{part}")()
        bench.result["seconds_total"] = round(time.perf_counter() - started, 1)
        write_result("gpu-expert", bench.result, args.out)  # after every part: a killed run keeps its figures
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
