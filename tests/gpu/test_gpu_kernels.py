"""Kernels on a CUDA device: every backend and the compiled path against references, the fused
Triton prologue, FP8, TensorRT, the VAE and the engine. Skipped (with the reason) without CUDA."""

import copy

import numpy as np
import pytest
import torch

from storyfarm.kernels import attention
from storyfarm.story.presets import load_preset
from storyfarm.m2v.model.rope import memory_time_positions
from storyfarm.m2v.model.transformer import M2VExpert
from helpers.models import tiny_wan as shared_tiny_wan

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
              pytest.mark.usefixtures("default_attention")]

CUDA = torch.device("cuda")
TOLERANCE = {torch.float32: dict(atol=1e-4, rtol=1e-3), torch.float16: dict(atol=5e-3, rtol=5e-3),
             torch.bfloat16: dict(atol=1e-2, rtol=1e-2)}  # bf16 kernels measure <= 3.3e-3 on CPU
# a whole compiled expert against eager: inductor reorders and fuses the bf16 roundings of 2 blocks
COMPILED_TOLERANCE = {torch.float32: dict(atol=1e-4, rtol=1e-3), torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}




def tiny_wan(seed=0, device=CUDA, dtype=torch.float32):
    return shared_tiny_wan(seed, device, dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("seq_q, seq_k, head_dim", [(1000, 1000, 128), (333, 512, 64), (4096, 4096, 128)])
def test_every_cuda_backend_matches_a_float64_reference(dtype, seq_q, seq_k, head_dim):
    g = torch.Generator(CUDA).manual_seed(seq_q * 7 + head_dim)
    q, k, v = (torch.randn(2, s, 4, head_dim, device=CUDA, generator=g) for s in (seq_q, seq_k, seq_k))
    want = attention.attend(q.double(), k.double(), v.double(), backend="math")
    names = attention.available_backends(CUDA, dtype, head_dim)
    assert "math" in names and len(names) > 2
    for name in names:
        got = attention.attend(q.to(dtype), k.to(dtype), v.to(dtype), backend=name)
        torch.testing.assert_close(got.double(), want, **TOLERANCE[dtype], msg=lambda m, n=name: f"{n}: {m}")


def test_auto_is_fused_on_cuda_and_never_materialises_the_scores():
    name = attention.resolve("auto", CUDA, torch.bfloat16, 128)
    assert name not in ("math", "sdpa")
    q = torch.randn(1, 16384, 8, 128, device=CUDA, dtype=torch.bfloat16)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    attention.attend(q, q, q)
    torch.cuda.synchronize()
    scores = 16384 * 16384 * 8 * 2
    assert torch.cuda.max_memory_allocated() - before < scores / 8
    assert attention.describe()["ran"] == [name]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_prologue_matches_the_torch_prologue(dtype):
    from storyfarm.kernels.rope import apply_rotary, grid_cos_sin, triton_prologue

    fused = triton_prologue()
    if fused is None:
        pytest.skip("needs the triton package")
    heads, head_dim, frames, h, w = 40, 128, 4, 6, 8
    cos, sin = grid_cos_sin(torch.tensor(memory_time_positions(2, 2)), h, w, (44, 42, 42))
    cos, sin = cos.view(1, -1, 1, head_dim).to(CUDA), sin.view(1, -1, 1, head_dim).to(CUDA)
    seq = frames * h * w
    g = torch.Generator(CUDA).manual_seed(0)
    q, k = (torch.randn(2, seq, heads * head_dim, device=CUDA, generator=g).to(dtype) for _ in range(2))
    norm_q, norm_k = (torch.nn.RMSNorm(heads * head_dim, eps=1e-6).to(CUDA) for _ in range(2))
    with torch.no_grad():
        norm_q.weight.uniform_(0.5, 1.5)
        norm_k.weight.uniform_(0.5, 1.5)
        want_q = apply_rotary(norm_q(q).unflatten(2, (heads, head_dim)), cos, sin)
        want_k = apply_rotary(norm_k(k).unflatten(2, (heads, head_dim)), cos, sin)
        got_q, got_k = fused(q, k, norm_q.weight, norm_k.weight, 1e-6, cos, sin, heads)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=4e-2, rtol=2e-2)
    torch.testing.assert_close(got_q.float(), want_q.float(), **tol)
    torch.testing.assert_close(got_k.float(), want_k.float(), **tol)


@pytest.mark.parametrize("rope", ["torch", "auto"])
def test_expert_on_cuda_matches_stock_diffusers(rope):
    stock = tiny_wan(dtype=torch.bfloat16)
    expert = M2VExpert(copy.deepcopy(stock), "high_noise", rope=rope)
    g = torch.Generator().manual_seed(1)
    latents, cond = torch.randn(2, 16, 5, 12, 20, generator=g), torch.randn(1, 20, 5, 12, 20, generator=g)
    text, t = torch.randn(2, 512, 32, generator=g), torch.tensor([900.0, 900.0])
    x = torch.cat([latents, cond.expand(2, -1, -1, -1, -1)], 1).to(CUDA, torch.bfloat16)
    with torch.no_grad():
        want = stock(x, t.to(CUDA), text.to(CUDA, torch.bfloat16), return_dict=False)[0].float()
    got = expert(latents.to(CUDA), t.to(CUDA), text.to(CUDA), memory_time_positions(0, 5), cond.to(CUDA))
    torch.testing.assert_close(got, want, atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inductor_compiled_expert_matches_eager(dtype):
    from storyfarm.m2v.accel.compile import compile_expert

    model = tiny_wan(seed=2, dtype=dtype)
    eager = M2VExpert(copy.deepcopy(model), "eager")
    compiled = M2VExpert(model, "compiled")
    regions = compile_expert(compiled, backend="inductor", shapes="dynamic")
    for memory in (0, 3):
        g = torch.Generator().manual_seed(memory)
        args = (torch.randn(2, 16, memory + 5, 12, 20, generator=g).to(CUDA), torch.full((2,), 700.0, device=CUDA),
                torch.randn(2, 512, 32, generator=g).to(CUDA), memory_time_positions(memory, 5),
                torch.randn(1, 20, memory + 5, 12, 20, generator=g).to(CUDA))
        torch.testing.assert_close(compiled(*args), eager(*args), **COMPILED_TOLERANCE[dtype])
    assert regions.stats.compiles <= 2 and regions.stats.eager_fallbacks == 0


def test_fp8_weights_stay_close_to_bf16():
    from storyfarm.m2v.accel.fp8 import fp8_layer_filter, fp8_unavailable_reason, quantize_expert_fp8

    reason = fp8_unavailable_reason(CUDA)
    if reason is not None:
        pytest.skip(reason)
    expert = M2VExpert(tiny_wan(seed=4, dtype=torch.bfloat16), "fp8")
    g = torch.Generator().manual_seed(4)
    args = (torch.randn(2, 16, 5, 12, 20, generator=g).to(CUDA), torch.full((2,), 500.0, device=CUDA),
            torch.randn(2, 512, 32, generator=g).to(CUDA), memory_time_positions(0, 5),
            torch.randn(1, 20, 5, 12, 20, generator=g).to(CUDA))
    bf16 = expert(*args)
    wanted = sum(1 for name, m in expert.model.named_modules() if fp8_layer_filter(m, name))
    assert quantize_expert_fp8(expert.model, CUDA) == wanted > 0  # counted from the converted weights
    fp8 = expert(*args)
    error = ((fp8 - bf16).norm() / bf16.norm()).item()
    assert 0 < error < 0.1  # a no-op quantisation (error 0) fails too


def test_tensorrt_engine_builds_from_the_onnx_export(tmp_path):
    from storyfarm.m2v.accel.export import ExportShape, build_tensorrt_engine, export_onnx, tensorrt_unavailable_reason

    reason = tensorrt_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    expert = M2VExpert(tiny_wan(device="cpu"), "high_noise")
    onnx_path = export_onnx(expert.model, tmp_path / "expert.onnx", ExportShape(2, 1, 3, 4, 8, 16))
    plan = build_tensorrt_engine(onnx_path, tmp_path / "expert.plan")
    assert plan.stat().st_size > 0


def test_vae_bf16_tiled_decode_on_cuda_is_close_to_untiled():
    from diffusers import AutoencoderKLWan

    from storyfarm.m2v.model.vae import VideoVAE

    torch.manual_seed(0)
    vae = VideoVAE(AutoencoderKLWan(**load_preset("tiny").architecture.vae).to(CUDA, torch.bfloat16), CUDA)
    latents = torch.randn(16, 2, 24, 40, generator=torch.Generator().manual_seed(1))
    plain = vae.decode_video(latents).float()
    vae.configure(tiling=True, tile=(128, 192, 96, 128))  # overlapping tiles: stride < tile blends the seams
    tiled = vae.decode_video(latents).float()
    assert torch.corrcoef(torch.stack([plain.flatten(), tiled.flatten()]))[0, 1] > 0.95


def test_engine_on_cuda_renders_with_a_fused_backend():
    from storyfarm.m2v.render.engine import Engine, ShotPlan
    from storyfarm.m2v.render.sampler import SamplerSettings

    engine = Engine(load_preset("tiny", {"dtype": "bfloat16"}), device="cuda")
    assert engine.runtime.attention_backend not in ("math", "sdpa") and engine.runtime.vae_tiling
    report = engine.warm_up()
    assert report["forwards"] > 0 and engine.attention_backend == engine.runtime.attention_backend
    plan = ShotPlan(story_key="s", prompt="a lighthouse", negative_prompt="", seed=3, width=160, height=96, frames=17,
                    sampler=SamplerSettings(steps=2))
    frames = engine.render_shot(plan).frames
    assert frames.shape == (17, 96, 160, 3) and frames.dtype == np.uint8
