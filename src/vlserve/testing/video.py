"""Video clips made in memory with PyAV, for the video tests and benchmarks (no files needed).

The clip maker itself lives with the benchmark client (``vlserve.bench.video``), which makes
synthetic videos with it; this module adds what only tests need (audio-only files, patched
headers)."""

from __future__ import annotations

import io
import struct

import numpy as np

from vlserve.bench.video import level, make_clip

__all__ = ["level", "make_audio", "make_clip", "patch_box"]


def make_audio(container: str = "mp4") -> bytes:
    """A short silent audio-only file: AAC in MP4, or PCM in WAV."""
    import av

    buffer = io.BytesIO()
    codec = "pcm_s16le" if container == "wav" else "aac"
    sample_format = "s16" if container == "wav" else "fltp"
    with av.open(buffer, "w", format=container) as output:
        stream = output.add_stream(codec, rate=8000, layout="mono")
        for i in range(4):
            samples = np.zeros((1, 1024), np.int16 if sample_format == "s16" else np.float32)
            frame = av.AudioFrame.from_ndarray(samples, format=sample_format, layout="mono")
            frame.sample_rate, frame.pts = 8000, i * 1024
            for packet in stream.encode(frame):
                output.mux(packet)
        for packet in stream.encode():
            output.mux(packet)
    return buffer.getvalue()


def patch_box(data: bytes, path: list[bytes], offset: int, value: int) -> bytes:
    """Overwrite a big-endian u32 at ``offset`` in the payload of the MP4 box at ``path``."""
    start, end, found = 0, len(data), 0
    for name in path:
        position = start
        while position + 8 <= end:
            size, kind = struct.unpack(">I4s", data[position : position + 8])
            if kind == name:
                found, start, end = position, position + 8, position + size
                break
            position += max(size, 8)
        else:
            raise KeyError(name)
    patched = bytearray(data)
    struct.pack_into(">I", patched, found + 8 + offset, value)
    return bytes(patched)
