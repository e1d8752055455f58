"""Video in the bench: JSONL video files and URLs, synthetic clips, video tokens in the reports."""

from __future__ import annotations

import argparse
import base64
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from vlserve.bench import cli
from vlserve.bench.client import RequestResult, _read_json, _take_usage
from vlserve.bench.config import DatasetConfig
from vlserve.bench.dataset import load_dataset, load_jsonl, media_per_request
from vlserve.bench.inline import sniff_mime
from vlserve.bench.metrics import summarize
from vlserve.bench.report import format_table, result_record
from vlserve.bench.video import (
    INSTALL_HINT,
    VideoSupportMissing,
    clip_shift,
    make_clip,
    require_av,
    synthetic_clip,
)

av = pytest.importorskip("av")

MP4 = make_clip(32, 24, frames=4, fps=4)
WEBM = make_clip(16, 16, frames=3, codec="libvpx-vp9", container="webm")


def data_url_bytes(url: str) -> tuple[str, bytes]:
    header, _, payload = url.partition(",")
    return header, base64.b64decode(payload)


def video_urls(messages: list[dict]) -> list[str]:
    return [
        p["video_url"]["url"]
        for m in messages
        if isinstance(m["content"], list)
        for p in m["content"]
        if p.get("type") == "video_url"
    ]


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    (tmp_path / "clips").mkdir()
    (tmp_path / "clips" / "a.mp4").write_bytes(MP4)
    (tmp_path / "clips" / "b.webm").write_bytes(WEBM)
    (tmp_path / "clips" / "c.mov").write_bytes(MP4[:8] + b"qt  " + MP4[12:])
    return tmp_path


def write_jsonl(path: Path, lines: list[object]) -> Path:
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


# --- JSONL datasets -------------------------------------------------------------------------


def test_every_video_form_is_inlined_with_the_mime_of_its_bytes(data_dir: Path) -> None:
    clip = data_dir / "clips" / "a.mp4"
    path = write_jsonl(data_dir / "v.jsonl", [
        {"id": "path", "video_path": "clips/a.mp4", "prompt": "What happens?"},
        {"id": "url", "video_url": ["clips/b.webm", "clips/c.mov"], "text": "Compare."},
        {"id": "parts", "messages": [{"role": "user", "content": [
            {"type": "video_url", "video_url": {"url": f"file://{clip}"}},
            {"type": "video", "video": "clips/b.webm", "fps": 2},
            {"type": "text", "text": "Both?"},
        ]}]},
        {"id": "mixed", "image_path": "clips/x.png", "video_path": "clips/a.mp4"},
    ])  # fmt: skip
    (data_dir / "clips" / "x.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    dataset = load_jsonl([str(path)], None)
    assert not dataset.issues
    by_id = {r.id: r for r in dataset.requests}
    header, data = data_url_bytes(video_urls(by_id["path"].messages)[0])
    assert header == "data:video/mp4;base64" and data == MP4
    assert by_id["path"].messages[0]["content"][-1] == {"type": "text", "text": "What happens?"}
    headers = [data_url_bytes(u)[0] for u in video_urls(by_id["url"].messages)]
    assert headers == ["data:video/webm;base64", "data:video/quicktime;base64"]
    parts = by_id["parts"].messages[0]["content"]
    assert [p["type"] for p in parts] == ["video_url", "video_url", "text"]
    assert data_url_bytes(parts[1]["video_url"]["url"])[1] == WEBM
    # images before videos before the question, as Qwen-VL's examples order them
    assert [p["type"] for p in by_id["mixed"].messages[0]["content"]] == ["image_url", "video_url"]


def test_video_urls_pass_through_untouched(tmp_path: Path) -> None:
    urls = ["https://example.com/v.mp4", "http://h/v.webm", "data:video/mp4;base64,AAAA"]
    path = write_jsonl(tmp_path / "v.jsonl", [
        {"id": "a", "video_url": urls[0]},
        {"id": "b", "messages": [{"role": "user", "content": [
            {"type": "video_url", "video_url": {"url": urls[1], "detail": "x"}},
            {"type": "video", "video": urls[2]},
        ]}]},
    ])  # fmt: skip
    dataset = load_jsonl([str(path)], None)
    assert [video_urls(r.messages) for r in dataset.requests] == [[urls[0]], urls[1:]]
    part = dataset.requests[1].messages[0]["content"][0]
    assert part["video_url"] == {"url": urls[1], "detail": "x"}  # other fields kept


def test_missing_or_malformed_videos_skip_the_line_with_a_reason(data_dir: Path) -> None:
    path = write_jsonl(data_dir / "v.jsonl", [
        {"id": "missing", "video_path": "clips/none.mp4"},
        {"id": "frames", "messages": [{"role": "user", "content": [
            {"type": "video", "video": ["f1.jpg", "f2.jpg"]}]}]},
        {"id": "empty", "messages": [{"role": "user", "content": [
            {"type": "video_url", "video_url": {"url": ""}}]}]},
        {"id": "turns", "video_path": "clips/a.mp4", "turns": ["hi"]},
        {"id": "ok", "video_path": "clips/a.mp4"},
    ])  # fmt: skip
    dataset = load_jsonl([str(path)], str(data_dir))
    assert [r.id for r in dataset.requests] == ["ok"]
    reasons = [issue.message for issue in dataset.issues]
    assert reasons[0].startswith("video not found: clips/none.mp4 (looked in ")
    assert "list of frames is not supported" in reasons[1]
    assert reasons[2] == "a video URL or path must be a non-empty string"
    assert "'turns' cannot be combined with ['video_path']" in reasons[3]


def test_conversation_turns_carry_videos(data_dir: Path) -> None:
    path = write_jsonl(data_dir / "c.jsonl", [{"id": "c", "turns": [
        [{"type": "video", "video": "clips/a.mp4"}, {"type": "text", "text": "What happens?"}],
        [{"type": "video_url", "video_url": "clips/b.webm"}, {"type": "text", "text": "And here?"}],
    ]}])  # fmt: skip
    (request,) = load_jsonl([str(path)], None).requests
    assert data_url_bytes(video_urls(request.messages)[0])[1] == MP4
    turn = request.followups[0].content
    assert isinstance(turn, list) and data_url_bytes(turn[0]["video_url"]["url"])[1] == WEBM
    assert media_per_request([request])["videos"] == {"total": 2, "mean": 2.0, "max": 2}


def test_mime_sniffing_of_videos_and_still_images_in_video_containers() -> None:
    where = Path("x.bin")
    assert sniff_mime(MP4, where, "video") == "video/mp4"
    assert sniff_mime(WEBM, where, "video") == "video/webm"
    assert sniff_mime(b"\x1a\x45\xdf\xa3" + b"\x00" * 40 + b"matroska", where) == "video/x-matroska"
    assert sniff_mime(b"\x00\x00\x00\x1cftypavif", where) == "image/avif"
    assert sniff_mime(b"\x00\x00\x00\x1cftypheic", where) == "image/heic"
    assert sniff_mime(b"RIFF\x00\x00\x00\x00AVI LIST", where) == "video/x-msvideo"
    assert sniff_mime(b"????", Path("v.mkv"), "video") == "video/x-matroska"
    assert sniff_mime(b"????", Path("v"), "video") == "video/mp4"
    assert sniff_mime(b"????", Path("i"), "image") == "image/png"  # unchanged for images


# --- synthetic videos -----------------------------------------------------------------------


def decode(data: bytes) -> tuple[float, tuple[int, int], list[bytes]]:
    """(duration in seconds, (width, height), every frame's RGB bytes) of an encoded clip."""
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        frames = [f.to_ndarray(format="rgb24").tobytes() for f in container.decode(stream)]
        duration = float(stream.duration * stream.time_base)
        return duration, (stream.width, stream.height), frames


def random_config(**changes: object) -> DatasetConfig:
    base = {
        "kind": "random", "num_random": 3, "random_input_len": 8, "random_videos": 2,
        "random_video_sizes": ((64, 48), (32, 16)), "random_video_seconds": 1.5,
        "random_video_fps": 8.0,
    }  # fmt: skip
    return DatasetConfig(**{**base, **changes})  # type: ignore[arg-type]


def test_synthetic_videos_have_their_size_and_duration_and_all_differ() -> None:
    dataset = load_dataset(random_config())
    clips = []
    for request in dataset.requests:
        urls = video_urls(request.messages)
        assert len(urls) == 2
        parts = request.messages[0]["content"]
        assert [p["type"] for p in parts] == ["video_url", "video_url", "text"]
        for url, size in zip(urls, ((64, 48), (32, 16)), strict=True):  # sizes cycled
            header, data = data_url_bytes(url)
            assert header == "data:video/mp4;base64"
            duration, decoded_size, frames = decode(data)
            assert decoded_size == size and len(frames) == 12
            assert duration == pytest.approx(1.5, abs=0.13)
            clips.append(frames)
    assert len({b"".join(frames) for frames in clips}) == 6  # no server cache can hit
    # not a single frame in common either, within a clip or across clips of one size
    same_size = [frame for frames in clips[::2] for frame in frames]
    assert len(set(same_size)) == len(same_size)
    assert media_per_request(dataset.requests) == {
        "images": {"total": 0, "mean": 0.0, "max": 0},
        "videos": {"total": 6, "mean": 2.0, "max": 2},
    }


def test_synthetic_videos_are_seeded_and_leave_the_rest_of_the_data_as_it_was() -> None:
    with_videos = load_dataset(random_config(random_images=1, random_turns=2))
    again = load_dataset(random_config(random_images=1, random_turns=2))
    without = load_dataset(random_config(random_images=1, random_turns=2, random_videos=0))
    other_seed = load_dataset(random_config(seed=1))
    assert [r.messages for r in with_videos.requests] == [r.messages for r in again.requests]
    for a, b in zip(with_videos.requests, without.requests, strict=True):
        image, _, _, text = a.messages[0]["content"]
        assert [image, text] == b.messages[0]["content"]  # same images and text as before
        assert a.followups == b.followups
    first = {u for r in with_videos.requests for u in video_urls(r.messages)}
    assert not first & {u for r in other_seed.requests for u in video_urls(r.messages)}


def test_65536_consecutive_clips_share_no_frame_and_neighbours_differ_widely() -> None:
    def differences(number: int) -> tuple[int, int]:
        red, green, blue = clip_shift(number)
        return (green - red) % 256, (blue - red) % 256

    start = 12345678
    assert len({differences(start + i) for i in range(65536)}) == 65536
    assert len({clip_shift(n) for n in range(0, 1 << 24, 65536)}) == 256  # the high bits
    a, b = clip_shift(start), clip_shift(start + 1)
    assert max(min((x - y) % 256, (y - x) % 256) for x, y in zip(a, b, strict=True)) >= 32


def test_a_synthetic_clip_is_decodable_by_the_server_s_decoder() -> None:
    media = pytest.importorskip("vlserve.media.video")
    clip = synthetic_clip(3, (320, 240), 4.0, 30.0)
    video = media.decode_video(clip, media.VideoLimits(), fps=2.0)
    assert video.frames.shape == (8, 240, 320, 3) and video.duration == pytest.approx(4.0)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    cli.add_arguments(p)
    return p


def test_video_flags_and_their_defaults() -> None:
    config = cli.config_from_args(parser().parse_args(["--dataset", "random"]))
    d = config.dataset
    assert (d.random_videos, d.random_video_sizes) == (0, ((320, 240),))
    assert (d.random_video_seconds, d.random_video_fps) == (4.0, 30.0)
    args = parser().parse_args([
        "--dataset", "random", "--random-videos", "2", "--random-video-size", "640x480",
        "--random-video-size", "64x64", "--random-video-seconds", "2.5", "--random-video-fps", "12",
    ])  # fmt: skip
    d = cli.config_from_args(args).dataset
    assert (d.random_videos, d.random_video_sizes) == (2, ((640, 480), (64, 64)))
    assert (d.random_video_seconds, d.random_video_fps) == (2.5, 12.0)


@pytest.mark.parametrize(
    "flags",
    [
        ["--random-videos", "-1"],
        ["--random-videos", "1", "--random-video-size", "321x240"],
        ["--random-videos", "1", "--random-video-size", "big"],
        ["--random-videos", "1", "--random-video-seconds", "0"],
        ["--random-videos", "1", "--random-video-fps", "0"],
    ],
)
def test_bad_video_flags_exit_2(flags: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.run(parser().parse_args(["--dataset", "random", *flags])) == 2
    assert "vlserve bench: error:" in capsys.readouterr().err


def test_without_pyav_synthetic_videos_say_how_to_install_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "av", None)  # import av now raises ImportError
    with pytest.raises(VideoSupportMissing, match=r"pip install 'vlserve\[video\]'"):
        require_av()
    with pytest.raises(VideoSupportMissing):
        load_dataset(random_config())
    assert cli.run(parser().parse_args(["--dataset", "random", "--random-videos", "1"])) == 2
    assert INSTALL_HINT in capsys.readouterr().err
    # a run without synthetic videos does not need PyAV
    assert cli.config_from_args(parser().parse_args(["--dataset", "random"]))


def test_the_base_bench_never_imports_pyav() -> None:
    code = """
import json, sys
import vlserve.bench, vlserve.bench.cli, vlserve.bench.app, vlserve.bench.video
from vlserve.bench.dataset import load_dataset
from vlserve.bench.config import DatasetConfig
load_dataset(DatasetConfig(kind="random", num_random=2, random_images=1))
print(json.dumps("av" in sys.modules))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) is False


# --- video tokens in the reports ------------------------------------------------------------


def usage(details: object = "absent") -> dict:
    body: dict = {"prompt_tokens": 300, "completion_tokens": 4, "total_tokens": 304}
    if details != "absent":
        body["prompt_tokens_details"] = details
    return body


@pytest.mark.parametrize(
    ("details", "expected"),
    [
        ({"video_tokens": 256}, 256),
        ({"video_tokens": 0}, 0),
        ({"cached_tokens": 12}, None),  # vLLM's details, no video field
        (None, None),
        ("absent", None),
        ({"video_tokens": "many"}, None),
    ],
)
def test_video_tokens_are_read_from_usage_when_present(details: object, expected: object) -> None:
    result = RequestResult("r", "r")
    _take_usage(usage(details), result)
    assert result.video_tokens == expected and result.prompt_tokens == 300


def test_video_tokens_from_a_non_streaming_response_and_reset_between_attempts() -> None:
    result = RequestResult("r", "r")
    body = {"choices": [{"message": {"content": "A"}, "finish_reason": "stop"}]}
    _read_json(json.dumps({**body, "usage": usage({"video_tokens": 96})}).encode(), result)
    assert result.video_tokens == 96 and result_record(result)["video_tokens"] == 96
    result.reset_attempt()
    assert result.video_tokens is None


def finished(n: int, video_tokens: int | None) -> RequestResult:
    r = RequestResult(f"q{n}", f"q{n}", success=True, latency_s=1.0, ttft_s=0.1)
    r.prompt_tokens, r.completion_tokens, r.total_tokens = 300, 4, 304
    r.video_tokens = video_tokens
    return r


def with_media(summary: dict, videos: int) -> dict:
    mean = float(videos)
    media = {
        "images": {"total": 0, "mean": 0.0, "max": 0},
        "videos": {"total": 4 * videos, "mean": mean, "max": videos},
    }
    return {**summary, "run": {"dataset_media": media}}


def test_summary_and_table_report_video_tokens_per_request() -> None:
    results = [finished(i, t) for i, t in enumerate((100, 200, 300, 400))]
    summary = summarize(results, 2.0, (50, 99))
    stats = summary["video_tokens"]
    assert (stats["count"], stats["mean"], stats["median"], stats["max"]) == (4, 250, 250, 400)
    assert stats["total"] == 1000 and stats["p99"] == pytest.approx(397.0)
    table = format_table(with_media(summary, 1))
    assert "Videos per request (dataset mean)" in table
    block = table.split(" Video tokens per request ")[1]
    assert "Mean" in block and "P99" in block and "1,000" in block


def test_a_server_that_reports_no_video_tokens_shows_n_a_and_video_free_runs_nothing() -> None:
    summary = summarize([finished(i, None) for i in range(4)], 2.0)
    assert summary["video_tokens"] is None
    table = format_table(with_media(summary, 1))
    row = next(line for line in table.splitlines() if line.startswith("Video tokens per request"))
    assert row.endswith("n/a") and "reported no usage.prompt_tokens_details" in table
    assert "Video" not in format_table(with_media(summary, 0))
    assert "Video" not in format_table(summary)  # e.g. a sweep's summary without dataset media
