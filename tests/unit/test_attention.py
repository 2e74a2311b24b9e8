"""Attention registry: every backend against the math reference, explicit choice, honest records."""

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from storyfarm.kernels import attention
from storyfarm.story.kernel_choices import ATTENTION_CHOICES, EXACT_ATTENTION
from storyfarm.kernels.rope import prologue_uses_triton
from storyfarm.m2v.model.frame_timesteps import wan_forward
from storyfarm.m2v.model.rope import memory_time_positions
from storyfarm.m2v.model.transformer import M2VExpert, StoryAttnProcessor
from helpers.models import tiny_wan

TOLERANCE = {torch.float32: dict(atol=2e-5, rtol=1e-4), torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}


pytestmark = pytest.mark.usefixtures("default_attention")


def reference(q, k, v):
    """softmax(q k^T / sqrt(d)) v written out in float64, independent of every backend."""
    q, k, v = (t.double().transpose(1, 2) for t in (q, k, v))
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    return (scores.softmax(-1) @ v).transpose(1, 2)


@settings(max_examples=12, deadline=None)
@given(
    batch=st.integers(1, 2), seq_q=st.integers(1, 70), seq_k=st.integers(1, 70), heads=st.integers(1, 3),
    head_dim=st.sampled_from([8, 24, 64, 128]), dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    seed=st.integers(0, 2**31 - 1),
)
def test_every_available_backend_matches_the_reference(batch, seq_q, seq_k, heads, head_dim, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, s, heads, head_dim, generator=g).to(dtype) for s in (seq_q, seq_k, seq_k))
    want = reference(q, k, v)
    names = attention.available_backends("cpu", dtype, head_dim)
    assert {"math", "sdpa", "sdpa_flash"} <= set(names)
    for name in names:
        got = attention.attend(q, k, v, backend=name)
        assert got.shape == q.shape and got.dtype == dtype, name
        torch.testing.assert_close(got.double(), want, **TOLERANCE[dtype], msg=lambda m, n=name: f"{n}: {m}")


def test_auto_picks_a_fused_exact_backend_and_records_what_ran():
    assert attention.resolve("auto", "cpu", torch.float32, 24) == "sdpa_flash"
    q = torch.randn(1, 10, 2, 24)
    attention.attend(q, q, q)
    attention.attend(q, q, q, backend="math")
    info = attention.describe()
    assert info["ran"] == ["math", "sdpa_flash"] and info["calls"] == {"math": 1, "sdpa_flash": 1}
    assert attention.backend_label() == "math+sdpa_flash"
    attention.configure("math")
    attention.attend(q, q, q)
    assert attention.describe()["calls"]["math"] == 2 and attention.describe()["requested"] == "math"


def test_a_named_backend_that_cannot_run_is_an_error_not_a_fallback():
    q = torch.randn(1, 4, 2, 24)
    with pytest.raises(attention.AttentionUnavailable, match=r"'flash_attn3' cannot run .*cpu.*not importable.*available here: math, sdpa, sdpa_flash"):
        attention.attend(q, q, q, backend="flash_attn3")
    with pytest.raises(attention.AttentionUnavailable, match=r"'sdpa_cudnn' cannot run .*runs on cuda, not cpu"):
        attention.resolve("sdpa_cudnn", "cpu", torch.bfloat16, 128)
    assert attention.describe()["ran"] == []


def test_unknown_and_approximate_backends_name_what_is_allowed():
    q = torch.randn(1, 4, 2, 8)
    with pytest.raises(ValueError, match="'fast' is not an attention backend; allowed: auto, math"):
        attention.attend(q, q, q, backend="fast")
    with pytest.raises(ValueError, match="'sage' is an approximate kernel; set allow_approximate"):
        attention.configure("sage")
    with pytest.raises(ValueError, match="approximate"):
        attention.attend(q, q, q, backend="sage")
    attention.configure("auto", allow_approximate=True)  # opted in: sage is now only unavailable here
    with pytest.raises(attention.AttentionUnavailable, match="sageattention"):
        attention.attend(q, q, q, backend="sage")
    assert set(ATTENTION_CHOICES) == {"auto", *attention.BACKENDS}
    assert all(attention.BACKENDS[n].exact for n in EXACT_ATTENTION)


def test_bad_shapes_are_refused_with_the_shapes():
    with pytest.raises(ValueError, match=r"\[batch, seq, heads, head_dim\]"):
        attention.attend(torch.randn(4, 2, 8), torch.randn(4, 2, 8), torch.randn(4, 2, 8))
    with pytest.raises(ValueError, match="shapes do not match"):
        attention.attend(torch.randn(1, 4, 2, 8), torch.randn(1, 4, 3, 8), torch.randn(1, 4, 3, 8))


def test_math_refuses_to_materialise_production_score_matrices(monkeypatch):
    monkeypatch.setattr(attention, "MATH_SCORE_LIMIT_BYTES", 64 * 64 * 2 * 4)
    q = torch.randn(1, 65, 2, 8)
    with pytest.raises(attention.AttentionUnavailable, match="would materialise .* GiB of scores"):
        attention.attend(q, q, q, backend="math")
    torch.testing.assert_close(attention.attend(q, q, q).double(), reference(q, q, q), atol=2e-5, rtol=1e-4)


def test_compiled_attention_records_its_backend_at_trace_time_and_matches_eager():
    q, k, v = (torch.randn(2, 33, 2, 24) for _ in range(3))
    compiled = torch.compile(lambda a, b, c: attention.attend(a, b, c) * 2, backend="aot_eager", fullgraph=True)
    out = compiled(q, k, v)
    compiled(q, k, v)
    assert attention.describe()["calls"] == {"sdpa_flash": 1}  # one trace, replayed without a recompile
    torch.testing.assert_close(out, 2 * attention.attend(q, k, v, backend="math"), atol=2e-5, rtol=1e-4)


def test_third_party_kernels_are_opaque_ops_that_trace_with_fullgraph():
    op = attention._opaque("cpu_probe", attention.BACKENDS["math"].run)
    q, k, v = (torch.randn(1, 9, 2, 8) for _ in range(3))
    compiled = torch.compile(lambda a, b, c: op(a, b, c) + 1, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v), attention.attend(q, k, v, backend="math") + 1)


def test_expert_attention_goes_through_the_registry_with_every_backend():
    stock = tiny_wan()
    g = torch.Generator().manual_seed(5)
    latents, cond = torch.randn(2, 16, 4, 4, 6, generator=g), torch.randn(1, 20, 4, 4, 6, generator=g)
    text, t = torch.randn(2, 512, 32, generator=g), torch.tensor([800.0, 800.0])
    with torch.no_grad():
        want = stock(torch.cat([latents, cond.expand(2, -1, -1, -1, -1)], 1), t, text, return_dict=False)[0]
    expert = M2VExpert(copy.deepcopy(stock), "high_noise")
    processors = {type(p) for p in expert.model.attn_processors.values()}
    assert processors == {StoryAttnProcessor}
    for name in attention.available_backends("cpu", torch.float32, 24):
        expert.set_attention(name)
        attention.reset_record()
        got = expert(latents, t, text, memory_time_positions(0, 4), cond)
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
        assert attention.describe()["calls"] == {name: 2 * 2}  # 2 blocks x (self + cross attention)


def test_per_frame_timesteps_equal_stock_per_token_without_per_token_embeddings():
    stock = tiny_wan(seed=3)
    expert = M2VExpert(copy.deepcopy(stock), "low_noise")
    g = torch.Generator().manual_seed(6)
    frames, grid = 5, (4, 6)
    x = torch.randn(2, 36, frames, *grid, generator=g)
    text = torch.randn(2, 512, 32, generator=g)
    per_frame = torch.rand(2, frames, generator=g) * 1000
    tokens_per_frame = grid[0] * grid[1] // 4
    with torch.no_grad():
        want = stock(x, per_frame.repeat_interleave(tokens_per_frame, dim=1), text, return_dict=False)[0]
    seen = []
    hook = expert.model.condition_embedder.time_embedder.register_forward_hook(lambda m, i, o: seen.append(tuple(i[0].shape)))
    try:
        got = expert(x[:, :16], per_frame, text, list(range(frames)), x[:, 16:])
        expert(x[:, :16], per_frame[:, 0], text, list(range(frames)), x[:, 16:])
    finally:
        hook.remove()
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    assert seen == [(2, frames, 32), (2, 32)]  # per frame, then per sample: never one row per token
    with pytest.raises(ValueError, match=r"timestep: expected shape"):
        wan_forward(expert.model, x, per_frame[:, :3], text)


def test_rope_prologue_choice():
    assert not prologue_uses_triton("auto", torch.device("cpu"))
    assert not prologue_uses_triton("torch", torch.device("cpu"))
    with pytest.raises(ValueError, match=r"'triton' needs a CUDA device \(or TRITON_INTERPRET=1 on CPU\)"):
        prologue_uses_triton("triton", torch.device("cpu"))
    with pytest.raises(ValueError, match="allowed: auto, torch, triton"):
        prologue_uses_triton("cuda", torch.device("cpu"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_prologue_is_bitwise_the_pairwise_formula(dtype):
    """apply_rotary's x*cos + swap(x)*(+-sin) form does the same products and sums as diffusers'
    pairwise (x1*c - x2*s, x1*s + x2*c), at any (negative) time position."""
    from storyfarm.kernels.rope import apply_rotary, grid_cos_sin

    cos, sin = grid_cos_sin(torch.tensor([-25, -5, 0, 7]), 3, 5, (8, 8, 8))
    cos, sin = cos.view(1, -1, 1, 24), sin.view(1, -1, 1, 24)
    x = torch.randn(2, 60, 3, 24, generator=torch.Generator().manual_seed(9)).to(dtype)
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    c, s = cos[..., 0::2], sin[..., 1::2]
    want = torch.stack((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1).flatten(-2).type_as(x)
    assert torch.equal(apply_rotary(x, cos, sin), want)


TRITON_CHECK = """
import torch
from storyfarm.kernels.rope import apply_rotary, grid_cos_sin
from storyfarm.kernels.triton_rope import norm_rope_qk
heads, d, s = 3, 24, 2 * 2 * 4
cos, sin = grid_cos_sin(torch.tensor([-10, -5]), 2, 4, (8, 8, 8))
cos, sin = cos.view(1, s, 1, d), sin.view(1, s, 1, d)
q, k = torch.randn(2, s, heads * d), torch.randn(2, s, heads * d)
w_q, w_k = torch.rand(heads * d) + 0.5, torch.rand(heads * d) + 0.5
norm = lambda x, w: torch.nn.functional.rms_norm(x, (heads * d,), w, 1e-6).unflatten(2, (heads, d))
got_q, got_k = norm_rope_qk(q, k, w_q, w_k, 1e-6, cos, sin, heads)
torch.testing.assert_close(got_q, apply_rotary(norm(q, w_q), cos, sin), atol=1e-5, rtol=1e-5)
torch.testing.assert_close(got_k, apply_rotary(norm(k, w_k), cos, sin), atol=1e-5, rtol=1e-5)

# the processor's wiring: a whole M2V expert with the fused prologue equals the torch prologue
import copy
from diffusers import WanTransformer3DModel
from storyfarm.kernels.rope import prologue_uses_triton
from storyfarm.story.presets import load_preset
from storyfarm.m2v.model.rope import memory_time_positions
from storyfarm.m2v.model.transformer import M2VExpert
assert prologue_uses_triton("triton", torch.device("cpu")) and not prologue_uses_triton("auto", torch.device("cpu"))
torch.manual_seed(0)
model = WanTransformer3DModel(**load_preset("tiny").architecture.transformer).eval()
fused, plain = M2VExpert(copy.deepcopy(model), "high_noise", rope="triton"), M2VExpert(model, "high_noise", rope="torch")
g = torch.Generator().manual_seed(1)
memory, frames = 2, 2
latents, cond = torch.randn(2, 16, memory + frames, 4, 6, generator=g), torch.randn(1, 20, memory + frames, 4, 6, generator=g)
args = (latents, torch.tensor([900.0, 900.0]), torch.randn(2, 512, 32, generator=g), memory_time_positions(memory, frames), cond)
calls = []
import storyfarm.kernels.triton_rope as kernel
original = kernel._norm_rope_qk_kernel
class Counting:
    def __getitem__(self, grid):
        calls.append(grid)
        return original[grid]
kernel._norm_rope_qk_kernel = Counting()
got = fused(*args)
kernel._norm_rope_qk_kernel = original
assert len(calls) == len(model.blocks), calls  # one fused prologue per self-attention, none for cross
torch.testing.assert_close(got, plain(*args), atol=1e-5, rtol=1e-4)
"""


def test_triton_prologue_in_the_triton_interpreter():
    """The fused RMSNorm+RoPE kernel's arithmetic and its wiring into the attention processor, run
    by Triton's CPU interpreter (the dev extra installs triton on Linux x86-64; tests/gpu runs the
    kernel compiled on CUDA)."""
    import importlib.util
    import os
    import subprocess
    import sys

    if importlib.util.find_spec("triton") is None:
        pytest.skip("needs the triton package (the CPU environment has none; tests/gpu runs the kernel on CUDA)")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", TRITON_CHECK], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.parametrize("version, usable", [(91500, False), (90100, False), (91501, True), (92000, True)])
def test_cudnn_attention_needs_a_cudnn_past_9_15_0(monkeypatch, version, usable):
    """Older cuDNN reads out of bounds at sequence lengths that are not multiples of 128 (every
    Wan length is one of those); torch itself prefers cuDNN attention only past 9.15.0."""
    monkeypatch.setattr(torch.backends.cudnn, "is_available", lambda: True)
    monkeypatch.setattr(torch.backends.cudnn, "version", lambda: version)
    spec = attention._Input("cuda", (9, 0), torch.bfloat16, 128)
    reason = attention.BACKENDS["sdpa_cudnn"].why_not(spec)
    assert (reason is None) == usable, reason
    if not usable:
        assert f"needs cuDNN newer than 9.15.0, found {version}" in reason
