"""The typed stages of a prompt: ChatPrompt → PreparedPrompt → EncodedPrompt.

Each stage is a new frozen object; no stage mutates the one before it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from vlserve.engine.sequence import ImageSpan


@dataclass(frozen=True)
class ChatPrompt:
    """What the API hands the engine: chat-template messages, images and videos already decoded
    (``{"type": "image", "image": PIL.Image}`` and ``{"type": "video", "video":
    media.video.DecodedVideo}`` parts, each with optional ``min_pixels``/``max_pixels``, per frame
    for a video), the tools the template renders (OpenAI's
    ``tools`` entries) and the tenant's cache salt."""

    messages: list[dict[str, Any]]
    cache_salt: str | None = None
    tools: list[dict[str, Any]] | None = None


@dataclass(frozen=True)
class VisualInput:
    """One image, or one temporal patch of a video (two frames), after the processor: its
    patches, grid and content key. The vision tower attends within each temporal patch only,
    so a video's patches are encoded, cached and scattered exactly as images are."""

    key: bytes  # hash of the processed pixels and grid: what the prefix and encoder caches key on
    pixel_values: torch.Tensor  # (patches, patch_dim), CPU
    grid_thw: torch.Tensor  # (1, 3): t is 1
    span: ImageSpan  # its placeholder tokens in the prompt
    kind: str = "image"  # or "video"

    @property
    def num_tokens(self) -> int:
        return self.span.end - self.span.start


@dataclass(frozen=True)
class PreparedPrompt:
    """A rendered, tokenized prompt with its images and videos preprocessed (CPU tensors)."""

    token_ids: list[int]
    visuals: tuple[VisualInput, ...]  # in prompt order
    rope_inputs: Mapping[str, torch.Tensor]  # what get_rope_index needs (input_ids, grids, ...)
    cache_salt: str | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_image_tokens(self) -> int:
        return sum(v.num_tokens for v in self.visuals if v.kind == "image")

    @property
    def num_video_tokens(self) -> int:
        return sum(v.num_tokens for v in self.visuals if v.kind == "video")


@dataclass(frozen=True)
class ImageFeatures:
    """The vision tower's outputs for one image (or temporal patch of a video), on the device."""

    embeds: torch.Tensor  # (tokens, hidden)
    deepstack: tuple[torch.Tensor, ...]  # one (tokens, hidden) per deepstack layer

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.embeds, *self.deepstack))


@dataclass(frozen=True)
class EncodedPrompt:
    """A prepared prompt with what its prefill needs: positions and image features."""

    prepared: PreparedPrompt
    positions: torch.Tensor  # (4, tokens): text, then the three multimodal rows
    rope_delta: int  # position offset of generated tokens (multimodal rows)
    features: tuple[ImageFeatures, ...] = field(default=())  # one per visual input, in order

    def positions_for(self, start: int, end: int) -> torch.Tensor:
        """Positions of tokens ``[start, end)``; tokens past the prompt continue the text."""
        n = self.positions.shape[1]
        head = self.positions[:, start : min(end, n)]
        if end <= n:
            return head
        tail = torch.arange(max(start, n), end, dtype=self.positions.dtype)
        rows = torch.stack(
            [tail, tail + self.rope_delta, tail + self.rope_delta, tail + self.rope_delta]
        )
        return torch.cat([head, rows], dim=1)
