"""MediaConfig: the limits and guards that apply to every image and video a request brings."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

# Formats a data URL may declare and the decoder may accept.
ALLOWED_FORMATS: frozenset[str] = frozenset({"png", "jpeg", "webp", "gif", "bmp"})


@dataclass(frozen=True)
class MediaConfig:
    """Limits for image and video inputs; every field is validated (and domains normalised) on
    creation. A per-request count of 0 turns that kind of input off."""

    # Downsize (keeping the aspect ratio) so that width*height <= this; the prototype's
    # MAX_IMAGE_PIXELS (2,621,440 is about 1.6K x 1.6K).
    max_image_pixels: int = 2_621_440
    # Refused before decoding above this (decompression bombs); read from the image header.
    max_decode_pixels: int = 50_000_000
    # Encoded size cap: data URL payload, HTTP body or local file.
    max_image_bytes: int = 20 * 1024 * 1024
    max_images_per_request: int = 16
    # Videos (media/video.py): encoded size, frames sampled per video at most, duration.
    max_video_bytes: int = 64 * 1024 * 1024
    max_video_frames: int = 64
    max_video_seconds: float = 3600.0
    max_videos_per_request: int = 4
    # Frames x pixels of all the videos of one request, split evenly among them.
    video_pixel_budget: int = 25_165_824
    # Each sampled frame at most (768 tokens of 32x32, qwen-vl-utils' VIDEO_MAX_PIXELS).
    max_video_frame_pixels: int = 786_432
    # Frame size a video header may claim; refused above, before decoding (8K is 33.2 M).
    max_video_decode_pixels: int = 36_000_000
    # Wall clock for opening and decoding one video (a decode slot is held meanwhile).
    video_decode_timeout_s: float = 30.0
    # Qwen's processor fails on images whose long side is over 200x the short one: refuse those
    # here with a clear message instead of inside the engine.
    max_aspect_ratio: float = 200.0
    # Deadline for one whole fetch: DNS, connect, every redirect hop and the body together.
    fetch_timeout_s: float = 10.0
    max_redirects: int = 3
    max_concurrent_fetches: int = 8
    # Images decoded at once, server-wide (one may briefly hold max_decode_pixels * 4 bytes).
    # Parts of decoding hold the GIL: on 2 cores, 4 threads stalled the event loop ~150 ms,
    # 2 threads ~60 ms, at the same throughput (benchmarks/media_decode.py).
    max_concurrent_decodes: int = 2
    # Videos decoded at once, apart from images: a slow video (up to its decode deadline) never
    # holds a slot an image is waiting for. PyAV releases the GIL while it decodes.
    max_concurrent_video_decodes: int = 2
    # Decoded images kept by the hash of their encoded bytes (LRU, RGB pixels counted): the same
    # image in the next turn of a conversation skips decoding. 0 turns it off.
    decoded_cache_bytes: int = 256 * 1024 * 1024
    # Local files (file:// URLs or absolute paths) are read only from below this directory;
    # None refuses local files altogether.
    allowed_local_media_path: str | None = None
    # Hosts a URL may name (an entry also admits its subdomains); empty means any public host.
    # Given in any case and with any iterable; stored lower-case as a tuple.
    allowed_media_domains: tuple[str, ...] = ()
    # Lets URLs reach loopback/private addresses: ONLY for tests and fully trusted networks.
    allow_private_networks: bool = False

    def __post_init__(self) -> None:
        for name in (
            "max_image_pixels",
            "max_decode_pixels",
            "max_image_bytes",
            "max_video_bytes",
            "max_video_frame_pixels",
            "max_video_decode_pixels",
            "max_concurrent_fetches",
            "max_concurrent_decodes",
            "max_concurrent_video_decodes",
        ):
            _require_int(name, getattr(self, name), minimum=1)
        _require_int("max_redirects", self.max_redirects, minimum=0)
        _require_int("max_images_per_request", self.max_images_per_request, minimum=0)
        self._check_video()
        _require_int("decoded_cache_bytes", self.decoded_cache_bytes, minimum=0)
        if self.max_image_pixels > self.max_decode_pixels:
            raise ValueError(
                f"max_image_pixels ({self.max_image_pixels}) must not exceed "
                f"max_decode_pixels ({self.max_decode_pixels})"
            )
        _require_positive_number("fetch_timeout_s", self.fetch_timeout_s)
        _require_positive_number("max_aspect_ratio", self.max_aspect_ratio)
        if self.max_aspect_ratio < 1:
            raise ValueError(f"max_aspect_ratio must be >= 1, got {self.max_aspect_ratio!r}")
        if not isinstance(self.allow_private_networks, bool):
            raise ValueError("allow_private_networks must be True or False")
        self._check_local_path()
        # Frozen: normalise through object.__setattr__, once, here.
        object.__setattr__(self, "allowed_media_domains", _normalise_domains(self))

    def _check_video(self) -> None:
        _require_int("max_videos_per_request", self.max_videos_per_request, minimum=0)
        # Qwen3-VL's temporal patch is two frames.
        _require_int("max_video_frames", self.max_video_frames, minimum=2)
        _require_positive_number("max_video_seconds", self.max_video_seconds)
        _require_positive_number("video_decode_timeout_s", self.video_decode_timeout_s)
        # Two frames of one 32x32 patch for each video a request may bring, at the least.
        least = 2 * 32 * 32 * max(self.max_videos_per_request, 1)
        _require_int("video_pixel_budget", self.video_pixel_budget, minimum=least)

    def _check_local_path(self) -> None:
        path = self.allowed_local_media_path
        if path is None:
            return
        if not isinstance(path, str) or not path:
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
