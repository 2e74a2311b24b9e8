"""m2v.lora: StoryMem's rsLoRA files (original Wan module names) on a tiny expert, checked by hand."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from diffusers import WanTransformer3DModel
from peft.tuners.lora import LoraLayer
from safetensors.torch import save_file

from storyfarm.m2v.model.lora import load_storymem_lora, set_strength
from storyfarm.m2v.model.checkpoint_files import CheckpointError

TINY = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=36,
            out_channels=16, text_dim=32, freq_dim=32, ffn_dim=48, num_layers=2,
            cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=64)
# StoryMem's target_modules, and the diffusers module each one is, written out independently.
TARGETS = {"self_attn.q": "attn1.to_q", "self_attn.k": "attn1.to_k", "self_attn.v": "attn1.to_v",
           "self_attn.o": "attn1.to_out.0", "cross_attn.q": "attn2.to_q",
           "cross_attn.k": "attn2.to_k", "cross_attn.v": "attn2.to_v",
           "cross_attn.o": "attn2.to_out.0", "ffn.0": "ffn.net.0.proj", "ffn.2": "ffn.net.2"}
R = 8


@pytest.fixture(scope="module")
def base() -> WanTransformer3DModel:
    torch.manual_seed(0)
    return WanTransformer3DModel(**TINY).eval()


@pytest.fixture(scope="module")
def lora(base):
    """{(block, original module name): (A, B)} with random A and B (B is zero at init in training)."""
    g = torch.Generator().manual_seed(5)
    out = {}
    for i in range(TINY["num_layers"]):
        for name, module in TARGETS.items():
            lin = base.get_submodule(f"blocks.{i}.{module}")
            out[i, name] = (torch.randn(R, lin.in_features, generator=g) * 0.1,
                            torch.randn(lin.out_features, R, generator=g) * 0.1)
    return out


def write_lora(path, lora, prefix="base_model.model.", adapter="", metadata=None, extra=None):
    tensors = {}
    for (i, name), (a, b) in lora.items():
        tensors[f"{prefix}blocks.{i}.{name}.lora_A{adapter}.weight"] = a
        tensors[f"{prefix}blocks.{i}.{name}.lora_B{adapter}.weight"] = b
    tensors.update(extra or {})
    save_file(tensors, str(path), metadata=metadata)
    return path


def run(model) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    x, text = torch.randn(1, 36, 2, 4, 4, generator=g), torch.randn(1, 5, 32, generator=g)
    with torch.no_grad():
        return model(x, torch.tensor([500.0]), text, return_dict=False)[0]


def test_merge_is_rslora_delta_by_hand(tmp_path, base, lora):
    expert = copy.deepcopy(base)
    info = load_storymem_lora(expert, write_lora(tmp_path / "backbone_high_noise.safetensors", lora),
                              strength=0.7)
    rs_scale, plain_scale = 8 / math.sqrt(8), 8 / 8
    assert (info.rank, info.alpha, info.merged) == (R, 8.0, True)
    assert info.scale == pytest.approx(rs_scale) and info.effective_scale == pytest.approx(0.7 * rs_scale)
    assert len(info.modules) == 2 * len(TARGETS)
    for (i, name), (a, b) in lora.items():
        module = f"blocks.{i}.{TARGETS[name]}"
        delta = expert.get_submodule(module).weight - base.get_submodule(module).weight
        torch.testing.assert_close(delta, 0.7 * rs_scale * (b @ a), atol=1e-6, rtol=0, msg=module)
        assert not torch.allclose(delta, 0.7 * plain_scale * (b @ a), atol=1e-3)
    # merged means gone: the same class, plain Linear layers, no peft state left behind
    assert type(expert) is WanTransformer3DModel and not hasattr(expert, "peft_config")
    assert not any(isinstance(m, LoraLayer) for m in expert.modules())
    assert all(type(expert.get_submodule(f"blocks.0.{m}")) is torch.nn.Linear for m in TARGETS.values())
    untouched = {k for k in base.state_dict() if not any(f".{m}." in k for m in TARGETS.values())}
    assert all(torch.equal(expert.state_dict()[k], base.state_dict()[k]) for k in untouched)


def test_alpha_from_argument_and_metadata(tmp_path, base, lora):
    # r = 8 with alpha 16: rsLoRA 16/sqrt(8) = 5.66, plain LoRA would be 2.
    path = write_lora(tmp_path / "a.safetensors", lora, metadata={"lora_alpha": "16"})
    from_meta = load_storymem_lora(copy.deepcopy(base), path)
    from_arg = load_storymem_lora(copy.deepcopy(base), write_lora(tmp_path / "b.safetensors", lora),
                                  alpha=16)
    for info in (from_meta, from_arg):
        assert info.alpha == 16 and info.scale == pytest.approx(16 / math.sqrt(8))


@pytest.mark.parametrize("prefix, adapter", [("", ""), ("diffusion_model.", ""),
                                             ("model.diffusion_model.", ".default"),
                                             ("base_model.model.", ".default")])
def test_key_spellings_merge_the_same(tmp_path, base, lora, prefix, adapter):
    reference = copy.deepcopy(base)
    load_storymem_lora(reference, write_lora(tmp_path / "ref.safetensors", lora))
    expert = copy.deepcopy(base)
    load_storymem_lora(expert, write_lora(tmp_path / "x.safetensors", lora, prefix, adapter))
    assert all(torch.equal(v, reference.state_dict()[k]) for k, v in expert.state_dict().items())


def test_unmerged_matches_merged_and_strength_changes(tmp_path, base, lora):
    path = write_lora(tmp_path / "l.safetensors", lora)
    merged = copy.deepcopy(base)
    load_storymem_lora(merged, path, strength=0.5)
    unmerged = copy.deepcopy(base)
    info = load_storymem_lora(unmerged, path, strength=0.5, merge=False)
    assert not info.merged and sum(isinstance(m, LoraLayer) for m in unmerged.modules()) == 20
    base_out, merged_out = run(base), run(merged)
    assert not torch.allclose(merged_out, base_out, atol=1e-3)
    torch.testing.assert_close(run(unmerged), merged_out, atol=1e-5, rtol=1e-5)
    set_strength(unmerged, 0.0)
    assert torch.equal(run(unmerged), base_out)
    set_strength(unmerged, 0.5)
    torch.testing.assert_close(run(unmerged), merged_out, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="no unmerged LoRA adapter"):
        set_strength(merged, 1.0)


def test_strength_zero_merged_is_the_base_model(tmp_path, base, lora):
    expert = copy.deepcopy(base)
    load_storymem_lora(expert, write_lora(tmp_path / "l.safetensors", lora), strength=0.0)
    assert torch.equal(run(expert), run(base))


@pytest.mark.parametrize("bad, message", [
    ({"base_model.model.blocks.5.self_attn.q.lora_A.weight": torch.zeros(R, 24),
      "base_model.model.blocks.5.self_attn.q.lora_B.weight": torch.zeros(24, R)},
     r"blocks\.5\.self_attn\.q\.lora_A\.weight.*targets 'blocks\.5\.attn1\.to_q'"),
    ({"base_model.model.blocks.0.norm3.lora_A.weight": torch.zeros(R, 24),
      "base_model.model.blocks.0.norm3.lora_B.weight": torch.zeros(24, R)},
     r"blocks\.0\.norm3\.lora_A\.weight.*not a linear"),
    ({"base_model.model.blocks.0.self_attn.k.lora_A.weight": torch.zeros(R, 24),
      "base_model.model.blocks.0.self_attn.k.lora_B.weight": torch.zeros(24, 4)},
     r"rank mismatch.*blocks\.0\.self_attn\.k\.lora_A\.weight"),
    ({"base_model.model.blocks.0.ffn.2.lora_A.weight": torch.zeros(R, 48)},
     r"blocks\.0\.ffn\.2\.lora_A\.weight.*no lora_B"),
    ({"base_model.model.blocks.0.self_attn.q.lora_A.weight": torch.zeros(R, 24),
      "base_model.model.blocks.0.self_attn.q.lora_B.weight": torch.zeros(24, R),
      "base_model.model.blocks.0.self_attn.q.lora_magnitude_vector": torch.zeros(24)},
     r"lora_magnitude_vector.*not a LoRA"),
])
def test_bad_files_name_the_key(tmp_path, base, bad, message):
    path = tmp_path / "bad.safetensors"
    save_file(bad, str(path))
    expert = copy.deepcopy(base)
    with pytest.raises(CheckpointError, match=rf"bad\.safetensors.*{message}"):
        load_storymem_lora(expert, path)
    assert not any(isinstance(m, LoraLayer) for m in expert.modules())  # refused before injecting


def test_files_without_lora_keys_and_pickles_are_refused(tmp_path, base):
    save_file({"blocks.0.self_attn.q.weight": torch.zeros(24, 24)}, str(tmp_path / "w.safetensors"))
    with pytest.raises(CheckpointError, match=r"w\.safetensors: no LoRA keys"):
        load_storymem_lora(copy.deepcopy(base), tmp_path / "w.safetensors")
    (tmp_path / "backbone_high_noise.pth").write_bytes(b"\x80\x04")
    with pytest.raises(CheckpointError, match=r"backbone_high_noise\.pth.*pickle"):
        load_storymem_lora(copy.deepcopy(base), tmp_path / "backbone_high_noise.pth")
