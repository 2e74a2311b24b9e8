"""The conditioning stream y of M2V: [mask (4 ch) | latent (16 ch)] over [M memory | F video] frames.

Memory frames are fully known: mask 1 on all four channels, latent = the keyframe's own latent
(each keyframe encoded alone as a one-frame clip). Video frames carry the VAE latent of the
conditioning clip: all zeros for a hard cut, [first frame, zeros...] for MI2V, [5 motion frames,
zeros...] for MM2V, with mask 1 exactly on the latent channels that those known pixel frames
occupy. The four mask channels per latent frame mirror Wan's VAE, whose first latent frame holds
pixel frame 0 and every later latent frame holds four pixel frames.
"""

from __future__ import annotations

import torch


def known_frames_mask(num_pixel_frames: int, known: int, temporal_stride: int = 4) -> torch.Tensor:
    """Mask [4, latent_frames] for a clip whose first `known` pixel frames are given."""
    if (num_pixel_frames - 1) % temporal_stride:
        raise ValueError(f"clip of {num_pixel_frames} frames is not {temporal_stride}n+1")
    if not 0 <= known <= num_pixel_frames:
        raise ValueError(f"known frames {known} outside 0..{num_pixel_frames}")
    pixel = torch.zeros(num_pixel_frames)
    pixel[:known] = 1.0
    # Pixel frame 0 fills a whole latent frame alone: repeat it to the stride, then group.
    pixel = torch.cat([pixel[:1].repeat(temporal_stride), pixel[1:]])
    return pixel.view(-1, temporal_stride).transpose(0, 1).contiguous()


def build_conditioning(
    memory_latents: torch.Tensor | None,
    clip_latents: torch.Tensor,
    num_pixel_frames: int,
    known_pixel_frames: int = 0,
    temporal_stride: int = 4,
) -> torch.Tensor:
    """y [1, 4 + C, M + F_lat, h, w] from memory latents [M, C, h, w] and clip latents [C, F_lat, h, w]."""
    channels, latent_frames, h, w = clip_latents.shape
    video_mask = known_frames_mask(num_pixel_frames, known_pixel_frames, temporal_stride)
    if video_mask.shape[1] != latent_frames:
        raise ValueError(f"clip latents have {latent_frames} frames, {num_pixel_frames} pixel frames need {video_mask.shape[1]}")
    video_mask = video_mask.to(clip_latents)[:, :, None, None].expand(temporal_stride, latent_frames, h, w)
    if memory_latents is None or memory_latents.shape[0] == 0:
        mask, latents = video_mask, clip_latents
    else:
        m = memory_latents.shape[0]
        if memory_latents.shape[1:] != (channels, h, w):
            raise ValueError(f"memory latents {tuple(memory_latents.shape)} do not match the clip's {(channels, h, w)}")
        memory_mask = torch.ones(temporal_stride, m, h, w, dtype=clip_latents.dtype, device=clip_latents.device)
        mask = torch.cat([memory_mask, video_mask], dim=1)
        latents = torch.cat([memory_latents.to(clip_latents).permute(1, 0, 2, 3), clip_latents], dim=1)
    return torch.cat([mask, latents], dim=0).unsqueeze(0)
