"""Consistent Self-Attention (StoryDiffusion) for stories rendered without the StoryMem LoRA.

Why: with plain Wan I2V/T2V weights there is no memory conditioning to keep characters alike from
shot to shot. StoryDiffusion's training-free alternative extends each identity sample's
self-attention keys/values with tokens sampled (rate about 0.5) from the other identity samples,
queries unchanged, and keeps a per-step bank of those tokens that later samples attend to.

storyfarm renders a story's shots one after another, so the exchange goes through the bank: each of
the first `identity_shots` shots writes a sample of its self-attention keys/values (post norm and
RoPE, ready to attend) per chosen denoising step and block into the bank, and every shot extends its
keys/values, at the same step and block, with the bank tokens of the identity shots before it.

Invariants (tested):
- rate 0 (nothing sampled, nothing banked) is exactly plain attention; a positive rate changes
  the output of every shot after the first identity shot;
- the bank is bounded: at most `bank_tokens` tokens per identity shot, step and block, so its size is
  at most identity_shots x steps x blocks x bank_tokens x 2 (K, V) x CFG batch x heads x head_dim x
  dtype bytes (`CsaSession.bound_bytes`); the bytes held and the extra keys per call are reported;
- sampling is seeded by (story seed, shot, step, block): a re-render reproduces its tokens;
- a shot reads only banked shots before it (a re-render sees the bank as it stood, like memory).
Attention itself runs through kernels.attention.attend (the configured backend).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field

import torch
from diffusers.models.transformers.transformer_wan import _get_qkv_projections
from safetensors.torch import load_file, save_file

from storyfarm.kernels.attention import attend
from storyfarm.kernels.rope import apply_rotary
from storyfarm.story.files import atomic_output
from storyfarm.story.modes import CsaOptions

BLOCK_STRIDE = 8  # default: every eighth block exchanges tokens (5 of Wan-A14B's 40)


class CsaBank:
    """Banked (K, V) tokens by (shot, step, block): each [batch, tokens, heads, head_dim]."""

    def __init__(self):
        self.entries: dict[tuple[int, int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def nbytes(self) -> int:
        return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in self.entries.values())

    def shots(self) -> list[int]:
        return sorted({shot for shot, _, _ in self.entries})

    def add(self, shot: int, step: int, block: int, key: torch.Tensor, value: torch.Tensor) -> None:
        self.entries[(shot, step, block)] = (key.detach(), value.detach())

    def drop_from(self, shot: int) -> None:
        """Forget the tokens of `shot` and later shots (a re-render writes its own again)."""
        self.entries = {k: v for k, v in self.entries.items() if k[0] < shot}

    def tokens(self, step: int, block: int, before_shot: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        found = [self.entries[k] for k in sorted(self.entries) if k[1:] == (step, block) and k[0] < before_shot]
        if not found:
            return None
        return torch.cat([k for k, _ in found], dim=1), torch.cat([v for _, v in found], dim=1)

    def save(self, path: str | os.PathLike) -> None:
        tensors = {}
        for (shot, step, block), (k, v) in self.entries.items():
            tensors[f"{shot}/{step}/{block}/k"] = k.contiguous().cpu()
            tensors[f"{shot}/{step}/{block}/v"] = v.contiguous().cpu()
        with atomic_output(path) as tmp:
            save_file(tensors, str(tmp))

    @classmethod
    def load(cls, path: str | os.PathLike) -> CsaBank:
        bank = cls()
        if os.path.isfile(path):
            tensors = load_file(str(path))
            for name in tensors:
                if name.endswith("/k"):
                    shot, step, block = (int(x) for x in name.split("/")[:3])
                    bank.add(shot, step, block, tensors[name], tensors[name[:-1] + "v"])
        return bank


@dataclass
class CsaSession:
    """One shot's view of CSA: which steps and blocks exchange, whether it writes, the bank."""

    options: CsaOptions
    bank: CsaBank
    shot_index: int
    num_blocks: int
    num_steps: int
    seed: int = 0
    step: int = 0  # the denoising step now running (the driver advances it after each step)
    stats: dict = field(default_factory=lambda: {"extra_keys": 0, "banked_tokens": 0})

    def __post_init__(self):
        blocks = self.options.blocks
        if blocks is None:
            blocks = tuple(range(0, self.num_blocks, BLOCK_STRIDE))
        bad = [b for b in blocks if b >= self.num_blocks]
        if bad:
            raise ValueError(f"csa.blocks: {bad} out of range; the model has blocks 0 to {self.num_blocks - 1}")
        self.blocks = frozenset(blocks)
        self.steps = max(1, self.num_steps // 4) if self.options.steps is None else min(self.options.steps, self.num_steps)

    @property
    def writes(self) -> bool:
        return self.shot_index < self.options.identity_shots and self.options.rate > 0

    def active(self, block: int) -> bool:
        return block in self.blocks and self.step < self.steps

    def bound_bytes(self, batch: int, heads: int, head_dim: int, element_size: int) -> int:
        return (self.options.identity_shots * self.steps * len(self.blocks) * self.options.bank_tokens * 2
                * batch * heads * head_dim * element_size)

    def sample(self, tokens: int, block: int, device) -> torch.Tensor:
        """Sorted indices of the tokens an identity shot banks at this step and block."""
        count = min(round(self.options.rate * tokens), self.options.bank_tokens)
        key = ((self.seed * 1_000_003 + self.shot_index) * 10_007 + self.step) * 1_009 + block
        generator = torch.Generator("cpu").manual_seed(key % (1 << 63))
        return torch.randperm(tokens, generator=generator)[:count].sort().values.to(device)


class ConsistentSelfAttention:
    """An attn1 processor: plain self-attention, with keys/values extended by the bank's tokens and
    (for identity shots) a sample of its own written to the bank, on the session's steps/blocks."""

    def __init__(self, inner, block: int, session: CsaSession):
        self.inner, self.block, self.session = inner, block, session
        self.backend = getattr(inner, "backend", None)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        session = self.session
        if encoder_hidden_states is not None or not session.active(self.block):
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        query, key, value = _get_qkv_projections(attn, hidden_states, None)
        query = attn.norm_q(query).unflatten(2, (attn.heads, -1))
        key = attn.norm_k(key).unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))
        if rotary_emb is not None:
            query, key = apply_rotary(query, *rotary_emb), apply_rotary(key, *rotary_emb)
        extended_key, extended_value = key, value
        banked = session.bank.tokens(session.step, self.block, session.shot_index)
        if banked is not None:
            bank_key, bank_value = (t.to(key.device, key.dtype) for t in banked)
            if bank_key.shape[0] != key.shape[0]:
                bank_key, bank_value = (t[:1].expand(key.shape[0], *t.shape[1:]) for t in (bank_key, bank_value))
            extended_key = torch.cat([key, bank_key], dim=1)
            extended_value = torch.cat([value, bank_value], dim=1)
            session.stats["extra_keys"] = max(session.stats["extra_keys"], bank_key.shape[1])
        if session.writes:
            picked = session.sample(key.shape[1], self.block, key.device)
            if len(picked):
                session.bank.add(session.shot_index, session.step, self.block, key[:, picked], value[:, picked])
                session.stats["banked_tokens"] += len(picked)
        out = attend(query, extended_key, extended_value, backend=self.backend).flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))


@contextlib.contextmanager
def consistent_self_attention(experts, session: CsaSession):
    """Install CSA on the chosen blocks' self-attention of every expert for the duration of a shot;
    the previous processors come back afterwards, whatever happens."""
    installed = []
    try:
        for expert in experts:
            for index, block in enumerate(expert.model.blocks):
                if index in session.blocks:
                    installed.append((block.attn1, block.attn1.processor))
                    block.attn1.set_processor(ConsistentSelfAttention(block.attn1.processor, index, session))
        yield session
    finally:
        for attn, processor in installed:
            attn.set_processor(processor)
