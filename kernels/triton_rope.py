"""The fused attention prologue on GPU: RMSNorm across heads, then RoPE, in one Triton kernel.

Wan normalises q and k over all heads (RMSNorm of width heads*head_dim) and then rotates each
head's interleaved pairs. In eager PyTorch that is about ten elementwise passes over q and k per
block; this kernel reads each projection once and writes it once (one program per token row),
computing in float32 and rounding once at the end (eager rounds after the norm too, so the two
differ by at most one rounding of the input dtype). Under torch.compile inductor generates the
same fusion itself, so the processor uses this kernel only in eager mode (see `use_triton`).

Only imported where `triton` imports; everything here is optional and detected at run time.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl


@triton.jit
def _norm_rope_row(x_ptr, o_ptr, w_ptr, cos_ptr, sin_ptr, row, s, eps,
                   WIDTH: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr):
    heads = WIDTH // HEAD_DIM
    h = tl.arange(0, BLOCK_H)[:, None]
    p = tl.arange(0, BLOCK_P)[None, :]
    mask = (h < heads) & (p < HEAD_DIM // 2)
    even = h * HEAD_DIM + 2 * p
    x_e = tl.load(x_ptr + row * WIDTH + even, mask=mask, other=0.0).to(tl.float32)
    x_o = tl.load(x_ptr + row * WIDTH + even + 1, mask=mask, other=0.0).to(tl.float32)
    mean_sq = (tl.sum(tl.sum(x_e * x_e, axis=1), axis=0) + tl.sum(tl.sum(x_o * x_o, axis=1), axis=0)) / WIDTH
    rstd = 1.0 / tl.sqrt(mean_sq + eps)
    w_e = tl.load(w_ptr + even, mask=mask, other=0.0).to(tl.float32)
    w_o = tl.load(w_ptr + even + 1, mask=mask, other=0.0).to(tl.float32)
    n_e = x_e * rstd * w_e
    n_o = x_o * rstd * w_o
    pair = 2 * tl.arange(0, BLOCK_P)[None, :]
    pmask = tl.arange(0, BLOCK_P)[None, :] < HEAD_DIM // 2
    c = tl.load(cos_ptr + s * HEAD_DIM + pair, mask=pmask, other=0.0)
    sn = tl.load(sin_ptr + s * HEAD_DIM + pair + 1, mask=pmask, other=0.0)
    out_e = n_e * c - n_o * sn
    out_o = n_e * sn + n_o * c
    tl.store(o_ptr + row * WIDTH + even, out_e.to(o_ptr.dtype.element_ty), mask=mask)
    tl.store(o_ptr + row * WIDTH + even + 1, out_o.to(o_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _norm_rope_qk_kernel(q_ptr, k_ptr, qo_ptr, ko_ptr, wq_ptr, wk_ptr, cos_ptr, sin_ptr, seq, eps,
                         WIDTH: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr):
    row = tl.program_id(0)  # batch * seq + s
    s = row % seq
    _norm_rope_row(q_ptr, qo_ptr, wq_ptr, cos_ptr, sin_ptr, row, s, eps, WIDTH, HEAD_DIM, BLOCK_H, BLOCK_P)
    _norm_rope_row(k_ptr, ko_ptr, wk_ptr, cos_ptr, sin_ptr, row, s, eps, WIDTH, HEAD_DIM, BLOCK_H, BLOCK_P)


def norm_rope_qk(
    query: torch.Tensor,
    key: torch.Tensor,
    weight_q: torch.Tensor,
    weight_k: torch.Tensor,
    eps: float,
    cos: torch.Tensor,
    sin: torch.Tensor,
    heads: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k [B, S, heads*D] (projection outputs) -> normed, rotated [B, S, heads, D] each.

    cos/sin: [S, D] or broadcastable views of it ([1, S, 1, D]), interleaved-pair layout.
    """
    batch, seq, width = query.shape
    if key.shape != query.shape:
        raise ValueError(f"norm_rope_qk: key {tuple(key.shape)} must match query {tuple(query.shape)}")
    head_dim = width // heads
    cos = cos.reshape(seq, head_dim).float().contiguous()
    sin = sin.reshape(seq, head_dim).float().contiguous()
    query, key = query.contiguous(), key.contiguous()
    q_out, k_out = torch.empty_like(query), torch.empty_like(key)
    # Triton launches on the current device: a FIFO window replica on cuda:1 must make it current
    with torch.cuda.device(query.device) if query.device.type == "cuda" else contextlib.nullcontext():
        _norm_rope_qk_kernel[(batch * seq,)](
            query, key, q_out, k_out, weight_q.contiguous(), weight_k.contiguous(), cos, sin, seq, float(eps),
            WIDTH=width, HEAD_DIM=head_dim,
            BLOCK_H=triton.next_power_of_2(heads), BLOCK_P=triton.next_power_of_2(head_dim // 2),
            num_warps=8 if width >= 2048 else 4,
        )
    return q_out.unflatten(2, (heads, head_dim)), k_out.unflatten(2, (heads, head_dim))
