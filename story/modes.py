"""Story options beyond one-pass M2V: FIFO long shots, Consistent Self-Attention, labelled references.

Why a module of their own: these options change how a shot is rendered (diagonal denoising, an
attention processor, the story's initial memory) rather than what it shows, and each has a small
schema with its own rules. They are read here with the same field readers as the rest of a story
(every problem reported at the path where it was written, nothing coerced) and stay pure Python,
so the daemon validates them at submit time without torch.

- `fifo: {partitions: n, lookahead: bool}` (story default or per shot): how a long shot is
  denoised; unset keys fall back to the preset. `mode: fifo` forces FIFO for a shot; a shot longer
  than the preset's native length uses it anyway (`mode: auto`, the default).
- `csa: {rate, identity_shots, blocks, steps, bank_tokens, memory}` (story level only): StoryDiffusion's
  Consistent Self-Attention for presets without the StoryMem LoRA.
- `references`: a list of image paths, or a mapping from a character or place to one or several
  image paths (`{lena: [front.png, side.png], harbour: harbour.png}`); labels travel with the images
  into the memory bank.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

from storyfarm.story.fields import (
    MAX_REFERENCES, FieldError, FieldErrors, StoryValidationError, check_keys, child, describe, read_bool,
    read_int, read_number, read_references, read_text,
)

MODES = ("auto", "m2v", "fifo")
FIFO_KEYS = ("partitions", "lookahead")
CSA_KEYS = ("rate", "identity_shots", "blocks", "steps", "bank_tokens", "memory")
MAX_PARTITIONS = 16
MAX_BANK_TOKENS = 1 << 16
MAX_LABEL_CHARS = 64


@dataclass(frozen=True)
class FifoOptions:
    """FIFO-Diffusion settings of a shot; None means the preset's value."""

    partitions: int | None = None
    lookahead: bool | None = None


@dataclass(frozen=True)
class CsaOptions:
    """Consistent Self-Attention settings of a story.

    rate: fraction of an identity shot's tokens sampled into the bank (0 disables the exchange).
    identity_shots: how many leading shots write to the bank (every shot reads it).
    blocks: transformer block indices that exchange tokens (None: every eighth, from block 0).
    steps: leading denoising steps that exchange tokens (None: the first quarter, where identity forms).
    bank_tokens: most tokens one identity shot keeps per (step, block): bounds the bank.
    memory: also condition on StoryMem memory (only for presets with the StoryMem LoRA).
    """

    rate: float = 0.5
    identity_shots: int = 3
    blocks: tuple[int, ...] | None = None
    steps: int | None = None
    bank_tokens: int = 256
    memory: bool = False


def renders_fifo(mode: str, frames: int, native_frames: int) -> bool:
    """Whether a shot of `frames` frames renders by FIFO: `mode: fifo`, or `auto` beyond the native length."""
    return mode == "fifo" or (mode == "auto" and frames > native_frames)


class LabelledReferences(NamedTuple):
    paths: tuple[str, ...]
    labels: tuple[str | None, ...]


def read_fifo(value: Any, path: str, errors: FieldErrors) -> FifoOptions | None:
    if not isinstance(value, dict):
        errors.add(path, f"expected a mapping with {' and/or '.join(FIFO_KEYS)}, got {describe(value)}")
        return None
    check_keys(value, path, FIFO_KEYS, errors)
    partitions = lookahead = None
    if "partitions" in value:
        partitions = read_int(value["partitions"], child(path, "partitions"), errors, minimum=1,
                              below=MAX_PARTITIONS + 1, below_text=str(MAX_PARTITIONS + 1))
    if "lookahead" in value:
        lookahead = read_bool(value["lookahead"], child(path, "lookahead"), errors)
    return FifoOptions(partitions, lookahead)


def read_csa(value: Any, path: str, errors: FieldErrors) -> CsaOptions | None:
    if value is True:
        return CsaOptions()
    if not isinstance(value, dict):
        errors.add(path, f"expected true or a mapping with some of {', '.join(CSA_KEYS)}, got {describe(value)}")
        return None
    check_keys(value, path, CSA_KEYS, errors)
    options: dict[str, Any] = {}
    if "rate" in value:
        rate = read_number(value["rate"], child(path, "rate"), errors, strict=False, what="a sampling rate")
        if rate is not None and rate > 1:
            errors.add(child(path, "rate"), f"expected a sampling rate from 0 to 1, got {describe(value['rate'])}")
        elif rate is not None:
            options["rate"] = rate
    for key, minimum, below in (("identity_shots", 1, None), ("steps", 0, None), ("bank_tokens", 1, MAX_BANK_TOKENS + 1)):
        if key in value:
            number = read_int(value[key], child(path, key), errors, minimum=minimum, below=below,
                              below_text=str(below))
            if number is not None:
                options[key] = number
    if "blocks" in value:
        blocks = _read_blocks(value["blocks"], child(path, "blocks"), errors)
        if blocks is not None:
            options["blocks"] = blocks
    if "memory" in value:
        memory = read_bool(value["memory"], child(path, "memory"), errors)
        if memory is not None:
            options["memory"] = memory
    return CsaOptions(**options)


def _read_blocks(value: Any, path: str, errors: FieldErrors) -> tuple[int, ...] | None:
    if not isinstance(value, (list, tuple)) or not value:
        errors.add(path, f"expected a non-empty list of transformer block indices, got {describe(value)}")
        return None
    blocks = [read_int(v, f"{path}[{i}]", errors, minimum=0) for i, v in enumerate(value)]
    if any(b is None for b in blocks):
        return None
    if len(set(blocks)) != len(blocks):
        errors.add(path, "lists a block more than once")
        return None
    return tuple(sorted(blocks))


def read_labelled_references(value: Any, path: str, errors: FieldErrors, base_dir: str) -> LabelledReferences | None:
    """A list of image paths, or {character or place: path or [paths]}; paths resolved as files."""
    if not isinstance(value, dict):
        paths = read_references(value, path, errors, base_dir)
        return None if paths is None else LabelledReferences(paths, (None,) * len(paths))
    if not value:
        errors.add(path, "expected at least one character or place with its images, got an empty mapping")
        return None
    total = sum(len(v) if isinstance(v, (list, tuple)) else 1 for v in value.values())
    if total > MAX_REFERENCES:
        errors.add(path, f"has {total} images; the limit is {MAX_REFERENCES}")
        return None
    paths: list[str] = []
    labels: list[str] = []
    ok = True
    for label, images in value.items():
        where = child(path, label)
        if not isinstance(label, str) or not label.strip() or len(label) > MAX_LABEL_CHARS or not label.isprintable():
            errors.add(where, f"a character or place name must be 1 to {MAX_LABEL_CHARS} printable characters")
            ok = False
            continue
        listed = list(images) if isinstance(images, (list, tuple)) else [images]
        if not listed:
            errors.add(where, "expected one or more image paths, got an empty list")
            ok = False
            continue
        found = read_references(listed, where, errors, base_dir)
        if found is None:
            ok = False
            continue
        paths += found
        labels += [label] * len(found)
    return LabelledReferences(tuple(paths), tuple(labels)) if ok else None


EDIT_KEYS = ("prompt", "strength", "seed")


@dataclass(frozen=True)
class ShotEdit:
    """A re-render's changes to one shot: a new prompt, a strength (how far back toward noise the
    previous take is pushed before denoising again: 1 or None = from pure noise, 0.3 = keep most of
    it), a seed for a different take. None leaves the shot's own value."""

    prompt: str | None = None
    strength: float | None = None
    seed: int | None = None

    def as_dict(self) -> dict:
        return {k: v for k, v in (("prompt", self.prompt), ("strength", self.strength), ("seed", self.seed)) if v is not None}


def read_edit(value: Any, path: str = "edit") -> ShotEdit | None:
    """An edit from a dict ({"prompt", "strength", "seed"}), validated like story fields; raises
    StoryValidationError listing every problem (e.g. `edit.strength: expected ... from 0 to 1`)."""
    if value is None or isinstance(value, ShotEdit):
        return value
    errors = FieldErrors()
    if not isinstance(value, dict):
        raise StoryValidationError([FieldError(path, f"expected a mapping with some of {', '.join(EDIT_KEYS)}, got {describe(value)}")])
    check_keys(value, path, EDIT_KEYS, errors)
    prompt = strength = seed = None
    if value.get("prompt") is not None:
        prompt = read_text(value["prompt"], child(path, "prompt"), errors)
    if value.get("strength") is not None:
        strength = read_number(value["strength"], child(path, "strength"), errors, what="a strength")
        if strength is not None and strength > 1:
            errors.add(child(path, "strength"), f"expected a strength of at most 1, got {describe(value['strength'])}")
            strength = None
    if value.get("seed") is not None:
        seed = read_int(value["seed"], child(path, "seed"), errors, minimum=0, below=2**63, below_text="2**63")
    errors.raise_if_any("edit")
    return ShotEdit(prompt, strength, seed)
