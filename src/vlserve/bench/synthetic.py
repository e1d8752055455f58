"""Synthetic load without data: random text of a given token length, random PNG images, and
the videos ``vlserve.bench.video`` makes."""

from __future__ import annotations

import base64
import random
import struct
import zlib
from collections.abc import Sequence

# Common English words that are each one token, with their leading space, in the Qwen2/Qwen3
# vocabulary (checked with the real BPE ranks) and in most other byte-level BPE vocabularies:
# n random words make a prompt of about n tokens without needing a tokenizer installed.
_WORDS = """the of and to in is was for on that with as by at from his it an were are which this be or
    has had not but one first new after their also its other two they who more been her all into
    time over when would only most up she may some out these can about year city there many school
    three such than world then both where between people part later under state he during made
    used known national well while him them second being through film team what war before our we
    you high university north south east west great small large long little own old right left
    good best water river house light music game book story place home family area life work day
    night town road group power public early century number name line point case fact form
    order"""
WORDS: tuple[str, ...] = tuple(_WORDS.split())


def random_text(num_tokens: int, rng: random.Random) -> str:
    """About ``num_tokens`` tokens of random words; random so that no prefix cache can help."""
    return " ".join(rng.choices(WORDS, k=max(0, num_tokens)))


def png_bytes(width: int, height: int, rgb: bytes) -> bytes:
    """Encode ``width*height*3`` bytes of RGB pixels as a PNG (no Pillow in the base install)."""
    if len(rgb) != width * height * 3:
        raise ValueError(f"expected {width * height * 3} bytes of RGB, got {len(rgb)}")
    stride = width * 3
    # Filter type 0 (none) before each row.
    raw = b"".join(b"\x00" + rgb[y * stride : (y + 1) * stride] for y in range(height))

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    # Noise does not compress: level 1 costs little and keeps smooth test images small.
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw, 1))
        + chunk(b"IEND", b"")
    )


def random_png(width: int, height: int, rng: random.Random) -> bytes:
    """A PNG of random noise: distinct per call, so servers cannot reuse cached image features."""
    return png_bytes(width, height, rng.randbytes(width * height * 3))


def png_data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def parse_size(text: str) -> tuple[int, int]:
    """``"448x448"`` → (448, 448)."""
    width, sep, height = text.lower().partition("x")
    try:
        size = (int(width), int(height))
    except ValueError:
        size = (0, 0)
    if not sep or size[0] <= 0 or size[1] <= 0:
        raise ValueError(f"image size must look like WIDTHxHEIGHT, got {text!r}")
    return size


def synthetic_messages(
    rng: random.Random,
    input_len: int,
    image_sizes: tuple[tuple[int, int], ...],
    num_images: int,
    video_urls: Sequence[str] = (),
) -> list[dict[str, object]]:
    """One user message: ``num_images`` random images (sizes cycled), the videos (data URLs
    made by ``vlserve.bench.video``), then random text."""
    parts: list[dict[str, object]] = []
    for index in range(num_images):
        width, height = image_sizes[index % len(image_sizes)]
        url = png_data_url(random_png(width, height, rng))
        parts.append({"type": "image_url", "image_url": {"url": url}})
    parts += [{"type": "video_url", "video_url": {"url": url}} for url in video_urls]
    parts.append({"type": "text", "text": random_text(input_len, rng)})
    return [{"role": "user", "content": parts}]
