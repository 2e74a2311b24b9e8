"""storyfarm.kernels: the numeric building blocks under the model runtime.

Lowest layer: imports torch (and optional kernel packages, lazily) and nothing else of storyfarm.
- attention: the backend registry (`attend`, `configure`, `describe`): SDPA flash/cuDNN/efficient/
  math, flash-attn 2/3, xformers, opt-in approximate kernels; the backend that ran is recorded.
- rope: rotary tables for any (negative) time position, applied in real arithmetic; the fused
  RMSNorm+RoPE Triton prologue (triton_rope) on CUDA.
- flops: the FLOP model of a Wan forward (GEMM vs attention work) behind the benchmark floor.
- catalog: the torch-free names presets may use (validated in the daemon, which never imports torch).
"""
