"""Video in the chat API, the pure parts: --limit-mm-per-prompt and the video flags,
mm_processor_kwargs validation and clamping, loading a request's media parts, usage."""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json

import pytest
from PIL import Image
from pydantic import ValidationError

pytest.importorskip("av")

from vlserve.api import protocol as p  # noqa: E402
from vlserve.api.chat import MediaRef  # noqa: E402
from vlserve.api.cli import add_arguments, config_from_args  # noqa: E402
from vlserve.api.multimodal import VideoOptions, load_parts  # noqa: E402
from vlserve.api.serving import usage  # noqa: E402
from vlserve.config import parse_limit_mm_per_prompt  # noqa: E402
from vlserve.errors import InvalidRequestError, MediaError  # noqa: E402
from vlserve.media import MediaConfig, MediaLoader  # noqa: E402
from vlserve.media.loader import video_limits  # noqa: E402
from vlserve.media.video import DecodedVideo  # noqa: E402
from vlserve.testing.video import make_clip  # noqa: E402

CLIP = make_clip()  # 2 s, 64x48, 10 fps


def data_url(data: bytes, mime: str) -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 6), (0, 128, 0)).save(buffer, "PNG")
    return buffer.getvalue()


# --- flags --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "limits"),
    [
        (None, {}),
        ('{"image": 4, "video": 1}', {"image": 4, "video": 1}),
        ("image=4,video=1", {"image": 4, "video": 1}),
        (" video = 0 ", {"video": 0}),
        ('{"video": 0}', {"video": 0}),
    ],
)
def test_limit_mm_per_prompt_takes_json_and_pairs(text: str | None, limits: dict) -> None:
    assert parse_limit_mm_per_prompt(text) == limits


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"image": 4', "not valid JSON"),
        ("[1, 2]", "expected MODALITY=COUNT"),
        ('{"audio": 1}', "unknown modality 'audio'"),
        ("image=-1", "image must be an integer >= 0"),
        ("image=two", "image must be an integer >= 0"),
        ('{"video": true}', "video must be an integer >= 0"),
        ('{"video": 1.5}', "video must be an integer >= 0"),
        ('{"video": {"count": 1}}', "video must be an integer >= 0"),
        ("image", "expected MODALITY=COUNT"),
        ("image=1,image=2", "image is given twice"),
        ("", "expected MODALITY=COUNT"),
    ],
)
def test_limit_mm_per_prompt_refusals_name_the_flag(text: str, message: str) -> None:
    with pytest.raises(ValueError, match="--limit-mm-per-prompt") as info:
        parse_limit_mm_per_prompt(text)
    assert message in str(info.value)


def _media(argv: list[str]) -> MediaConfig:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return config_from_args(parser.parse_args(["--model", "/m", *argv])).media


def test_video_flags_reach_the_media_config() -> None:
    default = _media([])
    assert (default.max_video_frames, default.max_video_seconds) == (64, 3600.0)
    assert (default.max_video_bytes, default.max_videos_per_request) == (64 << 20, 4)
    assert default.video_pixel_budget == 25_165_824 and default.max_images_per_request == 16
    media = _media(
        ["--max-video-frames", "8", "--max-video-seconds", "60", "--max-video-bytes", "1000"]
        + ["--max-videos-per-request", "3", "--video-pixel-budget", "1000000"]
    )
    assert (media.max_video_frames, media.max_video_seconds, media.max_video_bytes) == (8, 60, 1000)
    assert (media.max_videos_per_request, media.video_pixel_budget) == (3, 1_000_000)


@pytest.mark.parametrize(
    ("argv", "images", "videos"),
    [
        (["--limit-mm-per-prompt", "image=4,video=1"], 4, 1),
        (["--limit-mm-per-prompt", '{"video": 0}'], 16, 0),
        (["--limit-mm-per-prompt", '{"image": 40}', "--max-images-per-request", "8"], 8, 4),
        (["--limit-mm-per-prompt", "video=9", "--max-videos-per-request", "2"], 16, 2),
        (["--max-images-per-request", "0"], 0, 4),
    ],
)
def test_limit_mm_per_prompt_is_the_min_with_the_per_request_flags(
    argv: list[str], images: int, videos: int
) -> None:
    media = _media(argv)
    assert (media.max_images_per_request, media.max_videos_per_request) == (images, videos)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--max-video-frames", "1"], "max_video_frames must be an integer >= 2"),
        (["--max-video-seconds", "0"], "max_video_seconds must be a finite number > 0"),
        (["--max-video-bytes", "0"], "max_video_bytes must be an integer >= 1"),
        (["--max-videos-per-request", "-1"], "max_videos_per_request must be an integer >= 0"),
        (["--video-pixel-budget", "100"], "video_pixel_budget must be an integer >= 8192"),
        (["--limit-mm-per-prompt", "video=x"], "--limit-mm-per-prompt: video must be"),
    ],
)
def test_bad_video_flags_are_refused_at_startup(argv: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _media(argv)


# --- mm_processor_kwargs --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"fps": 0}, "fps"),
        ({"fps": -1.0}, "fps"),
        ({"fps": "2"}, "fps"),
        ({"fps": True}, "fps"),
        ({"fps": 1001}, "fps"),
        ({"max_frames": 1}, "max_frames"),
        ({"max_frames": 2.5}, "max_frames"),
        ({"max_frames": "8"}, "max_frames"),
        ({"max_pixels": 0}, "max_pixels"),
        ({"min_pixels": -5}, "min_pixels"),
    ],
)
def test_bad_sampling_controls_are_refused_by_name(kwargs: dict, field: str) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    with pytest.raises(ValidationError) as info:
        p.ChatCompletionRequest.model_validate_json(
            json.dumps({**body, "mm_processor_kwargs": kwargs})
        )
    assert info.value.errors()[0]["loc"] == ("mm_processor_kwargs", field)


def test_sampling_controls_default_and_clamp_to_the_server() -> None:
    config = MediaConfig(max_video_frames=16)
    assert VideoOptions.from_request(None, config) == VideoOptions(2.0, 16)
    assert VideoOptions.from_request({"fps": 0.5, "max_frames": 64}, config) == VideoOptions(
        0.5, 16
    )
    options = VideoOptions.from_request(
        {"max_frames": 4, "min_pixels": 10, "max_pixels": 99}, config
    )
    assert (options.max_frames, options.min_pixels, options.max_pixels) == (4, 10, 99)


def test_video_limits_split_the_pixel_budget_evenly() -> None:
    config = MediaConfig(video_pixel_budget=1_000_000, max_video_frame_pixels=300_000)
    one = video_limits(config, 1)
    assert (one.max_total_pixels, one.max_pixels) == (1_000_000, 300_000)
    four = video_limits(config, 4, max_pixels=200_000)
    assert (four.max_total_pixels, four.max_pixels) == (250_000, 200_000)
    assert video_limits(config, 1, max_pixels=10**9).max_pixels == 300_000  # clamped
    assert video_limits(config, 8).max_pixels == 125_000  # never above the video's share


# --- a request's parts ----------------------------------------------------------------------------


def _parts(refs: list[MediaRef], config: MediaConfig, kwargs: dict | None = None) -> list[dict]:
    async def run() -> list[dict]:
        loader = MediaLoader(config)
        try:
            return await load_parts(loader, refs, kwargs)
        finally:
            await loader.aclose()

    return asyncio.run(run())


def _video(url: str, index: int = 0) -> MediaRef:
    return MediaRef("video", url, f"messages[0].content[{index}].video_url")


def test_parts_follow_the_engine_contract_in_order() -> None:
    refs = [
        _video(data_url(CLIP, "video/mp4")),
        MediaRef("image", data_url(png(), "image/png"), "messages[0].content[1].image_url", "low"),
        _video(data_url(CLIP, "video/mp4"), 2),
    ]
    config = MediaConfig(video_pixel_budget=40_000)
    parts = _parts(refs, config, {"fps": 2.0, "max_frames": 4, "min_pixels": 64})
    assert [part["type"] for part in parts] == ["video", "image", "video"]
    assert parts[1]["image"].size == (8, 6) and parts[1]["max_pixels"] == 256 * 32 * 32
    for part in (parts[0], parts[2]):
        video = part["video"]
        assert isinstance(video, DecodedVideo) and len(video.frames) == 4
        # each video gets half the budget: 20,000 pixels over 4 frames
        assert part["max_pixels"] == 5_000 and part["min_pixels"] == 64
        height, width = video.frames.shape[1:3]
        assert width * height <= part["max_pixels"]
    assert set(parts[0]) == {"type", "video", "max_pixels", "min_pixels"}
    assert "min_pixels" not in _parts(refs[:1], config)[0]


def test_more_fps_and_frames_give_more_frames() -> None:
    refs = [_video(data_url(CLIP, "video/mp4"))]
    frames = [
        len(_parts(refs, MediaConfig(), kwargs)[0]["video"].frames)
        for kwargs in ({"fps": 1.0}, {"fps": 2.0}, {"fps": 5.0}, {"fps": 5.0, "max_frames": 6})
    ]
    assert frames == [2, 4, 10, 6]
    assert len(_parts(refs, MediaConfig(max_video_frames=4), {"fps": 5.0})[0]["video"].frames) == 4


def test_min_above_max_pixels_is_refused() -> None:
    with pytest.raises(InvalidRequestError) as info:
        _parts([_video("x")], MediaConfig(), {"min_pixels": 10, "max_pixels": 5})
    assert info.value.param == "mm_processor_kwargs.min_pixels"


@pytest.mark.parametrize(
    ("url", "message"),
    [
        (data_url(png(), "video/mp4"), "video 1: video data is a png image, not a video"),
        (data_url(CLIP, "image/png"), "video 1: data URL media type 'image/png' is not a video"),
        (data_url(CLIP, "video/avi"), "video 1: video format 'avi' is not allowed"),
        (data_url(b"\x00" * 64, "video/mp4"), "video 1: video data is not a recognised video"),
        ("ftp://example.com/a.mp4", "video 1: video URL scheme 'ftp' is not supported"),
        ("file:///etc/passwd", "video 1: local video files are not allowed"),
    ],
)
def test_bad_videos_are_refused_naming_the_video(url: str, message: str) -> None:
    refs = [MediaRef("image", data_url(png(), "image/png"), "p0"), _video(url, 1)]
    with pytest.raises(MediaError) as info:
        _parts(refs, MediaConfig())
    assert info.value.message.startswith(message), info.value.message
    assert info.value.param == "messages[0].content[1].video_url"
    assert info.value.code == "invalid_video"


def test_an_mp4_in_an_image_part_is_refused_as_a_video() -> None:
    ref = MediaRef("image", data_url(CLIP, "video/mp4"), "messages[0].content[0].image_url")
    with pytest.raises(MediaError, match="image 1: data URL media type 'video/mp4' is not an"):
        _parts([ref], MediaConfig())


def test_video_byte_cap() -> None:
    with pytest.raises(MediaError, match=f"video 1: video is larger than the {len(CLIP) - 1}"):
        _parts([_video(data_url(CLIP, "video/mp4"))], MediaConfig(max_video_bytes=len(CLIP) - 1))


def test_counts_are_checked_before_anything_loads() -> None:
    broken = _video("data:video/mp4;base64,!!!!")
    with pytest.raises(MediaError) as info:
        _parts([broken] * 3, MediaConfig(max_videos_per_request=2))
    assert info.value.message == "video 3: too many videos: 3, at most 2 allowed per request"
    assert info.value.param == "messages[0].content[0].video_url"
    with pytest.raises(MediaError, match="^video 1: video inputs are turned off on this server"):
        _parts([MediaRef("image", "x", "p"), broken], MediaConfig(max_videos_per_request=0))
    with pytest.raises(MediaError, match="^image 1: image inputs are turned off on this server"):
        _parts([broken, MediaRef("image", "x", "p")], MediaConfig(max_images_per_request=0))


# --- usage --------------------------------------------------------------------------------------


def test_video_tokens_appear_only_for_requests_with_videos() -> None:
    assert usage(10, 2, 3).model_dump_json() == (
        '{"prompt_tokens":10,"completion_tokens":2,"total_tokens":12,'
        '"prompt_tokens_details":{"cached_tokens":3}}'
    )
    assert usage(10, 2, 0, 6).model_dump()["prompt_tokens_details"] == {
        "cached_tokens": 0,
        "video_tokens": 6,
    }
    assert usage(10, 2, 0, 0).model_dump()["prompt_tokens_details"]["video_tokens"] == 0
    assert usage(10, 2, 0, 6, 4).model_dump()["prompt_tokens_details"] == {
        "cached_tokens": 0,
        "image_tokens": 4,
        "video_tokens": 6,
    }
