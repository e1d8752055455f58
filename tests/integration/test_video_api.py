"""Video in the chat API end to end: a real server on the tiny model, the official client.

Every hostile video is a fast OpenAI-shaped 400 naming the part ("video 1: ..."), after which
the server still answers; the success paths go through the engine's video support."""

from __future__ import annotations

import base64
import functools
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import ServerProcess, png_data_url, serve_routes, start_server, stop_server

pytest.importorskip("av")

from vlserve.testing.video import make_audio, make_clip, patch_box  # noqa: E402

pytestmark = pytest.mark.integration

CLIP = make_clip()  # 2 s, 64x48, 10 fps, H.264 in MP4
STBL = [b"moov", b"trak", b"mdia", b"minf", b"stbl"]
GREEDY = {"temperature": 0, "max_tokens": 8}
PARAM = "messages[0].content[1].video_url"


def video_url(data: bytes, mime: str = "video/mp4") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def _messages(*urls: str, images: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    parts: list[dict[str, Any]] = [{"type": "text", "text": "Describe"}]
    parts += [{"type": "video_url", "video_url": {"url": url}} for url in urls]
    parts += [{"type": "image_url", "image_url": {"url": url}} for url in images]
    return [{"role": "user", "content": parts}]


def _post(srv: ServerProcess, messages: list[dict[str, Any]], **body: Any) -> httpx.Response:
    payload = {"model": srv.model, "messages": messages, "max_tokens": 2, **body}
    return httpx.post(srv.base_url + "/v1/chat/completions", json=payload, timeout=120)


def _still_serves(srv: ServerProcess) -> None:
    r = _post(srv, [{"role": "user", "content": "hi"}], max_tokens=1)
    assert r.status_code == 200, r.text


def refused(
    srv: ServerProcess, url: str, message: str, *, param: str = PARAM, **body: Any
) -> dict[str, Any]:
    """A fast 400 in OpenAI's shape, through the official client, whose message starts with
    ``message``; then a good request is still answered."""
    client = openai.OpenAI(base_url=srv.base_url + "/v1", api_key="-", max_retries=0)
    start = time.monotonic()
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model=srv.model, messages=_messages(url), max_tokens=2, extra_body=body or None
        )
    elapsed = time.monotonic() - start
    assert caught.value.status_code == 400
    error = caught.value.response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param, error
    assert error["message"].startswith(message), error["message"]
    assert "Traceback" not in error["message"] and "av." not in error["message"]
    assert elapsed < 5, f"the refusal took {elapsed:.1f} s"
    _still_serves(srv)
    return error


@functools.cache
def huge_clip() -> bytes:
    return make_clip(6144, 6144, frames=2)  # 37.7 M pixels a frame, 270 kB of H.264


# --- hostile videos (default server) --------------------------------------------------------------


def test_random_bytes_labelled_mp4(server: ServerProcess) -> None:
    noise = bytes((i * 7919) % 251 for i in range(64 * 1024))
    error = refused(server, video_url(noise), "video 1: video data is not a recognised video")
    assert error["code"] == "invalid_video"
    refused(server, video_url(b"\x00\x00\x00\x18ftypisom" + noise), "video 1: video data is")


def test_truncated_file(server: ServerProcess) -> None:
    refused(server, video_url(CLIP[: len(CLIP) // 2]), "video 1: video data is truncated")


def test_header_claiming_huge_dimensions(server: ServerProcess) -> None:
    refused(server, video_url(huge_clip()), "video 1: video is 6144x6144 pixels, more than")


def test_header_claiming_an_absurd_frame_count(server: ServerProcess) -> None:
    absurd = patch_box(CLIP, [*STBL, b"stts"], 8, 2**31 - 1)
    refused(server, video_url(absurd), "video 1: video lasts 214748365 s, more than the 3600 s")


def test_zero_length_and_zero_fps(server: ServerProcess) -> None:
    refused(server, "data:video/mp4;base64,", "video 1: video data is empty")
    zero_delta = patch_box(CLIP, [*STBL, b"stts"], 12, 0)  # every frame at time 0
    refused(server, video_url(zero_delta), "video 1: video")


def test_audio_only_file(server: ServerProcess) -> None:
    refused(server, video_url(make_audio()), "video 1: video has no video stream")


@pytest.mark.parametrize(("fmt", "mime"), [("PNG", "image/png"), ("GIF", "image/gif")])
def test_images_passed_as_video(server: ServerProcess, fmt: str, mime: str) -> None:
    image = base64.b64decode(png_data_url(32, 32, fmt=fmt).split(",", 1)[1])
    name = fmt.lower()
    refused(server, video_url(image), f"video 1: video data is a {name} image, not a video")
    refused(server, video_url(image, mime), f"video 1: data URL media type '{mime}' is not a video")


def test_data_urls_whose_mime_lies(server: ServerProcess) -> None:
    png = base64.b64decode(png_data_url(32, 32).split(",", 1)[1])
    refused(server, video_url(png, "video/mp4"), "video 1: video data is a png image")
    refused(server, video_url(CLIP, "image/png"), "video 1: data URL media type 'image/png'")
    refused(server, video_url(CLIP, "text/plain"), "video 1: data URL media type 'text/plain'")
    refused(server, video_url(CLIP, "video/x-msvideo"), "video 1: video format 'x-msvideo'")
    # and an mp4 inside an image_url part
    r = _post(server, [{"role": "user", "content": [_image_part(video_url(CLIP))]}])
    assert r.status_code == 400
    assert r.json()["error"]["message"].startswith(
        "image 1: data URL media type 'video/mp4' is not an image"
    )


def _image_part(url: str) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url}}


def test_sources_follow_the_image_rules(server: ServerProcess, tmp_path: Path) -> None:
    outside = tmp_path / "clip.mp4"
    outside.write_bytes(CLIP)
    refused(server, f"file://{outside}", "video 1: local video file is outside the allowed")
    refused(server, "ftp://example.com/a.mp4", "video 1: video URL scheme 'ftp' is not supported")
    with serve_routes({"/gone": (404, b"")}, "video/mp4") as base:
        refused(server, base + "/gone", "video 1: could not fetch")


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"fps": 0}, "fps"),
        ({"fps": "2"}, "fps"),
        ({"fps": 5000}, "fps"),
        ({"max_frames": 1}, "max_frames"),
        ({"max_frames": 2.5}, "max_frames"),
        ({"max_pixels": 0}, "max_pixels"),
    ],
)
def test_bad_sampling_controls(server: ServerProcess, kwargs: dict, field: str) -> None:
    r = _post(server, _messages(video_url(CLIP)), mm_processor_kwargs=kwargs)
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["param"] == f"mm_processor_kwargs.{field}"
    assert error["message"].startswith(f"mm_processor_kwargs.{field}")


# --- limits (a server with small ones) -------------------------------------------------------------


@pytest.fixture(scope="module")
def limited(
    tiny_model_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    srv = start_server(
        tiny_model_path,
        tmp_path_factory.mktemp("video-limits"),
        "--max-video-bytes", "20000",
        "--max-video-seconds", "30",
        "--max-video-frames", "4",
        "--limit-mm-per-prompt", "image=4,video=2",
        "--kv-cache-tokens", "1024",
    )  # fmt: skip
    yield srv
    stop_server(srv)


@pytest.fixture(scope="module")
def no_video(
    tiny_model_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    srv = start_server(
        tiny_model_path,
        tmp_path_factory.mktemp("no-video"),
        "--limit-mm-per-prompt", '{"image": 4, "video": 0}',
    )  # fmt: skip
    yield srv
    stop_server(srv)


def test_over_the_byte_limit(limited: ServerProcess) -> None:
    big = make_clip(320, 240, frames=30, gradient=True)
    assert len(big) > 20000
    refused(limited, video_url(big), "video 1: video is larger than the 20000 bytes allowed")
    with serve_routes({"/big.mp4": (200, big)}, "video/mp4") as base:
        refused(limited, base + "/big.mp4", "video 1: could not fetch")
    (limited.media_dir / "big.mp4").write_bytes(big)
    refused(limited, f"file://{limited.media_dir / 'big.mp4'}", "video 1: video is larger than")


def test_over_the_duration_limit(limited: ServerProcess) -> None:
    long = make_clip(16, 16, frames=40, fps=1)  # 40 s, small
    refused(limited, video_url(long), "video 1: video lasts 40 s, more than the 30 s allowed")


def test_over_the_videos_per_request_limit(limited: ServerProcess) -> None:
    r = _post(limited, _messages(*[video_url(CLIP)] * 3))
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["message"] == "video 3: too many videos: 3, at most 2 allowed per request"
    assert error["param"] == "messages[0].content[3].video_url"
    _still_serves(limited)


def test_video_turned_off(no_video: ServerProcess) -> None:
    refused(no_video, video_url(CLIP), "video 1: video inputs are turned off on this server")
    r = _post(no_video, [{"role": "user", "content": [_image_part(png_data_url())]}])
    assert r.status_code == 200, r.text


def test_usage_details_name_the_media_the_request_brought(server: ServerProcess) -> None:
    """OpenAI's ``image_tokens`` with images, our ``video_tokens`` with videos, neither for text."""
    r = _post(server, [{"role": "user", "content": [_image_part(png_data_url(224, 320))]}])
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens_details"] == {"cached_tokens": 0, "image_tokens": 70}
    r = _post(server, [{"role": "user", "content": "hi"}])
    assert list(r.json()["usage"]["prompt_tokens_details"]) == ["cached_tokens"]
    both = _post(server, _messages(video_url(CLIP), images=(png_data_url(224, 320),)))
    details = both.json()["usage"]["prompt_tokens_details"]
    assert details["image_tokens"] == 70 and details["video_tokens"] == 8


# --- success paths (the engine's video support) ------------------------------------------------------


def _prompt_tokens(srv: ServerProcess, messages: list[dict[str, Any]], **body: Any) -> int:
    r = _post(srv, messages, **body)
    assert r.status_code == 200, r.text
    return int(r.json()["usage"]["prompt_tokens"])


def test_a_video_request_streamed_and_not(client: openai.OpenAI, server: ServerProcess) -> None:
    messages = _messages(video_url(CLIP))
    whole = client.chat.completions.create(model=server.model, messages=messages, **GREEDY)
    text_only = client.chat.completions.create(model=server.model, messages=_messages(), **GREEDY)
    details = whole.usage.prompt_tokens_details
    assert details.video_tokens > 0
    assert whole.usage.prompt_tokens >= text_only.usage.prompt_tokens + details.video_tokens
    chunks = list(
        client.chat.completions.create(
            model=server.model,
            messages=messages,
            stream=True,
            stream_options={"include_usage": True},
            **GREEDY,
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    assert chunks[-1].usage.prompt_tokens_details.video_tokens == details.video_tokens


def test_video_and_image_and_two_videos(client: openai.OpenAI, server: ServerProcess) -> None:
    one = _prompt_tokens(server, _messages(video_url(CLIP)))
    image = png_data_url(224, 320)
    with_image = _prompt_tokens(server, _messages(video_url(CLIP), images=(image,)))
    assert with_image == one + 70 + 2  # 224x320: 70 image tokens and 2 delimiters
    other = make_clip(48, 64, frames=20)
    two = client.chat.completions.create(
        model=server.model, messages=_messages(video_url(CLIP), video_url(other)), **GREEDY
    )
    assert two.usage.prompt_tokens > one
    assert two.usage.prompt_tokens_details.video_tokens > 0


def test_prompt_tokens_grow_with_fps_and_max_frames(server: ServerProcess) -> None:
    messages = _messages(video_url(make_clip(frames=80)))  # 8 s
    counts = [
        _prompt_tokens(server, messages, mm_processor_kwargs=kwargs)
        for kwargs in ({"fps": 0.5}, {"fps": 1.0}, {"fps": 2.0}, {"fps": 2.0, "max_frames": 4})
    ]
    assert counts[0] < counts[1] < counts[2]
    assert counts[3] == counts[0]  # 4 frames either way
    # exactly: 4, 8 and 16 frames make 2, 4 and 8 temporal patches of 64x48 frames (resized to
    # 64x64: 4 tokens), each patch with its "<t seconds>" label and vision start and end
    videos = [
        _post(server, messages, mm_processor_kwargs={"fps": fps}).json()["usage"]
        for fps in (0.5, 1.0, 2.0)
    ]
    assert [u["prompt_tokens_details"]["video_tokens"] for u in videos] == [8, 16, 32]
    per_patch = (counts[2] - counts[0]) / 6
    assert per_patch == (counts[1] - counts[0]) / 2 and per_patch > 4


def test_frames_over_the_limit_are_clamped_not_refused(limited: ServerProcess) -> None:
    messages = _messages(video_url(make_clip(frames=80)))
    clamped = _prompt_tokens(limited, messages, mm_processor_kwargs={"max_frames": 64})
    assert clamped == _prompt_tokens(limited, messages, mm_processor_kwargs={"max_frames": 4})


def test_local_file_and_http_videos(server: ServerProcess) -> None:
    (server.media_dir / "clip.mp4").write_bytes(CLIP)
    expected = _prompt_tokens(server, _messages(video_url(CLIP)))
    assert _prompt_tokens(server, _messages(f"file://{server.media_dir / 'clip.mp4'}")) == expected
    with serve_routes({"/clip.mp4": (200, CLIP)}, "video/mp4") as base:
        assert _prompt_tokens(server, _messages(base + "/clip.mp4")) == expected


def test_a_video_that_could_never_fit_is_a_400(limited: ServerProcess) -> None:
    """4 frames of 1280x720 (2 patches of about 768 tokens) cannot fit a 1024-token KV cache:
    refused before any frame reaches the vision tower, counted with the video's tokens."""
    r = _post(limited, _messages(video_url(make_clip(1280, 720, frames=4, fps=2))))
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert "more than the server's KV cache of 1024 tokens" in error["message"]
    prompt = int(error["message"].split("needs ")[1].split(" prompt")[0])
    assert prompt > 1024
    _still_serves(limited)
