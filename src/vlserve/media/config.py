"""MediaConfig: the limits and guards that apply to every image and video a request brings."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from vlserve.settings import check, option

# Formats a data URL may declare and the decoder may accept.
ALLOWED_FORMATS: frozenset[str] = frozenset({"png", "jpeg", "webp", "gif", "bmp"})


@dataclass(frozen=True)
class MediaConfig:
    """Limits for image and video inputs; every field is validated (and domains normalised) on
    creation. A per-request count of 0 turns that kind of input off."""

    # The prototype's MAX_IMAGE_PIXELS (2,621,440 is about 1.6K x 1.6K).
    max_image_pixels: int = option(
        2_621_440,
        group="images",
        env_aliases=("MAX_IMAGE_PIXELS",),
        min=1,
        metavar="N",
        help="larger images are downsized (aspect kept) to at most N pixels",
    )
    # Refused before decoding above this (decompression bombs); read from the image header.
    max_decode_pixels: int = 50_000_000
    max_image_bytes: int = option(
        20 * 1024 * 1024,
        group="images",
        min=1,
        metavar="N",
        doc_default="20 MiB",
        help="encoded size cap of one image (data URL, HTTP body or local file)",
    )
    max_images_per_request: int = option(
        16, group="images", min=0, metavar="N", help="more images get 400; 0 turns images off"
    )
    # Videos (media/video.py): encoded size, frames sampled per video at most, duration.
    max_video_bytes: int = option(
        64 * 1024 * 1024,
        group="videos",
        min=1,
        metavar="N",
        doc_default="64 MiB",
        help="encoded size cap of one video (data URL, HTTP body or local file)",
    )
    max_video_frames: int = option(
        64,
        group="videos",
        min=2,  # Qwen3-VL's temporal patch is two frames
        metavar="N",
        help="frames sampled from one video at most (the default and cap of "
        "mm_processor_kwargs.max_frames; more are spread evenly, never refused)",
    )
    max_video_seconds: float = option(
        3600.0,
        group="videos",
        above=0,
        metavar="SECONDS",
        help="longer videos get 400 (read from the header, before decoding)",
    )
    max_videos_per_request: int = option(
        4, group="videos", min=0, metavar="N", help="more videos get 400; 0 turns videos off"
    )
    video_pixel_budget: int = option(
        25_165_824,
        group="videos",
        metavar="PIXELS",
        help="frames x pixels of all of a request's videos together, split evenly among them; "
        "frames are downsized to fit (the default is at most 12,288 video tokens)",
    )
    # Each sampled frame at most (768 tokens of 32x32, qwen-vl-utils' VIDEO_MAX_PIXELS).
    max_video_frame_pixels: int = 786_432
    # Frame size a video header may claim; refused above, before decoding (8K is 33.2 M).
    max_video_decode_pixels: int = 36_000_000
    # Wall clock for opening and decoding one video (a decode slot is held meanwhile).
    video_decode_timeout_s: float = 30.0
    # Qwen's processor fails on images whose long side is over 200x the short one: refuse those
    # here with a clear message instead of inside the engine.
    max_aspect_ratio: float = 200.0
    fetch_timeout_s: float = option(
        10.0,
        group="images",
        flag="--image-fetch-timeout",
        above=0,
        metavar="SECONDS",
        help="deadline for fetching one image or video URL: DNS, connect, every redirect and "
        "the body together",
    )
    max_redirects: int = 3
    max_concurrent_fetches: int = 8
    # Images decoded at once, server-wide (one may briefly hold max_decode_pixels * 4 bytes).
    # Parts of decoding hold the GIL: on 2 cores, 4 threads stalled the event loop ~150 ms,
    # 2 threads ~60 ms, at the same throughput (benchmarks/media_decode.py).
    max_concurrent_decodes: int = 2
    # Videos decoded at once, apart from images: a slow video (up to its decode deadline) never
    # holds a slot an image is waiting for. PyAV releases the GIL while it decodes.
    max_concurrent_video_decodes: int = 2
    # Decoding memory (media/budget.py): what decodes in progress hold, estimated from each
    # header before any pixel is decoded (full-size pixels and the copies made on the way down).
    media_memory_mb: int = option(
        1024,
        group="images",
        min=1,
        metavar="MIB",
        help="memory that image and video decodes in progress may hold together, server-wide "
        "(estimated from each header before decoding); a decode waits for room, then gets 429",
    )
    max_request_media_mb: int = option(
        1024,
        group="images",
        min=1,
        metavar="MIB",
        help="the same, summed over all the images and videos of one request (capped by "
        "--media-memory-mb); more gets 400",
    )
    # How long a decode waits for room in --media-memory-mb before its request gets 429.
    media_wait_timeout_s: float = 30.0
    # Decoded images kept by the hash of their encoded bytes (LRU, RGB pixels counted): the same
    # image in the next turn of a conversation skips decoding. 0 turns it off.
    decoded_cache_bytes: int = 256 * 1024 * 1024
    allowed_local_media_path: str | None = option(
        None,
        group="images",
        metavar="DIR",
        doc_default="off",
        help="serve file:// and absolute-path images and videos from below DIR only",
    )
    # Given in any case and with any iterable; stored lower-case as a tuple.
    allowed_media_domains: tuple[str, ...] = option(
        (),
        group="images",
        metavar="DOMAIN",
        doc_default="any public host",
        help="only fetch image and video URLs from these hosts (and their subdomains)",
    )
    # ONLY for tests and fully trusted networks.
    allow_private_networks: bool = option(
        False,
        group="images",
        flag="--allow-private-media-urls",
        help="let image and video URLs reach loopback/private addresses",
    )

    def __post_init__(self) -> None:
        # Frozen: normalise through object.__setattr__, once, here.
        object.__setattr__(self, "allowed_media_domains", _normalise_domains(self))
        check(self)
        for name in (
            "max_decode_pixels",
            "max_video_frame_pixels",
            "max_video_decode_pixels",
            "max_concurrent_fetches",
            "max_concurrent_decodes",
            "max_concurrent_video_decodes",
        ):
            _require_int(name, getattr(self, name), minimum=1)
        _require_int("max_redirects", self.max_redirects, minimum=0)
        self._check_video()
        _require_int("decoded_cache_bytes", self.decoded_cache_bytes, minimum=0)
        if self.max_image_pixels > self.max_decode_pixels:
            raise ValueError(
                f"max_image_pixels ({self.max_image_pixels}) must not exceed "
                f"max_decode_pixels ({self.max_decode_pixels})"
            )
        _require_positive_number("max_aspect_ratio", self.max_aspect_ratio)
        if self.max_aspect_ratio < 1:
            raise ValueError(f"max_aspect_ratio must be >= 1, got {self.max_aspect_ratio!r}")
        self._check_local_path()
        _require_positive_number("media_wait_timeout_s", self.media_wait_timeout_s)

    def _check_video(self) -> None:
        _require_positive_number("video_decode_timeout_s", self.video_decode_timeout_s)
        # Two frames of one 32x32 patch for each video a request may bring, at the least.
        least = 2 * 32 * 32 * max(self.max_videos_per_request, 1)
        _require_int("video_pixel_budget", self.video_pixel_budget, minimum=least)

    def _check_local_path(self) -> None:
        path = self.allowed_local_media_path
        if path is None:
            return
        if not path:
            raise ValueError("allowed_local_media_path must be a non-empty string or None")
        if not os.path.isabs(path):
            raise ValueError(f"allowed_local_media_path must be absolute, got {path!r}")
        if not os.path.isdir(path):
            raise ValueError(f"allowed_local_media_path {path!r} is not an existing directory")


def _normalise_domains(config: MediaConfig) -> tuple[str, ...]:
    domains = config.allowed_media_domains
    if isinstance(domains, (str, bytes)):
        raise ValueError("allowed_media_domains must be a sequence of host names, not a string")
    try:
        items = tuple(domains)
    except TypeError:
        raise ValueError("allowed_media_domains must be a sequence of host names") from None
    normalised = []
    for domain in items:
        name = domain.strip().lower().rstrip(".") if isinstance(domain, str) else ""
        if not _is_host_name(name):
            raise ValueError(f"allowed_media_domains: {domain!r} is not a host name")
        normalised.append(name)
    return tuple(normalised)


def _require_int(name: str, value: object, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _require_positive_number(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def _is_host_name(name: str) -> bool:
    """LDH host names (IDNs in their xn-- form) and IPv4 literals; no wildcards."""
    if not name or len(name) > 253:
        return False
    return all(
        0 < len(label) <= 63
        and label[0] != "-"
        and label[-1] != "-"
        and all(c.isascii() and (c.isalnum() or c == "-") for c in label)
        for label in name.split(".")
    )
