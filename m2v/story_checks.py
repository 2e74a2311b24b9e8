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

from storyfarm.m2v.story_fields import FieldErrors


@dataclass(frozen=True)
class ModelLimits:
    spatial_multiple: int = 16     # VAE stride 8 x patch 2: width and height must be multiples
    temporal_stride: int = 4       # frame counts must be 4n+1
    fps: int = 16
    max_frames: int = 321
    min_side: int = 16
    max_side: int = 1920
    max_steps: int = 200


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


def _valid_neighbours(frames: Fraction, limits: ModelLimits) -> list[int]:
    """The valid frame counts (stride*n + 1, within 2..max_frames) just below and above `frames`."""
    stride = limits.temporal_stride
    below = (frames - 1) // stride * stride + 1
    return [f for f in (below, below + stride) if 1 < f <= limits.max_frames and f != frames]


def _use(options: list[str]) -> str:
    return f": use {' or '.join(options)}" if options else ""


def frames_of_duration(duration: float, path: str, limits: ModelLimits, errors: FieldErrors) -> int | None:
    """The frame count a duration gives, or None with an error when the model cannot render it."""
    exact = Fraction(repr(duration)) * limits.fps + 1  # the decimal the user wrote, not its binary float
    said = f"{duration!r} s at {limits.fps} fps is {float(exact):.6g} frames"
    if exact > limits.max_frames:
        longest = _as_duration(limits.max_frames, limits.fps)
        errors.add(path, f"{said}; the model allows at most {longest}")
    elif exact.denominator != 1 or (exact - 1) % limits.temporal_stride:
        options = [_as_duration(f, limits.fps) for f in _valid_neighbours(exact, limits)]
        errors.add(path, f"{said}; the model needs {limits.temporal_stride}n+1 frames{_use(options)}")
    else:
        return int(exact)
    return None


def check_frames(frames: int, path: str, limits: ModelLimits, errors: FieldErrors) -> None:
    if frames > limits.max_frames:
        errors.add(path, f"{frames} frames exceeds the model's maximum of {limits.max_frames}")
    elif (frames - 1) % limits.temporal_stride:
        options = [str(f) for f in _valid_neighbours(Fraction(frames), limits)]
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
