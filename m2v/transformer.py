"""One expert of the M2V model: memory latents and video latents in one bidirectional forward.

The token sequence is [M memory | F video] latent frames on the time axis. The input channels
are the noisy stream (16, covering memory positions too) followed by the conditioning y
(4 mask + 16 latent) for I2V-shaped experts (36 in), or the noisy stream alone for T2V experts
(16 in). Every token shares one timestep. The rotary time positions come from the caller
(`memory_time_positions`). The stock diffusers model is used unchanged apart from its rotary
module, so weights, LoRA, attention processors and compilation all work as for diffusers.
"""

from __future__ import annotations

import torch
from diffusers import WanTransformer3DModel

from storyfarm.m2v.rope import install_story_rope


class M2VExpert:
    """Callable wrapper around one WanTransformer3DModel expert."""

    def __init__(self, model: WanTransformer3DModel, name: str):
        self.model = model.eval()
        self.name = name
        self.rope = install_story_rope(model)

    @property
    def in_channels(self) -> int:
        return self.model.config.in_channels

    @property
    def takes_conditioning(self) -> bool:
        return self.in_channels > 16

    @property
    def dtype(self) -> torch.dtype:
        return self.model.patch_embedding.weight.dtype

    @torch.no_grad()
    def __call__(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        text: torch.Tensor,
        time_positions,
        conditioning: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """latents [B,16,T,h,w], conditioning [B or 1,20,T,h,w], text [B,L,D] -> prediction [B,16,T,h,w]."""
        if self.takes_conditioning:
            if conditioning is None:
                raise ValueError(f"expert {self.name} takes {self.in_channels} input channels and needs conditioning")
            if conditioning.shape[0] != latents.shape[0]:
                conditioning = conditioning.expand(latents.shape[0], *conditioning.shape[1:])
            model_input = torch.cat([latents, conditioning], dim=1)
        else:
            model_input = latents
        model_input = model_input.to(self.dtype)
        with self.rope.time_positions(time_positions):
            out = self.model(
                hidden_states=model_input,
                timestep=timestep.to(model_input.device),
                encoder_hidden_states=text.to(self.dtype),
                return_dict=False,
            )[0]
        return out.float()
