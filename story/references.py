"""Reference images (a story's characters and places) checked before they become memory.

Images come from users, so they are untrusted: only PNG, JPEG and WebP, at most 64 MiB on disk,
at most 40 megapixels decoded (checked from the header before decoding, which defeats
decompression bombs), at least 16 px a side. Errors name the story field the path came from.

The daemon checks every submitted image here, so PIL is imported inside `open_reference_image`
only: the daemon's parent imports it when a story brings images, never at start-up.
"""

from __future__ import annotations

import os
import re

# The name an uploaded image is stored under (a file in the story's references folder): the CLI
# renames story-relative paths to fit it, the daemon refuses anything else.
REFERENCE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP")
MAX_FILE_BYTES = 64 << 20
MAX_PIXELS = 40_000_000
MIN_SIDE = 16


class ReferenceImageError(ValueError):
    pass


def open_reference_image(path: str | os.PathLike, field: str, *, max_pixels: int = MAX_PIXELS,
                         max_bytes: int = MAX_FILE_BYTES):
    """Decode a reference image to an RGB PIL image, or raise ReferenceImageError naming `field`."""
    from PIL import Image

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ReferenceImageError(f"{field}: no such image file {path}")
    size = os.path.getsize(path)
    if size > max_bytes:
        raise ReferenceImageError(f"{field}: {path} is {size} bytes; at most {max_bytes} allowed")
    try:
        with Image.open(path) as im:
            if im.format not in ALLOWED_FORMATS:
                raise ReferenceImageError(f"{field}: {path} is {im.format}; allowed: {', '.join(ALLOWED_FORMATS)}")
            w, h = im.size
            if w * h > max_pixels:
                raise ReferenceImageError(f"{field}: {path} is {w}x{h}; at most {max_pixels} pixels allowed")
            if min(w, h) < MIN_SIDE:
                raise ReferenceImageError(f"{field}: {path} is {w}x{h}; each side must be >= {MIN_SIDE}")
            im.draft("RGB", (w, h))
            rgb = im.convert("RGB")
            rgb.load()
    except ReferenceImageError:
        raise
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise ReferenceImageError(f"{field}: {path} is not a readable image: {exc}") from None
    return rgb
