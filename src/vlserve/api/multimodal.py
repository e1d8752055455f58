"""A request's images and videos → the engine's media parts: per-request sampling controls
(``mm_processor_kwargs``), counts, loading (media.MediaLoader) and per-part pixel bounds."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from vlserve.api.chat import ImageBudget, MediaRef
from vlserve.media import MediaConfig, MediaLoader
from vlserve.media.loader import video_limits
from vlserve.media.video import DecodedVideo

DEFAULT_VIDEO_FPS = 2.0  # qwen-vl-utils' and the Qwen3-VL video processor's default


@dataclass(frozen=True)
class VideoOptions:
    """How a request's videos are sampled: ``fps`` (default 2), ``max_frames`` (default and
    cap: the server's ``--max-video-frames``) and per-frame ``min_pixels``/``max_pixels``
    (capped by the server's frame limit and the request's share of ``--video-pixel-budget``).
    Types and ranges were checked by the protocol (``MMProcessorKwargs``)."""

    fps: float
    max_frames: int
    min_pixels: int | None = None
    max_pixels: int | None = None

    @classmethod
    def from_request(cls, kwargs: dict[str, Any] | None, config: MediaConfig) -> VideoOptions:
        kwargs = kwargs or {}
        frames = kwargs.get("max_frames") or config.max_video_frames
        return cls(
            fps=float(kwargs.get("fps") or DEFAULT_VIDEO_FPS),
            max_frames=min(frames, config.max_video_frames),
            min_pixels=kwargs.get("min_pixels"),
            max_pixels=kwargs.get("max_pixels"),
        )

    def bounds(self, video: DecodedVideo, max_pixels: int, max_total_pixels: int) -> dict[str, int]:
        """The engine part's per-frame bounds: the budget the frames were decoded to."""
        frames = max(len(video.frames), 1)
        high = max(min(max_pixels, max_total_pixels // frames), 1)
        out = {"max_pixels": high}
        if self.min_pixels is not None:
            out["min_pixels"] = min(self.min_pixels, high)
        return out


async def load_parts(
    loader: MediaLoader, refs: Sequence[MediaRef], kwargs: dict[str, Any] | None
) -> list[dict[str, Any]]:
    """The engine part of each of ``refs``, in order; raises ``InvalidRequestError`` /
    ``MediaError`` (a 400 naming the part) for bad settings or media."""
    config = loader.config
    images = ImageBudget.from_request(kwargs, config.max_image_pixels)  # checks min <= max
    options = VideoOptions.from_request(kwargs, config)
    videos = sum(ref.kind == "video" for ref in refs)
    limits = video_limits(config, videos, options.max_pixels)
    video_kind = loader.video_kind(limits, options.fps, options.max_frames)
    kinds = [video_kind if ref.kind == "video" else loader.image_kind for ref in refs]
    loaded = await loader.load_many([r.url for r in refs], [r.param for r in refs], kinds)
    parts = []
    for ref, item in zip(refs, loaded, strict=True):
        if ref.kind == "video":
            bounds = options.bounds(item, limits.max_pixels, limits.max_total_pixels)
            parts.append({"type": "video", "video": item, **bounds})
        else:
            parts.append({"type": "image", "image": item, **images.bounds(ref.detail)})
    return parts
