"""Attention backends behind one call, with the kernel that actually ran on record.

Every attention in the runtime (Wan self- and cross-attention, Consistent Self-Attention) calls
`attend(query, key, value)` with tensors laid out [batch, seq, heads, head_dim] (the layout of
diffusers' Wan processor and of flash-attn/xformers). Which kernel runs is a configuration choice
(`configure`), never a silent fallback: an explicitly named backend that cannot run on the given
device/dtype is an error naming the backend, the input and what it needs; `auto` picks the first
exact backend in a fixed per-device preference order. Approximate kernels (8-bit SageAttention)
run only after `configure(allow_approximate=True)`.

Invariants:
- The backend that ran is recorded (`describe()`): per call in eager mode, once per trace under
  torch.compile (the choice is made in Python at trace time and baked into the graph).
- Only `math` materialises the [seq_q, seq_k] score matrix; it refuses problems whose scores would
  exceed MATH_SCORE_LIMIT_BYTES, so production sizes always run a fused kernel.
- Optional packages (flash-attn 2/3, xformers, sageattention) are imported lazily, wrapped as
  opaque torch custom ops so torch.compile(fullgraph=True) can trace through them.
"""

from __future__ import annotations

import importlib
import threading
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from storyfarm.story.kernel_choices import APPROXIMATE_ATTENTION, EXACT_ATTENTION, check_attention_choice

MATH_SCORE_LIMIT_BYTES = 1 << 30
CUDNN_ATTENTION_MIN_EXCLUSIVE = 91500  # torch.backends.cudnn.version() of cuDNN 9.15.0
HALF = (torch.float16, torch.bfloat16)
FLOATS = (torch.float32, *HALF)

# auto's preference, best first. Hopper: FA3, then cuDNN's fused attention (close to FA3 there).
AUTO_ORDER = {
    "cuda_sm90": ("flash_attn3", "sdpa_cudnn", "flash_attn2", "sdpa_flash", "xformers", "sdpa_efficient", "math"),
    "cuda": ("flash_attn2", "sdpa_flash", "sdpa_cudnn", "xformers", "sdpa_efficient", "math"),
    "cpu": ("sdpa_flash", "math"),
}


class AttentionUnavailable(ValueError):
    """A named backend cannot run this input (missing package, device, dtype or shape)."""


@dataclass(frozen=True)
class _Input:
    """What backend choice depends on; hashable so a traced choice is a constant."""

    device: str  # "cpu" | "cuda"
    capability: tuple[int, int]  # (0, 0) off CUDA
    dtype: torch.dtype
    head_dim: int


def _module(name: str):
    try:
        return importlib.import_module(name)
    except Exception:  # noqa: BLE001 - any import failure means "not installed here"
        return None


def _sdpa(kind: SDPBackend | None):
    def run(q, k, v):
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        if kind is None:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            with sdpa_kernel([kind]):
                out = F.scaled_dot_product_attention(q, k, v)
        return out.transpose(1, 2)

    return run


_OPAQUE: dict[str, Callable] = {}
_OPAQUE_LOCK = threading.Lock()


def _opaque(name: str, fn: Callable) -> Callable:
    """Wrap a third-party [B,S,H,D] kernel as a torch custom op (compile sees one opaque node)."""
    with _OPAQUE_LOCK:
        if name not in _OPAQUE:

            def impl(q, k, v):
                return fn(q, k, v).contiguous()

            op = torch.library.custom_op(
                f"storyfarm_attention::{name}", impl, mutates_args=(), schema="(Tensor q, Tensor k, Tensor v) -> Tensor"
            )
            op.register_fake(lambda q, k, v: q.new_empty((*q.shape[:-1], v.shape[-1])))
            _OPAQUE[name] = op
    return _OPAQUE[name]


def _flash_attn2(q, k, v):
    from flash_attn import flash_attn_func

    return flash_attn_func(q, k, v, dropout_p=0.0, causal=False)


def _flash_attn3(q, k, v):
    from flash_attn_interface import flash_attn_func

    out = flash_attn_func(q, k, v, causal=False)
    return out[0] if isinstance(out, tuple) else out


def _xformers(q, k, v):
    from xformers.ops import memory_efficient_attention

    return memory_efficient_attention(q, k, v)


def _sage(q, k, v):
    from sageattention import sageattn

    return sageattn(q, k, v, tensor_layout="NHD", is_causal=False)


@dataclass(frozen=True)
class Backend:
    name: str
    exact: bool
    package: str | None
    devices: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...]
    max_head_dim: int
    head_multiple: int
    min_capability: tuple[int, int]
    run: Callable

    def why_not(self, spec: _Input) -> str | None:
        """None when this backend can run `spec`, else the reason (for the error message)."""
        if self.package and _module(self.package) is None:
            return f"the {self.package!r} package is not importable"
        if spec.device not in self.devices:
            return f"runs on {'/'.join(self.devices)}, not {spec.device}"
        if spec.dtype not in self.dtypes:
            return f"needs {'/'.join(str(d).removeprefix('torch.') for d in self.dtypes)}, got {str(spec.dtype).removeprefix('torch.')}"
        if spec.head_dim > self.max_head_dim or spec.head_dim % self.head_multiple:
            return f"needs head_dim a multiple of {self.head_multiple} up to {self.max_head_dim}, got {spec.head_dim}"
        if spec.device == "cuda" and spec.capability < self.min_capability:
            return f"needs CUDA capability {self.min_capability[0]}.{self.min_capability[1]}+, got {spec.capability[0]}.{spec.capability[1]}"
        return self._torch_build_reason(spec)

    def _torch_build_reason(self, spec: _Input) -> str | None:
        if spec.device != "cuda":
            return None
        if self.name == "sdpa_flash" and not torch.backends.cuda.is_flash_attention_available():
            return "this torch build has no flash attention kernel"
        if self.name == "sdpa_cudnn":
            if not torch.backends.cudnn.is_available():
                return "cuDNN is not available"
            version = torch.backends.cudnn.version() or 0
            if version <= CUDNN_ATTENTION_MIN_EXCLUSIVE:
                return (f"needs cuDNN newer than 9.15.0, found {version} (older releases read out of bounds at "
                        "sequence lengths that are not multiples of 128, pytorch#169849; torch itself prefers "
                        "cuDNN attention only above 9.15.0)")
        return None


ANY = 1 << 16
BACKENDS: dict[str, Backend] = {
    b.name: b
    for b in (
        Backend("math", True, None, ("cpu", "cuda"), (*FLOATS, torch.float64), ANY, 1, (0, 0), _sdpa(SDPBackend.MATH)),
        Backend("sdpa", True, None, ("cpu", "cuda"), FLOATS, ANY, 1, (0, 0), _sdpa(None)),
        Backend("sdpa_flash", True, None, ("cpu", "cuda"), FLOATS, ANY, 1, (0, 0), _sdpa(SDPBackend.FLASH_ATTENTION)),
        Backend("sdpa_efficient", True, None, ("cuda",), FLOATS, ANY, 1, (5, 0), _sdpa(SDPBackend.EFFICIENT_ATTENTION)),
        Backend("sdpa_cudnn", True, None, ("cuda",), HALF, 128, 8, (8, 0), _sdpa(SDPBackend.CUDNN_ATTENTION)),
        Backend("flash_attn2", True, "flash_attn", ("cuda",), HALF, 256, 8, (8, 0), _flash_attn2),
        Backend("flash_attn3", True, "flash_attn_interface", ("cuda",), HALF, 256, 8, (9, 0), _flash_attn3),
        Backend("xformers", True, "xformers", ("cuda",), FLOATS, ANY, 1, (5, 0), _xformers),
        Backend("sage", False, "sageattention", ("cuda",), HALF, 128, 8, (8, 0), _sage),
    )
}
assert tuple(n for n, b in BACKENDS.items() if b.exact) == EXACT_ATTENTION
assert tuple(n for n, b in BACKENDS.items() if not b.exact) == APPROXIMATE_ATTENTION
_THIRD_PARTY = {"flash_attn2", "flash_attn3", "xformers", "sage"}
# On CUDA, PyTorch's flash kernel takes only half precision (head_dim <= 256, multiple of 8); on
# the CPU it takes float32 and any head_dim.
_CUDA_HALF_ONLY = {"sdpa_flash"}


class _State:
    def __init__(self):
        self.default = "auto"
        self.allow_approximate = False
        self.calls: dict[str, int] = {}
        self.choices: dict[tuple, str] = {}  # resolved backends, cleared by configure()
        self.lock = threading.Lock()


_STATE = _State()


def configure(default: str = "auto", *, allow_approximate: bool = False) -> None:
    """Set the process-wide backend used when `attend` gets no explicit backend."""
    check_attention_choice(default, allow_approximate)
    _STATE.default = default
    _STATE.allow_approximate = allow_approximate
    _STATE.choices.clear()


def _record(name: str) -> None:
    with _STATE.lock:
        _STATE.calls[name] = _STATE.calls.get(name, 0) + 1


def reset_record() -> None:
    with _STATE.lock:
        _STATE.calls.clear()


def describe() -> dict:
    """What is configured and what ran: {'requested', 'allow_approximate', 'ran', 'calls'}."""
    with _STATE.lock:
        calls = dict(_STATE.calls)
    return {
        "requested": _STATE.default,
        "allow_approximate": _STATE.allow_approximate,
        "ran": sorted(calls),
        "calls": calls,
    }


def backend_label() -> str:
    """One short string for a metric label / log line: the backends that ran, or 'none'."""
    ran = describe()["ran"]
    return "+".join(ran) if ran else "none"


def _spec(device: torch.device, dtype: torch.dtype, head_dim: int) -> _Input:
    capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else (0, 0)
    return _Input(device.type, tuple(capability), dtype, int(head_dim))


def _why_not(name: str, spec: _Input) -> str | None:
    if name in _CUDA_HALF_ONLY and spec.device == "cuda":
        if spec.dtype not in HALF:
            return f"needs float16/bfloat16 on cuda, got {str(spec.dtype).removeprefix('torch.')}"
        if spec.head_dim > 256 or spec.head_dim % 8:
            return f"needs head_dim a multiple of 8 up to 256 on cuda, got {spec.head_dim}"
    return BACKENDS[name].why_not(spec)


def _choose_uncached(requested: str, spec: _Input) -> str:
    if requested == "auto":
        order = AUTO_ORDER["cuda_sm90" if spec.capability >= (9, 0) else spec.device]
        for name in order:
            if _why_not(name, spec) is None:
                return name
        raise AttentionUnavailable(f"attention: no backend can run {spec}")
    check_attention_choice(requested, _STATE.allow_approximate, field="attention backend")
    reason = _why_not(requested, spec)
    if reason is not None:
        raise AttentionUnavailable(
            f"attention backend {requested!r} cannot run {spec.dtype} on {spec.device} "
            f"(head_dim {spec.head_dim}): {reason}; available here: {', '.join(available(spec)) or 'none'}"
        )
    return requested


@torch.compiler.assume_constant_result
def _choose_and_record(requested: str, device_type: str, device_index: int, dtype: torch.dtype, head_dim: int) -> str:
    key = (requested, device_type, device_index, dtype, head_dim)
    name = _STATE.choices.get(key)
    if name is None:
        device = torch.device(device_type, device_index) if device_type == "cuda" else torch.device(device_type)
        name = _STATE.choices[key] = _choose_uncached(requested, _spec(device, dtype, head_dim))
    _record(name)
    return name


def available(spec: _Input) -> list[str]:
    return [n for n in BACKENDS if _why_not(n, spec) is None and (BACKENDS[n].exact or _STATE.allow_approximate)]


def available_backends(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, head_dim: int = 128) -> list[str]:
    """Backends that can run attention for this device/dtype/head_dim in this process."""
    return available(_spec(torch.device(device), dtype, head_dim))


def resolve(backend: str | None = None, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, head_dim: int = 128) -> str:
    """The concrete backend `attend` would run (for logs at worker start); raises if none can."""
    return _choose_uncached(backend or _STATE.default, _spec(torch.device(device), dtype, head_dim))


def _check_math_size(q: torch.Tensor, k: torch.Tensor) -> None:
    batch, seq_q, heads, _ = q.shape
    scores = batch * heads * seq_q * k.shape[1] * 4
    if scores > MATH_SCORE_LIMIT_BYTES:
        raise AttentionUnavailable(
            f"attention backend 'math' would materialise {scores / 2**30:.1f} GiB of scores "
            f"(limit {MATH_SCORE_LIMIT_BYTES / 2**30:.0f} GiB); use auto or a fused backend"
        )


def attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v over [batch, seq, heads, head_dim] tensors -> [batch, seq_q, heads, head_dim]."""
    if query.ndim != 4 or key.ndim != 4 or value.ndim != 4:
        raise ValueError(
            f"attend: query/key/value must be [batch, seq, heads, head_dim], got {tuple(query.shape)}, "
            f"{tuple(key.shape)}, {tuple(value.shape)}"
        )
    if key.shape[:1] + key.shape[2:] != query.shape[:1] + query.shape[2:] or key.shape[:3] != value.shape[:3]:
        raise ValueError(
            f"attend: shapes do not match: query {tuple(query.shape)}, key {tuple(key.shape)}, value {tuple(value.shape)}"
        )
    index = query.device.index if query.device.index is not None else 0
    name = _choose_and_record(backend or _STATE.default, query.device.type, index, query.dtype, int(query.shape[-1]))
    if name == "math":
        _check_math_size(query, key)
    run = BACKENDS[name].run
    if name in _THIRD_PARTY:
        run = _opaque(name, run)
    return run(query, key, value)
