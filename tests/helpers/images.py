"""Image bytes for tests: good PNGs, noise that does not compress, and hostile files (bombs,
corrupt chunks, formats the daemon refuses), built in code so no binary fixture is checked in."""

from __future__ import annotations

import io
import os
import random
import struct
import zlib

from PIL import Image


def png(width: int, height: int, noise: bool = False) -> bytes:
    if noise:  # random pixels do not compress: the file is about width * height * 3 bytes
        image = Image.frombytes("RGB", (width, height), os.urandom(width * height * 3))
    else:
        image = Image.new("RGB", (width, height), (40, 90, 160))
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def encoded(fmt: str, width: int = 64, height: int = 64, **save) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (200, 120, 40)).save(out, format=fmt, **save)
    return out.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header_bomb(width: int = 65_535, height: int = 65_535) -> bytes:
    """A few hundred bytes that claim width x height pixels (a decompression bomb by its header)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 1024, 9)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def png_text_bomb() -> bytes:
    """A valid 32x32 PNG with a zTXt chunk that inflates to 64 MiB (a zip bomb in metadata)."""
    image = png(32, 32)
    bomb = _chunk(b"zTXt", b"comment\0\0" + zlib.compress(b"A" * (64 << 20), 9))
    return image[:33] + bomb + image[33:]  # right after IHDR (8 signature + 25 IHDR bytes)


def png_broken_chunk() -> bytes:
    """A 64x64 PNG in several IDAT chunks whose second chunk type is garbage: Pillow notices only
    while decoding, and says so with a SyntaxError rather than an OSError."""
    import PIL.ImageFile as ImageFile

    image = Image.frombytes("RGB", (64, 64), random.Random(0).randbytes(64 * 64 * 3))
    old, ImageFile.MAXBLOCK = ImageFile.MAXBLOCK, 1024
    try:
        out = io.BytesIO()
        image.save(out, format="PNG")
    finally:
        ImageFile.MAXBLOCK = old
    data, pos, idats = bytearray(out.getvalue()), 8, []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        if data[pos + 4:pos + 8] == b"IDAT":
            idats.append(pos)
        pos += 12 + length
    assert len(idats) >= 2, "expected several IDAT chunks"
    data[idats[1] + 4:idats[1] + 8] = b"_\xd4a\xcf"
    return bytes(data)
