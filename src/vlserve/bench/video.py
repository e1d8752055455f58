"""Video clips made in memory with PyAV: the synthetic videos of `vlserve bench --dataset random`
(each one different, so that no server cache helps) and the clips of the video tests and
benchmarks (``vlserve.testing.video`` imports them from here).

PyAV is imported only when a clip is made: the base bench install has no av, and
``pip install 'vlserve[video]'`` adds it. No numpy either: frames are built from bytes.
"""

from __future__ import annotations

import base64
import io
import logging
import random
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from vlserve.bench.config import DatasetConfig

log = logging.getLogger("vlserve.bench")

INSTALL_HINT = "synthetic videos need PyAV, which is not installed: pip install 'vlserve[video]'"
_FIRST_LEVEL, _LEVEL_STEP, _LEVELS = 16, 4, 56
_GRADIENT_STEP = 3  # grey levels a gradient moves per frame


class VideoSupportMissing(ImportError):
    """PyAV is not installed (the ``video`` extra)."""


def require_av() -> Any:
    """The ``av`` module, or ``VideoSupportMissing`` saying how to install it."""
    try:
        import av
    except ImportError as exc:
        raise VideoSupportMissing(INSTALL_HINT) from exc
    return av


def level(index: int) -> int:
    """The grey level of frame ``index`` of a flat clip: distinct from its neighbours, so a
    decoded frame's level tells which frame it is."""
    return _FIRST_LEVEL + (index % _LEVELS) * _LEVEL_STEP


def make_clip(
    width: int = 64,
    height: int = 48,
    frames: int = 20,
    fps: float = 10,
    *,
    codec: str = "libx264",
    container: str = "mp4",
    gop: int | None = None,
    gradient: bool = False,
    shift: tuple[int, int, int] = (0, 0, 0),
    rotation: int = 0,
    hflip: bool = False,
    vflip: bool = False,
    corner: bool = False,
) -> bytes:
    """A clip encoded in memory: flat frames at ``level(i)``, or a horizontal gradient moving
    ``_GRADIENT_STEP`` levels a frame (frames that differ everywhere, closer to real video for
    timing), each RGB channel shifted by ``shift``. H.264 and VP9 in 4:2:0 need even sizes.
    ``rotation``: the display matrix's counter-clockwise degrees (a phone's portrait video is
    landscape frames with -90), then ``hflip`` / ``vflip`` mirrors (FFmpeg's meaning); ``corner``
    whitens the top-left quarter of each frame, to see where a player shows it."""
    av = require_av()
    buffer = io.BytesIO()
    with av.open(buffer, "w", format=container) as output:
        options = {"preset": "ultrafast"} if codec == "libx264" else {}
        rate = Fraction(fps).limit_denominator(1001)
        stream = output.add_stream(codec, rate=rate, options=options)
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuvj420p" if codec == "mjpeg" else "yuv420p"
        if gop:
            stream.codec_context.gop_size = gop
        if rotation or hflip or vflip:
            stream.set_display_rotation(rotation, hflip=hflip, vflip=vflip)
        ramp = [int(k * 255 / (width - 1)) if width > 1 else 0 for k in range(width)]
        for i in range(frames):
            if gradient:
                moved = [i * _GRADIENT_STEP + s for s in shift]
                pixels = bytes(
                    v
                    for r in ramp
                    for v in ((r + moved[0]) % 256, (r + moved[1]) % 256, (r + moved[2]) % 256, 255)
                )
                rgba = pixels * height
            else:
                rgba = bytes((level(i),) * 3 + (255,)) * (width * height)
            if corner:
                row, white = 4 * width, 4 * (width // 4)
                top = b"\xff" * white + rgba[white:row]
                rgba = top * (height // 4) + rgba[row * (height // 4) :]
            # rgba: the one packed RGB format PyAV builds a frame from bytes in
            frame = av.VideoFrame.from_bytes(rgba, width, height, format="rgba")
            for packet in stream.encode(frame):
                output.mux(packet)
        for packet in stream.encode():
            output.mux(packet)
    return buffer.getvalue()


_SPREAD = 40503  # odd: a bijection of the 16-bit numbers that sends neighbours far apart
CLIP_NUMBERS = 1 << 24  # distinct clips


def clip_shift(number: int) -> tuple[int, int, int]:
    """The RGB shifts of synthetic clip ``number``. Two gradient frames are equal only when
    their channels' shifts differ from each other by the same amounts; here those differences
    are a bijection of the number's low 16 bits, so clips whose numbers differ there share no
    frame, and the high 8 bits shift all three channels."""
    base = (number >> 16) & 255
    mixed = (number * _SPREAD) & 0xFFFF
    return base, (base + (mixed & 255)) % 256, (base + (mixed >> 8)) % 256


def synthetic_clip(number: int, size: tuple[int, int], seconds: float, fps: float) -> bytes:
    """Synthetic clip ``number``: a moving gradient of ``seconds`` at ``fps``, MP4/H.264."""
    width, height = size
    frames = max(1, round(seconds * fps))
    return make_clip(width, height, frames, fps, gradient=True, shift=clip_shift(number))


def video_data_url(data: bytes, mime: str = "video/mp4") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


@dataclass(frozen=True)
class SyntheticVideos:
    """The videos of a synthetic run: ``per_request`` clips per request, sizes cycled within a
    request (as images are), every clip of the run different, sharing no frame with another
    (``clip_shift``); runs with other seeds start elsewhere among the 2**24 clips."""

    per_request: int
    sizes: tuple[tuple[int, int], ...]
    seconds: float
    fps: float
    start: int = 0  # the first clip's number, drawn from the seed: other seeds, other clips

    def urls(self, request_index: int) -> list[str]:
        """The data URLs of request ``request_index``'s clips (encoded now: before timing)."""
        first = self.start + request_index * self.per_request
        return [
            video_data_url(
                synthetic_clip(
                    (first + k) % CLIP_NUMBERS,
                    self.sizes[k % len(self.sizes)],
                    self.seconds,
                    self.fps,
                )
            )
            for k in range(self.per_request)
        ]


def synthetic_videos(config: DatasetConfig) -> SyntheticVideos | None:
    """The videos ``--random-videos`` asks for, or None; ``VideoSupportMissing`` without PyAV."""
    if config.kind != "random" or not config.random_videos:
        return None
    require_av()
    log.info(
        "encoding %d synthetic videos (%s, %g s at %g fps) before timing",
        config.num_random * config.random_videos,
        ", ".join(f"{w}x{h}" for w, h in config.random_video_sizes),
        config.random_video_seconds,
        config.random_video_fps,
    )
    return SyntheticVideos(
        per_request=config.random_videos,
        sizes=config.random_video_sizes,
        seconds=config.random_video_seconds,
        fps=config.random_video_fps,
        start=random.Random(f"video-{config.seed}").randrange(CLIP_NUMBERS),
    )
