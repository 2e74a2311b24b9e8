"""Export of one expert to ONNX, checked against PyTorch, and an optional TensorRT engine build.

The exported graph is the Wan forward for one shape bucket (batch, latent frames incl. memory,
latent height/width, text length) with the rotary tables as *inputs* (`rope_cos`, `rope_sin`,
[tokens, head_dim]): one file serves any memory time positions of its bucket, because positions
only enter the model through those tables. Attention goes through kernels.attention (backend
`math` at export, which lowers to plain ONNX MatMul/Softmax that every runtime runs).

`check_onnx` runs the file with onnxruntime on the CPU and compares it with the PyTorch forward on
fresh random inputs (tolerance by dtype). TensorRT cannot be installed in every workplace: the
engine build (`build_tensorrt_engine`) is detected at run time (`tensorrt_unavailable_reason`) and
refuses with that reason when `import tensorrt` fails. On a machine with TensorRT:

    python -m storyfarm.m2v.accel.export --preset tiny --out expert.onnx --trt expert.plan
"""

from __future__ import annotations

import argparse
import importlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from storyfarm.kernels import attention
from storyfarm.kernels.rope import grid_cos_sin
from storyfarm.m2v.model.frame_timesteps import wan_forward
from storyfarm.m2v.model.rope import memory_time_positions

INPUT_NAMES = ("hidden_states", "timestep", "encoder_hidden_states", "rope_cos", "rope_sin")
TOLERANCE = {torch.float32: (2e-4, 1e-3), torch.bfloat16: (5e-2, 5e-2), torch.float16: (1e-2, 1e-2)}


class _ExportedExpert(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, hidden_states, timestep, encoder_hidden_states, rope_cos, rope_sin):
        rotary = (rope_cos[None, :, None, :], rope_sin[None, :, None, :])
        return wan_forward(self.model, hidden_states, timestep, encoder_hidden_states, rotary_emb=rotary)


@dataclass(frozen=True)
class ExportShape:
    batch: int
    memory: int
    frames: int  # video latent frames
    height: int  # latent grid (before patching)
    width: int
    text_len: int


def example_inputs(model, shape: ExportShape, generator: torch.Generator | None = None, dtype=None):
    """Random inputs for `shape`, with StoryMem's rotary tables for its memory count."""
    dtype = dtype or model.patch_embedding.weight.dtype
    device = model.patch_embedding.weight.device
    g = generator or torch.Generator("cpu").manual_seed(0)
    cfg = model.config
    total = shape.memory + shape.frames
    hidden = torch.randn(shape.batch, cfg.in_channels, total, shape.height, shape.width, generator=g)
    timestep = torch.rand(shape.batch, generator=g) * 1000
    text = torch.randn(shape.batch, shape.text_len, cfg.text_dim, generator=g)
    rope = model.rope
    positions = torch.tensor(memory_time_positions(shape.memory, shape.frames))
    cos, sin = grid_cos_sin(positions, shape.height // cfg.patch_size[1], shape.width // cfg.patch_size[2],
                            (rope.t_dim, rope.h_dim, rope.w_dim), getattr(rope, "theta", 10000.0))
    return (hidden.to(device, dtype), timestep.to(device), text.to(device, dtype), cos.to(device), sin.to(device))


def export_onnx(model, path: str | Path, shape: ExportShape, opset: int = 18) -> Path:
    """Write `model` (a WanTransformer3DModel prepared by M2VExpert) to `path` for one shape bucket."""
    path = Path(path)
    inputs = example_inputs(model, shape)
    previous = attention.describe()
    attention.configure("math", allow_approximate=previous["allow_approximate"])
    try:
        program = torch.onnx.export(_ExportedExpert(model).eval(), inputs, dynamo=True, opset_version=opset,
                                    input_names=list(INPUT_NAMES), output_names=["prediction"], external_data=False,
                                    verbose=False)
        program.save(str(path))
    finally:
        attention.configure(previous["requested"], allow_approximate=previous["allow_approximate"])
    return path


def check_onnx(model, path: str | Path, shape: ExportShape, seed: int = 1) -> dict:
    """Run the ONNX file with onnxruntime (CPU) and PyTorch on fresh inputs; raise if they differ."""
    import onnxruntime as ort

    inputs = example_inputs(model, shape, torch.Generator("cpu").manual_seed(seed))
    with torch.no_grad():
        want = _ExportedExpert(model).eval()(*inputs).float().cpu().numpy()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {name: t.float().cpu().numpy() if t.dtype == torch.bfloat16 else t.cpu().numpy()
            for name, t in zip(INPUT_NAMES, inputs)}
    got = session.run(None, feed)[0].astype(np.float32)
    atol, rtol = TOLERANCE[model.patch_embedding.weight.dtype]
    err = float(np.abs(got - want).max())
    if not np.allclose(got, want, atol=atol, rtol=rtol):
        raise AssertionError(f"ONNX {path}: max abs error {err:.3g} exceeds atol {atol}, rtol {rtol}")
    return {"max_abs_error": err, "atol": atol, "rtol": rtol, "shape": list(got.shape)}


def tensorrt_unavailable_reason() -> str | None:
    try:
        importlib.import_module("tensorrt")
    except Exception as exc:  # noqa: BLE001
        return f"TensorRT is not installed here (import tensorrt failed: {type(exc).__name__}: {exc})"
    if not torch.cuda.is_available():
        return "TensorRT needs a CUDA device"
    return None


def build_tensorrt_engine(onnx_path: str | Path, engine_path: str | Path, *, bf16: bool = True,
                          workspace_gb: int = 8) -> Path:
    """Build a serialized TensorRT engine from an exported ONNX file (static shapes: its bucket)."""
    reason = tensorrt_unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"build_tensorrt_engine: {reason}")
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_gb << 30)
    if bf16:
        config.set_flag(trt.BuilderFlag.BF16)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path}")
    Path(engine_path).write_bytes(bytes(serialized))
    return Path(engine_path)


def main(argv=None) -> int:
    from storyfarm.m2v.model.components import load_components
    from storyfarm.story.presets import load_preset

    ap = argparse.ArgumentParser(description="Export the high-noise M2V expert of a preset to ONNX (and TensorRT).")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--out", required=True, help="ONNX file to write")
    ap.add_argument("--memory", type=int, default=0, help="memory latent frames of the exported bucket")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--trt", help="also build a TensorRT engine here (needs tensorrt and CUDA)")
    args = ap.parse_args(argv)
    preset = load_preset(args.preset)
    expert = load_components(preset).m2v_experts[0]
    width, height = preset.render.resolution
    shape = ExportShape(args.batch, args.memory, (preset.render.frames - 1) // 4 + 1, height // 8, width // 8,
                        preset.architecture.text_len if preset.architecture else 512)
    export_onnx(expert.model, args.out, shape)
    print(check_onnx(expert.model, args.out, shape))
    if args.trt:
        print(build_tensorrt_engine(args.out, args.trt))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
