"""Video prompts: the step-by-step preprocessing gives what the model's processor gives, token for
token and pixel for pixel (on transformers 5.x and 4.57, whose renderings differ)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from vlserve.engine.video_input import patch_times
from vlserve.media.video import DecodedVideo, VideoLimits, decode_video
from vlserve.testing.video import make_clip

VIDEO_PAD = 151656


@pytest.fixture(scope="module")
def runner(tiny_model_path: Path):  # type: ignore[no-untyped-def]
    from vlserve.engine.device import resolve_device
    from vlserve.engine.runner import ModelRunner

    return ModelRunner(tiny_model_path, resolve_device("cpu", "float32"))


def _video(width: int, height: int, frames: int, fps: int, **kw: Any) -> DecodedVideo:
    data = make_clip(width, height, frames=frames, fps=fps, gradient=True)
    return decode_video(data, VideoLimits(), **kw)


def _reference(processor: Any, messages: list[dict], videos: list[DecodedVideo], **size: Any):  # type: ignore[no-untyped-def]
    """The processor's own output for ``messages`` (video parts as {"type": "video"})."""
    from transformers.video_utils import VideoMetadata

    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    images = [p["image"] for m in messages for p in m["content"] if p["type"] == "image"]
    kwargs: dict[str, Any] = {"do_sample_frames": False, "return_tensors": "pt"}
    if hasattr(processor.video_processor, "cap_pixels_per_frame"):
        kwargs["cap_pixels_per_frame"] = False
    if size:
        kwargs["size"] = size
    return processor(
        text=[text],
        images=images or None,
        videos=[v.frames for v in videos],
        video_metadata=[VideoMetadata(**v.metadata()) for v in videos],
        **kwargs,
    )


def _prepare(runner, messages: list[dict]):  # type: ignore[no-untyped-def]
    from vlserve.engine.prompt import ChatPrompt

    return runner.preprocess(ChatPrompt(messages))


def test_patch_times_average_each_pair_and_pad_the_last() -> None:
    assert patch_times([0, 6, 12, 17], 10.0, 2) == pytest.approx([0.3, 1.45])
    assert patch_times([0, 6, 12], 10.0, 2) == pytest.approx([0.3, 1.2])


def test_video_prompts_match_the_processor_exactly(runner) -> None:  # type: ignore[no-untyped-def]
    from PIL import Image

    short = _video(64, 48, frames=30, fps=10)  # 6 frames: 3 temporal patches
    wide = _video(96, 64, frames=40, fps=8)  # 10 frames: 5 temporal patches
    image = Image.new("RGB", (64, 96), (30, 200, 90))
    messages = [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {
            "role": "user",
            "content": [
                {"type": "video", "video": short},
                {"type": "text", "text": "and"},
                {"type": "image", "image": image},
                {"type": "video", "video": wide},
                {"type": "text", "text": "what happens?"},
            ],
        },
    ]
    reference = _reference(runner.preprocess.processor, messages, [short, wide])
    for _ in range(2):  # cold, then the videos from the cache
        prepared = _prepare(runner, messages)
        assert prepared.token_ids == reference["input_ids"][0].tolist()
        videos = [v for v in prepared.visuals if v.kind == "video"]
        images = [v for v in prepared.visuals if v.kind == "image"]
        assert torch.equal(
            torch.cat([v.pixel_values for v in videos]), reference["pixel_values_videos"]
        )
        assert torch.equal(images[0].pixel_values, reference["pixel_values"])
        # one grid row per temporal patch: get_rope_index splits the processor's rows so too
        grids = reference["video_grid_thw"]
        split = torch.repeat_interleave(grids, grids[:, 0], dim=0)
        split[:, 0] = 1
        assert torch.equal(prepared.rope_inputs["video_grid_thw"], split)
        assert prepared.num_video_tokens == prepared.token_ids.count(VIDEO_PAD)
        assert prepared.num_video_tokens == sum(int(g.prod()) // 4 for g in grids)
        for key in ("attention_mask", "mm_token_type_ids"):
            if key in reference:
                assert torch.equal(prepared.rope_inputs[key], reference[key]), key
        model = runner.model.model
        kwargs = {
            k: v
            for k, v in reference.items()
            if k in ("attention_mask", "mm_token_type_ids", "image_grid_thw", "video_grid_thw")
        }
        expected, _ = model.get_rope_index(reference["input_ids"], **kwargs)
        mine, _ = model.get_rope_index(
            prepared.rope_inputs["input_ids"],
            **{k: v for k, v in prepared.rope_inputs.items() if k in kwargs},
        )
        assert torch.equal(mine, expected)


def test_per_frame_pixel_bounds_match_the_processor(runner) -> None:  # type: ignore[no-untyped-def]
    video = _video(320, 240, frames=20, fps=10)  # 4 frames
    messages = [{"role": "user", "content": [{"type": "video", "video": video}]}]
    frames = video.frames.shape[0]
    small = _prepare(
        runner,
        [{"role": "user", "content": [{**messages[0]["content"][0], "max_pixels": 64 * 64}]}],
    )
    reference = _reference(
        runner.preprocess.processor,
        messages,
        [video],
        shortest_edge=min(
            int(runner.preprocess.processor.video_processor.size["shortest_edge"]), 64 * 64 * frames
        ),
        longest_edge=64 * 64 * frames,
    )
    assert small.token_ids == reference["input_ids"][0].tolist()
    full = _prepare(runner, messages)
    assert small.num_video_tokens < full.num_video_tokens


def test_a_video_encodes_as_its_temporal_patches(runner) -> None:  # type: ignore[no-untyped-def]
    """The vision tower attends within each temporal patch: the whole video (grid (T, h, w), as
    generate() encodes it) and its patches as T grids (1, h, w) (as the engine does) agree."""
    prepared = _prepare(
        runner, [{"role": "user", "content": [{"type": "video", "video": _video(96, 64, 40, 8)}]}]
    )
    patches = [v for v in prepared.visuals if v.kind == "video"]
    pixels = torch.cat([v.pixel_values for v in patches])
    split = torch.cat([v.grid_thw for v in patches])
    whole = split[:1].clone()
    whole[0, 0] = len(patches)
    visual = runner.model.model.visual
    with torch.inference_mode():
        a, b = visual(pixels, grid_thw=whole), visual(pixels, grid_thw=split)
    a = a if isinstance(a, tuple) else (a.pooler_output, a.deepstack_features)
    b = b if isinstance(b, tuple) else (b.pooler_output, b.deepstack_features)
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=1e-5)
    for x, y in zip(a[1], b[1], strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-5)


def test_seen_videos_skip_the_video_processor(runner) -> None:  # type: ignore[no-untyped-def]
    """The same decoded video (the next turn: the loader hands out the same frames) is processed
    once per pixel bounds, and the processor leaves the shared frames untouched."""
    from vlserve.engine.preprocess import Preprocessor
    from vlserve.lru import BytesLRU

    pre = runner.preprocess
    calls = []
    real = pre.processor.video_processor

    class Counting:
        def __getattr__(self, name: str) -> Any:
            return getattr(real, name)

        def __call__(self, **kw: Any) -> Any:
            calls.append(1)
            return real(**kw)

    processor = type("P", (), {})()
    processor.tokenizer = pre.processor.tokenizer
    processor.apply_chat_template = pre.processor.apply_chat_template
    processor.video_processor = Counting()
    cached = Preprocessor(
        processor, pre._image_token_id, 2, BytesLRU(1 << 26), video_marker=pre._video_marker
    )
    video = _video(96, 64, 40, 8)
    before = video.frames.copy()
    part = {"type": "video", "video": video}
    first = _prepare_with(cached, [{"role": "user", "content": [part]}])
    second = _prepare_with(
        cached, [{"role": "user", "content": [{"type": "text", "text": "x"}, part]}]
    )
    assert len(calls) == 1
    assert [v.key for v in first.visuals] == [v.key for v in second.visuals]
    _prepare_with(cached, [{"role": "user", "content": [{**part, "max_pixels": 32 * 32}]}])
    assert len(calls) == 2  # other bounds: processed again
    assert (video.frames == before).all()


def _prepare_with(pre, messages: list[dict]):  # type: ignore[no-untyped-def]
    from vlserve.engine.prompt import ChatPrompt

    return pre(ChatPrompt(messages))


def test_the_video_marker_is_the_one_the_installed_processor_replaces(runner) -> None:  # type: ignore[no-untyped-def]
    """4.57 and 5.25 replace the template's whole vision_start/video_pad/vision_end, 5.0-5.24
    only the video_pad: asked of the processor, not guessed from the version."""
    import transformers

    from vlserve.engine.video_input import VIDEO_MARKERS, find_video_marker

    marker = find_video_marker(runner.preprocess.processor, 4)
    assert marker in VIDEO_MARKERS
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    if major == 5 and minor < 25:
        assert marker == "<|video_pad|>"
    elif (major, minor) in ((4, 57), (5, 25)):
        assert marker == "<|vision_start|><|video_pad|><|vision_end|>"


class _Drifted:
    """The real processor, except that its prompts gain a token: a rendering vlserve does not
    reproduce (as 5.25's was, before this check)."""

    def __init__(self, real: Any) -> None:
        self._real = real

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def __call__(self, **kw: Any) -> Any:
        out = self._real(**kw)
        out["input_ids"] = torch.cat([torch.tensor([[27]]), out["input_ids"]], dim=1)
        return out


def test_a_processor_that_renders_videos_otherwise_is_refused_at_startup(runner) -> None:  # type: ignore[no-untyped-def]
    from vlserve.engine.preprocess import Preprocessor
    from vlserve.engine.video_input import VideoPromptMismatch

    pre = runner.preprocess
    with pytest.raises(VideoPromptMismatch, match="renders video prompts in a way vlserve"):
        Preprocessor(_Drifted(pre.processor), pre._image_token_id, 2)
