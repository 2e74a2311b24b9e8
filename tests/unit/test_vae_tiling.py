"""The VAE's speed settings on the tiny Wan VAE: tiled decode close to untiled, bf16, decode only."""

import pytest
import torch
from diffusers import AutoencoderKLWan

from storyfarm.story.presets import load_preset
from storyfarm.m2v.model.vae import VideoVAE


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(0)
    return VideoVAE(AutoencoderKLWan(**load_preset("tiny").architecture.vae))


@pytest.fixture(scope="module")
def latents():
    return torch.randn(16, 1, 12, 20, generator=torch.Generator().manual_seed(1))  # one frame, 96x160 px


@pytest.fixture(scope="module")
def untiled(vae, latents):
    vae.configure(tiling=False)
    return vae.decode_video(latents)


def test_tiled_decode_matches_untiled_within_tolerance(vae, latents, untiled):
    vae.configure(tiling=True, tile=(96, 128, 96, 96))  # two tiles across, blended over 32 px
    try:
        tiled = vae.decode_video(latents)
    finally:
        vae.configure(tiling=False, tile=(256, 256, 192, 192))
    assert tiled.shape == untiled.shape == (3, 1, 96, 160)
    diff = (tiled - untiled).abs()
    assert diff.max() > 0  # it really decoded in tiles
    # Random weights have a receptive field as wide as the frame, so seams differ; the bulk must not.
    assert torch.corrcoef(torch.stack([tiled.flatten(), untiled.flatten()]))[0, 1] > 0.97
    assert (tiled - untiled).norm() / untiled.norm() < 0.25
    assert diff[..., :64].mean() < 0.02 < diff[..., 96:128].mean()  # error sits at the seam


def test_tiling_is_for_decoding_only_and_leaves_callers_choice(vae):
    frames = torch.randint(0, 256, (1, 96, 160, 3), dtype=torch.uint8).numpy()
    vae.configure(tiling=False)
    plain = vae.encode_clip(frames)
    vae.configure(tiling=True, tile=(64, 64, 48, 48))
    try:
        assert torch.equal(vae.encode_clip(frames), plain)  # encoding never tiles
        assert vae.vae.use_tiling is False  # the flag is only set for the decode call
        vae.vae.use_tiling = True  # a low-memory retry enabling tiling on the diffusers VAE
        vae.configure(tiling=False)
        vae.decode_video(torch.zeros(16, 1, 12, 20))
        assert vae.vae.use_tiling is True
    finally:
        vae.vae.use_tiling = False
        vae.configure(tiling=False, tile=(256, 256, 192, 192))


def test_bad_tile_sizes_name_the_rule(vae):
    with pytest.raises(ValueError, match="multiples of 8 with 0 < stride <= size"):
        vae.configure(tile=(100, 128, 64, 64))
    with pytest.raises(ValueError, match="0 < stride <= size"):
        vae.configure(tile=(64, 64, 96, 48))


def test_bfloat16_decode_stays_close_to_float32(vae, latents, untiled):
    vae.configure(dtype=torch.bfloat16)
    try:
        assert vae.dtype == torch.bfloat16
        half = vae.decode_video(latents).float()
    finally:
        vae.configure(dtype=torch.float32)
    assert (half - untiled).abs().mean() < 0.02 and (half - untiled).abs().max() < 0.25
