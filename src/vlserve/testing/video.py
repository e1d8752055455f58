"""Video clips made in memory with PyAV, for the video tests and benchmarks (no files needed)."""

from __future__ import annotations

import io
import struct

import numpy as np


def level(index: int) -> int:
    """The grey level of frame ``index`` of a flat clip: distinct from its neighbours, so a
    decoded frame's level tells which frame it is."""
    return 16 + (index % 56) * 4


def make_clip(
    width: int = 64,
    height: int = 48,
    frames: int = 20,
    fps: int = 10,
    *,
    codec: str = "libx264",
    container: str = "mp4",
    gop: int | None = None,
    gradient: bool = False,
) -> bytes:
    """A clip encoded in memory: flat frames at ``level(i)``, or a moving gradient (frames
    that differ everywhere, closer to real video for timing)."""
    import av

    buffer = io.BytesIO()
    ramp = np.linspace(0, 255, width, dtype=np.float32)[None, :, None]
    with av.open(buffer, "w", format=container) as output:
        options = {"preset": "ultrafast"} if codec == "libx264" else {}
        stream = output.add_stream(codec, rate=fps, options=options)
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuvj420p" if codec == "mjpeg" else "yuv420p"
        if gop:
            stream.codec_context.gop_size = gop
        for i in range(frames):
            if gradient:
                image = np.broadcast_to((ramp + i * 3) % 256, (height, width, 3)).astype(np.uint8)
            else:
                image = np.full((height, width, 3), level(i), np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                output.mux(packet)
        for packet in stream.encode():
            output.mux(packet)
    return buffer.getvalue()


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
