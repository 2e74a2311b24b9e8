"""Rotary position frequencies for arbitrary (including negative) positions.

Wan splits each attention head's rotary pairs across time, height and width and rotates
interleaved pairs (x[2i], x[2i+1]). diffusers precomputes a 0..N table and slices it, which cannot
express StoryMem's memory positions (-5M, ..., -5). These helpers compute the same cos/sin values
for any position list, in float64 then float32, so that for non-negative integer positions they are
bitwise equal to diffusers' table (tested), and apply them in real arithmetic (no complex128).
"""

from __future__ import annotations

import os

import torch


def axis_frequencies(dim: int, theta: float = 10000.0) -> torch.Tensor:
    """Inverse frequencies of one axis with `dim` channels (dim/2 rotary pairs), float64."""
    if dim % 2:
        raise ValueError(f"rotary axis dim must be even, got {dim}")
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64)[: dim // 2] / dim))


def axis_cos_sin(positions: torch.Tensor, dim: int, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of shape [len(positions), dim], each pair's value repeated twice (interleaved layout)."""
    angles = torch.outer(positions.to(torch.float64), axis_frequencies(dim, theta))
    cos = angles.cos().repeat_interleave(2, dim=1).float()
    sin = angles.sin().repeat_interleave(2, dim=1).float()
    return cos, sin


def grid_cos_sin(
    time_positions: torch.Tensor,
    height: int,
    width: int,
    split: tuple[int, int, int],
    theta: float = 10000.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin for a (frames x height x width) token grid, flattened frame-major: [F*H*W, head_dim].

    `split` is the (time, height, width) channel split of the head dim. Height and width use the
    ordinary 0..H-1 / 0..W-1 patch grid; time uses the given positions, one per latent frame.
    """
    t_dim, h_dim, w_dim = split
    frames = time_positions.numel()
    ct, st = axis_cos_sin(time_positions, t_dim, theta)
    ch, sh = axis_cos_sin(torch.arange(height), h_dim, theta)
    cw, sw = axis_cos_sin(torch.arange(width), w_dim, theta)

    def expand(t, h, w):
        return torch.cat(
            [
                t.view(frames, 1, 1, -1).expand(frames, height, width, -1),
                h.view(1, height, 1, -1).expand(frames, height, width, -1),
                w.view(1, 1, width, -1).expand(frames, height, width, -1),
            ],
            dim=-1,
        ).reshape(frames * height * width, -1)

    return expand(ct, ch, cw), expand(st, sh, sw)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of x [..., D] by cos/sin broadcastable to x; real arithmetic.

    cos/sin are in the interleaved layout (each pair's value twice, as `axis_cos_sin` makes them).
    Written as x*cos + swap(x)*(+-sin): the same products and sums as the pairwise formula
    (x1*c - x2*s, x1*s + x2*c), so bitwise equal to it, in fewer full-size passes over x.
    """
    swapped = x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)  # (x2, x1) per pair
    pairs = sin.unflatten(-1, (-1, 2))
    signed_sin = torch.stack((-pairs[..., 0], pairs[..., 1]), dim=-1)  # (-s, +s): exact, no host constant
    return (x * cos + swapped * signed_sin.flatten(-2)).type_as(x)


def triton_prologue():
    """The fused RMSNorm+RoPE Triton kernel (kernels.triton_rope.norm_rope_qk), or None without triton."""
    try:
        from storyfarm.kernels.triton_rope import norm_rope_qk
    except Exception:  # noqa: BLE001 - triton missing or unusable: the torch path is used
        return None
    return norm_rope_qk


def triton_interpreted() -> bool:
    """Triton's CPU interpreter is on (TRITON_INTERPRET=1): its kernels run on CPU tensors, slowly,
    which is how CI checks the fused kernel and its wiring without a GPU."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def prologue_uses_triton(choice: str, device: torch.device) -> bool:
    """Whether the attention prologue runs the Triton kernel: `auto` on CUDA in eager mode (under
    torch.compile inductor fuses the torch ops itself), `triton` always, `torch` never. `triton`
    on the CPU is allowed only under Triton's interpreter (tests, debugging); `auto` never picks it."""
    if choice == "torch":
        return False
    if choice == "triton":
        runs_here = device.type == "cuda" or (device.type == "cpu" and triton_interpreted())
        if not runs_here or triton_prologue() is None:
            raise ValueError(f"rope: 'triton' needs a CUDA device (or TRITON_INTERPRET=1 on CPU) and the triton "
                             f"package (device {device}, triton importable: {triton_prologue() is not None}); "
                             "allowed: auto, torch, triton")
        return True
    if choice != "auto":
        raise ValueError(f"rope: {choice!r} is not a RoPE kernel; allowed: auto, torch, triton")
    return device.type == "cuda" and not torch.compiler.is_compiling() and triton_prologue() is not None
