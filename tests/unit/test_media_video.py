"""vlserve.media.video: sampling, seeking, limits and hostile input, on clips encoded here."""

from __future__ import annotations

import io
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from tests.conftest import mutate

av = pytest.importorskip("av")

from vlserve.errors import MediaError  # noqa: E402
from vlserve.media.video import (  # noqa: E402
    DecodedVideo,
    StreamInfo,
    VideoLimits,
    check_stream,
    decode_video,
)
from vlserve.testing.video import level, make_audio, make_clip, patch_box  # noqa: E402

LIMITS = VideoLimits()


CLIP = make_clip()  # 2 s, 64x48, 10 fps, 20 frames
MDIA = [b"moov", b"trak", b"mdia"]
STTS = [*MDIA, b"minf", b"stbl", b"stts"]


def refused(data: bytes, match: str, config: VideoLimits = LIMITS, **kwargs: Any) -> None:
    start = time.perf_counter()
    with pytest.raises(MediaError, match=match) as info:
        decode_video(data, config, **kwargs)
    assert time.perf_counter() - start < 1.0, "refusals must be fast"
    assert "Traceback" not in info.value.message and "av." not in info.value.message


def assert_frames_are(video: DecodedVideo) -> None:
    """Each returned frame is the source frame its index names (within codec error)."""
    for frame, index in zip(video.frames, video.frames_indices, strict=True):
        assert abs(int(frame.mean()) - level(index)) <= 3, (index, frame.mean())


# --- sampling and metadata -----------------------------------------------------------------------


def test_samples_two_fps_with_the_metadata_the_processor_needs() -> None:
    video = decode_video(CLIP, LIMITS, fps=2.0)
    assert video.frames.shape == (4, 48, 64, 3) and video.frames.dtype == np.uint8
    assert video.frames_indices == (0, 6, 13, 19)  # linspace(0, total - 1, 4), rounded
    assert video.timestamps == pytest.approx((0.0, 0.6, 1.3, 1.9))
    assert (video.fps, video.total_num_frames, video.duration) == (10.0, 20, 2.0)
    assert video.metadata() == {
        "total_num_frames": 20,
        "fps": 10.0,
        "width": 64,
        "height": 48,
        "duration": 2.0,
        "video_backend": "pyav",
        "frames_indices": [0, 6, 13, 19],
    }
    assert_frames_are(video)


@pytest.mark.parametrize(
    ("fps", "max_frames", "limit", "count"),
    [
        (10.0, 6, 128, 6),  # capped by the argument, spread evenly
        (10.0, 5, 128, 4),  # an even count: each temporal patch gets two distinct frames
        (10.0, None, 8, 8),  # capped by the limits
        (100.0, None, 128, 20),  # never more than the stream has
        (0.1, None, 128, 2),  # at least two (Qwen3-VL's temporal patch)
        (10.0, 1, 128, 1),  # unless asked for one
    ],
)
def test_frame_count(fps: float, max_frames: int | None, limit: int, count: int) -> None:
    video = decode_video(CLIP, VideoLimits(max_frames=limit), fps=fps, max_frames=max_frames)
    assert len(video.frames) == len(video.frames_indices) == count
    assert list(video.frames_indices) == sorted(video.frames_indices)
    assert video.frames_indices[0] == 0 and (count == 1 or video.frames_indices[-1] == 19)
    assert_frames_are(video)


def test_a_one_frame_video_gives_its_frame_twice() -> None:
    video = decode_video(make_clip(frames=1), LIMITS)
    assert video.frames_indices == (0, 0) and len(video.frames) == 2


def test_webm_vp9_decodes() -> None:
    # Matroska headers carry no frame count: it comes from the duration.
    video = decode_video(make_clip(codec="libvpx-vp9", container="webm"), LIMITS, fps=2.0)
    assert len(video.frames) == 4 and video.total_num_frames == 20
    assert_frames_are(video)


def test_long_video_is_sampled_by_seeking_not_by_decoding_everything() -> None:
    clip = make_clip(32, 32, frames=3000, fps=10, gop=20)  # 5 minutes, a keyframe every 2 s
    video = decode_video(clip, LIMITS, fps=2.0, max_frames=16)
    assert len(video.frames) == 16 and video.total_num_frames == 3000
    assert video.frames_decoded <= 16 * 20  # at most a GOP per sampled frame
    assert video.frames_decoded < 3000 / 5
    assert_frames_are(video)


def test_frames_are_downsized_to_the_per_frame_and_total_budgets() -> None:
    video = decode_video(CLIP, VideoLimits(max_pixels=1000, max_total_pixels=1000), fps=2.0)
    height, width = video.frames.shape[1:3]
    assert width * height <= 1000 // 4 and 64 / 48 - 0.15 < width / height <= 64 / 48
    video = decode_video(CLIP, VideoLimits(max_pixels=1000), fps=2.0)
    assert np.prod(video.frames.shape[1:3]) <= 1000
    assert video.metadata()["width"] == video.frames.shape[2]


def test_frames_go_through_the_qwen3_vl_video_processor(tiny_model_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    processor = transformers.AutoProcessor.from_pretrained(tiny_model_path)
    video = decode_video(CLIP, LIMITS, fps=2.0)
    kwargs = {"do_sample_frames": False, "cap_pixels_per_frame": False}
    out = processor.video_processor(
        videos=[video.frames],
        video_metadata=[video.metadata()],
        return_metadata=True,
        return_tensors="pt",
        **kwargs,
    )
    # 4 frames / temporal patch 2 = 2; 48x64 → 64x64 (multiples of 32) → 4x4 patches of 16
    assert out["video_grid_thw"].tolist() == [[2, 4, 4]]
    assert out["pixel_values_videos"].shape[0] == 2 * 4 * 4
    assert out["video_metadata"][0].frames_indices == [0, 6, 13, 19]
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(
        text=[text],
        videos=[video.frames],
        videos_kwargs={"video_metadata": [video.metadata()], **kwargs},
    )
    rendered = processor.tokenizer.decode(inputs["input_ids"][0])
    # each temporal patch is labelled with the mean time of its two frames
    assert "<0.3 seconds>" in rendered and "<1.6 seconds>" in rendered
    assert rendered.count("<|video_pad|>") == 2 * (4 * 4) // 4


# --- hostile input: each refused fast, with a clear MediaError -------------------------------------


@pytest.mark.parametrize(
    ("rotation", "dark_edge"),
    [(0, "left"), (-90, "top"), (90, "bottom"), (180, "right"), (270, "top")],
)
def test_frames_are_turned_upright_by_the_display_matrix(rotation: int, dark_edge: str) -> None:
    """A phone's portrait clip is landscape frames plus a rotation: the model must see it as a
    player shows it. The stored gradient runs dark (left) to bright (right)."""
    clip = make_clip(64, 32, frames=4, gradient=True, rotation=rotation)
    frames = decode_video(clip, LIMITS, fps=2.0).frames
    height, width = frames.shape[1:3]
    assert (height, width) == ((64, 32) if rotation % 180 else (32, 64))
    grey = frames[0].mean(axis=2)
    edges = {
        "left": grey[:, :4].mean(),
        "right": grey[:, -4:].mean(),
        "top": grey[:4].mean(),
        "bottom": grey[-4:].mean(),
    }
    assert min(edges, key=edges.__getitem__) == dark_edge


def test_only_quarter_turns_are_applied() -> None:
    from vlserve.media.video import upright

    frame = np.arange(24, dtype=np.uint8).reshape(2, 4, 3)
    assert upright(frame, 0) is frame
    assert upright(frame, 3).shape == (4, 2, 3)
    assert np.array_equal(upright(frame, 2), frame[::-1, ::-1])
    assert np.array_equal(upright(frame, 0, mirrored=True), frame[:, ::-1])


@pytest.mark.parametrize("rotation", [0, 90, 180, 270])
@pytest.mark.parametrize(("hflip", "vflip"), [(False, False), (True, False), (False, True)])
def test_mirrored_display_matrices_are_applied_after_the_turn(
    rotation: int, hflip: bool, vflip: bool
) -> None:
    """A front camera may store a mirror image: a player mirrors it back. All eight orientations
    (vflip is hflip after another half turn), against the matrix's meaning (turn the stored frame
    counter-clockwise, then mirror it) applied with numpy; the white corner shows where."""
    stored = decode_video(make_clip(64, 32, frames=4, corner=True), LIMITS, fps=2.0).frames[0]
    assert stored[:6, :14].mean() > 200 and stored[10:, 20:].mean() < 100  # the corner shows
    shown = np.rot90(stored, rotation // 90)
    shown = shown[:, ::-1] if hflip else shown
    shown = shown[::-1] if vflip else shown
    clip = make_clip(64, 32, frames=4, corner=True, rotation=rotation, hflip=hflip, vflip=vflip)
    frame = decode_video(clip, LIMITS, fps=2.0).frames[0]
    assert frame.shape == shown.shape
    assert np.abs(frame.astype(int) - shown.astype(int)).mean() < 8  # codec noise only


def test_empty_and_oversized_data_are_refused() -> None:
    refused(b"", "video data is empty")
    refused(CLIP, f"larger than the {len(CLIP) - 1} bytes", VideoLimits(max_bytes=len(CLIP) - 1))


def test_random_bytes_labelled_mp4_are_refused() -> None:
    noise = np.random.default_rng(0).bytes(64 * 1024)
    refused(noise, "not a recognised video")
    refused(b"\x00\x00\x00\x18ftypisom" + noise, "truncated or not a valid video")


def test_truncated_files_are_refused() -> None:
    refused(CLIP[: len(CLIP) // 2], "truncated")  # the index (moov) comes last: lost
    webm = make_clip(frames=40, codec="libvpx-vp9", container="webm")  # header first
    refused(webm[: len(webm) // 2], "truncated: it ends before its stated duration")


@pytest.mark.parametrize("where", ["av.open", "_read_frames"])
def test_errors_that_are_not_pyavs_are_bugs_not_bad_input(
    where: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only PyAV's own errors mean bad bytes (a 400 blaming the user). Anything else, such as
    PyAV 19's TypeError for an argument it removed, must propagate (a 500 with a trace)."""
    import vlserve.media.video as video

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise TypeError("open() got an unexpected keyword argument 'metadata_errors'")

    if where == "av.open":
        monkeypatch.setattr(video.av, "open", broken)
    else:
        monkeypatch.setattr(video, "_read_frames", broken)
    with pytest.raises(TypeError, match="metadata_errors"):
        decode_video(CLIP, LIMITS)


def test_pyav_errors_are_bad_input(monkeypatch: pytest.MonkeyPatch) -> None:
    import vlserve.media.video as video

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise av.error.InvalidDataError(1094995529, "Invalid data found when processing input")

    monkeypatch.setattr(video, "_read_frames", broken)
    refused(CLIP, "truncated or corrupt")


def test_open_arguments_follow_the_pyav_version() -> None:
    from vlserve.media.video import _open_kwargs

    assert _open_kwargs("18.1.0") == {"metadata_errors": "replace"}
    assert _open_kwargs("17.1.0") == {"metadata_errors": "replace"}
    assert _open_kwargs("19.0.2") == {}


def test_huge_dimensions_are_refused_from_the_header() -> None:
    refused(CLIP, "64x48 pixels, more than the 3071 allowed", VideoLimits(max_decode_pixels=3071))
    fake = StreamInfo("h264", 65535, 65535, 30.0, 10.0, 300)
    with pytest.raises(MediaError, match="65535x65535 pixels, more than"):
        check_stream(fake, LIMITS)
    with pytest.raises(MediaError, match="aspect ratio"):
        check_stream(StreamInfo("h264", 4020, 20, 30.0, 10.0, 300), LIMITS)


def test_absurd_frame_count_or_duration_in_the_header_is_refused() -> None:
    refused(patch_box(CLIP, STTS, 8, 2**31 - 1), r"lasts 214748365 s, more than the 3600 s")
    refused(patch_box(CLIP, [*MDIA, b"mdhd"], 12, 1), "more than the 3600 s")  # time base 1 s
    refused(CLIP, "lasts 2 s, more than the 1 s allowed", VideoLimits(max_seconds=1))


@pytest.mark.parametrize(
    ("info", "message"),
    [
        (StreamInfo("h264", 64, 48, 0.0, 2.0, 20), "frame rate 0 is not valid"),
        (StreamInfo("h264", 64, 48, float("nan"), 2.0, 20), "frame rate nan"),
        (StreamInfo("h264", 64, 48, 10.0, 0.0, 20), "no duration or no frames"),
        (StreamInfo("h264", 64, 48, 10.0, 2.0, 0), "no duration or no frames"),
        (StreamInfo("h264", 0, 48, 10.0, 2.0, 20), "0x48 pixels: it has no pixels"),
        (StreamInfo("prores", 64, 48, 10.0, 2.0, 20), "codec 'prores' is not allowed"),
    ],
)
def test_invalid_stream_headers_are_refused(info: StreamInfo, message: str) -> None:
    with pytest.raises(MediaError, match=message):
        check_stream(info, LIMITS)


def test_a_header_without_duration_falls_back_to_the_frame_count() -> None:
    # FFmpeg reads an MP4 duration of 0 as unknown; the frames are still there.
    patched = patch_box(patch_box(CLIP, [*MDIA, b"mdhd"], 16, 0), [b"moov", b"mvhd"], 16, 0)
    video = decode_video(patched, LIMITS, fps=2.0)
    assert video.duration == 2.0 and len(video.frames) == 4


@pytest.mark.parametrize("container", ["mp4", "wav"])
def test_audio_only_files_are_refused(container: str) -> None:
    expected = "no video stream" if container == "mp4" else "not a recognised video"
    refused(make_audio(container), expected)


@pytest.mark.parametrize("fmt", ["PNG", "GIF", "JPEG", "WEBP", "BMP"])
def test_images_are_refused_as_images(fmt: str) -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, fmt)
    refused(buffer.getvalue(), f"is a {fmt.lower()} image, not a video")
    refused(b"\x00\x00\x00\x1cftypavif" + bytes(32), "is a avif image")


def test_codecs_outside_the_list_are_refused() -> None:
    refused(make_clip(codec="mjpeg"), "codec 'mjpeg' is not allowed")


def test_the_deadline_is_enforced_between_frames() -> None:
    ticks = iter(range(1000))
    refused(
        make_clip(frames=40),
        "took too long",
        VideoLimits(deadline_s=5),
        fps=10.0,
        clock=lambda: float(next(ticks)),
    )


@pytest.mark.parametrize("fps", [0, -1.0, float("nan"), float("inf"), True])
def test_bad_sampling_fps_is_refused(fps: float) -> None:
    refused(CLIP, "sampling fps", fps=fps)


@pytest.mark.parametrize("max_frames", [0, -3, 2.5, True])
def test_bad_max_frames_is_refused(max_frames: int) -> None:
    refused(CLIP, "max_frames must be an integer", max_frames=max_frames)


def test_limits_are_validated() -> None:
    with pytest.raises(ValueError, match="max_frames"):
        VideoLimits(max_frames=0)
    with pytest.raises(ValueError, match="max_total_pixels"):
        VideoLimits(max_pixels=100, max_total_pixels=99)
    with pytest.raises(ValueError, match="deadline_s"):
        VideoLimits(deadline_s=float("inf"))


# --- fuzzing: only MediaError, whatever comes in ---------------------------------------------------

_SEEDS = [CLIP, make_clip(16, 16, frames=6, codec="libvpx-vp9", container="webm")]
_FUZZ_LIMITS = VideoLimits(max_pixels=256, deadline_s=5)


def _decode_or_media_error(data: bytes) -> None:
    try:
        video = decode_video(data, _FUZZ_LIMITS, fps=2.0, max_frames=4)
    except MediaError:
        return
    assert video.frames.dtype == np.uint8 and video.frames.ndim == 4
    assert 1 <= len(video.frames) <= 4 and np.prod(video.frames.shape[1:3]) <= 256


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.sampled_from(_SEEDS),
    edits=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=8),
    cut=st.integers(0, 10_000),
)
def test_decode_fuzz_mutated_real_videos(
    seed: bytes, edits: list[tuple[int, int]], cut: int
) -> None:
    _decode_or_media_error(mutate(seed, edits, cut))


@settings(max_examples=150, deadline=None)
@given(
    prefix=st.sampled_from([b"", b"\x00\x00\x00\x18ftypisom", b"\x1a\x45\xdf\xa3"]),
    data=st.binary(max_size=512),
)
def test_decode_fuzz_arbitrary_bytes(prefix: bytes, data: bytes) -> None:
    _decode_or_media_error(prefix + data)


def test_decoding_leaves_no_frames_for_the_cyclic_collector() -> None:
    """Reading a frame's side data through ``frame.side_data`` made a reference cycle (the frame
    caches the container, the container points back): every sampled source frame stayed in
    memory until a full collection, 52 MB each at 5888x5888 (issue #22 item 3)."""
    import gc

    clip = make_clip(64, 48, 20, 10, rotation=90, hflip=True)
    gc.collect()
    gc.disable()
    try:
        video = decode_video(clip, LIMITS)
        assert video.frames.shape[0] == 4
        del video
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        frames = [o for o in gc.garbage if isinstance(o, av.frame.Frame)]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert frames == []


def test_the_decode_reserves_its_cost_from_the_header_before_sampling() -> None:
    from vlserve.media.video import decode_cost

    clip = make_clip(320, 240, 20, 10)
    costs: list[int] = []
    video = decode_video(clip, LIMITS, reserve=costs.append)
    info = StreamInfo("h264", 320, 240, 10.0, 2.0, 20)
    assert costs == [decode_cost(info, (320, 240), 4)]
    assert costs[0] >= 2 * video.frames.nbytes + 4 * 320 * 240 * 3 // 2

    def refuse(nbytes: int) -> None:
        raise MediaError("no room")

    refused(clip, "no room", reserve=refuse)
