"""Random-weight models with Wan2.2-I2V-A14B's structure, built in code (the `tiny` preset).

Same classes and wiring as the real model (two experts switched at a boundary, 36 input channels,
Wan VAE with strides (4, 8, 8) and 16 latent channels, umT5 text encoder, CLIP for keyframes), only
small. Weights are a pure function of the seed, so tests and demos are reproducible and need no
download. The tokenizer is byte-level (every UTF-8 byte is a token) so any prompt encodes.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKLWan, WanTransformer3DModel
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A local umT5-shaped tokenizer: <pad>=0, </s>=1, <unk>=2, then the 256 byte symbols; appends </s>."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for symbol in sorted(alphabet):
        vocab[symbol] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def _seeded(seed: int, build):
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return build()
    finally:
        torch.random.set_rng_state(state)


def _transformer_config(cfg: dict) -> dict:
    out = dict(cfg)
    if "patch_size" in out:
        out["patch_size"] = tuple(out["patch_size"])
    return out


def build_expert(cfg: dict, seed: int) -> WanTransformer3DModel:
    return _seeded(seed, lambda: WanTransformer3DModel(**_transformer_config(cfg)).eval())


def build_vae(cfg: dict, seed: int) -> AutoencoderKLWan:
    return _seeded(seed, lambda: AutoencoderKLWan(**cfg).eval())


def build_text_encoder(cfg: dict, seed: int):
    tokenizer = byte_tokenizer()
    config = UMT5Config(**{"vocab_size": 384, **cfg})
    if config.vocab_size < len(tokenizer):
        raise ValueError(f"text_encoder.vocab_size {config.vocab_size} < tokenizer size {len(tokenizer)}")
    model = _seeded(seed, lambda: UMT5EncoderModel(config).eval())
    return tokenizer, model


def build_tiny_components(architecture, seed: int) -> dict:
    """Models for `source: random` presets, each with its own derived seed."""
    comps = {
        "high_noise": build_expert(architecture.transformer, seed + 1),
        "low_noise": build_expert(architecture.transformer, seed + 2),
        "vae": build_vae(architecture.vae, seed + 3),
        "text": build_text_encoder(architecture.text_encoder, seed + 4),
    }
    if architecture.t2v_transformer is not None:
        comps["t2v_high_noise"] = build_expert(architecture.t2v_transformer, seed + 5)
        comps["t2v_low_noise"] = build_expert(architecture.t2v_transformer, seed + 6)
    return comps
