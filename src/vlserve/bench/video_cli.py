"""`vlserve bench` flags for synthetic videos (``--dataset random``) → DatasetConfig fields
(argparse only; the clips are made by ``vlserve.bench.video``)."""

from __future__ import annotations

import argparse
from typing import Any

from vlserve.bench.synthetic import parse_size
from vlserve.bench.video import VideoSupportMissing, require_av

DEFAULT_VIDEO_SIZE = "320x240"


def add_video_flags(video: argparse._ArgumentGroup) -> None:
    video.add_argument(
        "--random-videos",
        type=int,
        default=0,
        metavar="N",
        help="synthetic: videos per request (MP4/H.264, each one different; needs the video "
        "extra: pip install 'vlserve[video]')",
    )
    video.add_argument(
        "--random-video-size",
        action="append",
        default=None,
        metavar="WxH",
        help=f"synthetic: video size, even; repeat to cycle sizes (default {DEFAULT_VIDEO_SIZE})",
    )
    video.add_argument(
        "--random-video-seconds",
        type=float,
        default=4.0,
        metavar="S",
        help="synthetic: video duration in seconds",
    )
    video.add_argument(
        "--random-video-fps",
        type=float,
        default=30.0,
        metavar="F",
        help="synthetic: video frame rate (the server samples its own frames from it)",
    )


def video_fields(args: argparse.Namespace, synthetic: bool) -> dict[str, Any]:
    """The DatasetConfig fields of the video flags; a ValueError (exit code 2) when synthetic
    videos are asked for and PyAV is not installed."""
    sizes = tuple(parse_size(s) for s in (args.random_video_size or [DEFAULT_VIDEO_SIZE]))
    if synthetic and args.random_videos > 0:
        try:
            require_av()
        except VideoSupportMissing as exc:
            raise ValueError(f"--random-videos: {exc}") from None
    return {
        "random_videos": args.random_videos,
        "random_video_sizes": sizes,
        "random_video_seconds": args.random_video_seconds,
        "random_video_fps": args.random_video_fps,
    }
