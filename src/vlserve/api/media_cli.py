"""`vlserve serve` image and video flags → MediaConfig (argparse only; split from api/cli.py)."""

from __future__ import annotations

import argparse
import json
import os

from vlserve.media.config import MediaConfig

MODALITIES = ("image", "video")
_DEFAULT = MediaConfig()  # the flags' defaults are its defaults, never a second copy


def add_media_arguments(p: argparse.ArgumentParser) -> None:
    _add_image_arguments(p.add_argument_group("images"))
    _add_video_arguments(p.add_argument_group("videos"))


def _add_image_arguments(i: argparse._ArgumentGroup) -> None:
    i.add_argument(
        "--max-image-pixels",
        type=int,
        default=int(os.environ.get("MAX_IMAGE_PIXELS") or _DEFAULT.max_image_pixels),
        help="larger images are downsized to this many pixels (env MAX_IMAGE_PIXELS)",
    )
    i.add_argument("--max-images-per-request", type=int, default=_DEFAULT.max_images_per_request)
    i.add_argument("--max-image-bytes", type=int, default=_DEFAULT.max_image_bytes)
    i.add_argument(
        "--image-fetch-timeout", type=float, default=_DEFAULT.fetch_timeout_s, metavar="SECONDS"
    )
    i.add_argument(
        "--allowed-local-media-path",
        default=None,
        metavar="DIR",
        help="serve file:// and absolute-path images and videos from below DIR only (off by "
        "default)",
    )
    i.add_argument(
        "--allowed-media-domains",
        nargs="+",
        default=(),
        metavar="DOMAIN",
        help="only fetch image and video URLs from these hosts (and their subdomains)",
    )
    i.add_argument(
        "--allow-private-media-urls",
        action="store_true",
        help="let image and video URLs reach loopback/private addresses (trusted networks only)",
    )


def _add_video_arguments(v: argparse._ArgumentGroup) -> None:
    v.add_argument(
        "--max-video-frames",
        type=int,
        default=_DEFAULT.max_video_frames,
        help="frames sampled per video at most (the default of mm_processor_kwargs.max_frames, "
        "and its cap)",
    )
    v.add_argument(
        "--max-video-seconds",
        type=float,
        default=_DEFAULT.max_video_seconds,
        help="longer videos get 400",
    )
    v.add_argument(
        "--max-video-bytes",
        type=int,
        default=_DEFAULT.max_video_bytes,
        help="encoded size of one video (data URL, HTTP body or local file)",
    )
    v.add_argument(
        "--max-videos-per-request",
        type=int,
        default=_DEFAULT.max_videos_per_request,
        help="0 turns video inputs off",
    )
    v.add_argument(
        "--video-pixel-budget",
        type=int,
        default=_DEFAULT.video_pixel_budget,
        metavar="PIXELS",
        help="sampled frames x pixels of all of a request's videos together, split evenly "
        "among them; frames are downsized to fit",
    )
    v.add_argument(
        "--limit-mm-per-prompt",
        default=None,
        metavar="LIMITS",
        help='vLLM\'s per-request limits by modality, as JSON (\'{"image": 4, "video": 1}\') or '
        "image=4,video=1; 0 turns a modality off; the lower of this and "
        "--max-images-per-request / --max-videos-per-request applies",
    )


def parse_limit_mm_per_prompt(text: str | None) -> dict[str, int]:
    """``'{"image": 4, "video": 1}'`` or ``'image=4,video=1'`` → ``{"image": 4, "video": 1}``;
    raises ``ValueError`` with a message naming the flag."""
    if text is None:
        return {}
    flag = "--limit-mm-per-prompt"
    if text.lstrip().startswith("{"):
        try:
            pairs = json.loads(text)
        except ValueError:
            raise ValueError(f"{flag}: not valid JSON: {text!r}") from None
        if not isinstance(pairs, dict):
            raise ValueError(f"{flag}: expected a JSON object, got {text!r}")
        items = list(pairs.items())
    else:
        items = []
        for entry in text.split(","):
            name, eq, value = entry.partition("=")
            if not eq:
                raise ValueError(f"{flag}: expected MODALITY=COUNT, got {entry.strip()!r}")
            count: object = int(value) if value.strip().isdigit() else value.strip()
            items.append((name.strip(), count))
    limits: dict[str, int] = {}
    for name, count in items:
        if name not in MODALITIES:
            raise ValueError(f"{flag}: unknown modality {name!r} (supported: image, video)")
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ValueError(f"{flag}: {name} must be an integer >= 0, got {count!r}")
        if name in limits:
            raise ValueError(f"{flag}: {name} is given twice")
        limits[name] = count
    return limits


def media_config_from_args(args: argparse.Namespace) -> MediaConfig:
    limits = parse_limit_mm_per_prompt(args.limit_mm_per_prompt)
    for flag in ("max_images_per_request", "max_videos_per_request"):
        if getattr(args, flag) < 0:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 0")
    return MediaConfig(
        max_image_pixels=args.max_image_pixels,
        max_images_per_request=min(args.max_images_per_request, limits.get("image", 1 << 30)),
        max_image_bytes=args.max_image_bytes,
        fetch_timeout_s=args.image_fetch_timeout,
        allowed_local_media_path=args.allowed_local_media_path,
        allowed_media_domains=tuple(args.allowed_media_domains),
        allow_private_networks=args.allow_private_media_urls,
        decoded_cache_bytes=args.encoder_cache_mb * 1024 * 1024,
        max_video_frames=args.max_video_frames,
        max_video_seconds=args.max_video_seconds,
        max_video_bytes=args.max_video_bytes,
        max_videos_per_request=min(args.max_videos_per_request, limits.get("video", 1 << 30)),
        video_pixel_budget=args.video_pixel_budget,
    )
