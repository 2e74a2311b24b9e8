"""Wan VAE at the boundary between pixels and latents.

Pixels cross this boundary as uint8 RGB [T, H, W, 3]; latents as normalised float tensors
(per-channel (z - mean) / std from the VAE's config, as Wan's models expect). Keyframes are encoded
alone as one-frame clips, which is how StoryMem trains memory. Decoding is only ever asked for the
video latents: memory latents are split off before they reach this module.

Speed and memory (`configure`): the VAE runs in bfloat16 on GPUs (fp32 VAEs double decode time),
and decodes large shots in overlapping spatial tiles (diffusers' tiled decode, blended seams), which
bounds decode memory at 480p and above; tiling applies to decoding only, so keyframe latents do not
depend on it.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def to_unit(frames: np.ndarray) -> torch.Tensor:
    """uint8 [T,H,W,3] -> float [3,T,H,W] in [-1, 1]."""
    t = torch.from_numpy(np.ascontiguousarray(frames)).float()
    return t.permute(3, 0, 1, 2).div_(127.5).sub_(1.0)


def to_uint8(video: torch.Tensor) -> np.ndarray:
    """float [3,T,H,W] in [-1, 1] -> uint8 [T,H,W,3]."""
    v = video.float().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)
    return v.permute(1, 2, 3, 0).cpu().numpy()


def fit_image(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """Scale an RGB uint8 image to cover (width, height), centre-crop the overflow."""
    h, w = image.shape[:2]
    if (h, w) == (height, width):
        return image
    scale = max(width / w, height / h)
    new_w, new_h = max(width, round(w * scale)), max(height, round(h * scale))
    t = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float()
    t = F.interpolate(t, size=(new_h, new_w), mode="bicubic", antialias=True, align_corners=False)
    top, left = (new_h - height) // 2, (new_w - width) // 2
    t = t[..., top : top + height, left : left + width]
    return t[0].clamp(0, 255).round().to(torch.uint8).permute(1, 2, 0).numpy()


class VideoVAE:
    def __init__(self, vae, device: str | torch.device = "cpu"):
        self.vae = vae.eval()
        self.device = torch.device(device)
        cfg = vae.config
        self.temporal_stride = int(getattr(cfg, "scale_factor_temporal", 4))
        self.spatial_stride = int(getattr(cfg, "scale_factor_spatial", 8))
        self.channels = int(cfg.z_dim)
        self._mean = torch.tensor(cfg.latents_mean, dtype=torch.float32).view(-1, 1, 1, 1)
        self._std = torch.tensor(cfg.latents_std, dtype=torch.float32).view(-1, 1, 1, 1)
        self.tiling = False

    def configure(self, *, tiling: bool | None = None, dtype: torch.dtype | None = None, tile: tuple[int, int, int, int] | None = None) -> None:
        """tiling: tiled decode on/off; dtype: cast the VAE; tile: (min height, min width, stride height,
        stride width) in pixels (diffusers' defaults 256, 256, 192, 192)."""
        if dtype is not None and dtype != self.dtype:
            self.vae.to(dtype=dtype)
        if tile is not None:
            min_h, min_w, stride_h, stride_w = tile
            if not (0 < stride_h <= min_h and 0 < stride_w <= min_w) or min_h % self.spatial_stride or min_w % self.spatial_stride:
                raise ValueError(f"vae tile {tile}: sizes must be multiples of {self.spatial_stride} with 0 < stride <= size")
            self.vae.tile_sample_min_height, self.vae.tile_sample_min_width = min_h, min_w
            self.vae.tile_sample_stride_height, self.vae.tile_sample_stride_width = stride_h, stride_w
        if tiling is not None:
            self.tiling = bool(tiling)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    def latent_frames(self, pixel_frames: int) -> int:
        return (pixel_frames - 1) // self.temporal_stride + 1

    @torch.no_grad()
    def _encode(self, video: torch.Tensor) -> torch.Tensor:
        """video [B,3,T,H,W] in [-1,1] -> normalised latents [B,C,T',h,w]."""
        z = self.vae.encode(video.to(self.device, self.dtype)).latent_dist.mode().float()
        return (z - self._mean.to(z.device)) / self._std.to(z.device)

    def encode_clip(self, frames: np.ndarray) -> torch.Tensor:
        """uint8 [T,H,W,3] -> [C, T', h, w]."""
        return self._encode(to_unit(frames)[None])[0]

    def encode_blank_clip(self, num_frames: int, width: int, height: int, known: np.ndarray | None = None) -> torch.Tensor:
        """The conditioning clip: `known` leading frames (uint8 [k,H,W,3]) then zeros (mid-grey 0.0)."""
        video = torch.zeros(1, 3, num_frames, height, width)
        if known is not None and len(known):
            video[0, :, : len(known)] = to_unit(known)
        return self._encode(video)[0]

    def encode_images(self, images: list[np.ndarray], batch: int = 8) -> torch.Tensor:
        """Each image alone as a one-frame clip: uint8 [H,W,3] list -> [N, C, h, w]."""
        out = []
        for start in range(0, len(images), batch):
            chunk = np.stack(images[start : start + batch])  # [n,H,W,3]
            video = to_unit(chunk).permute(1, 0, 2, 3).unsqueeze(2)  # [n,3,1,H,W]
            out.append(self._encode(video)[:, :, 0])
        return torch.cat(out) if out else torch.empty(0)

    @torch.no_grad()
    def decode_video(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents [C, T', h, w] -> float video [3, T, H, W] in about [-1, 1]."""
        z = latents.float().to(self.device) * self._std.to(self.device) + self._mean.to(self.device)
        previous = getattr(self.vae, "use_tiling", False)
        self.vae.use_tiling = previous or self.tiling  # a caller's enable_tiling() (low-memory retry) still holds
        try:
            return self.vae.decode(z[None].to(self.dtype)).sample[0]
        finally:
            self.vae.use_tiling = previous

    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """Normalised latents [C, T', h, w] -> uint8 [T, H, W, 3]."""
        return to_uint8(self.decode_video(latents))
