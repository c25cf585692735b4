"""Hostile files the tests send: a PNG whose pixels are a decompression bomb."""
from __future__ import annotations

import struct
import zlib


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bomb(text_chunks: bytes, side: int = 12000) -> bytes:
    """A valid PNG of side x side black RGB pixels (432 MB decoded at 12000) in well under 1 MB, with
    ``text_chunks`` (whole chunks) after its pixels."""
    squeeze = zlib.compressobj(9)
    row = b"\0" * (1 + 3 * side)
    pixels = b"".join(squeeze.compress(row) for _ in range(side)) + squeeze.flush()
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0))
            + png_chunk(b"IDAT", pixels) + text_chunks + png_chunk(b"IEND", b""))
