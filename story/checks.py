"""Model-dependent rules for story values: frame counts, durations, resolutions, steps.

They depend on the model preset (VAE strides, patch size, fps), so they are checked apart from
the story's structure, by story.check_against_model, against a ModelLimits the preset gives.
Invariant: a value the model cannot take is refused with the nearest values it can take, never
rounded: a 5.1 s shot is not silently rendered as 5.0 s, an 830-pixel side is not cropped to 832.
Durations are read as the decimal the user wrote (5.1 means 51/10, not its binary float), so a
duration is valid exactly when duration * fps + 1 is a whole stride*n + 1 frame count.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

from storyfarm.story.fields import FieldErrors


@dataclass(frozen=True)
class ModelLimits:
    spatial_multiple: int = 16     # VAE stride 8 x patch 2: width and height must be multiples
    temporal_stride: int = 4       # frame counts must be 4n+1
    fps: int = 16
    max_frames: int = 321           # the longest shot rendered in one pass (mode m2v)
    min_side: int = 16
    max_side: int = 1920
    max_steps: int = 200
    native_frames: int | None = None  # the model's native length: longer shots use FIFO (mode auto)
    max_fifo_frames: int = 4801     # the longest shot FIFO renders (5 min at 16 fps)
    memory_slots: int | None = None  # keyframes in a shot's memory window; references must leave one free


def check_steps(steps: int, path: str, limits: ModelLimits, errors: FieldErrors) -> None:
    if steps > limits.max_steps:
        errors.add(path, f"{steps} steps exceeds the model's maximum of {limits.max_steps}")


def _as_duration(frames: int, fps: int) -> str:
    """A frame count as the duration that gives it, or as `frames: N` when no short decimal does."""
    exact = Fraction(frames - 1, fps)
    denominator = exact.denominator
    for prime in (2, 5):
        while denominator % prime == 0:
            denominator //= prime
    return f"{float(exact)!r} s ({frames} frames)" if denominator == 1 else f"frames: {frames}"


def _valid_neighbours(frames: Fraction, limits: ModelLimits, longest: int | None = None) -> list[int]:
    """The valid frame counts (stride*n + 1, within 2..longest) just below and above `frames`."""
    stride = limits.temporal_stride
    longest = limits.max_frames if longest is None else longest
    below = (frames - 1) // stride * stride + 1
    return [f for f in (below, below + stride) if 1 < f <= longest and f != frames]


def _use(options: list[str]) -> str:
    return f": use {' or '.join(options)}" if options else ""


def frames_of_duration(duration: float, path: str, limits: ModelLimits, errors: FieldErrors,
                       longest: int | None = None) -> int | None:
    """The frame count a duration gives, or None with an error when the model cannot render it
    (`longest`: the most frames allowed, default the one-pass maximum)."""
    longest = limits.max_frames if longest is None else longest
    exact = Fraction(repr(duration)) * limits.fps + 1  # the decimal the user wrote, not its binary float
    said = f"{duration!r} s at {limits.fps} fps is {float(exact):.6g} frames"
    if exact > longest:
        errors.add(path, f"{said}; the model allows at most {_as_duration(longest, limits.fps)}")
    elif exact.denominator != 1 or (exact - 1) % limits.temporal_stride:
        options = [_as_duration(f, limits.fps) for f in _valid_neighbours(exact, limits, longest)]
        errors.add(path, f"{said}; the model needs {limits.temporal_stride}n+1 frames{_use(options)}")
    else:
        return int(exact)
    return None


def check_frames(frames: int, path: str, limits: ModelLimits, errors: FieldErrors,
                 longest: int | None = None) -> None:
    longest = limits.max_frames if longest is None else longest
    if frames > longest:
        errors.add(path, f"{frames} frames exceeds the model's maximum of {longest}")
    elif (frames - 1) % limits.temporal_stride:
        options = [str(f) for f in _valid_neighbours(Fraction(frames), limits, longest)]
        errors.add(path, f"{frames} is not {limits.temporal_stride}n+1 frames{_use(options)}")


def check_resolution(resolution: tuple[int, int], path: str, limits: ModelLimits,
                     errors: FieldErrors) -> None:
    multiple = limits.spatial_multiple
    smallest = -(-limits.min_side // multiple) * multiple
    largest = limits.max_side // multiple * multiple
    problems = []
    for side, size in zip(("width", "height"), resolution):
        if size < limits.min_side:
            problems.append(f"{side} {size} is below the minimum of {limits.min_side}"
                            f" (nearest valid: {smallest})")
        elif size > limits.max_side:
            problems.append(f"{side} {size} is above the maximum of {limits.max_side}"
                            f" (nearest valid: {largest})")
        elif size % multiple:
            below = size // multiple * multiple
            nearest = [str(n) for n in (below, below + multiple) if smallest <= n <= largest]
            problems.append(f"{side} {size} is not a multiple of {multiple}"
                            f" (nearest valid: {' or '.join(nearest)})")
    if problems:
        errors.add(path, f"{resolution[0]}x{resolution[1]} does not fit the model: {'; '.join(problems)}")


def longest_shot(mode: str, limits: ModelLimits) -> int:
    """The most frames a shot of `mode` may have: one pass for m2v (and for auto on a model with
    no native length), FIFO's maximum otherwise."""
    if mode == "m2v" or (mode == "auto" and limits.native_frames is None):
        return limits.max_frames
    return max(limits.max_fifo_frames, limits.max_frames if mode == "auto" else 0)


def resolve_mode(mode: str, frames: int | None, limits: ModelLimits) -> str:
    """`auto` becomes fifo for a shot longer than the model's native length, m2v otherwise; it
    stays auto for a shot without a length of its own (the renderer decides with the final one)."""
    if mode != "auto" or frames is None:
        return mode
    native = limits.native_frames
    return "fifo" if native is not None and frames > native else "m2v"


def check_references(count: int, path: str, limits: ModelLimits, errors: FieldErrors) -> None:
    """References are kept for good in the memory window; at least one slot must stay for the
    keyframes of recent shots, or shots would lose sight of each other."""
    slots = limits.memory_slots
    if slots is not None and slots >= 2 and count > slots - 1:
        errors.add(path, f"{count} reference images; the memory window holds {slots} keyframes and keeps every "
                         f"reference, so at most {slots - 1} (one slot stays for recent shots)")
