"""Regional torch.compile of an expert: the repeated transformer block, with counted recompiles.

Compiling the whole Wan model costs minutes and recompiles on every new shape; its 40 blocks are
identical, so compiling one block's forward (PyTorch inlines nn.Modules, so every block reuses the
same graph with its own weights as inputs) gives the speed at a fraction of the compile time.

Shapes are grouped into buckets: (batch, latent frames incl. memory, latent height, latent width,
text tokens, timestep kind). With `static` shapes each bucket compiles once; with `dynamic` shapes
one graph serves all token counts. Either way the number of compiled graphs is counted (the
compile backend is wrapped), at most `max_buckets` buckets are compiled, and a forward in any
further bucket runs eager (counted as an eager fallback) instead of recompiling without bound.

Invariants: LoRA is merged before compiling (an unmerged peft adapter is refused); the attention
backend is chosen at trace time and recorded by kernels.attention; `warm_up` (m2v.warmup) compiles
the buckets a worker expects before it takes work.
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass, field

import torch

from storyfarm.story.kernel_choices import COMPILE_SHAPES

Bucket = tuple  # (batch, frames, height, width, text_len, "sample" | "frame")


@dataclass
class CompileStats:
    compiles: int = 0  # graphs compiled (each backend invocation is one (re)compile)
    buckets: list = field(default_factory=list)  # compiled buckets, in order of first use
    eager_fallbacks: int = 0  # forwards run eager because the bucket budget was spent
    compile_seconds: float = 0.0

    def as_dict(self) -> dict:
        return {"compiles": self.compiles, "buckets": [list(b) for b in self.buckets],
                "eager_fallbacks": self.eager_fallbacks, "compile_seconds": round(self.compile_seconds, 3)}


def bucket_of(model_input: torch.Tensor, text: torch.Tensor, timestep: torch.Tensor, patch=(1, 2, 2)) -> Bucket:
    batch, _, frames, height, width = model_input.shape
    return (batch, frames // patch[0], height // patch[1], width // patch[2], text.shape[1],
            "frame" if timestep.ndim == 2 else "sample")


def _has_unmerged_lora(model: torch.nn.Module) -> bool:
    return any(hasattr(m, "lora_A") and len(getattr(m, "lora_A", {})) for m in model.modules())


class CompiledRegions:
    """The compiled blocks of one expert and the bookkeeping around them."""

    def __init__(self, model: torch.nn.Module, *, backend: str = "inductor", shapes: str = "static",
                 max_buckets: int = 12, cuda_graphs: bool = False):
        if shapes not in COMPILE_SHAPES:
            raise ValueError(f"compile_shapes: {shapes!r}; allowed: {', '.join(COMPILE_SHAPES)}")
        if max_buckets < 1:
            raise ValueError(f"max_shape_buckets: must be >= 1, got {max_buckets}")
        if _has_unmerged_lora(model):
            raise ValueError("compile: the expert has an unmerged LoRA adapter (weights.lora.merge: false); "
                             "merge it at load or set runtime.compile: off")
        self.model = model
        self.stats = CompileStats()
        self.max_buckets = max_buckets
        self.shapes = shapes
        self._lock = threading.Lock()
        config_patches = {"triton.cudagraphs": True} if cuda_graphs else {}
        # Let dynamo keep one cache entry per bucket; our own budget decides what compiles.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, max_buckets + 1)
        torch._dynamo.config.accumulated_recompile_limit = max(
            torch._dynamo.config.accumulated_recompile_limit, 4 * (max_buckets + 1))
        compile_backend = self._counting(backend, config_patches)
        for block in model.blocks:
            block.compile(backend=compile_backend, dynamic=shapes == "dynamic", fullgraph=True)

    def _counting(self, backend: str, config_patches: dict):
        def compile_graph(gm, example_inputs):
            start = time.perf_counter()
            try:
                if backend == "inductor":
                    from torch._inductor.compile_fx import compile_fx

                    compiled = compile_fx(gm, example_inputs, config_patches=config_patches)
                else:
                    compiled = torch._dynamo.lookup_backend(backend)(gm, example_inputs)
            finally:
                self.stats.compile_seconds += time.perf_counter() - start
            with self._lock:  # counted on success: dynamo may restart an analysis and call us again
                self.stats.compiles += 1
            return compiled

        return compile_graph

    @contextlib.contextmanager
    def running(self, bucket: Bucket):
        """Run the forward inside: compiled if the bucket is (or can become) compiled, else eager."""
        with self._lock:
            known = bucket in self.stats.buckets
            if not known and len(self.stats.buckets) < self.max_buckets:
                self.stats.buckets.append(bucket)
                known = True
            if not known:
                self.stats.eager_fallbacks += 1
        if known:
            yield True
        else:
            with torch.compiler.set_stance("force_eager"):
                yield False

    def remove(self) -> None:
        """Back to eager blocks (the compiled code is dropped)."""
        for block in self.model.blocks:
            block._compiled_call_impl = None


def compile_expert(expert, *, backend: str = "inductor", shapes: str = "static", max_buckets: int = 12,
                   cuda_graphs: bool = False) -> CompiledRegions:
    """Compile an M2VExpert's blocks in place; the expert then routes forwards through the buckets."""
    if getattr(expert, "regions", None) is not None:
        return expert.regions
    expert.regions = CompiledRegions(expert.model, backend=backend, shapes=shapes, max_buckets=max_buckets,
                                     cuda_graphs=cuda_graphs)
    return expert.regions
