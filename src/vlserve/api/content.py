"""The content parts and ``mm_processor_kwargs`` of a chat request (pydantic, OpenAI's and
vLLM's names); the rest of the request is in protocol.py."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

# An unknown field is a 400 that names it; so are NaN and infinities (Python's json accepts them)
# and values of another JSON type (no false → 0.0, no "10" → 10): what the schema says is what
# is accepted.
STRICT = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)
MAX_TEXT_CHARS = 1_000_000  # per text; the context check bounds the tokens


class ImageURL(BaseModel):
    model_config = STRICT
    url: str = Field(min_length=1)
    detail: Literal["auto", "low", "high"] | None = None


class TextPart(BaseModel):
    model_config = STRICT
    type: Literal["text"]
    text: str = Field(max_length=MAX_TEXT_CHARS)


class ImagePart(BaseModel):
    model_config = STRICT
    type: Literal["image_url"]
    image_url: ImageURL


class VideoURL(BaseModel):
    model_config = STRICT
    url: str = Field(min_length=1)


class VideoPart(BaseModel):
    """vLLM's video content part: a data:video/...;base64 URL, an http(s) URL or a local file."""

    model_config = STRICT
    type: Literal["video_url"]
    video_url: VideoURL


ContentPart = Annotated[TextPart | ImagePart | VideoPart, Field(discriminator="type")]


# Sampling rates above this only repeat source frames (the decoder's own bound).
MAX_VIDEO_FPS = 1000


class MMProcessorKwargs(BaseModel):
    """vLLM's per-request processor settings (api/multimodal.py): pixel bounds per image and
    per video frame (clamped to --max-image-pixels and the video limits), and the video
    sampling rate and frame count (clamped to --max-video-frames)."""

    model_config = STRICT
    min_pixels: int | None = Field(default=None, ge=1)
    max_pixels: int | None = Field(default=None, ge=1)
    fps: float | None = Field(default=None, gt=0, le=MAX_VIDEO_FPS)
    # Qwen3-VL's temporal patch is two frames
    max_frames: int | None = Field(default=None, ge=2, le=2**31 - 1)
