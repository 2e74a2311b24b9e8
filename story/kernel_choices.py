"""The names of the runtime's kernel choices, importable without torch.

Presets are validated in the daemon process, which never imports torch, so the lists a preset may
name (attention backends, compile modes, RoPE kernels) live here as plain data; the torch modules
(`kernels.attention`, `m2v.compile`) check at import time that they implement exactly these names.
"""

from __future__ import annotations

# Exact attention backends: every one computes softmax(QK^T/sqrt(d))V up to floating-point order.
# `math` is the reference (PyTorch SDPA's math kernel: it materialises the score matrix, so it is
# for checks and small problems only). `sdpa` lets PyTorch pick; the named `sdpa_*` pin its kernel.
EXACT_ATTENTION = (
    "math",
    "sdpa",
    "sdpa_flash",
    "sdpa_efficient",
    "sdpa_cudnn",
    "flash_attn2",
    "flash_attn3",
    "xformers",
)
# Approximate kernels (quantised QK^T / PV): faster, measurably different; opt-in only.
APPROXIMATE_ATTENTION = ("sage",)
ATTENTION_CHOICES = ("auto", *EXACT_ATTENTION, *APPROXIMATE_ATTENTION)

COMPILE_MODES = ("off", "regional")  # regional: each repeated transformer block
COMPILE_SHAPES = ("static", "dynamic")
COMPILE_BACKENDS = ("inductor", "aot_eager")  # aot_eager: traced but not code-generated (CPU CI)
ROPE_KERNELS = ("auto", "torch", "triton")
VAE_TILING = ("auto", "on", "off")


def check_attention_choice(name: str, allow_approximate: bool, field: str | None = "attention") -> str:
    """Validate a configured backend name; the error names the field and what is allowed."""
    prefix = f"{field}: " if field else ""
    if name not in ATTENTION_CHOICES:
        raise ValueError(f"{prefix}{name!r} is not an attention backend; allowed: {', '.join(ATTENTION_CHOICES)}")
    if name in APPROXIMATE_ATTENTION and not allow_approximate:
        raise ValueError(
            f"{prefix}{name!r} is an approximate kernel; set allow_approximate: true to opt in "
            f"(exact backends: auto, {', '.join(EXACT_ATTENTION)})"
        )
    return name
