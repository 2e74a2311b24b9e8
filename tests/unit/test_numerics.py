"""Numerical faithfulness to Wan (DESIGN.md section 4): the float32 forward of the repo's expert is
no further from a float64 run of the same weights than float32 rounding allows.

The oracle is diffusers' own model cast to float64, made float64 *throughout*: three places of the
stock model round to float32 even in a float64 model (the timestep sinusoid, `get_timestep_embedding`;
the rotary tables, computed in float64 but stored as float32; the blocks' `.float()` before each
norm), so the oracle gets Wan's sinusoid and float64 rotary tables written out here, independently of
the code under test, and runs with `.float()` leaving float64 tensors alone. With the float32
sinusoid diffusers ships, the expert is about 2e-6 relative off the oracle at Wan's freq_dim (256)
and high-noise timesteps; with Wan's float64 sinusoid, about 3e-7 (2-3 float32 ulps of the output).
"""

from __future__ import annotations

import contextlib
import copy
from unittest import mock

import pytest
import torch

from storyfarm.m2v.model.frame_timesteps import WanTimesteps
from storyfarm.m2v.model.rope import memory_time_positions
from storyfarm.m2v.model.transformer import M2VExpert
from helpers.models import tiny_wan

FREQ_DIM = 256  # Wan2.2's: the sinusoid's float32 error grows with the number of frequencies
# float32 rounding of the whole forward, relative to the output's magnitude: a few float32 ulps
# (eps 1.19e-7). Measured: 2.6-3.5e-7 with the float64 sinusoid, 1.5-2.2e-6 with diffusers' float32 one.
RELATIVE_TOLERANCE = 8e-7


def wan_sinusoid(dim: int, position: torch.Tensor) -> torch.Tensor:
    """Wan's `sinusoidal_embedding_1d`, as written in its model code (float64)."""
    half = dim // 2
    position = position.type(torch.float64)
    sinusoid = torch.outer(position, torch.pow(10000, -torch.arange(half).to(position).div(half)))
    return torch.cat([torch.cos(sinusoid), torch.sin(sinusoid)], dim=1)


class _OracleSinusoid(torch.nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, timesteps):
        return wan_sinusoid(self.dim, timesteps)


def _float64_rope_tables(rope) -> None:
    cos, sin = [], []
    for dim in (rope.t_dim, rope.h_dim, rope.w_dim):
        freqs = 1.0 / 10000.0 ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)  # Wan's theta
        angles = torch.outer(torch.arange(rope.max_seq_len, dtype=torch.float64), freqs)
        cos.append(angles.cos().repeat_interleave(2, dim=1))
        sin.append(angles.sin().repeat_interleave(2, dim=1))
    rope.freqs_cos, rope.freqs_sin = torch.cat(cos, dim=1), torch.cat(sin, dim=1)


def float64_oracle(stock):
    """The stock diffusers model with the same weights, computing everything in float64."""
    oracle = copy.deepcopy(stock).to(torch.float64)
    oracle.condition_embedder.timesteps_proj = _OracleSinusoid(stock.config.freq_dim)
    _float64_rope_tables(oracle.rope)
    return oracle


@contextlib.contextmanager
def keep_float64():
    """Make `.float()` a no-op on float64 tensors (diffusers' blocks call it before every norm)."""
    original = torch.Tensor.float

    def float_(self, *args, **kwargs):
        return self if self.dtype == torch.float64 else original(self, *args, **kwargs)

    with mock.patch.object(torch.Tensor, "float", float_):
        yield


def test_the_sinusoid_is_wans_in_float64():
    t = torch.tensor([999.0, 937.7, 0.0, 12.5])
    got = WanTimesteps(FREQ_DIM, flip_sin_to_cos=True, downscale_freq_shift=0)(t)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, wan_sinusoid(FREQ_DIM, t), atol=1e-12, rtol=0)


@pytest.mark.parametrize("per_frame", [False, True], ids=["per-sample", "per-frame"])
def test_float32_forward_is_within_float32_rounding_of_a_float64_oracle(per_frame):
    stock = tiny_wan(seed=0, freq_dim=FREQ_DIM)
    frames, height, width = 5, 6, 8
    g = torch.Generator().manual_seed(10)
    latents = torch.randn(2, 16, frames, height, width, generator=g)
    cond = torch.randn(2, 20, frames, height, width, generator=g)
    text = torch.randn(2, 512, stock.config.text_dim, generator=g)
    if per_frame:  # a FIFO window: every latent frame its own (fractional) timestep
        t = torch.tensor([[999.0, 987.3, 960.1, 937.7, 901.2], [899.5, 850.25, 700.0, 512.4, 250.8]])
        t_oracle = t.repeat_interleave(height * width // 4, dim=1)  # diffusers' per-token form
    else:
        t = t_oracle = torch.tensor([999.0, 937.7])

    got = M2VExpert(copy.deepcopy(stock), "high_noise")(latents, t, text, memory_time_positions(0, frames), cond)
    with torch.no_grad(), keep_float64():
        want = float64_oracle(stock)(torch.cat([latents, cond], 1).double(), t_oracle.double(), text.double(),
                                     return_dict=False)[0]
    err = (got.double() - want).abs().max().item()
    magnitude = want.abs().max().item()
    assert err <= RELATIVE_TOLERANCE * magnitude, f"max abs error {err:.3g} at output magnitude {magnitude:.3g}"
