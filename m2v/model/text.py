"""Prompt -> text embedding for Wan's cross-attention.

Wan encodes with umT5 and zero-pads the context to a fixed length (512 tokens): embeddings past a
prompt's real length are zeros and the model cross-attends to them with no mask. This module does
exactly that, so the same prompt gives the same tensor whether it is encoded alone or in a batch.
"""

from __future__ import annotations

import html
import re

import torch

try:  # optional, as in Wan and diffusers: fixes mojibake before tokenising
    import ftfy
except ImportError:  # pragma: no cover - depends on the environment
    ftfy = None


def clean_prompt(text: str) -> str:
    """Wan's prompt cleaning: ftfy when installed, HTML entities unescaped, whitespace collapsed."""
    if ftfy is not None:
        text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


class TextEncoder:
    def __init__(self, tokenizer, model, text_len: int = 512, device: str | torch.device = "cpu"):
        self.tokenizer = tokenizer
        self.model = model.eval()
        self.text_len = int(text_len)
        self.device = torch.device(device)

    @property
    def dim(self) -> int:
        return int(self.model.config.d_model)

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> torch.Tensor:
        """[B, text_len, D] float32, zero past each prompt's token count."""
        tokens = self.tokenizer(
            [clean_prompt(p) for p in prompts],
            padding="max_length",
            max_length=self.text_len,
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        ids = tokens.input_ids.to(self.device)
        mask = tokens.attention_mask.to(self.device)
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state.float()
        return hidden * mask[..., None].to(hidden.dtype)
