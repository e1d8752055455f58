"""OpenAI chat messages → chat-template messages: every role, every turn, every part, in order."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from vlserve.errors import InvalidRequestError

_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def split_messages(messages: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[str]]:
    """Return template messages with image placeholders, and the image URLs in prompt order.

    Each placeholder is ``{"type": "image", "index": k}``; ``attach_images`` later puts the k-th
    decoded image in its place, so images are fetched once, concurrently, outside this pure step.
    """
    out: list[dict[str, Any]] = []
    urls: list[str] = []
    for i, message in enumerate(messages):
        role = _ROLES.get(message.get("role", ""))
        if role is None:
            raise InvalidRequestError(
                f"messages[{i}].role {message.get('role')!r} is not supported; use system, "
                "developer, user or assistant",
                param=f"messages[{i}].role",
            )
        content = message.get("content")
        parts: list[dict[str, Any]] = []
        if isinstance(content, str):
            parts.append({"type": "text", "text": content})
        else:
            for j, part in enumerate(content or []):
                parts.append(_part(part, role, urls, f"messages[{i}].content[{j}]"))
        out.append({"role": role, "content": parts})
    return out, urls


def _part(part: dict[str, Any], role: str, urls: list[str], where: str) -> dict[str, Any]:
    kind = part.get("type")
    if kind == "text":
        return {"type": "text", "text": part.get("text", "")}
    if kind == "image_url":
        if role != "user":
            raise InvalidRequestError(
                f"{where}: images are only allowed in user messages, not in {role} messages",
                param=where,
            )
        urls.append(part["image_url"]["url"])
        return {"type": "image", "index": len(urls) - 1}
    raise InvalidRequestError(f"{where}.type {kind!r} is not supported", param=f"{where}.type")


def attach_images(messages: list[dict[str, Any]], images: Sequence[Any]) -> list[dict[str, Any]]:
    """Replace each image placeholder by its decoded image (a new structure; input untouched)."""
    result = []
    for message in messages:
        parts = [
            {"type": "image", "image": images[p["index"]]} if p["type"] == "image" else p
            for p in message["content"]
        ]
        result.append({"role": message["role"], "content": parts})
    return result


# A special token the chat template never emits: each message text is rendered as this one token
# and tokenized on its own afterwards, with special-token strings split into plain text, so a user
# typing "<|im_end|>" or "<|image_pad|>" can neither end a turn nor make the processor expect
# image features.
TEXT_SLOT = "<|object_ref_start|>"


def hide_texts(messages: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[str]]:
    """Replace every text part by ``TEXT_SLOT``; return the new messages and the texts in order.

    Adjacent text parts of a message are joined first (the template concatenates them anyway),
    so tokenizing them apart cannot split a word the joined text would have kept whole.
    """
    out: list[dict[str, Any]] = []
    texts: list[str] = []
    for message in messages:
        content = message["content"]
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        hidden: list[dict[str, Any]] = []
        after_text = False
        for part in parts:
            if part.get("type") != "text":
                hidden.append(part)
            elif after_text:
                texts[-1] += part["text"]
            else:
                hidden.append({"type": "text", "text": TEXT_SLOT})
                texts.append(part["text"])
            after_text = part.get("type") == "text"
        out.append({**message, "content": hidden})
    return out, texts


def splice_texts(
    ids: Sequence[int], slot_id: int, pieces: Sequence[Sequence[int]]
) -> tuple[list[int], list[int]]:
    """Put ``pieces[k]`` in place of the k-th ``slot_id`` in ``ids``.

    Returns the new ids and, for each of them, its index in ``ids`` (-1 for spliced text), so
    per-token tensors (attention mask, token types) can follow. Raises ValueError if the slots
    and pieces do not match one to one (a template that drops or repeats a text).
    """
    out: list[int] = []
    source: list[int] = []
    k = 0
    for i, token in enumerate(ids):
        if token != slot_id:
            out.append(token)
            source.append(i)
            continue
        if k >= len(pieces):
            raise ValueError("the chat template rendered more texts than the messages hold")
        out.extend(pieces[k])
        source.extend([-1] * len(pieces[k]))
        k += 1
    if k != len(pieces):
        raise ValueError("the chat template dropped a message text")
    return out, source
