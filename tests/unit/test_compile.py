"""Regional compilation, shape buckets, warm-up and the preset's runtime section.

Compiled paths use torch.compile's `aot_eager` backend here: it runs dynamo's full tracing (graph
capture with fullgraph=True, guards, recompiles, the attention choice made at trace time) but skips
inductor's C++ code generation, which takes 30-60 s per graph on this CI's two shared cores. The
inductor path is compared with eager in bench/cpu_kernels.py and on the GPU in tests/gpu.
"""

import copy

import numpy as np
import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model

from storyfarm.kernels import attention
from storyfarm.m2v.accel.compile import CompiledRegions, compile_expert
from storyfarm.m2v.render.engine import Engine, ShotPlan
from storyfarm.m2v.accel.fp8 import fp8_layer_filter, fp8_unavailable_reason
from storyfarm.story.presets import PresetError, load_preset
from storyfarm.m2v.model.rope import memory_time_positions
from storyfarm.m2v.render.sampler import SamplerSettings
from storyfarm.m2v.model.transformer import M2VExpert
from helpers.models import tiny_wan


pytestmark = pytest.mark.usefixtures("default_attention")


def inputs(memory, frames=4, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 16, memory + frames, 4, 8, generator=g), torch.full((batch,), 700.0),
            torch.randn(batch, 512, 32, generator=g), memory_time_positions(memory, frames),
            torch.randn(1, 20, memory + frames, 4, 8, generator=g))


def test_compiled_blocks_match_eager_and_recompiles_are_bounded_and_counted():
    model = tiny_wan()
    eager = M2VExpert(copy.deepcopy(model), "eager")
    compiled = M2VExpert(model, "compiled")
    regions = compile_expert(compiled, backend="aot_eager", max_buckets=2)
    assert compile_expert(compiled) is regions  # idempotent
    for memory in (0, 3, 0, 3):  # two buckets, each compiled once, then reused
        args = inputs(memory, seed=memory)
        torch.testing.assert_close(compiled(*args), eager(*args), atol=1e-5, rtol=1e-5)
    assert regions.stats.compiles == 2 and regions.stats.eager_fallbacks == 0
    assert [b[1] for b in regions.stats.buckets] == [4, 7]  # latent frames incl. memory
    args = inputs(5)  # a third bucket over the budget of 2: runs eager, no recompile
    torch.testing.assert_close(compiled(*args), eager(*args), atol=1e-5, rtol=1e-5)
    assert regions.stats.compiles == 2 and regions.stats.eager_fallbacks == 1
    per_frame = torch.linspace(100, 900, 2 * 7).view(2, 7)
    args = inputs(3)
    torch.testing.assert_close(compiled(args[0], per_frame, *args[2:]), eager(args[0], per_frame, *args[2:]), atol=1e-5, rtol=1e-5)
    assert regions.stats.as_dict()["eager_fallbacks"] == 2  # per-frame timesteps are their own bucket


def test_dynamic_shapes_serve_every_memory_count_with_one_graph():
    compiled = M2VExpert(tiny_wan(1), "compiled")
    eager = M2VExpert(tiny_wan(1), "eager")
    regions = compile_expert(compiled, backend="aot_eager", shapes="dynamic", max_buckets=8)
    for memory in (0, 2, 5):
        args = inputs(memory, seed=memory)
        torch.testing.assert_close(compiled(*args), eager(*args), atol=1e-5, rtol=1e-5)
    assert regions.stats.compiles == 1 and len(regions.stats.buckets) == 3


def test_compile_refuses_an_unmerged_lora_and_bad_settings():
    model = tiny_wan()
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q"]), model, adapter_name="storymem")
    with pytest.raises(ValueError, match="unmerged LoRA adapter .*merge: false"):
        CompiledRegions(model, backend="aot_eager")
    with pytest.raises(ValueError, match="compile_shapes: 'wobbly'; allowed: static, dynamic"):
        CompiledRegions(tiny_wan(), shapes="wobbly")
    with pytest.raises(ValueError, match="max_shape_buckets: must be >= 1"):
        CompiledRegions(tiny_wan(), max_buckets=0)


def test_engine_warm_up_compiles_the_buckets_a_shot_then_uses():
    preset = load_preset("tiny", {"runtime": {"compile": "regional", "compile_backend": "aot_eager", "warmup_memory": [0, 2]}})
    engine = Engine(preset)
    assert engine.runtime.compile == "regional/aot_eager/static" and engine.runtime.attention_backend == "sdpa_flash"
    attention.reset_record()
    report = engine.warm_up()
    high = report["compile"]["high_noise"]
    assert report["forwards"] == 2 * 2 + 2  # M2V experts x memory counts (0, 2) + T2V experts at M=0
    assert high["compiles"] == 2 and [b[1] for b in high["buckets"]] == [5, 7]
    assert report["attention"]["ran"] == ["sdpa_flash"] and engine.attention_backend == "sdpa_flash"
    assert engine.recompiles() == 2 + 2 + 1 + 1  # what a worker reports in its metrics
    width, height = preset.render.resolution
    rng = np.random.default_rng(0)
    memory = [(f"k{i}", rng.integers(0, 256, (height, width, 3), dtype=np.uint8)) for i in range(2)]
    plan = ShotPlan(story_key="s", prompt="a harbour at dawn", negative_prompt=preset.render.negative_prompt, seed=1,
                    width=width, height=height, frames=preset.render.frames, sampler=SamplerSettings(steps=2), memory=memory)
    engine.render_shot(plan)
    after = {e.name: e.regions.stats.as_dict() for e in engine.m2v_experts}
    assert all(s["compiles"] == 2 and s["eager_fallbacks"] == 0 for s in after.values())  # no compile mid-shot
    assert engine.recompiles() == 6


@pytest.mark.parametrize(
    "runtime, message",
    [
        ({"fp8": True}, r"runtime.fp8: .*(torchao is not importable|need a CUDA device)"),
        ({"rope": "triton"}, r"runtime.rope: 'triton' needs a CUDA device"),
        ({"attention": "flash_attn2"}, r"runtime.attention: attention backend 'flash_attn2' cannot run"),
    ],
)
def test_runtime_choices_that_cannot_run_here_fail_the_load(runtime, message):
    with pytest.raises(ValueError, match=message):
        Engine(load_preset("tiny", {"runtime": runtime}))


def test_runtime_section_validation_names_field_and_allowed_values():
    with pytest.raises(PresetError, match=r"runtime.attention: 'fastest' is not an attention backend; allowed: auto"):
        load_preset("tiny", {"runtime": {"attention": "fastest"}})
    with pytest.raises(PresetError, match=r"runtime.attention: 'sage' is an approximate kernel"):
        load_preset("tiny", {"runtime": {"attention": "sage"}})
    assert load_preset("tiny", {"runtime": {"attention": "sage", "allow_approximate": True}}).runtime.attention == "sage"
    with pytest.raises(PresetError, match=r"runtime.compile: Input should be 'off' or 'regional'"):
        load_preset("tiny", {"runtime": {"compile": "everything"}})
    with pytest.raises(PresetError, match=r"runtime.warmup_memory.1: Input should be greater than or equal to 0"):
        load_preset("tiny", {"runtime": {"warmup_memory": [0, -2]}})
    with pytest.raises(PresetError, match=r"runtime.turbo: Extra inputs are not permitted"):
        load_preset("tiny", {"runtime": {"turbo": True}})


def test_fp8_targets_only_block_linears_and_explains_why_not_here():
    model = tiny_wan()
    chosen = [name for name, m in model.named_modules() if fp8_layer_filter(m, name)]
    assert chosen and all(name.startswith("blocks.") for name in chosen)
    assert "blocks.0.attn1.to_q" in chosen and "blocks.1.ffn.net.2" in chosen
    assert not any(n.startswith(("proj_out", "condition_embedder", "patch_embedding")) for n in chosen)
    assert fp8_unavailable_reason("cpu") is not None
