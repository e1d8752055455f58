"""ChatPrompt → PreparedPrompt: the chat template, the processor, image keys; the special-token
defence lives here, where the prompt is tokenized.

Runs on the engine's preprocessing thread, never on the event loop or the inference thread.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from vlserve.engine.long_text import encode_text
from vlserve.engine.prompt import ChatPrompt, PreparedPrompt, VisualInput
from vlserve.engine.sequence import ImageSpan
from vlserve.engine.video_input import (
    ProcessedVideo,
    find_video_marker,
    frames_key,
    process_video,
    size_get,
)
from vlserve.errors import InvalidRequestError
from vlserve.lru import BytesLRU

_RAW_KEY = "vlserve_pixels_key"  # memo of the decoded pixels' hash, in the PIL image's info


@dataclass(frozen=True)
class ProcessedImage:
    """The image processor's output for one image, with its content key."""

    key: bytes
    pixel_values: torch.Tensor
    grid_thw: torch.Tensor  # (1, 3)

    @property
    def nbytes(self) -> int:
        return self.pixel_values.numel() * self.pixel_values.element_size()


class Preprocessor:
    """Renders and tokenizes prompts with the model's processor (one thread at a time).

    It does what the processor's ``apply_chat_template(tokenize=True)`` does, in steps, so that
    images already seen skip the image processor (the costly part: about 40 ms for 448x448 on
    two cores): the template renders text with one placeholder per image, each image is
    processed (or found in ``cache`` by its decoded pixels), each placeholder is expanded to that
    image's token count, and the text is tokenized. A test checks the result against the
    processor's own, token for token and pixel for pixel.
    """

    def __init__(
        self,
        processor: Any,
        image_token_id: int,
        merge_size: int,
        cache: BytesLRU[ProcessedImage | ProcessedVideo] | None = None,
        video_token_id: int | None = None,
        video_marker: str | None = None,
    ) -> None:
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self._slot_id = int(self.tokenizer.convert_tokens_to_ids(TEXT_SLOT))
        self._image_token_id = image_token_id
        self._image_token = str(self.tokenizer.convert_ids_to_tokens(image_token_id))
        if video_token_id is None:
            video_token_id = int(self.tokenizer.convert_tokens_to_ids(VIDEO_TOKEN))
        self._video_token_id = video_token_id
        self._video_token = str(self.tokenizer.convert_ids_to_tokens(video_token_id))
        self._merge = merge_size * merge_size
        # what the processor replaces by a video's patches, asked of the processor itself
        # (engine/video_input.py): it changed between transformers versions
        if video_marker is None:
            video_marker = find_video_marker(processor, self._merge)
        self._video_marker = video_marker
        self._token_types = "mm_token_type_ids" in getattr(processor, "model_input_names", ())
        self.cache: BytesLRU[ProcessedImage | ProcessedVideo] = (
            cache if cache is not None else BytesLRU(0)
        )
        added = [str(t) for t in getattr(self.tokenizer, "added_tokens_decoder", {}).values()]
        self._special = re.compile("|".join(re.escape(t) for t in added)) if added else None

    def _refuse_special(self, value: Any, where: str) -> None:
        """Tools and tool calls are rendered by the template as they are (JSON text): a special
        token's text inside them would become that token, so it is refused."""
        if value is None or self._special is None:
            return
        found = self._special.search(json.dumps(value, ensure_ascii=False))
        if found is not None:
            raise InvalidRequestError(
                f"{where} contains the special token {found.group()!r}; it cannot be rendered "
                "as plain text there",
                param=where,
            )

    def __call__(
        self, prompt: ChatPrompt, pieces: list[list[int]] | None = None
    ) -> PreparedPrompt:
        """Render the chat template and preprocess images (CPU tensors).

        Message texts never pass through the template's tokenization: special-token strings in
        them stay plain text (see ``hide_texts``). ``pieces``: the texts' ids, when the
        long-text lane has tokenized them already (``engine.long_text``).
        """
        template, texts = hide_texts(prompt.messages)
        extra: dict[str, Any] = {}
        if prompt.tools:
            self._refuse_special(prompt.tools, "tools")
            extra["tools"] = prompt.tools
        for i, message in enumerate(template):
            self._refuse_special(message.get("tool_calls"), f"messages[{i}].tool_calls")
        text = self.processor.apply_chat_template(
            template, tokenize=False, add_generation_prompt=True, **extra
        )
        parts = [p for m in template for p in m["content"] if p.get("type") in _VISUAL]
        processed = [self._process_part(p) for p in parts]
        text = self._expand(text, processed)
        rendered = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if pieces is None:
            pieces = [encode_text(self.tokenizer, t) for t in texts]
        elif len(pieces) != len(texts):
            raise ValueError("the long-text lane tokenized another prompt's texts")
        token_ids, _ = splice_texts(rendered, self._slot_id, pieces)
        visuals = self._visuals(token_ids, processed)
        return PreparedPrompt(
            token_ids, visuals, self._rope_inputs(token_ids, visuals), prompt.cache_salt
        )

    def _process_part(self, part: dict[str, Any]) -> ProcessedImage | ProcessedVideo:
        low, high = part.get("min_pixels"), part.get("max_pixels")
        if part["type"] == "image":
            return self._process(part["image"], low, high)
        # the same frames with the same bounds again (the next turn): the processor is skipped
        key = b"video:" + frames_key(part["video"]) + f"{low}:{high}".encode()
        found = self.cache.get(key)
        if found is None:
            found = process_video(self.processor.video_processor, part["video"], low, high)
            self.cache.put(key, found)
        return found

    def _process(
        self, image: Any, min_pixels: int | None = None, max_pixels: int | None = None
    ) -> ProcessedImage:
        """One image through the processor, within its pixel bounds (None: the processor's)."""
        raw_key = image.info.get(_RAW_KEY)  # a decoded image the media cache handed out again
        if raw_key is None:
            raw = hashlib.blake2b(digest_size=16)
            raw.update(f"{image.mode}{image.size}".encode())
            raw.update(image.tobytes())
            raw_key = image.info[_RAW_KEY] = raw.digest()
        kwargs: dict[str, Any] = {}
        cache_key = raw_key
        if min_pixels is not None or max_pixels is not None:
            size = self.processor.image_processor.size
            high = max_pixels or int(size_get(size, "longest_edge"))
            low = min(min_pixels or int(size_get(size, "shortest_edge")), high)
            kwargs["size"] = {"shortest_edge": low, "longest_edge": high}
            cache_key = raw_key + f"{min_pixels}:{max_pixels}".encode()
        found = self.cache.get(cache_key)
        if found is not None:
            return found
        out = self.processor.image_processor(images=[image], return_tensors="pt", **kwargs)
        pixels, grid = out["pixel_values"], out["image_grid_thw"].view(1, 3)
        processed = ProcessedImage(image_key(raw_key, grid), pixels, grid)
        self.cache.put(cache_key, processed)
        return processed

    def _expand(self, text: str, processed: list[ProcessedImage | ProcessedVideo]) -> str:
        """Each image placeholder becomes as many placeholders as its image has tokens; each
        video placeholder becomes its patches' times and placeholders (``video_input``)."""
        pattern = "|".join(re.escape(m) for m in (self._video_marker, self._image_token))
        chunks = re.split(f"({pattern})", text)
        markers = chunks[1::2]
        kinds = ["video" if m == self._video_marker else "image" for m in markers]
        if kinds != [_kind(p) for p in processed]:
            raise ValueError("the chat template's media placeholders do not match the media")
        out = [chunks[0]]
        for item, chunk in zip(processed, chunks[2::2], strict=True):
            if isinstance(item, ProcessedVideo):
                out.append(item.placeholder(self._video_token, self._merge))
            else:
                out.append(self._image_token * (int(item.grid_thw.prod()) // self._merge))
            out.append(chunk)
        return "".join(out)

    def _visuals(
        self, token_ids: list[int], processed: list[ProcessedImage | ProcessedVideo]
    ) -> tuple[VisualInput, ...]:
        """Each image's placeholder run, and each video's runs (one per temporal patch), in
        prompt order."""
        image_runs = iter(_runs(token_ids, self._image_token_id))
        video_runs = iter(_runs(token_ids, self._video_token_id))
        visuals: list[VisualInput] = []
        for item in processed:
            if isinstance(item, ProcessedVideo):
                runs = [next(video_runs, (0, 0)) for _ in range(int(item.grid_thw[0, 0]))]
                visuals.extend(item.patches(runs, self._merge))
                continue
            start, end = next(image_runs, (0, 0))
            if end - start != int(item.grid_thw.prod()) // self._merge:
                raise ValueError("an image's placeholder count does not match its grid")
            span = ImageSpan(start, end, item.key)
            visuals.append(VisualInput(item.key, item.pixel_values, item.grid_thw, span))
        if next(image_runs, None) is not None or next(video_runs, None) is not None:
            raise ValueError("media placeholders do not match the processed media")
        return tuple(sorted(visuals, key=lambda v: v.span.start))

    def _rope_inputs(
        self, token_ids: list[int], visuals: tuple[VisualInput, ...]
    ) -> dict[str, torch.Tensor]:
        """What the model's ``get_rope_index`` reads, as the processor would have returned it
        (a video's grid as one row per temporal patch: get_rope_index splits it so anyway)."""
        ids = torch.tensor([token_ids], dtype=torch.long)
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        for kind, name in (("image", "image_grid_thw"), ("video", "video_grid_thw")):
            grids = [v.grid_thw for v in visuals if v.kind == kind]
            if grids:
                inputs[name] = torch.cat(grids)
        if self._token_types:
            types = (ids == self._image_token_id).long() + 2 * (ids == self._video_token_id).long()
            inputs["mm_token_type_ids"] = types
        return inputs


_VISUAL = ("image", "video")
VIDEO_TOKEN = "<|video_pad|>"


def _kind(item: ProcessedImage | ProcessedVideo) -> str:
    return "video" if isinstance(item, ProcessedVideo) else "image"


def image_key(pixels_key: bytes, grid: torch.Tensor) -> bytes:
    """Content key of one processed image: the hash of its decoded pixels and its patch grid.

    The processor's output is a function of those two (the grid fixes the resized size, and the
    normalization is the server's), so hashing the 4.8 MB of processed pixels of a 448x448 image
    (about 8 ms) is not needed.
    """
    h = hashlib.blake2b(digest_size=16)
    h.update(pixels_key)
    h.update(str(tuple(grid.view(-1).tolist())).encode())
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
