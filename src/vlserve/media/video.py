"""Untrusted video bytes → sampled RGB frames plus the metadata Qwen3-VL's video processor needs.

PyAV (FFmpeg bundled in its wheel) decodes; only the MP4/QuickTime and Matroska/WebM demuxers
ever see the bytes (the container is sniffed here and forced, so FFmpeg never probes, and never
reaches its playlist or concat demuxers), and only the codecs in ``ALLOWED_CODECS`` decode them.
Frames are sampled at ``fps`` and reached by seeking (keyframe, then decoding forward), so the
cost follows the number of sampled frames, not the length of the video (docs/media.md).
"""

from __future__ import annotations

import hashlib
import io
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import av
import numpy as np
from av.video.reformatter import VideoReformatter

from vlserve.errors import MediaError
from vlserve.media.decode import fit_within
from vlserve.media.orientation import orientation, upright

# FFmpeg demuxer forced for each container we accept, by its signature.
_MP4_BOXES: frozenset[bytes] = frozenset({b"ftyp", b"moov", b"mdat", b"free", b"skip", b"wide"})
_EBML = b"\x1a\x45\xdf\xa3"
# ISO-BMFF brands that are still images (HEIF/AVIF), refused like other images.
_IMAGE_BRANDS: frozenset[bytes] = frozenset(
    {b"avif", b"avis", b"heic", b"heix", b"heim", b"heis", b"mif1", b"msf1"}
)
# Image signatures, only to word the refusal: images have their own path (image_url).
_IMAGE_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"GIF87a", "gif"),
    (b"GIF89a", "gif"),
    (b"\xff\xd8\xff", "jpeg"),
    (b"BM", "bmp"),
)
ALLOWED_CONTAINERS = "mp4/mov, webm/mkv"
# FFmpeg decoder names; everything else (mjpeg, prores, rawvideo, ...) is refused by name.
ALLOWED_CODECS: frozenset[str] = frozenset({"h264", "hevc", "vp8", "vp9", "av1", "mpeg4"})
# Qwen's processor refuses frames more elongated than this.
MAX_ASPECT_RATIO = 200.0
# Seek when the next sampled frame is further ahead than this; decode forward otherwise.
_SEEK_GAP_S = 1.0
# A stream that ends this close before a sampled time gives its last frame for it.
_END_TOLERANCE_S = 1.0


@dataclass(frozen=True)
class VideoLimits:
    """Limits for one video; every field is checked on creation."""

    max_bytes: int = 64 * 1024 * 1024
    # Frames sampled at most (evenly spread when ``fps`` would give more).
    max_frames: int = 128
    # Longer videos are refused (from the header, before decoding).
    max_seconds: float = 3600.0
    # Frame size the header may claim; refused above, before decoding (8K is 33.2 M).
    max_decode_pixels: int = 36_000_000
    # Each frame is downsized (aspect kept) to at most this: 768 tokens of 32x32 (qwen-vl-utils).
    max_pixels: int = 786_432
    # All sampled frames together (Qwen3-VL's video ``size.longest_edge``): 72 MiB of RGB.
    max_total_pixels: int = 25_165_824
    # Wall-clock budget for opening and decoding, checked between frames.
    deadline_s: float = 30.0

    def __post_init__(self) -> None:
        for name in ("max_bytes", "max_frames", "max_decode_pixels", "max_pixels"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if not isinstance(self.max_total_pixels, int) or self.max_total_pixels < self.max_pixels:
            raise ValueError("max_total_pixels must be an integer >= max_pixels")
        for name in ("max_seconds", "deadline_s"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


@dataclass(frozen=True)
class StreamInfo:
    """What the container header says about the video stream (before any frame is decoded)."""

    codec: str
    width: int
    height: int
    fps: float  # source frames per second
    duration: float  # seconds
    total_frames: int


@dataclass(frozen=True)
class DecodedVideo:
    """Sampled frames, (T, H, W, 3) uint8 RGB, and where they come from in the source."""

    frames: np.ndarray
    fps: float  # of the source: frames_indices / fps are the timestamps
    total_num_frames: int
    duration: float
    frames_indices: tuple[int, ...]
    timestamps: tuple[float, ...]  # seconds from the start of the stream
    frames_decoded: int  # frames the decoder produced to reach the sampled ones (cost)
    # what the frames are a function of: the bytes, the sampling and the limits (the engine's
    # caches key on it instead of hashing the frames)
    key: bytes = b""

    def metadata(self) -> dict[str, Any]:
        """The fields of ``transformers.video_utils.VideoMetadata`` for these frames."""
        return {
            "total_num_frames": self.total_num_frames,
            "fps": self.fps,
            "width": int(self.frames.shape[2]),
            "height": int(self.frames.shape[1]),
            "duration": self.duration,
            "video_backend": "pyav",
            "frames_indices": list(self.frames_indices),
        }


def decode_video(
    data: bytes,
    config: VideoLimits,
    fps: float = 2.0,
    max_frames: int | None = None,
    *,
    min_frames: int = 2,
    clock: Callable[[], float] = time.monotonic,
    reserve: Callable[[int], None] | None = None,
) -> DecodedVideo:
    """Decode the frames of ``data`` sampled at ``fps``, at most ``max_frames`` (and the
    limits') of them, at least ``min_frames`` (Qwen3-VL needs 2: its temporal patch), evenly
    spread; each downsized to the pixel limits. Blocking and CPU-bound: call it in a worker
    thread. Bad bytes raise ``MediaError`` (a 400); only PyAV's own errors count as bad bytes,
    so anything else (a bug, an incompatible PyAV) propagates and becomes a 500. ``reserve``
    is called with ``decode_cost`` once the header is checked, before frames are sampled (the
    loader's memory budget; it may wait, or raise)."""
    deadline = clock() + config.deadline_s
    if not data:
        raise MediaError("video data is empty")
    if len(data) > config.max_bytes:
        raise MediaError(f"video is larger than the {config.max_bytes} bytes allowed")
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not 0 < fps <= 1000:
        raise MediaError(f"video sampling fps must be a number in (0, 1000], got {fps!r}")
    limit = config.max_frames if max_frames is None else max_frames
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise MediaError(f"video max_frames must be an integer >= 1, got {max_frames!r}")
    limit = min(limit, config.max_frames)
    container = _open(data, _sniff_container(data))
    try:
        stream = _video_stream(container)
        info = _stream_info(container, stream)
        check_stream(info, config)
        indices = sample_indices(info, fps, limit, min_frames)
        budget = min(config.max_pixels, config.max_total_pixels // len(indices))
        size = fit_within((info.width, info.height), budget)
        if reserve is not None:
            reserve(decode_cost(info, size, len(indices)))
        frames, decoded = _read_frames(container, stream, info, indices, size, deadline, clock)
    except av.error.FFmpegError as exc:  # the demuxer or decoder refused the bytes
        raise MediaError("video data is truncated or corrupt") from exc
    finally:
        container.close()
    return DecodedVideo(
        frames=np.stack(frames),
        fps=info.fps,
        total_num_frames=info.total_frames,
        duration=info.duration,
        frames_indices=tuple(indices),
        timestamps=tuple(i / info.fps for i in indices),
        frames_decoded=decoded,
        key=_content_key(data, fps, limit, min_frames, config),
    )


def _content_key(data: bytes, fps: float, frames: int, min_frames: int, config: Any) -> bytes:
    """What the frames are a function of. SHA-256, as the loader's keys: hardware-accelerated,
    about 3x BLAKE2b's speed on these CPUs."""
    h = hashlib.sha256(
        repr((float(fps), frames, min_frames, config.max_pixels, config.max_total_pixels)).encode()
    )
    h.update(data)
    return h.digest()[:16]


def decode_cost(info: StreamInfo, size: tuple[int, int], frames: int) -> int:
    """Bytes sampling ``frames`` frames of ``size`` from the stream holds at its peak: four
    source frames in 4:2:0 (the one decoded, the reference it needs, FFmpeg's frame pool and
    the scaler's input; a 5888x5888 H.264 clip peaked at 181 MiB, 3.5 frames,
    benchmarks/media_memory.py), and the sampled RGB frames with their stacked copy."""
    source = info.width * info.height * 3 // 2
    return 4 * source + 2 * frames * size[0] * size[1] * 3


def check_stream(info: StreamInfo, config: VideoLimits) -> None:
    """Refuse, from the header alone, a stream that is unsupported, empty or over a limit."""
    if info.codec not in ALLOWED_CODECS:
        allowed = ", ".join(sorted(ALLOWED_CODECS))
        raise MediaError(f"video codec '{info.codec[:32]}' is not allowed (allowed: {allowed})")
    width, height = info.width, info.height
    if width <= 0 or height <= 0:
        raise MediaError(f"video is {width}x{height} pixels: it has no pixels")
    if width * height > config.max_decode_pixels:
        raise MediaError(
            f"video is {width}x{height} pixels, more than the {config.max_decode_pixels} allowed"
        )
    if max(width, height) / min(width, height) > MAX_ASPECT_RATIO:
        raise MediaError(f"video is {width}x{height} pixels: its aspect ratio is above 200")
    if not math.isfinite(info.fps) or info.fps <= 0 or info.fps > 1000:
        raise MediaError(f"video frame rate {info.fps:g} is not valid")
    if not math.isfinite(info.duration) or info.duration <= 0 or info.total_frames <= 0:
        raise MediaError("video has no duration or no frames")
    seconds = max(info.duration, info.total_frames / info.fps)
    if seconds > config.max_seconds:
        raise MediaError(
            f"video lasts {seconds:.0f} s, more than the {config.max_seconds:g} s allowed"
        )


def sample_indices(info: StreamInfo, fps: float, max_frames: int, min_frames: int) -> list[int]:
    """Source frame indices at ``fps`` over the whole stream, evenly spread (the reference's
    ``linspace(0, total - 1, n)``), ``n`` even when above 1 (each temporal patch gets two
    distinct frames). A stream shorter than ``min_frames`` repeats its frames."""
    wanted = min(math.floor(info.duration * fps), max_frames, info.total_frames)
    count = max(wanted, min(min_frames, max_frames), 1)
    if count > 1:
        count -= count % 2
    return [round(v) for v in np.linspace(0, info.total_frames - 1, count)]


def _sniff_container(data: bytes) -> str:
    if data[4:8] in _MP4_BOXES:
        if data[4:8] == b"ftyp" and data[8:12] in _IMAGE_BRANDS:
            raise MediaError(_is_an_image(data[8:12].decode("ascii")))
        return "mov"
    if data[:4] == _EBML:
        return "matroska"
    for magic, name in _IMAGE_MAGIC:
        if data.startswith(magic):
            raise MediaError(_is_an_image(name))
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        raise MediaError(_is_an_image("webp"))
    raise MediaError(f"video data is not a recognised video (allowed: {ALLOWED_CONTAINERS})")


def _is_an_image(name: str) -> str:
    return f"video data is a {name} image, not a video (send images as image_url parts)"


def _open(data: bytes, container_format: str) -> Any:
    # enable_drefs stays off: the mov demuxer must never open files the movie refers to.
    options = {"enable_drefs": "0"} if container_format == "mov" else {}
    try:
        return av.open(io.BytesIO(data), format=container_format, options=options, **_OPEN_KW)
    except av.error.FFmpegError:
        raise MediaError(
            f"video data is truncated or not a valid video (allowed: {ALLOWED_CONTAINERS})"
        ) from None


def _open_kwargs(version: str) -> dict[str, str]:
    """PyAV before 19 decodes metadata strictly unless told to replace bad UTF-8 (a hostile
    title would raise UnicodeDecodeError); 19 always decodes it leniently (surrogateescape)
    and removed the argument."""
    major = int(version.split(".")[0])
    return {"metadata_errors": "replace"} if major < 19 else {}


_OPEN_KW = _open_kwargs(av.__version__)


def _video_stream(container: Any) -> Any:
    streams = container.streams.video
    if not streams:
        raise MediaError("video has no video stream (audio-only or empty)")
    return streams[0]


def _stream_info(container: Any, stream: Any) -> StreamInfo:
    if not stream.time_base or stream.time_base <= 0:  # PyAV gives None for a 0 denominator
        raise MediaError("video stream has no valid time base")
    context = stream.codec_context
    if context is None:  # FFmpeg has no decoder for the stream's codec id
        raise MediaError("video codec is unknown or has no decoder")
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    fps = float(rate) if rate else 0.0
    # The stream's duration, else the container's, else the frame count's (FFmpeg reads an
    # MP4 duration of 0 or 0xFFFFFFFF as unknown); Matroska headers have no frame count.
    duration = float(stream.duration * stream.time_base) if stream.duration else 0.0
    if duration <= 0 and container.duration:
        duration = container.duration / av.time_base
    frames = int(stream.frames or 0)
    if duration <= 0 and frames > 0 and fps > 0:
        duration = frames / fps
    if frames <= 0 and math.isfinite(duration) and fps > 0:
        frames = round(min(duration, 1e9) * fps)
    return StreamInfo(
        codec=str(context.name or "unknown"),
        width=int(context.width or 0),
        height=int(context.height or 0),
        fps=fps,
        duration=duration,
        total_frames=frames,
    )


def _read_frames(
    container: Any,
    stream: Any,
    info: StreamInfo,
    indices: list[int],
    size: tuple[int, int],
    deadline: float,
    clock: Callable[[], float],
) -> tuple[list[np.ndarray], int]:
    """The frame shown at each index's time: a keyframe seek when the target is more than
    ``_SEEK_GAP_S`` ahead, then decoding forward; the deadline is checked after every frame."""
    base = stream.start_time or 0
    tb = float(stream.time_base)
    half = 0.5 / info.fps / tb  # a frame counts as the target from half a frame before it
    frames: list[np.ndarray] = []
    decoded, last, source = 0, None, None
    # One scaler for all frames: a frame's own to_ndarray() built a new one each time (~3 ms).
    reformatter = VideoReformatter()
    for index in indices:
        target = base + index / info.fps / tb
        if source is None or last is None or target - last.pts > _SEEK_GAP_S / tb:
            container.seek(int(target), stream=stream, backward=True, any_frame=False)
            source, last = _frames(container, stream, deadline, clock), None
        while last is None or last.pts < target - half:
            frame = next(source, None)
            if clock() > deadline:
                raise MediaError("video took too long to decode")
            if frame is None:
                if last is None or (target - last.pts) * tb > _END_TOLERANCE_S:
                    raise MediaError("video data is truncated: it ends before its stated duration")
                break
            decoded += 1
            last = frame
        rgb = reformatter.reformat(last, size[0], size[1], "rgb24", interpolation="AREA")
        frames.append(upright(rgb.to_ndarray(), *orientation(last)))
    return frames, decoded


def _frames(
    container: Any, stream: Any, deadline: float, clock: Callable[[], float]
) -> Iterator[Any]:
    """Decoded frames with a timestamp; the deadline is checked per packet too (packets that
    decode to nothing must not loop unchecked)."""
    for packet in container.demux(stream):
        if clock() > deadline:
            raise MediaError("video took too long to decode")
        for frame in packet.decode():
            if frame.pts is not None:
                yield frame
