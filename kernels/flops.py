"""FLOPs of one Wan transformer forward, split into GEMM (linear) work and attention work.

The split matters because the two run at different peak rates (bf16 GEMM about 790 TFLOP/s on
an H100, the best attention kernels about 650): the benchmark's floor is linear FLOPs at the
measured GEMM rate plus attention FLOPs at the attention rate, and every GPU timing is reported
as a fraction of it. A multiply-add counts as 2 FLOPs. Pure Python (no torch): schedulers may
use it for cost estimates.

For Wan2.2-A14B at 832x480, 81 frames (32,760 tokens), one sample: linear 0.79 PFLOP,
self-attention 0.88, cross-attention 0.01 (DESIGN.md §7; checked in tests).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class WanShape:
    dim: int = 5120
    ffn_dim: int = 13824
    num_layers: int = 40
    in_channels: int = 36
    out_channels: int = 16
    patch_volume: int = 4  # 1 x 2 x 2
    text_dim: int = 4096
    freq_dim: int = 256

    @classmethod
    def from_config(cls, config) -> "WanShape":
        get = config.get if isinstance(config, dict) else (lambda k, d=None: getattr(config, k, d))
        patch = get("patch_size", (1, 2, 2))
        return cls(
            dim=get("num_attention_heads", 40) * get("attention_head_dim", 128),
            ffn_dim=get("ffn_dim", 13824),
            num_layers=get("num_layers", 40),
            in_channels=get("in_channels", 36),
            out_channels=get("out_channels", 16),
            patch_volume=patch[0] * patch[1] * patch[2],
            text_dim=get("text_dim", 4096),
            freq_dim=get("freq_dim", 256),
        )


def tokens(frames: int, height: int, width: int, memory: int = 0) -> int:
    """Tokens of a shot: latent frames (pixel frames 4n+1 -> n+1) plus memory frames, (h/16)*(w/16) each."""
    return ((frames - 1) // 4 + 1 + memory) * (height // 16) * (width // 16)


def forward_flops(shape: WanShape, seq: int, text_len: int = 512, batch: int = 1) -> dict[str, float]:
    """{'linear', 'self_attention', 'cross_attention', 'attention', 'total'} FLOPs of one forward."""
    d, f = shape.dim, shape.ffn_dim
    per_layer_linear = (
        4 * 2 * seq * d * d  # self-attention q, k, v, o
        + 2 * 2 * seq * d * d  # cross-attention q, o
        + 2 * 2 * text_len * d * d  # cross-attention k, v over the text
        + 2 * 2 * seq * d * f  # FFN up and down
    )
    embed = (
        2 * seq * shape.in_channels * shape.patch_volume * d  # patch embedding
        + 2 * seq * d * shape.out_channels * shape.patch_volume  # output projection
        + 2 * text_len * (shape.text_dim * d + d * d)  # text embedder
        + 2 * (shape.freq_dim * d + d * d + d * 6 * d)  # time embedder and projection
    )
    linear = shape.num_layers * per_layer_linear + embed
    self_attention = shape.num_layers * 2 * 2 * seq * seq * d  # QK^T and PV
    cross_attention = shape.num_layers * 2 * 2 * seq * text_len * d
    out = {
        "linear": linear,
        "self_attention": self_attention,
        "cross_attention": cross_attention,
    }
    out = {k: float(v * batch) for k, v in out.items()}
    out["attention"] = out["self_attention"] + out["cross_attention"]
    out["total"] = out["linear"] + out["attention"]
    return out


def attention_flops(batch: int, seq_q: int, seq_k: int, heads: int, head_dim: int) -> float:
    """FLOPs of one attention call (QK^T and PV)."""
    return float(4 * batch * heads * seq_q * seq_k * head_dim)


def floor_seconds(flops: dict[str, float], gemm_tflops: float, attention_tflops: float) -> float:
    """Linear FLOPs at the GEMM rate plus attention FLOPs at the attention rate (TFLOP/s)."""
    return flops["linear"] / (gemm_tflops * 1e12) + flops["attention"] / (attention_tflops * 1e12)
