"""OpenAI chat messages → chat-template messages: every role, every turn, every part, in order."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from vlserve.api.protocol import ChatMessage
from vlserve.errors import InvalidRequestError

_ROLES = {
    "system": "system",
    "developer": "system",
    "user": "user",
    "assistant": "assistant",
    "tool": "tool",
}
_IMAGE_ROLES = ("user", "tool")  # a tool result may hold images and videos too
# image_url.detail "low": at most 256 image tokens (each covers 32x32 pixels after merging)
LOW_DETAIL_MAX_PIXELS = 256 * 32 * 32


@dataclass(frozen=True)
class ImageBudget:
    """Pixel bounds for the image processor: the request's ``mm_processor_kwargs``
    (``min_pixels``/``max_pixels``, vLLM's extension) clamped to the server's
    ``--max-image-pixels``; ``detail: "low"`` caps one image at ``LOW_DETAIL_MAX_PIXELS``.
    ``high`` and ``auto`` mean the server's limit. None: the processor's own setting."""

    min_pixels: int | None = None
    max_pixels: int | None = None

    @classmethod
    def from_request(cls, kwargs: dict[str, int | None] | None, server_max: int) -> ImageBudget:
        kwargs = kwargs or {}
        low, high = kwargs.get("min_pixels"), kwargs.get("max_pixels")
        if low is not None and high is not None and low > high:
            raise InvalidRequestError(
                f"mm_processor_kwargs.min_pixels ({low}) is above max_pixels ({high})",
                param="mm_processor_kwargs.min_pixels",
            )
        return cls(
            None if low is None else min(low, server_max),
            None if high is None else min(high, server_max),
        )

    def bounds(self, detail: str | None) -> dict[str, int]:
        high = self.max_pixels
        if detail == "low":
            high = min(high or LOW_DETAIL_MAX_PIXELS, LOW_DETAIL_MAX_PIXELS)
        low = (
            self.min_pixels
            if high is None or self.min_pixels is None
            else min(self.min_pixels, high)
        )
        out = {}
        if low is not None:
            out["min_pixels"] = low
        if high is not None:
            out["max_pixels"] = high
        return out


@dataclass(frozen=True)
class MediaRef:
    """One image or video a request brings, in prompt order: what to load and where it was."""

    kind: str  # "image" or "video"
    url: str
    param: str  # the request field, e.g. messages[0].content[1].video_url
    detail: str | None = None  # image_url.detail


# content part type → the media kind it brings (both only in user and tool messages)
_MEDIA_PARTS = {"image_url": "image", "video_url": "video"}


def split_messages(
    messages: Sequence[ChatMessage] | Sequence[Mapping[str, Any]],
) -> tuple[list[dict[str, Any]], list[MediaRef]]:
    """Return template messages with media placeholders, and the images and videos in prompt
    order.

    ``messages`` are the request's typed messages, walked as they are (no dump, no second
    validation); the same shapes as plain dicts are read alike (callers that build them).
    Each placeholder is ``{"type": "image" | "video", "index": k}``; ``attach_media`` later puts
    the k-th loaded part in its place, so media are fetched once, concurrently, outside this
    pure step.
    """
    out: list[dict[str, Any]] = []
    refs: list[MediaRef] = []
    for i, message in enumerate(messages):
        role = _ROLES.get(_get(message, "role") or "")
        if role is None:
            raise InvalidRequestError(
                f"messages[{i}].role {_get(message, 'role')!r} is not supported; use system, "
                "developer, user, assistant or tool",
                param=f"messages[{i}].role",
            )
        content = _get(message, "content")
        calls = _get(message, "tool_calls")
        if calls is not None and role != "assistant":
            raise InvalidRequestError(
                f"messages[{i}]: only assistant messages carry tool_calls",
                param=f"messages[{i}].tool_calls",
            )
        if role == "tool" and not _get(message, "tool_call_id"):
            raise InvalidRequestError(
                f"messages[{i}].tool_call_id is required: messages with role 'tool' must "
                "answer a tool call by its id",
                param=f"messages[{i}].tool_call_id",
            )
        if content is None and not calls:
            raise InvalidRequestError(
                f"messages[{i}].content is required (it may be null only beside tool_calls)",
                param=f"messages[{i}].content",
            )
        parts: list[dict[str, Any]] = []
        if isinstance(content, str):
            parts.append({"type": "text", "text": content})
        else:
            for j, part in enumerate(content or []):
                parts.append(_part(part, role, refs, f"messages[{i}].content[{j}]"))
        entry: dict[str, Any] = {"role": role, "content": parts}
        if calls:
            entry["tool_calls"] = [
                {"type": "function", "function": _plain(_get(c, "function"))} for c in calls
            ]
        out.append(entry)
    return out, refs


def _get(item: Any, name: str) -> Any:
    """Field ``name`` of a typed model, or key ``name`` of the same shape as a dict (None if
    absent either way)."""
    return item.get(name) if isinstance(item, Mapping) else getattr(item, name, None)


def _plain(function: Any) -> dict[str, Any]:
    """A tool call's ``function`` as the template takes it: ``{"name", "arguments"}``."""
    return function if isinstance(function, Mapping) else function.model_dump(exclude_none=True)


def _part(part: Any, role: str, refs: list[MediaRef], where: str) -> dict[str, Any]:
    kind = _get(part, "type")
    if kind == "text":
        return {"type": "text", "text": _get(part, "text") or ""}
    media = _MEDIA_PARTS.get(kind)  # type: ignore[arg-type]
    if media is not None:
        if role not in _IMAGE_ROLES:
            raise InvalidRequestError(
                f"{where}: {media}s are only allowed in user and tool messages, not in {role} "
                "messages",
                param=where,
            )
        source = _get(part, kind)
        refs.append(MediaRef(media, _get(source, "url"), f"{where}.{kind}", _get(source, "detail")))
        return {"type": media, "index": len(refs) - 1}
    raise InvalidRequestError(f"{where}.type {kind!r} is not supported", param=f"{where}.type")


def attach_media(
    messages: list[dict[str, Any]], parts: Sequence[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Replace each media placeholder by its loaded part (``parts[index]``, the engine's
    ``{"type": "image", "image": ...}`` or ``{"type": "video", "video": ...}`` with its pixel
    bounds); a new structure, input untouched."""
    return [
        {
            **message,
            "content": [parts[p["index"]] if "index" in p else p for p in message["content"]],
        }
        for message in messages
    ]
