"""Per-frame timesteps without per-token embeddings (FIFO diagonal denoising).

diffusers' Wan forward takes a 2-D timestep as one timestep per *token*: it embeds every token's
timestep and builds a [batch, tokens, 6, dim] float32 modulation tensor in every block (about
8 GB per block at 480p with CFG). A window of FIFO frames only needs one timestep per latent
*frame*. Here the embedding is computed once per frame ([batch, frames, 6, dim]) and broadcast
over each frame's tokens through a view; the arithmetic is the stock block's, so the result equals
stock diffusers given the same timestep repeated over each frame's tokens (tested).

`StoryTransformerBlock` is the stock block with that broadcast added (installed by class swap,
so weights, LoRA and regional compilation are untouched); `wan_forward` is the model forward for
timesteps shaped [batch] or [batch, latent frames] (the stock model's own forward still serves the
per-sample case in M2VExpert, which keeps it comparable with diffusers).

`WanTimesteps` is the timestep sinusoid as Wan computes it, in float64 (DESIGN.md section 4):
diffusers computes it in float32, which alone puts the forward about 1.5e-5 off Wan's on identical
weights (tests/unit/test_numerics.py measures the forward against a float64 oracle). It is one row
per sample (or per frame), so float64 costs nothing; the condition embedder then casts it to its
time embedder's dtype as before. Installed by class swap, so every path embeds through it: the
per-sample stock forward, `wan_forward`, the regionally compiled model (only its blocks are
compiled) and the ONNX export.
"""

from __future__ import annotations

import torch
from diffusers.models.embeddings import Timesteps
from diffusers.models.transformers.transformer_wan import WanTransformerBlock


class WanTimesteps(Timesteps):
    """diffusers' Timesteps with Wan's float64 arithmetic (`sinusoidal_embedding_1d`): the frequencies
    10000^(-i/half) and the angles t * freq in float64, cos before sin. The result stays float64 so a
    float64 model keeps full precision; the condition embedder casts it to its own dtype. MPS has no
    float64, so it computes in float32 there (diffusers' own rule for its rotary tables)."""

    def forward(self, timesteps: torch.Tensor) -> torch.Tensor:
        dtype = torch.float32 if timesteps.device.type == "mps" else torch.float64
        half = self.num_channels // 2
        exponent = torch.arange(half, dtype=dtype, device=timesteps.device) / (half - self.downscale_freq_shift)
        angles = self.scale * timesteps.to(dtype)[:, None] * torch.pow(10000.0, -exponent)[None, :]
        cos, sin = torch.cos(angles), torch.sin(angles)
        pair = [cos, sin] if self.flip_sin_to_cos else [sin, cos]
        return torch.nn.functional.pad(torch.cat(pair, dim=-1), (0, self.num_channels % 2))


def install_wan_timesteps(model) -> None:
    """Make a WanTransformer3DModel embed timesteps in float64 as Wan does (idempotent)."""
    proj = model.condition_embedder.timesteps_proj
    if type(proj) is Timesteps:
        proj.__class__ = WanTimesteps
    elif not isinstance(proj, WanTimesteps):
        raise TypeError(f"unexpected timestep projection type {type(proj).__name__}")


def _per_frame(x: torch.Tensor, frames: int) -> torch.Tensor:
    return x.unflatten(1, (frames, -1))  # [B, F*HW, D] -> [B, F, HW, D] (a view)


class StoryTransformerBlock(WanTransformerBlock):
    """WanTransformerBlock that also accepts per-frame modulation: temb [B, F, 6, D] with F < tokens."""

    def forward(self, hidden_states, encoder_hidden_states, temb, rotary_emb):
        if temb.ndim != 4 or temb.shape[1] == hidden_states.shape[1]:
            return super().forward(hidden_states, encoder_hidden_states, temb, rotary_emb)
        frames = temb.shape[1]
        if hidden_states.shape[1] % frames:
            raise ValueError(f"per-frame timesteps: {frames} frames do not divide {hidden_states.shape[1]} tokens")
        mod = (self.scale_shift_table.unsqueeze(0) + temb.float()).unsqueeze(2)  # [B, F, 1, 6, D]
        shift_msa, scale_msa, gate_msa, c_shift_msa, c_scale_msa, c_gate_msa = mod.unbind(3)  # [B, F, 1, D]

        def pf(x):
            return _per_frame(x, frames)

        norm = (pf(self.norm1(hidden_states.float())) * (1 + scale_msa) + shift_msa).flatten(1, 2)
        attn_output = self.attn1(norm.type_as(hidden_states), None, None, rotary_emb)
        hidden_states = (pf(hidden_states.float()) + pf(attn_output) * gate_msa).flatten(1, 2).type_as(hidden_states)

        norm = self.norm2(hidden_states.float()).type_as(hidden_states)
        hidden_states = hidden_states + self.attn2(norm, encoder_hidden_states, None, None)

        norm = (pf(self.norm3(hidden_states.float())) * (1 + c_scale_msa) + c_shift_msa).flatten(1, 2)
        ff_output = self.ffn(norm.type_as(hidden_states))
        return (pf(hidden_states.float()) + pf(ff_output.float()) * c_gate_msa).flatten(1, 2).type_as(hidden_states)


def install_story_blocks(model) -> None:
    """Make every block of a WanTransformer3DModel a StoryTransformerBlock (idempotent)."""
    for block in model.blocks:
        if type(block) is WanTransformerBlock:
            block.__class__ = StoryTransformerBlock
        elif not isinstance(block, StoryTransformerBlock):
            raise TypeError(f"unexpected transformer block type {type(block).__name__}")


def wan_forward(model, hidden_states: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """The Wan forward on hidden_states [B, C, F, H, W] with timestep [B] (per sample) or [B, F]
    (per latent frame); `rotary_emb` (cos, sin) replaces the model's rotary module when given
    (ONNX export passes it as an input)."""
    batch, _, num_frames, height, width = hidden_states.shape
    p_t, p_h, p_w = model.config.patch_size
    frames, post_h, post_w = num_frames // p_t, height // p_h, width // p_w
    per_frame = timestep.ndim == 2
    if timestep.shape != ((batch, frames) if per_frame else (batch,)):
        raise ValueError(f"timestep: expected shape ({batch},) or {(batch, frames)}, got {tuple(timestep.shape)}")
    if rotary_emb is None:
        rotary_emb = model.rope(hidden_states)
    hidden_states = model.patch_embedding(hidden_states).flatten(2).transpose(1, 2).contiguous()
    temb, timestep_proj, encoder_hidden_states, _ = model.condition_embedder(
        timestep.flatten(), encoder_hidden_states, None, timestep_seq_len=frames if per_frame else None
    )  # temb [B, D] or [B, F, D]: one embedding per sample or per frame, never per token
    timestep_proj = timestep_proj.unflatten(timestep_proj.ndim - 1, (6, -1))  # [B, 6, D] or [B, F, 6, D]
    for block in model.blocks:
        hidden_states = block(hidden_states, encoder_hidden_states, timestep_proj, rotary_emb)
    if per_frame:
        modulation = model.scale_shift_table.unsqueeze(0) + temb.unsqueeze(2)  # [B, F, 2, D]
        shift, scale = modulation.unsqueeze(2).unbind(3)  # [B, F, 1, D]
        out = (_per_frame(model.norm_out(hidden_states.float()), frames) * (1 + scale) + shift).flatten(1, 2)
    else:
        shift, scale = (model.scale_shift_table + temb.unsqueeze(1)).chunk(2, dim=1)  # [B, 1, D]
        out = model.norm_out(hidden_states.float()) * (1 + scale) + shift
    out = model.proj_out(out.type_as(hidden_states))
    out = out.reshape(batch, frames, post_h, post_w, p_t, p_h, p_w, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
    return out.flatten(6, 7).flatten(4, 5).flatten(2, 3)
