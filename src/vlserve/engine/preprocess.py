"""ChatPrompt → PreparedPrompt: the chat template, the processor, image keys; the special-token
defence lives here, where the prompt is tokenized.

Runs on the engine's preprocessing thread, never on the event loop or the inference thread.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import torch

from vlserve.engine.prompt import ChatPrompt, ImageInput, PreparedPrompt
from vlserve.engine.sequence import ImageSpan


class Preprocessor:
    """Renders and tokenizes prompts with the model's processor (one thread at a time)."""

    def __init__(self, processor: Any, image_token_id: int, merge_size: int) -> None:
        self.processor = processor
        self._slot_id = int(processor.tokenizer.convert_tokens_to_ids(TEXT_SLOT))
        self._image_token_id = image_token_id
        self._merge = merge_size * merge_size

    def __call__(self, prompt: ChatPrompt) -> PreparedPrompt:
        """Render the chat template and preprocess images (CPU tensors).

        Message texts never pass through the template's tokenization: special-token strings in
        them stay plain text (see ``hide_texts``).
        """
        template, texts = hide_texts(prompt.messages)
        inputs = self.processor.apply_chat_template(
            template,
            tokenize=True,
            add_generation_prompt=True,
            return_dict=True,
            return_tensors="pt",
        )
        tokenizer = self.processor.tokenizer
        pieces = [
            tokenizer.encode(t, add_special_tokens=False, split_special_tokens=True) for t in texts
        ]
        inputs = _splice_inputs(dict(inputs), self._slot_id, pieces)
        token_ids = inputs["input_ids"][0].tolist()
        images = self._images(inputs, token_ids)
        rope_inputs = {k: v for k, v in inputs.items() if k != "pixel_values" and v is not None}
        return PreparedPrompt(token_ids, images, rope_inputs, prompt.cache_salt)

    def _images(self, inputs: dict[str, Any], token_ids: list[int]) -> tuple[ImageInput, ...]:
        grids = inputs.get("image_grid_thw")
        if grids is None:
            return ()
        spans = _runs(token_ids, self._image_token_id)
        if len(spans) != grids.shape[0]:
            raise ValueError("image placeholders do not match the processed images")
        images: list[ImageInput] = []
        patches = torch.split(inputs["pixel_values"], [int(g.prod()) for g in grids])
        for (start, end), grid, pixels in zip(spans, grids, patches, strict=True):
            if end - start != int(grid.prod()) // self._merge:
                raise ValueError("an image's placeholder count does not match its grid")
            key = image_key(pixels, grid)
            images.append(ImageInput(key, pixels, grid.view(1, 3), ImageSpan(start, end, key)))
        return tuple(images)


def image_key(pixels: torch.Tensor, grid: torch.Tensor) -> bytes:
    """Content key of one processed image: its pixels as the model sees them, and its grid."""
    h = hashlib.blake2b(digest_size=16)
    h.update(str(tuple(grid.tolist())).encode())
    h.update(str(pixels.dtype).encode())
    h.update(pixels.contiguous().numpy().data)  # no copy
    return h.digest()


def _runs(ids: Sequence[int], token: int) -> list[tuple[int, int]]:
    """``[start, end)`` of each maximal run of ``token`` in ``ids``."""
    runs: list[tuple[int, int]] = []
    start = None
    for i, t in enumerate([*ids, None]):
        if t == token and start is None:
            start = i
        elif t != token and start is not None:
            runs.append((start, i))
            start = None
    return runs


def _splice_inputs(inputs: dict[str, Any], slot_id: int, pieces: list[list[int]]) -> dict[str, Any]:
    """Put each text's ids in place of its slot token; per-token tensors follow the ids."""
    ids = inputs["input_ids"]
    new_ids, source = splice_texts(ids[0].tolist(), slot_id, pieces)
    index = torch.tensor(source, dtype=torch.long)
    spliced = index < 0
    out = dict(inputs)
    for key, value in inputs.items():
        if isinstance(value, torch.Tensor) and value.dim() == 2 and value.shape == ids.shape:
            row = value[0].index_select(0, index.clamp(min=0))
            row[spliced] = 1 if key == "attention_mask" else 0  # text: attended, not an image
            out[key] = row.view(1, -1)
    out["input_ids"] = torch.tensor([new_ids], dtype=ids.dtype)
    return out


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
