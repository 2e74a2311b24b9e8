"""Wan's rotary embedding, extended to arbitrary (negative) time positions.

StoryMem places M memory latent frames before the video on the time axis at positions
-5*(M-j) (oldest -5M, newest -5) while video frame i keeps position i. diffusers'
`WanRotaryPosEmbed` slices a precomputed 0..N table and cannot express that, so this subclass
computes the time frequencies for whatever positions the caller sets, and reuses diffusers'
module everywhere else (same channel split, same interleaved layout, same theta). With no
positions set it behaves exactly like the stock module (positions 0..F-1).
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict

import torch
from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

from storyfarm.kernels.rope import grid_cos_sin

MEMORY_POSITION_STRIDE = 5


def memory_time_positions(num_memory: int, num_video: int, stride: int = MEMORY_POSITION_STRIDE) -> list[int]:
    """StoryMem's time positions: [-stride*M, ..., -stride] for memory, then 0..F-1 for video."""
    return [-stride * (num_memory - j) for j in range(num_memory)] + list(range(num_video))


class StoryRotaryPosEmbed(WanRotaryPosEmbed):
    """A WanRotaryPosEmbed whose time positions can be set per call (see `time_positions`)."""

    _CACHE_SIZE = 8

    def __init__(self, attention_head_dim, patch_size, max_seq_len, theta: float = 10000.0):
        super().__init__(attention_head_dim, patch_size, max_seq_len, theta)
        self.theta = theta
        self._positions: tuple[int, ...] | None = None
        self._cache: OrderedDict = OrderedDict()

    @classmethod
    def replacing(cls, rope: WanRotaryPosEmbed) -> "StoryRotaryPosEmbed":
        theta = getattr(rope, "theta", 10000.0)
        new = cls(rope.attention_head_dim, rope.patch_size, rope.max_seq_len, theta)
        return new.to(rope.freqs_cos.device)

    @contextlib.contextmanager
    def time_positions(self, positions):
        """Use `positions` (one int per latent frame) for forwards inside the block."""
        previous = self._positions
        self._positions = tuple(int(p) for p in positions) if positions is not None else None
        try:
            yield
        finally:
            self._positions = previous

    def forward(self, hidden_states: torch.Tensor):
        _, _, num_frames, height, width = hidden_states.shape
        p_t, p_h, p_w = self.patch_size
        ppf, pph, ppw = num_frames // p_t, height // p_h, width // p_w
        positions = self._positions if self._positions is not None else tuple(range(ppf))
        if len(positions) != ppf:
            raise ValueError(f"rotary time positions: got {len(positions)} positions for {ppf} latent frames")
        key = (positions, pph, ppw, hidden_states.device)
        cached = self._cache.get(key)
        if cached is None:
            cos, sin = grid_cos_sin(
                torch.tensor(positions), pph, ppw, (self.t_dim, self.h_dim, self.w_dim), self.theta
            )
            # Fresh tensors (no view of the [F, H, W, D] grid): torch.compile with dynamic shapes
            # would otherwise guard on coincidences between F, H and W and recompile.
            cached = (
                cos.to(hidden_states.device).reshape(1, ppf * pph * ppw, 1, -1).clone(),
                sin.to(hidden_states.device).reshape(1, ppf * pph * ppw, 1, -1).clone(),
            )
            self._cache[key] = cached
            while len(self._cache) > self._CACHE_SIZE:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(key)
        return cached


def install_story_rope(model) -> StoryRotaryPosEmbed:
    """Swap a WanTransformer3DModel's rotary module for the story-aware one (idempotent)."""
    if isinstance(model.rope, StoryRotaryPosEmbed):
        return model.rope
    model.rope = StoryRotaryPosEmbed.replacing(model.rope)
    return model.rope
