"""Weight and LoRA files an operator might be handed: pickles are refused unread, safetensors
with absurd headers are refused before any tensor is read, each with an error naming the file.

Every pickle here would leave a marker file behind if anything unpickled it (its __reduce__
runs a command), so "refused" also means "never executed". The loaders are the ones a preset's
paths reach: a StoryMem LoRA, a Wan expert (file or folder), the VAE, the CLIP image tower.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
import zipfile

import pytest
import torch
from diffusers import WanTransformer3DModel

from storyfarm.m2v.model.lora import load_storymem_lora
from storyfarm.m2v.model.checkpoint_files import CheckpointError, read_safetensors_header
from storyfarm.m2v.model.wan_loaders import load_wan_expert, load_wan_vae

PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".pkl")


class Payload:
    """Unpickling this runs `touch marker`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def marker(tmp_path):
    path = tmp_path / "UNPICKLED"
    yield path
    assert not path.exists(), "a pickle was unpickled: its payload ran"


def evil_pickle(path, marker) -> None:
    with open(path, "wb") as f:
        pickle.dump({"blocks.0.attn1.to_q.lora_A.weight": Payload(marker)}, f)


def tiny_expert() -> WanTransformer3DModel:
    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                 out_channels=4, text_dim=8, freq_dim=8, ffn_dim=16, num_layers=1)


def safetensors(path, header, data: bytes = b"", length: int | None = None) -> None:
    """A file in safetensors' layout: u64 header length, the header bytes, the data."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)


def entry(dtype="F32", shape=(2, 2), begin=0, end=16):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": [begin, end]}


HEADERS = {  # name: (header, data, declared length or None, what the error says)
    "length 2^64-1": (b"{}", b"", 2**64 - 1, "absurd"),
    "length past the end": (b"{}", b"", 4096, "runs past the end"),
    "length zero": (b"", b"", 0, "malformed"),
    "not UTF-8": (b"\xff\xfe{}", b"", None, "malformed"),
    "not JSON": (b"{tensors: yes}", b"", None, "malformed"),
    "a JSON list": (b"[1, 2]", b"", None, "not a JSON object"),
    "metadata not a mapping": ({"__metadata__": [1]}, b"", None, "__metadata__"),
    "unknown dtype": ({"w": entry(dtype="F128")}, b"\0" * 16, None, "malformed header entry"),
    "negative dimension": ({"w": entry(shape=(-2, 2))}, b"\0" * 16, None, "malformed header entry"),
    "offsets reversed": ({"w": entry(begin=16, end=0)}, b"\0" * 16, None, "malformed header entry"),
    "offsets past the data": ({"w": entry(end=1 << 40)}, b"\0" * 16, None, "past the end"),
    "bytes do not fit the shape": ({"w": entry(shape=(1 << 31, 1 << 31))}, b"\0" * 16, None, "declares 16 bytes"),
    "entry is a string": ({"w": "F32"}, b"", None, "malformed header entry"),
    "offsets are strings": ({"w": {"dtype": "F32", "shape": [1], "data_offsets": ["0", "4"]}}, b"\0" * 4, None,
                            "malformed header entry"),
}


def tally(figures, n: int = 1) -> None:
    counts = figures.setdefault("bad_inputs", {})
    counts["weights"] = counts.get("weights", 0) + n


@pytest.mark.parametrize("suffix", PICKLE_SUFFIXES)
def test_pickled_lora_and_expert_files_are_refused_unread(tmp_path, marker, suffix, figures):
    path = tmp_path / f"backbone_high_noise{suffix}"
    evil_pickle(path, marker)
    for load in (lambda: load_storymem_lora(tiny_expert(), path), lambda: load_wan_expert(path),
                 lambda: read_safetensors_header(path)):
        with pytest.raises(CheckpointError, match=rf"{path.name}.*pickle.*safetensors"):
            load()
    tally(figures)


def test_pickles_renamed_to_safetensors_are_refused_unread(tmp_path, marker, figures):
    disguised = tmp_path / "backbone_low_noise.safetensors"
    evil_pickle(disguised, marker)
    zipped = tmp_path / "torch_save_format.safetensors"  # what torch.save writes: a zip holding a pickle
    with zipfile.ZipFile(zipped, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps({"w": Payload(marker)}))
    for path in (disguised, zipped):
        with pytest.raises(CheckpointError, match=rf"{path.name}: header length \d+ bytes is absurd"):
            load_storymem_lora(tiny_expert(), path)
    tally(figures, 2)


def test_a_model_folder_of_pickles_is_refused(tmp_path, marker, figures):
    for folder, name in (("high_noise_model", "diffusion_pytorch_model.bin"), ("vae", "diffusion_pytorch_model.bin")):
        (tmp_path / folder).mkdir()
        evil_pickle(tmp_path / folder / name, marker)
    with pytest.raises(CheckpointError, match=r"diffusion_pytorch_model\.bin.*pickle"):
        load_wan_expert(tmp_path / "high_noise_model")
    with pytest.raises(CheckpointError, match=r"no VAE found.*safetensors"):  # the pickle beside it is not read
        load_wan_vae(tmp_path)
    tally(figures, 2)


@pytest.mark.parametrize("name", list(HEADERS))
def test_absurd_safetensors_headers_are_refused_before_reading_tensors(tmp_path, name, figures):
    header, data, length, message = HEADERS[name]
    path = tmp_path / "backbone_high_noise.safetensors"
    safetensors(path, header, data, length)
    with pytest.raises(CheckpointError, match=rf"backbone_high_noise\.safetensors.*{message}"):
        load_storymem_lora(tiny_expert(), path)
    tally(figures)


def test_a_deeply_nested_header_is_refused_with_the_file_named(tmp_path, figures):
    path = tmp_path / "backbone_high_noise.safetensors"
    safetensors(path, b"[" * 100_000 + b"]" * 100_000)
    with pytest.raises(CheckpointError, match=r"backbone_high_noise\.safetensors"):
        read_safetensors_header(path)


def test_a_clip_folder_with_only_a_pickle_is_refused(tmp_path, marker):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from storyfarm.m2v.memory.keyframes import TransformersCLIPEmbedder

    config = CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                              num_attention_heads=2, projection_dim=16)
    folder = tmp_path / "clip"
    CLIPVisionModelWithProjection(config).save_pretrained(folder)
    state = CLIPVisionModelWithProjection(config).state_dict()
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")  # an honest pickle: only the policy refuses it
    with pytest.raises((CheckpointError, ValueError, OSError), match="safetensors"):
        TransformersCLIPEmbedder.from_pretrained(str(folder))
