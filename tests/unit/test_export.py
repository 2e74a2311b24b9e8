"""ONNX export of a tiny expert checked with onnxruntime; TensorRT detected at run time."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from storyfarm.kernels import attention
from storyfarm.kernels.rope import grid_cos_sin
from storyfarm.m2v.accel.export import (INPUT_NAMES, ExportShape, build_tensorrt_engine, check_onnx, example_inputs,
                                  export_onnx, tensorrt_unavailable_reason)
from storyfarm.m2v.model.rope import memory_time_positions
from storyfarm.m2v.model.transformer import M2VExpert
from helpers.models import tiny_wan

SHAPE = ExportShape(batch=2, memory=2, frames=3, height=4, width=8, text_len=16)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    expert = M2VExpert(tiny_wan(0), "high_noise")
    path = export_onnx(expert.model, tmp_path_factory.mktemp("onnx") / "expert.onnx", SHAPE)
    return expert, path


def test_onnx_matches_pytorch_on_fresh_inputs(exported):
    expert, path = exported
    onnx.checker.check_model(str(path))
    assert [i.name for i in onnx.load(str(path)).graph.input] == list(INPUT_NAMES)
    for seed in (1, 2):
        report = check_onnx(expert.model, path, SHAPE, seed=seed)
        assert report["shape"] == [2, 16, 5, 4, 8] and report["max_abs_error"] < report["atol"]
    assert attention.describe()["requested"] == "auto"  # export's math backend was restored


def test_memory_positions_are_inputs_of_the_exported_graph(exported):
    """One file serves any time positions of its bucket: feed contiguous positions instead of
    StoryMem's, and ONNX still agrees with PyTorch run at those positions."""
    expert, path = exported
    hidden, timestep, text, _, _ = example_inputs(expert.model, SHAPE, torch.Generator().manual_seed(3))
    rope = expert.model.rope
    cos, sin = grid_cos_sin(torch.arange(5), 2, 4, (rope.t_dim, rope.h_dim, rope.w_dim))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, dict(zip(INPUT_NAMES, (t.numpy() for t in (hidden, timestep, text, cos, sin)))))[0]
    with torch.no_grad(), rope.time_positions(range(5)):
        want = expert.model(hidden, timestep, text, return_dict=False)[0].numpy()
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=1e-3)
    with torch.no_grad(), rope.time_positions(memory_time_positions(2, 3)):
        storymem = expert.model(hidden, timestep, text, return_dict=False)[0].numpy()
    assert not np.allclose(got, storymem, atol=1e-3)  # the positions really changed the answer


def test_a_wrong_onnx_file_fails_the_check(exported, tmp_path):
    expert, path = exported
    other = M2VExpert(tiny_wan(1), "other")
    with pytest.raises(AssertionError, match="max abs error .* exceeds atol"):
        check_onnx(other.model, path, SHAPE)


def test_tensorrt_is_optional_and_says_why_it_is_missing(tmp_path):
    reason = tensorrt_unavailable_reason()
    if reason is None:
        pytest.skip("tensorrt and CUDA are present: the build path is exercised by tests/gpu")
    assert "TensorRT" in reason
    with pytest.raises(RuntimeError, match=r"build_tensorrt_engine: TensorRT"):
        build_tensorrt_engine(tmp_path / "x.onnx", tmp_path / "x.plan")
