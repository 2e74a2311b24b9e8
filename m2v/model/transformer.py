"""One expert of the M2V model: memory latents and video latents in one bidirectional forward.

The token sequence is [M memory | F video] latent frames on the time axis. The input channels
are the noisy stream (16, covering memory positions too) followed by the conditioning y
(4 mask + 16 latent) for I2V-shaped experts (36 in), or the noisy stream alone for T2V experts
(16 in). Every token shares one timestep (per sample), or each latent frame has its own (FIFO;
see m2v.frame_timesteps). The rotary time positions come from the caller
(`memory_time_positions`). The stock diffusers model is used with four seams replaced: its
rotary module (any time position), its blocks' class (per-frame modulation), its timestep
sinusoid (float64, as Wan computes it: m2v.frame_timesteps) and its attention
processors (`StoryAttnProcessor`: RMSNorm+RoPE prologue, then `kernels.attention.attend`, so the
configured backend runs and is recorded). Weights, LoRA and compilation work as for diffusers.
"""

from __future__ import annotations

import contextlib

import torch
from diffusers import WanTransformer3DModel
from diffusers.models.transformers.transformer_wan import _get_added_kv_projections, _get_qkv_projections

from storyfarm.kernels.attention import attend
from storyfarm.kernels.rope import apply_rotary, prologue_uses_triton, triton_prologue
from storyfarm.m2v.model.frame_timesteps import install_story_blocks, install_wan_timesteps, wan_forward
from storyfarm.m2v.model.rope import install_story_rope


def _eps(norm: torch.nn.RMSNorm, x: torch.Tensor) -> float:
    return norm.eps if norm.eps is not None else torch.finfo(x.dtype).eps


class StoryAttnProcessor:
    """diffusers' WanAttnProcessor semantics with storyfarm's kernels.

    backend: an attention backend name, or None for the process default (kernels.attention.configure).
    rope: 'auto' (Triton fused RMSNorm+RoPE on CUDA in eager mode), 'torch' or 'triton'.
    """

    _attention_backend = None
    _parallel_config = None

    def __init__(self, backend: str | None = None, rope: str = "auto"):
        self.backend = backend
        self.rope = rope

    def _prologue(self, attn, query, key, rotary_emb):
        if rotary_emb is not None and prologue_uses_triton(self.rope, query.device):
            cos, sin = rotary_emb
            return triton_prologue()(query, key, attn.norm_q.weight, attn.norm_k.weight, _eps(attn.norm_q, query), cos, sin, attn.heads)
        query = attn.norm_q(query).unflatten(2, (attn.heads, -1))
        key = attn.norm_k(key).unflatten(2, (attn.heads, -1))
        if rotary_emb is not None:
            query, key = apply_rotary(query, *rotary_emb), apply_rotary(key, *rotary_emb)
        return query, key

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        if attention_mask is not None:
            raise ValueError("StoryAttnProcessor: Wan attention takes no attention_mask")
        image_context = None
        if attn.add_k_proj is not None:  # Wan2.1 I2V image tokens before the 512 text tokens
            image_length = encoder_hidden_states.shape[1] - 512
            image_context, encoder_hidden_states = encoder_hidden_states[:, :image_length], encoder_hidden_states[:, image_length:]
        query, key, value = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
        query, key = self._prologue(attn, query, key, rotary_emb)
        value = value.unflatten(2, (attn.heads, -1))
        out = attend(query, key, value, backend=self.backend).flatten(2, 3).type_as(query)
        if image_context is not None:
            key_img, value_img = _get_added_kv_projections(attn, image_context)
            key_img = attn.norm_added_k(key_img).unflatten(2, (attn.heads, -1))
            value_img = value_img.unflatten(2, (attn.heads, -1))
            out = out + attend(query, key_img, value_img, backend=self.backend).flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))


def install_attention(model: WanTransformer3DModel, backend: str | None = None, rope: str = "auto") -> None:
    """Route every attention of the model through kernels.attention (self and cross)."""
    for block in model.blocks:
        for attn in (block.attn1, block.attn2):
            attn.set_processor(StoryAttnProcessor(backend, rope))


class M2VExpert:
    """Callable wrapper around one WanTransformer3DModel expert."""

    def __init__(self, model: WanTransformer3DModel, name: str, attention: str | None = None, rope: str = "auto"):
        self.model = model.eval()
        self.name = name
        self.regions = None  # m2v.compile.CompiledRegions once compiled
        self.rope = install_story_rope(model)
        install_story_blocks(model)
        install_wan_timesteps(model)
        install_attention(model, attention, rope)

    @property
    def in_channels(self) -> int:
        return self.model.config.in_channels

    @property
    def takes_conditioning(self) -> bool:
        return self.in_channels > 16

    @property
    def dtype(self) -> torch.dtype:
        return self.model.patch_embedding.weight.dtype

    def set_attention(self, backend: str | None = None, rope: str = "auto") -> None:
        install_attention(self.model, backend, rope)

    def _compiled(self, model_input, text, timestep):
        if self.regions is None:
            return contextlib.nullcontext()
        from storyfarm.m2v.accel.compile import bucket_of

        return self.regions.running(bucket_of(model_input, text, timestep, self.model.config.patch_size))

    @torch.no_grad()
    def __call__(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        text: torch.Tensor,
        time_positions,
        conditioning: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """latents [B,16,T,h,w], conditioning [B or 1,20,T,h,w], text [B,L,D] -> prediction [B,16,T,h,w].

        timestep: [B] (one per sample) or [B, T] (one per latent frame, FIFO windows).
        """
        if self.takes_conditioning:
            if conditioning is None:
                raise ValueError(f"expert {self.name} takes {self.in_channels} input channels and needs conditioning")
            if conditioning.shape[0] != latents.shape[0]:
                conditioning = conditioning.expand(latents.shape[0], *conditioning.shape[1:])
            model_input = torch.cat([latents, conditioning], dim=1)
        else:
            model_input = latents
        model_input = model_input.to(self.dtype)
        timestep = timestep.to(model_input.device)
        if timestep.ndim not in (1, 2):
            raise ValueError(f"timestep: expected [batch] or [batch, latent frames], got shape {tuple(timestep.shape)}")
        text = text.to(self.dtype)
        with self.rope.time_positions(time_positions), self._compiled(model_input, text, timestep):
            if timestep.ndim == 2:
                out = wan_forward(self.model, model_input, timestep, text)
            else:
                out = self.model(
                    hidden_states=model_input,
                    timestep=timestep,
                    encoder_hidden_states=text,
                    return_dict=False,
                )[0]
        return out.float()
