"""A `source: local` preset end to end: checkpoints written here in the real folder layouts.

The tiny models are saved the way the real Wan2.2 / StoryMem releases are laid out on disk
(diffusers layout, and Wan's original layout with its own key names; StoryMem LoRA files keyed by
Wan module names), a preset YAML points at them, and a short story renders through the CLI.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from storyfarm.story.presets import load_preset
from storyfarm.m2v.model.tiny import build_tiny_components
from storyfarm.m2v.model.wan_layouts import to_wan_original_state_dict, to_wan_original_vae_state_dict

CLI = str(Path(sys.executable).with_name("storyfarm"))
LORA_TARGETS = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.k",
                "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2")


def wan_config(cfg: dict) -> dict:
    """Wan's own config.json for an expert with the tiny architecture."""
    heads, head_dim = cfg["num_attention_heads"], cfg["attention_head_dim"]
    return {"_class_name": "WanModel", "dim": heads * head_dim, "eps": 1e-6, "ffn_dim": cfg["ffn_dim"],
            "freq_dim": cfg["freq_dim"], "in_dim": cfg["in_channels"], "model_type": "i2v", "num_heads": heads,
            "num_layers": cfg["num_layers"], "out_dim": cfg["out_channels"], "text_len": 512, "text_dim": cfg["text_dim"]}


def write_lora(path: Path, expert, rank: int, seed: int) -> None:
    """StoryMem's released layout: base_model.model.blocks.N.<wan module>.lora_A/B.weight."""
    g = torch.Generator().manual_seed(seed)
    original = to_wan_original_state_dict(expert.state_dict())
    tensors = {}
    for i in range(expert.config.num_layers):
        for target in LORA_TARGETS:
            out_f, in_f = original[f"blocks.{i}.{target}.weight"].shape
            tensors[f"base_model.model.blocks.{i}.{target}.lora_A.weight"] = torch.randn(rank, in_f, generator=g) * 0.05
            tensors[f"base_model.model.blocks.{i}.{target}.lora_B.weight"] = torch.randn(out_f, rank, generator=g) * 0.05
    save_file(tensors, str(path))


@pytest.fixture(scope="module")
def model_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    tiny = load_preset("tiny")
    comps = build_tiny_components(tiny.architecture, seed=42)
    arch = tiny.architecture
    # diffusers layout
    diff = root / "Wan2.2-I2V-A14B-Diffusers"
    comps["high_noise"].save_pretrained(diff / "transformer")
    comps["low_noise"].save_pretrained(diff / "transformer_2")
    comps["vae"].save_pretrained(diff / "vae")
    tokenizer, text = comps["text"]
    text.save_pretrained(diff / "text_encoder")
    tokenizer.save_pretrained(diff / "tokenizer")
    (diff / "model_index.json").write_text(json.dumps({"_class_name": "WanImageToVideoPipeline", "boundary_ratio": 0.9}))
    # Wan's original layout: own key names (with the checkpoint prefix), VAE converted to safetensors
    orig = root / "Wan2.2-I2V-A14B"
    for folder, expert in (("high_noise_model", comps["high_noise"]), ("low_noise_model", comps["low_noise"])):
        (orig / folder).mkdir(parents=True)
        (orig / folder / "config.json").write_text(json.dumps(wan_config(arch.transformer)))
        sd = {f"model.diffusion_model.{k}": v.contiguous() for k, v in to_wan_original_state_dict(expert.state_dict()).items()}
        save_file(sd, str(orig / folder / "diffusion_pytorch_model.safetensors"))
    save_file({k: v.contiguous() for k, v in to_wan_original_vae_state_dict(comps["vae"].state_dict()).items()},
              str(orig / "Wan2.1_VAE.safetensors"))
    # T2V pair (diffusers layout)
    t2v = root / "Wan2.2-T2V-A14B-Diffusers"
    comps["t2v_high_noise"].save_pretrained(t2v / "transformer")
    comps["t2v_low_noise"].save_pretrained(t2v / "transformer_2")
    # StoryMem LoRA, rank 4, one file per expert
    lora = root / "StoryMem"
    lora.mkdir()
    write_lora(lora / "backbone_high_noise.safetensors", comps["high_noise"], 4, 1)
    write_lora(lora / "backbone_low_noise.safetensors", comps["low_noise"], 4, 2)
    # a local CLIP vision tower with projection (transformers layout)
    torch.manual_seed(0)
    clip = CLIPVisionModelWithProjection(CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                                                          num_hidden_layers=2, num_attention_heads=2, projection_dim=32))
    clip.save_pretrained(root / "clip-vit-base-patch32")
    return root


def write_preset(path: Path, base: str, extra_weights: str = "") -> Path:
    path.write_text(f"""
name: local-test
source: local
dtype: float32
weights:
  base: {base}
  text_encoder: Wan2.2-I2V-A14B-Diffusers
  t2v: Wan2.2-T2V-A14B-Diffusers
  clip: clip-vit-base-patch32
  lora:
    high_noise: StoryMem/backbone_high_noise.safetensors
    low_noise: StoryMem/backbone_low_noise.safetensors
    variant: mi2v
    strength: 1.0
{extra_weights}
render:
  resolution: [64, 32]
  frames: 9
  steps: 3
""")
    return path


@pytest.mark.parametrize("layout", ["Wan2.2-I2V-A14B-Diffusers", "Wan2.2-I2V-A14B"])
def test_local_preset_renders_a_story(model_root, tmp_path, repo, layout):
    preset = write_preset(model_root / f"preset-{layout}.yaml", layout)
    out = tmp_path / "out"
    res = subprocess.run([CLI, "render", str(repo / "configs/stories/minimal.yaml"), "--preset", str(preset), "--out", str(out), "--quiet"],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["model"] for s in manifest["shots"]] == ["t2v", "m2v", "m2v"]
    assert manifest["preset"] == "local-test"


def test_both_layouts_and_the_lora_scale_reach_the_engine(model_root):
    from storyfarm.m2v.model.components import load_components

    a = load_components(load_preset(str(write_preset(model_root / "p-diff.yaml", "Wan2.2-I2V-A14B-Diffusers"))))
    b = load_components(load_preset(str(write_preset(model_root / "p-orig.yaml", "Wan2.2-I2V-A14B"))))
    for ea, eb in zip(a.m2v_experts, b.m2v_experts):
        sa, sb = ea.model.state_dict(), eb.model.state_dict()
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    info = a.lora["high_noise"]
    assert info.rank == 4 and math.isclose(info.scale, 4 / math.sqrt(4)) and info.merged
    # merged LoRA changed the base weights by scale * B @ A
    base = build_tiny_components(load_preset("tiny").architecture, seed=42)["high_noise"]
    from safetensors.torch import load_file

    lora = load_file(str(model_root / "StoryMem/backbone_high_noise.safetensors"))
    delta = lora["base_model.model.blocks.0.self_attn.q.lora_B.weight"] @ lora["base_model.model.blocks.0.self_attn.q.lora_A.weight"]
    got = a.m2v_experts[0].model.blocks[0].attn1.to_q.weight - base.blocks[0].attn1.to_q.weight
    torch.testing.assert_close(got, info.scale * delta, atol=1e-6, rtol=1e-5)


def test_pickled_weights_are_refused(model_root, tmp_path):
    from storyfarm.m2v.model.components import load_components

    evil = tmp_path / "evil"
    (evil / "high_noise_model").mkdir(parents=True)
    (evil / "low_noise_model").mkdir()
    torch.save({"x": torch.zeros(1)}, evil / "high_noise_model" / "model.pth")
    torch.save({"x": torch.zeros(1)}, evil / "low_noise_model" / "model.pth")
    (evil / "high_noise_model" / "config.json").write_text("{}")
    (evil / "low_noise_model" / "config.json").write_text("{}")
    preset = load_preset(str(write_preset(model_root / "p-evil.yaml", str(evil))))
    with pytest.raises(ValueError, match=r"\.pth"):
        load_components(preset)


@pytest.mark.parametrize("layout", ["Wan2.2-I2V-A14B-Diffusers", "Wan2.2-I2V-A14B"])
def test_expert_bytes_come_from_the_headers_alone(model_root, layout):
    from storyfarm.m2v.model.wan_loaders import load_wan_pair, wan_pair_bytes

    high, low, _ = load_wan_pair(model_root / layout, dtype=torch.bfloat16)
    loaded = sum(p.numel() * 2 for model in (high, low) for p in model.parameters())
    assert wan_pair_bytes(model_root / layout, torch.bfloat16) == loaded
    assert wan_pair_bytes(model_root / layout, torch.float32) == 2 * loaded


def test_both_placement_is_refused_before_loading_when_the_experts_cannot_fit(model_root, monkeypatch):
    """On a GPU whose free memory cannot hold every expert (four with a T2V pair) plus the
    headroom, `both` fails with the field named, before any weight is read."""
    from storyfarm.m2v.model import components
    from storyfarm.m2v.accel.placement import RESIDENT_HEADROOM_BYTES

    preset = load_preset(str(write_preset(model_root / "p-fit.yaml", "Wan2.2-I2V-A14B-Diffusers")))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (RESIDENT_HEADROOM_BYTES + 1000, 80 << 30))
    monkeypatch.setattr(components, "_local_components", lambda *a: pytest.fail("weights were loaded"))
    with pytest.raises(ValueError, match=r"scheduler.expert_placement: 'both' keeps all 4 experts resident .* "
                                         r"use 'swap'"):
        components.load_components(preset, "cuda:0", "both")
    roomy = RESIDENT_HEADROOM_BYTES + (1 << 30)  # the tiny experts are a few MB
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (roomy, 80 << 30))
    monkeypatch.setattr(components, "_local_components", lambda preset, device, dtype, expert_device: expert_device)
    assert components.load_components(preset, "cuda:0", "both") == "cuda:0"
    assert components.load_components(preset, "cuda:0", "swap") == "cpu"  # swap: experts load into CPU memory


def test_a_shot_rerender_refuses_a_folder_without_a_render_before_reading_weights(tmp_path, repo):
    """`render --shot` checks --out (an earlier render's manifest) before the preset's weights load:
    with real weights that is minutes; here the weights do not even exist."""
    preset = write_preset(tmp_path / "missing.yaml", str(tmp_path / "no-such-weights"))
    out = tmp_path / "out"
    out.mkdir()
    res = subprocess.run([CLI, "render", str(repo / "configs/stories/minimal.yaml"), "--preset", str(preset),
                          "--out", str(out), "--shot", "1", "--quiet"], capture_output=True, text=True, timeout=600)
    assert res.returncode == 2, res.stdout + res.stderr
    said = " ".join(res.stdout.split())
    assert "no manifest" in said and "loading preset" not in said, said
