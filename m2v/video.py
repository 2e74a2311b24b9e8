"""Video and image files of a story: shot clips, the assembled story video, keyframe PNGs.

Role: the only place that touches PyAV and Pillow for output files, so every artifact the daemon
publishes is written the same way.

Invariants:
- Every file is written atomically: into a temporary file in the destination folder, fsynced, then
  `os.replace`d onto the final name (and the folder fsynced). A crash or an error leaves either the
  previous file or nothing under the final name, never half a file; temporaries are removed on error.
- Clips are H.264 (libx264) in yuv420p, which needs even width and height; odd sizes are refused
  rather than silently cropped.
- The story video is built from an explicit, ordered list of shot files, never from a folder glob
  (StoryMem's official pipeline globbed and picked up stray files).
"""

from __future__ import annotations

import collections
import functools
import itertools
import os
from collections.abc import Iterable, Iterator, Sequence
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from storyfarm.story.files import atomic_output
from storyfarm.story.references import open_reference_image

PathLike = str | os.PathLike

__all__ = [
    "concat_mp4",
    "contact_sheet",
    "load_reference_image",
    "probe_mp4",
    "read_frame",
    "read_last_frames",
    "read_mp4",
    "save_png",
    "write_mp4",
    "write_mp4_stream",
]




def _check_frames(frames: np.ndarray) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 [T, H, W, 3], got {frames.dtype} {list(frames.shape)}")
    if frames.shape[0] == 0:
        raise ValueError("cannot write a video with no frames")
    return frames


def _check_even(height: int, width: int, what: str) -> None:
    if height % 2 or width % 2:
        raise ValueError(f"{what}: H.264 yuv420p needs even width and height, got {width}x{height}")


# BT.601 limited range, the matrix decoders assume for untagged SD/HD-ish H.264 and the one PyAV
# uses to convert back to RGB: rows give Y, Cb, Cr from R, G, B in 0..255.
_BT601 = np.array(
    [[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]], dtype=np.float64
)
_RANGE = np.array([219.0, 224.0, 224.0]) / 255.0
_OFFSET = np.array([16.0, 128.0, 128.0])


def _plane_bytes(values: np.ndarray, line_size: int) -> bytes:
    """A plane's whole buffer: the rows, each padded to `line_size` by repeating its last pixel."""
    return np.pad(values, ((0, 0), (0, line_size - values.shape[1])), mode="edge").tobytes()


def yuv420_frame(rgb: np.ndarray) -> av.VideoFrame:
    """uint8 RGB [H, W, 3] -> a yuv420p frame whose every byte, line padding included, is set.

    Published shots must keep their sha256 for a given seed, so nothing the encoder may read is
    left to chance: FFmpeg leaves a new frame's line padding uninitialised and SIMD code may read
    past the visible width. Converting here also pins the colour matrix (BT.601, limited range,
    what decoders and PyAV assume for untagged streams) instead of whatever swscale defaults to.
    """
    height, width, _ = rgb.shape
    ycc = rgb.astype(np.float64) @ _BT601.T  # [H, W, 3]
    luma = np.clip(np.rint(ycc[..., 0] * _RANGE[0] + _OFFSET[0]), 0, 255).astype(np.uint8)
    # chroma: mean over each 2x2 block, then scaled; yuv420p needs even sizes (checked by callers)
    blocks = ycc[..., 1:].reshape(height // 2, 2, width // 2, 2, 2).mean(axis=(1, 3))
    chroma = np.clip(np.rint(blocks * _RANGE[1:] + _OFFSET[1:]), 0, 255).astype(np.uint8)
    frame = av.VideoFrame(width, height, "yuv420p")
    for plane, values in zip(frame.planes, (luma, chroma[..., 0], chroma[..., 1])):
        plane.update(_plane_bytes(values, plane.line_size))
    return frame


# x264 instruction sets by /proc/cpuinfo flag. AVX-512 is left out on purpose: with its AVX-512
# kernels, libx264 (as PyAV ships it) encoded the same frames to different bytes from run to run
# (26 of 26 runs identical without them, two outcomes with them, seen here), and published shots
# must keep their sha256. AVX2 is within a few percent for encoding.
_X264_CPU_FLAGS = (
    ("mmxext", "MMX2"), ("sse2", "SSE2Fast"), ("ssse3", "SSSE3"), ("sse4_1", "SSE4"), ("sse4_2", "SSE4.2"),
    ("avx", "AVX"), ("fma", "FMA3"), ("bmi1", "BMI1"), ("bmi2", "BMI2"), ("avx2", "AVX2"), ("abm", "LZCNT"),
)


def x264_asm(cpuinfo: str) -> str | None:
    """x264's `asm` list for the CPU described by /proc/cpuinfo text, AVX-512 excluded; None when
    the CPU does not say (leave x264 to detect: never name an instruction set the CPU lacks)."""
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            present = set(line.split(":", 1)[1].split())
            names = [name for flag, name in _X264_CPU_FLAGS if flag in present]
            return ",".join(names) if names else None
    return None


@functools.lru_cache(maxsize=8)
def _x264_options(crf: int) -> dict[str, str]:
    # One encoder thread: with frame threads libx264's output is not guaranteed to repeat either.
    options = {"crf": str(int(crf)), "threads": "1"}
    try:
        with open("/proc/cpuinfo") as f:
            asm = x264_asm(f.read())
    except OSError:
        asm = None
    if asm:
        options["x264-params"] = f"asm={asm}"
    return options


def _encode(path: Path, frames: Iterable[np.ndarray], width: int, height: int, fps: int, crf: int) -> None:
    """Encode RGB frames (each uint8 [H, W, 3]) into an mp4 at `path` (not atomic by itself)."""
    with av.open(str(path), mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=int(fps))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = dict(_x264_options(crf))
        stream.codec_context.thread_count = 1
        time_base = Fraction(1, int(fps))
        for index, rgb in enumerate(frames):
            frame = yuv420_frame(np.asarray(rgb))
            # Explicit timestamps: rate control and the container read frame timing from them.
            frame.pts, frame.time_base = index, time_base
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


def _decode(path: PathLike) -> Iterator[np.ndarray]:
    with av.open(str(path)) as container:
        for frame in container.decode(video=0):
            yield frame.to_ndarray(format="rgb24")


def write_mp4(path: PathLike, frames: np.ndarray, fps: int, *, crf: int = 18) -> None:
    """Write uint8 RGB frames [T, H, W, 3] as an H.264 mp4, atomically."""
    frames = _check_frames(frames)
    _, height, width, _ = frames.shape
    _check_even(height, width, str(path))
    if fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    with atomic_output(path) as tmp:
        _encode(tmp, frames, width, height, fps, crf)


def write_mp4_stream(path: PathLike, frames: Iterable[np.ndarray], fps: int, *, crf: int = 18) -> int:
    """Write uint8 RGB frames [H, W, 3] as they arrive (a long shot is never held whole), atomically,
    byte for byte as write_mp4 would write the same frames; returns how many were written."""
    if fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    iterator = iter(frames)
    first = next(iterator, None)
    if first is None:
        raise ValueError("cannot write a video with no frames")
    first = _check_frames(np.asarray(first)[None])[0]
    height, width, _ = first.shape
    _check_even(height, width, str(path))
    written = 0

    def counted() -> Iterator[np.ndarray]:
        nonlocal written
        for frame in itertools.chain([first], iterator):
            if np.shape(frame) != first.shape:
                raise ValueError(f"{path}: frame {written} is {list(np.shape(frame))}, the first was {list(first.shape)}")
            written += 1
            yield frame

    with atomic_output(path) as tmp:
        _encode(tmp, counted(), width, height, fps, crf)
    return written


def read_last_frames(path: PathLike, count: int) -> np.ndarray:
    """The last `count` frames of a video (uint8 RGB [k, H, W, 3]), holding no more than that."""
    last = collections.deque(_decode(path), maxlen=max(0, count))
    if not last:
        info = probe_mp4(path)
        return np.empty((0, info["height"], info["width"], 3), dtype=np.uint8)
    return np.stack(last)


def read_frame(path: PathLike, index: int) -> np.ndarray:
    """Frame `index` of a video (uint8 RGB [H, W, 3]), decoding no further than it."""
    for n, frame in enumerate(_decode(path)):
        if n == index:
            return frame
    raise IndexError(f"{path}: no frame {index}")


def read_mp4(path: PathLike) -> np.ndarray:
    """Decode every frame of a video into uint8 RGB [T, H, W, 3]."""
    frames = list(_decode(path))
    if not frames:
        info = probe_mp4(path)
        return np.empty((0, info["height"], info["width"], 3), dtype=np.uint8)
    return np.stack(frames)


def probe_mp4(path: PathLike) -> dict:
    """Frame count, size, frame rate, codec and duration of a video's first video stream."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = stream.frames or sum(1 for _ in container.decode(video=0))
        fps = float(stream.average_rate or stream.guessed_rate or 0)
        if stream.duration is not None and stream.time_base is not None:
            duration = float(stream.duration * stream.time_base)
        elif container.duration is not None:
            duration = container.duration / av.time_base
        else:
            duration = frames / fps if fps else 0.0
        return {
            "frames": int(frames),
            "width": stream.codec_context.width,
            "height": stream.codec_context.height,
            "fps": fps,
            "codec": stream.codec_context.name,
            "duration_s": duration,
        }


def concat_mp4(out_path: PathLike, files: Sequence[PathLike], fps: int, *, crf: int = 18) -> None:
    """Assemble the story video from shot files, in exactly the order given, atomically.

    Frames are decoded and re-encoded one at a time (shots are short; memory stays flat). Every
    input must have the size of the first; the error names the file that differs.
    """
    if isinstance(files, (str, bytes, os.PathLike)):
        raise TypeError("files must be an explicit ordered list of shot files, not a single path or glob")
    files = [Path(f) for f in files]
    if not files:
        raise ValueError("concat_mp4 needs at least one shot file")
    sizes = [(info["width"], info["height"]) for info in map(probe_mp4, files)]
    width, height = sizes[0]
    for f, size in zip(files, sizes):
        if size != (width, height):
            raise ValueError(f"{f}: size {size[0]}x{size[1]} differs from {files[0]} ({width}x{height})")
    _check_even(height, width, str(files[0]))

    def frames() -> Iterator[np.ndarray]:
        for f in files:
            yield from _decode(f)

    with atomic_output(out_path) as tmp:
        _encode(tmp, frames(), width, height, fps, crf)


def _check_image(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"image must be uint8 [H, W, 3], got {image.dtype} {list(image.shape)}")
    return image


def _save_pil(image: Image.Image, path: PathLike) -> None:
    with atomic_output(path) as tmp:
        image.save(tmp, format="PNG")


def save_png(path: PathLike, image_uint8_hwc: np.ndarray) -> None:
    """Write one RGB image as PNG, atomically (lossless: it reads back bit-exact)."""
    _save_pil(Image.fromarray(_check_image(image_uint8_hwc), mode="RGB"), path)


def contact_sheet(
    tiles: Sequence[tuple[str, np.ndarray]],
    path: PathLike,
    *,
    columns: int = 6,
    tile_width: int = 192,
) -> None:
    """A grid of labelled thumbnails (label under each tile), row-major, written atomically as PNG.

    Every cell is `tile_width` wide and as tall as the tallest scaled thumbnail plus one text line;
    labels too wide for the cell are shortened with an ellipsis (...).
    """
    if not tiles:
        raise ValueError("contact_sheet needs at least one tile")
    if columns <= 0 or tile_width <= 0:
        raise ValueError("columns and tile_width must be positive")
    font = ImageFont.load_default()
    thumbs = []
    for _, image in tiles:
        img = Image.fromarray(_check_image(image), mode="RGB")
        height = max(1, round(img.height * tile_width / img.width))
        thumbs.append(img.resize((tile_width, height), Image.Resampling.BICUBIC))
    pad = 2
    _, top, _, bottom = font.getbbox("Ag")
    label_h = bottom - top + 2 * pad
    cell_h = max(t.height for t in thumbs) + label_h
    cols = min(columns, len(tiles))
    rows = -(-len(tiles) // cols)
    sheet = Image.new("RGB", (cols * tile_width, rows * cell_h), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for n, ((label, _), thumb) in enumerate(zip(tiles, thumbs)):
        x, y = (n % cols) * tile_width, (n // cols) * cell_h
        sheet.paste(thumb, (x, y))
        text = _fit_label(str(label), font, tile_width - 2 * pad)
        draw.text((x + pad, y + cell_h - label_h + pad - top), text, fill=(0, 0, 0), font=font)
    _save_pil(sheet, path)


def _fit_label(text: str, font: ImageFont.ImageFont | ImageFont.FreeTypeFont, width: int) -> str:
    if font.getlength(text) <= width:
        return text
    while text and font.getlength(text + "...") > width:
        text = text[:-1]
    return text + "..."


def load_reference_image(path: PathLike, field: str, **limits) -> np.ndarray:
    """A reference image as uint8 RGB [H, W, 3], checked by `storyfarm.story.references` (its
    errors name `field`); `limits` are that check's max_pixels and max_bytes."""
    return np.asarray(open_reference_image(path, field, **limits), dtype=np.uint8).copy()
