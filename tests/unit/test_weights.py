"""m2v.model's checkpoint loading (checkpoint_files, wan_layouts, wan_loaders) on tiny checkpoints
written here, in diffusers' and in Wan's original key layouts."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKLWan, WanTransformer3DModel
from diffusers.loaders.single_file_utils import (
    convert_wan_transformer_to_diffusers,
    convert_wan_vae_to_diffusers,
)
from safetensors.torch import save_file

from storyfarm.m2v.model.checkpoint_files import CheckpointError, read_safetensors
from storyfarm.m2v.model.wan_layouts import (
    detect_layout,
    to_wan_original_state_dict,
    to_wan_original_vae_state_dict,
)
from storyfarm.m2v.model.wan_loaders import load_text_encoder, load_wan_expert, load_wan_pair, load_wan_vae

TINY = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=36,
            out_channels=16, text_dim=32, freq_dim=32, ffn_dim=48, num_layers=2,
            cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=64)
# The same model in Wan's own config terms (text_dim is a WanModel argument too).
WAN_CONFIG = {"_class_name": "WanModel", "dim": 24, "eps": 1e-6, "ffn_dim": 48, "freq_dim": 32,
              "in_dim": 36, "model_type": "i2v", "num_heads": 2, "num_layers": 2, "out_dim": 16,
              "text_len": 512, "text_dim": 32}


def randomized(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter random, so a swapped or mis-mapped tensor cannot hide behind an init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()


def tiny_expert(seed: int = 0) -> WanTransformer3DModel:
    return randomized(WanTransformer3DModel(**TINY), seed)


def run(model: WanTransformer3DModel) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 36, 2, 4, 4, generator=g)
    text = torch.randn(1, 5, 32, generator=g)
    with torch.no_grad():
        return model(x, torch.tensor([500.0]), text, return_dict=False)[0]


def write_sharded(state: dict, folder: Path, shards: int = 3, prefix: str = "",
                  stem: str = "diffusion_pytorch_model") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    keys = sorted(state)
    weight_map = {}
    for i in range(shards):
        name = f"{stem}-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {prefix + k: state[k].contiguous() for k in keys[i::shards]}
        save_file(part, str(folder / name))
        weight_map.update(dict.fromkeys(part, name))
    (folder / f"{stem}.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}))


def write_original_expert(model, folder: Path, prefix: str = "") -> None:
    write_sharded(to_wan_original_state_dict(model.state_dict()), folder, prefix=prefix)
    (folder / "config.json").write_text(json.dumps(WAN_CONFIG))


@pytest.fixture(scope="module")
def expert():
    return tiny_expert()


def test_inverse_conversion_round_trips_key_names(expert):
    sd = expert.state_dict()
    original = to_wan_original_state_dict(sd)
    assert "blocks.0.norm3.weight" in original and "blocks.0.norm2.weight" not in original
    assert {"head.head.weight", "head.modulation", "blocks.1.modulation", "blocks.0.ffn.0.weight",
            "blocks.0.cross_attn.o.weight", "time_projection.1.bias"} <= set(original)
    back = convert_wan_transformer_to_diffusers(dict(original))
    assert set(back) == set(sd) and all(back[k] is sd[k] for k in sd)


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_original_layout_round_trip(tmp_path, expert, prefix):
    write_original_expert(expert, tmp_path / "high_noise_model", prefix)
    loaded = load_wan_expert(tmp_path / "high_noise_model")
    assert type(loaded) is WanTransformer3DModel
    assert loaded.config.num_attention_heads == 2 and loaded.config.attention_head_dim == 12
    assert loaded.config.image_dim is None and loaded.config.in_channels == 36
    assert torch.equal(run(loaded), run(expert))


def test_diffusers_layout_round_trip(tmp_path, expert):
    expert.save_pretrained(tmp_path / "transformer", max_shard_size="20KB")
    assert list((tmp_path / "transformer").glob("*.index.json"))
    assert torch.equal(run(load_wan_expert(tmp_path / "transformer")), run(expert))


def test_single_file_with_config_and_bf16(tmp_path, expert):
    save_file(to_wan_original_state_dict(expert.state_dict()), str(tmp_path / "expert.safetensors"))
    loaded = load_wan_expert(tmp_path / "expert.safetensors", config=WAN_CONFIG, dtype=torch.bfloat16)
    assert loaded.proj_out.weight.dtype == torch.bfloat16
    assert loaded.scale_shift_table.dtype == torch.float32  # diffusers' keep-in-fp32 modules
    assert torch.equal(loaded.proj_out.weight, expert.proj_out.weight.to(torch.bfloat16))
    assert loaded.rope.freqs_cos.device.type == "cpu"


def test_pair_in_both_layouts(tmp_path):
    high, low = tiny_expert(1), tiny_expert(2)
    root = tmp_path / "diffusers"
    high.save_pretrained(root / "transformer")
    low.save_pretrained(root / "transformer_2")
    (root / "model_index.json").write_text(json.dumps({"boundary_ratio": 0.9}))
    write_original_expert(high, tmp_path / "wan" / "high_noise_model")
    write_original_expert(low, tmp_path / "wan" / "low_noise_model", "model.diffusion_model.")
    for folder, layout in ((root, "diffusers"), (tmp_path / "wan", "wan-original")):
        assert detect_layout(folder) == layout
        h, l, info = load_wan_pair(folder)
        assert info["layout"] == layout
        assert torch.equal(run(h), run(high)) and torch.equal(run(l), run(low))
    assert load_wan_pair(root)[2]["boundary_ratio"] == 0.9
    assert "boundary_ratio" not in info


def test_detect_layout_lists_what_it_expected(tmp_path):
    (tmp_path / "stuff").mkdir()
    with pytest.raises(CheckpointError, match="transformer_2/.*high_noise_model/.*stuff"):
        detect_layout(tmp_path)


def tiny_vae() -> AutoencoderKLWan:
    torch.manual_seed(0)
    return randomized(AutoencoderKLWan(base_dim=4, z_dim=16), 3)


def test_vae_original_and_diffusers_layouts(tmp_path):
    vae = tiny_vae()
    original = to_wan_original_vae_state_dict(vae.state_dict())
    assert "decoder.upsamples.4.shortcut.weight" in original and "conv2.weight" in original
    assert set(convert_wan_vae_to_diffusers(dict(original))) == set(vae.state_dict())
    save_file({k: v.contiguous() for k, v in original.items()}, str(tmp_path / "Wan2.1_VAE.safetensors"))
    vae.save_pretrained(tmp_path / "diffusers" / "vae")
    z = torch.randn(1, 16, 2, 2, 2, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = vae.decode(z).sample
    for source in (tmp_path, tmp_path / "Wan2.1_VAE.safetensors", tmp_path / "diffusers"):
        loaded = load_wan_vae(source)
        assert loaded.config.base_dim == 4
        with torch.no_grad():
            assert torch.equal(loaded.decode(z).sample, want)


def test_text_encoder(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

    torch.manual_seed(0)
    encoder = UMT5EncoderModel(UMT5Config(vocab_size=32, d_model=16, d_kv=4, d_ff=32, num_layers=2,
                                          num_heads=4, relative_attention_num_buckets=8)).eval()
    encoder.save_pretrained(tmp_path / "text_encoder")
    words = Tokenizer(models.WordLevel({"<pad>": 0, "</s>": 1, "<unk>": 2, "a": 3, "cat": 4},
                                       unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=words, pad_token="<pad>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(tmp_path / "tokenizer")
    for source in (tmp_path, tmp_path / "text_encoder"):
        tokenizer, loaded = load_text_encoder(source)
        ids = tokenizer(["a cat"], return_tensors="pt")
        assert ids.input_ids.tolist() == [[3, 4]]
        with torch.no_grad():
            assert torch.equal(loaded(**ids).last_hidden_state, encoder(**ids).last_hidden_state)
    (tmp_path / "wan").mkdir()
    (tmp_path / "wan" / "models_t5_umt5-xxl-enc-bf16.pth").write_bytes(b"pickle")
    with pytest.raises(CheckpointError, match="models_t5_umt5-xxl-enc-bf16.pth"):
        load_text_encoder(tmp_path / "wan")


# ---- refusals -----------------------------------------------------------------------------------

def test_pickles_are_refused_without_being_read(tmp_path):
    pth = tmp_path / "Wan2.1_VAE.pth"
    pth.write_bytes(b"\x80\x04not even a real pickle")
    for call in (lambda: read_safetensors(pth), lambda: load_wan_vae(tmp_path),
                 lambda: load_wan_expert(pth, config=WAN_CONFIG)):
        with pytest.raises(CheckpointError, match=r"Wan2\.1_VAE\.pth.*pickle.*safetensors"):
            call()
    expert_dir = tmp_path / "high_noise_model"
    expert_dir.mkdir()
    (expert_dir / "diffusion_pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(CheckpointError, match=r"diffusion_pytorch_model\.bin.*pickle"):
        load_wan_expert(expert_dir)


@pytest.mark.parametrize("header_len, body, message", [
    (2**40, b"{}", "absurd"),
    (1000, b"{}", "runs past the end"),
    (5, b"{nope", "malformed"),
])
def test_bad_headers_are_refused(tmp_path, header_len, body, message):
    f = tmp_path / "bad.safetensors"
    f.write_bytes(struct.pack("<Q", header_len) + body)
    with pytest.raises(CheckpointError, match=rf"bad\.safetensors.*{message}"):
        read_safetensors(f)


def test_truncated_file_is_refused(tmp_path, expert):
    folder = tmp_path / "high_noise_model"
    write_original_expert(expert, folder)
    shard = sorted(folder.glob("*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match=rf"{shard.name}: tensor .* past the end.*truncated"):
        load_wan_expert(folder)


@pytest.mark.parametrize("change, message", [
    ("drop", r"1 missing keys \['blocks.1.cross_attn.k.weight'\]"),
    ("add", r"1 unexpected keys \['blocks.0.self_attn.extra.weight'\]"),
    ("reshape", r"wrong shape.*head.head.weight"),
])
def test_key_mismatches_are_refused(tmp_path, expert, change, message):
    state = to_wan_original_state_dict(expert.state_dict())
    if change == "drop":
        del state["blocks.1.cross_attn.k.weight"]
    elif change == "add":
        state["blocks.0.self_attn.extra.weight"] = torch.zeros(2)
    else:
        state["head.head.weight"] = torch.zeros(3, 24)
    write_sharded(state, tmp_path / "m")
    with pytest.raises(CheckpointError, match=message):
        load_wan_expert(tmp_path / "m", config=WAN_CONFIG)
