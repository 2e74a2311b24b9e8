"""storyfarm.kernels: the numeric building blocks under the model runtime.

Lowest layer above `storyfarm.story`: imports torch (and optional kernel packages, lazily) and,
of storyfarm, only the story package.
- attention: the backend registry (`attend`, `configure`, `describe`): SDPA flash/cuDNN/efficient/
  math, flash-attn 2/3, xformers, opt-in approximate kernels; the backend that ran is recorded.
- rope: rotary tables for any (negative) time position, applied in real arithmetic; the fused
  RMSNorm+RoPE Triton prologue (triton_rope) on CUDA.
- flops: the FLOP model of a Wan forward (GEMM vs attention work) behind the benchmark floor.
- the names a preset may choose (validated in the daemon, which never imports torch) live in
  `storyfarm.story.kernel_choices`; the modules here check they implement exactly those.
"""
