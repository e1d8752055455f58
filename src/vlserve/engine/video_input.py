"""A decoded video → what Qwen3-VL's video processor and prompt make of it.

The frames (already sampled and downsized by ``media.video``) go through the model's own video
processor with ``do_sample_frames=False``; every two frames make one temporal patch. The prompt
gives each temporal patch its time and its placeholders, as the model's processor renders it:
``<{t:.1f} seconds><|vision_start|><|video_pad|>×n<|vision_end|>``, with ``t`` the mean of the
patch's two frame times. Which text of the template the processor replaces has changed between
transformers versions: 4.57 and 5.25 replace the whole ``<|vision_start|><|video_pad|><|vision_end|>``,
5.0-5.24 only the ``<|video_pad|>`` (keeping the template's start and end around the patches).
So it is not guessed from the version: ``find_video_marker`` asks the installed processor once, at
startup, which rendering it makes of a small video, and refuses to start if it makes neither.

The vision tower attends within one temporal patch at a time, and Qwen3-VL's ``get_rope_index``
splits a video's grid into one grid per patch: so each patch becomes a ``VisualInput`` of its
own (grid ``(1, h, w)``), encoded, cached and scattered as an image is.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import torch

from vlserve.engine.prompt import VisualInput
from vlserve.engine.sequence import ImageSpan


@dataclass(frozen=True)
class ProcessedVideo:
    """The video processor's output for one video, with its content key and patch times."""

    key: bytes
    pixel_values: torch.Tensor  # (patches * h * w, patch_dim)
    grid_thw: torch.Tensor  # (1, 3): temporal patches, height and width in patches
    times: tuple[float, ...]  # seconds, one per temporal patch

    @property
    def nbytes(self) -> int:
        return self.pixel_values.numel() * self.pixel_values.element_size()

    def tokens_per_patch(self, merge: int) -> int:
        return int(self.grid_thw[0, 1] * self.grid_thw[0, 2]) // merge

    def placeholder(self, video_token: str, merge: int) -> str:
        """The prompt text of this video's patches (what replaces the template's placeholder)."""
        pads = video_token * self.tokens_per_patch(merge)
        return "".join(f"<{t:.1f} seconds><|vision_start|>{pads}<|vision_end|>" for t in self.times)

    def patches(self, spans: list[tuple[int, int]], merge: int) -> list[VisualInput]:
        """One ``VisualInput`` per temporal patch, at ``spans`` (its placeholder runs)."""
        t, h, w = (int(v) for v in self.grid_thw[0])
        if len(spans) != t:
            raise ValueError("a video's placeholder runs do not match its temporal patches")
        rows = h * w
        grid = torch.tensor([[1, h, w]], dtype=self.grid_thw.dtype)
        out = []
        for k, (start, end) in enumerate(spans):
            if end - start != rows // merge:
                raise ValueError("a video patch's placeholder count does not match its grid")
            key = hashlib.blake2b(self.key + k.to_bytes(4, "little"), digest_size=16).digest()
            pixels = self.pixel_values[k * rows : (k + 1) * rows]
            out.append(VisualInput(key, pixels, grid, ImageSpan(start, end, key), kind="video"))
        return out


def process_video(
    video_processor: Any,
    video: Any,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
) -> ProcessedVideo:
    """``video`` (a ``media.video.DecodedVideo``) through the model's video processor.

    ``min_pixels``/``max_pixels`` bound each frame (the processor's ``size`` bounds all frames
    together, so they are scaled by the frame count); None keeps the processor's own.
    """
    frames = video.frames
    count = int(frames.shape[0])
    kwargs: dict[str, Any] = {"do_sample_frames": False, "return_tensors": "pt"}
    if hasattr(video_processor, "cap_pixels_per_frame"):  # 5.x: our per-frame bounds rule
        kwargs["cap_pixels_per_frame"] = False
    if min_pixels is not None or max_pixels is not None:
        size = video_processor.size
        high = max_pixels * count if max_pixels else int(size_get(size, "longest_edge"))
        low = min_pixels * count if min_pixels else int(size_get(size, "shortest_edge"))
        kwargs["size"] = {"shortest_edge": min(low, high), "longest_edge": high}
    out = video_processor(videos=[frames], **kwargs)
    grid = out["video_grid_thw"].view(1, 3)
    temporal = int(video_processor.temporal_patch_size)
    times = patch_times(video.frames_indices, video.fps, temporal)
    if len(times) != int(grid[0, 0]):
        raise ValueError("the video processor made an unexpected number of temporal patches")
    h = hashlib.blake2b(digest_size=16)
    h.update(b"video" + frames_key(video))
    h.update(str((frames.shape, tuple(grid.view(-1).tolist()), times)).encode())
    return ProcessedVideo(h.digest(), out["pixel_values_videos"], grid, tuple(times))


def frames_key(video: Any) -> bytes:
    """What a decoded video's frames are a function of: the decoder's key (its bytes, sampling
    and limits), else a hash of the frames themselves."""
    if video.key:
        return bytes(video.key)
    frames = video.frames
    h = hashlib.blake2b(digest_size=16)
    h.update(str((frames.shape, tuple(video.frames_indices), video.fps)).encode())
    h.update(memoryview(frames).cast("B") if frames.flags.c_contiguous else frames.tobytes())
    return h.digest()


def patch_times(indices: Any, fps: float, temporal: int) -> list[float]:
    """Each temporal patch's time: the mean of its first and last frame's (the processor's
    ``_calculate_timestamps``; a last patch short of frames repeats the last frame)."""
    frames = [int(i) for i in indices]
    while len(frames) % temporal:
        frames.append(frames[-1])
    seconds = [i / fps for i in frames]
    return [(seconds[i] + seconds[i + temporal - 1]) / 2 for i in range(0, len(seconds), temporal)]


def size_get(size: Any, name: str) -> Any:
    return size.get(name) if isinstance(size, dict) else getattr(size, name)


# The two renderings processors have made of the template's video placeholder (see the module's
# docstring): the text each one replaces by the patches.
VIDEO_MARKERS = ("<|vision_start|><|video_pad|><|vision_end|>", "<|video_pad|>")


class VideoPromptMismatch(RuntimeError):
    """The installed processor renders video prompts in a way vlserve does not reproduce."""


def find_video_marker(processor: Any, merge: int) -> str:
    """Which template text (one of ``VIDEO_MARKERS``) the installed ``processor`` replaces by
    a video's patches: the one whose expansion gives, token for token, the processor's own
    prompt for a small synthetic video. Raises ``VideoPromptMismatch`` when none does."""
    import numpy as np
    from transformers.video_utils import VideoMetadata

    from vlserve.media.video import DecodedVideo

    frames = np.zeros((4, 64, 64, 3), dtype=np.uint8)
    frames[:, ::2] = 200  # not one flat colour: any resize still sees an image
    video = DecodedVideo(frames, 2.0, 8, 4.0, (0, 2, 5, 7), (0.0, 1.0, 2.5, 3.5), 4)
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "?"}]}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    kwargs: dict[str, Any] = {"do_sample_frames": False, "return_tensors": "pt"}
    if hasattr(processor.video_processor, "cap_pixels_per_frame"):
        kwargs["cap_pixels_per_frame"] = False
    expected = processor(
        text=[text],
        videos=[video.frames],
        video_metadata=[VideoMetadata(**video.metadata())],
        **kwargs,
    )["input_ids"][0].tolist()
    ours = process_video(processor.video_processor, video)
    pad = VIDEO_MARKERS[1]
    for marker in VIDEO_MARKERS:
        if text.count(marker) != 1:
            continue
        rendered = text.replace(marker, ours.placeholder(pad, merge))
        if processor.tokenizer(rendered, add_special_tokens=False)["input_ids"] == expected:
            return marker
    import transformers

    raise VideoPromptMismatch(
        f"transformers {transformers.__version__}'s processor renders video prompts in a way "
        "vlserve does not reproduce (checked at startup on a 4-frame video), so every video "
        "prompt would be wrong; install a supported version (README, 'Supported versions'; "
        "requirements/lock.txt pins the tested ones)"
    )
