"""ModelRunner: the model and processor, prompt preparation, prefill and batched decode steps."""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import AutoProcessor, AutoTokenizer, DynamicCache, GenerationConfig

from vlserve.engine.chat import TEXT_SLOT, hide_texts, splice_texts
from vlserve.engine.device import DeviceInfo

log = logging.getLogger(__name__)

_TF5 = int(transformers.__version__.split(".")[0]) >= 5
# transformers 4.57 reads the cache from `past_key_values=` (and silently ignores `cache=`);
# 5.x reads `cache=` and deprecates the old name. See FACTS.md.
_CACHE_KW = "cache" if _TF5 else "past_key_values"

KV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: (batch, kv_heads, seq, head_dim)
_ENCODED = "vlserve_encoded"  # marks inputs that went through ModelRunner.encode


@dataclass
class PrefillResult:
    """Rows just prefilled together, ready to join the decode batch."""

    logits: torch.Tensor  # (rows, vocab) float32, last position of each row
    kv: KV  # (rows, kv_heads, width, head_dim) per layer, left-padded
    mask: torch.Tensor  # (rows, width): 1 on real positions
    lengths: list[int]  # prompt length of each row
    rope_deltas: list[int]  # multimodal position offset of each row, constant from now on


class ModelRunner:
    """Owns the model; every method but ``prepare`` runs on the engine's inference thread."""

    def __init__(
        self, model_path: str | Path, device: DeviceInfo, model: torch.nn.Module | None = None
    ) -> None:
        """Load from ``model_path``; or, with ``model`` (already on the device), take only the
        processor, tokenizer and generation config from ``model_path`` (benchmarks build real-size
        random models in memory this way)."""
        from transformers import Qwen3VLForConditionalGeneration

        self.device = device
        self.model_path = str(model_path)
        self.processor = AutoProcessor.from_pretrained(self.model_path)
        # A second tokenizer for detokenizing on the inference thread while the processor encodes
        # prompts on another: Rust tokenizers must not be shared across threads that mutate them.
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        if model is None:
            model = Qwen3VLForConditionalGeneration.from_pretrained(
                self.model_path, dtype=device.dtype, attn_implementation="sdpa"
            )
            model.to(device.torch_device)
        self.model = model.eval()
        self.generation_config = _load_generation_config(self.model_path)
        self.eos_token_ids = _eos_ids(self.generation_config, self.tokenizer)
        text_config = getattr(self.model.config, "text_config", self.model.config)
        self.max_model_len = int(text_config.max_position_embeddings)
        self.vocab_size = int(text_config.vocab_size)
        pad = self.tokenizer.pad_token_id
        self._pad_id = int(pad if pad is not None else min(self.eos_token_ids))
        self._rope_params = set(inspect.signature(self.model.model.get_rope_index).parameters)
        self._slot_id = int(self.processor.tokenizer.convert_tokens_to_ids(TEXT_SLOT))
        self._image_token_id = int(self.model.config.image_token_id)

    # -- prompt preparation (runs on the preprocessing thread) ---------------------------------
    def prepare(self, messages: list[dict[str, Any]]) -> dict[str, Any]:
        """Render the chat template and preprocess images; returns CPU tensors.

        Message texts never pass through the template's tokenization: special-token strings in
        them stay plain text (see ``chat.hide_texts``).
        """
        template, texts = hide_texts(messages)
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
        return _splice_inputs(dict(inputs), self._slot_id, pieces)

    @torch.inference_mode()
    def encode(self, prompts: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """What each prompt needs before its prefill: the vision tower's outputs and the
        multimodal position ids. All images of all ``prompts`` go through the vision tower in one
        forward (its attention stays within each image); positions are computed per prompt.

        The engine runs this on its encoder thread, ahead of the inference thread, so image
        encoding overlaps the running batch's decode steps; ``prefill`` then runs only the
        language model. Prompts already encoded are returned as they are.
        """
        todo = [p for p in prompts if _ENCODED not in p]
        features = self._image_features([p for p in todo if p.get("pixel_values") is not None])
        encoded: dict[int, dict[str, Any]] = {}
        for prompt in todo:
            positions, delta = self._positions(prompt)
            row = {
                _ENCODED: True,
                "input_ids": prompt["input_ids"],
                "position_ids": positions,
                "rope_delta": delta,
            }
            if id(prompt) in features:
                row["image_embeds"], row["deepstack"] = features[id(prompt)]
            encoded[id(prompt)] = row
        return [encoded.get(id(p), p) for p in prompts]

    def _image_features(
        self, prompts: list[dict[str, Any]]
    ) -> dict[int, tuple[torch.Tensor, list[torch.Tensor]]]:
        """One vision forward for the images of ``prompts``; id(prompt) → (embeds, deepstack)."""
        if not prompts:
            return {}
        dev = self.device.torch_device
        visual = self.model.model.visual
        grids = [p["image_grid_thw"] for p in prompts]
        pixels = torch.cat([p["pixel_values"] for p in prompts]).to(dev, visual.dtype)
        out = visual(pixels, grid_thw=torch.cat(grids).to(dev))
        # transformers 4.57 returns (embeds, deepstack); 5.x a ModelOutput
        embeds, deepstack = (
            out if isinstance(out, tuple) else (out.pooler_output, out.deepstack_features)
        )
        merge = int(visual.spatial_merge_size) ** 2
        sizes = [int(g.prod(-1).sum()) // merge for g in grids]  # image tokens of each prompt
        split_deep = [torch.split(layer, sizes) for layer in deepstack]
        return {
            id(p): (e, [layer[k] for layer in split_deep])
            for k, (p, e) in enumerate(zip(prompts, torch.split(embeds, sizes), strict=True))
        }

    # -- device work (inference thread) --------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, prompts: list[dict[str, Any]]) -> PrefillResult:
        """Run several prompts through the language model in one left-padded forward; returns
        their last logits, cache and rope deltas.

        Prompts not yet encoded are encoded here. Each row's positions are its own and its image
        features come from attention within each image, so a row does not depend on its neighbours.
        """
        dev = self.device.torch_device
        rows = self.encode(prompts)
        lengths = [row["input_ids"].shape[1] for row in rows]
        width = max(lengths)
        ids = [row["input_ids"] for row in rows]
        input_ids = torch.cat([_left_pad(i, width, self._pad_id) for i in ids]).to(dev)
        mask = torch.cat([_left_pad(torch.ones_like(i), width) for i in ids]).to(dev)
        positions = torch.cat([_left_pad(r["position_ids"], width) for r in rows], dim=1)
        embeds = self.model.get_input_embeddings()(input_ids)
        visual_mask, deepstack = None, None
        with_images = [row for row in rows if "image_embeds" in row]
        if with_images:
            visual_mask = input_ids == self._image_token_id
            features = torch.cat([row["image_embeds"] for row in with_images])
            if features.shape[0] != int(visual_mask.sum()):
                raise ValueError("image features do not match the prompts' image tokens")
            embeds = embeds.masked_scatter(
                visual_mask.unsqueeze(-1).expand_as(embeds), features.to(dev, embeds.dtype)
            )
            layers = zip(*(row["deepstack"] for row in with_images), strict=True)
            deepstack = [torch.cat(layer).to(dev) for layer in layers]
        cache = DynamicCache()
        out = self.model.model.language_model(
            inputs_embeds=embeds,
            attention_mask=mask,
            position_ids=positions.to(dev),
            use_cache=True,
            visual_pos_masks=visual_mask,
            deepstack_visual_embeds=deepstack,
            **{_CACHE_KW: cache},
        )
        cache = _output_cache(out, cache)
        return PrefillResult(
            logits=self.model.lm_head(out.last_hidden_state[:, -1]).float(),
            kv=[(layer.keys, layer.values) for layer in cache.layers],
            mask=mask,
            lengths=lengths,
            rope_deltas=[row["rope_delta"] for row in rows],
        )

    def _positions(self, inputs: dict[str, Any]) -> tuple[torch.Tensor, int]:
        """4-row position ids (text, t, h, w) of one prompt, computed per request.

        The model's own ``rope_deltas`` attribute is shared mutable state (``generate``
        overwrites it), so it is never read: each request keeps its delta.
        """
        input_ids = inputs["input_ids"]
        length = input_ids.shape[1]
        text = torch.arange(length, device=input_ids.device).view(1, 1, length)
        if inputs.get("image_grid_thw") is None:
            return text.expand(4, 1, length), 0
        kwargs = {k: v for k, v in inputs.items() if k in self._rope_params and k != "input_ids"}
        vision, delta = self.model.model.get_rope_index(input_ids, **kwargs)
        return torch.cat([text, vision.to(text.dtype)], dim=0), int(delta.view(-1)[0])

    @torch.inference_mode()
    def decode(self, batch: DecodeBatch, last_tokens: list[int]) -> torch.Tensor:
        """One decode step for every row of ``batch``; returns (rows, vocab) float32 logits."""
        dev = self.device.torch_device
        rows = len(batch.positions)
        input_ids = torch.tensor(last_tokens, dtype=torch.long, device=dev).view(rows, 1)
        pos = torch.tensor(batch.positions, dtype=torch.long, device=dev)
        delta = torch.tensor(batch.rope_deltas, dtype=torch.long, device=dev)
        mrope = (pos + delta).view(1, rows, 1).expand(3, rows, 1)
        position_ids = torch.cat([pos.view(1, rows, 1), mrope], dim=0)
        mask = torch.cat([batch.mask, torch.ones(rows, 1, dtype=batch.mask.dtype, device=dev)], 1)
        cache = DynamicCache(batch.kv)
        out = self.model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=position_ids,
            use_cache=True,
            logits_to_keep=1,
            **{_CACHE_KW: cache},
        )
        cache = _output_cache(out, cache)
        batch.kv = [(layer.keys, layer.values) for layer in cache.layers]
        batch.mask = mask
        batch.positions = [p + 1 for p in batch.positions]
        return out.logits[:, -1].float()


class DecodeBatch:
    """The running rows' KV cache, left-padded to a common length, with their positions.

    Rows join after their own prefill and leave when finished; columns that are padding in every
    row are trimmed so the cache never grows beyond the longest live row.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.kv: KV = []
        self.mask = torch.zeros(0, 0, dtype=torch.long, device=device)
        self.positions: list[int] = []  # next position index of each row
        self.rope_deltas: list[int] = []

    def __len__(self) -> int:
        return len(self.positions)

    def add(self, prefill: PrefillResult) -> None:
        """Append freshly prefilled rows, re-padding everyone to the common width."""
        if not self.positions:
            self.kv, self.mask = prefill.kv, prefill.mask
        else:
            width = max(self.mask.shape[1], prefill.mask.shape[1])
            self.kv = [
                (
                    torch.cat([_left_pad(k, width), _left_pad(nk, width)], 0),
                    torch.cat([_left_pad(v, width), _left_pad(nv, width)], 0),
                )
                for (k, v), (nk, nv) in zip(self.kv, prefill.kv, strict=True)
            ]
            self.mask = torch.cat([_left_pad(self.mask, width), _left_pad(prefill.mask, width)], 0)
        self.positions.extend(prefill.lengths)
        self.rope_deltas.extend(prefill.rope_deltas)

    def keep(self, rows: list[int]) -> None:
        """Keep only ``rows`` (indices, in order), trimming all-padding columns."""
        if len(rows) == len(self.positions):
            return
        if not rows:
            self.__init__(self.device)  # type: ignore[misc]
            return
        index = torch.tensor(rows, dtype=torch.long, device=self.device)
        mask = self.mask.index_select(0, index)
        start = int((mask.sum(0) > 0).nonzero()[0])  # first column any remaining row uses
        self.mask = mask[:, start:]
        self.kv = [
            (k.index_select(0, index)[..., start:, :], v.index_select(0, index)[..., start:, :])
            for k, v in self.kv
        ]
        self.positions = [self.positions[i] for i in rows]
        self.rope_deltas = [self.rope_deltas[i] for i in rows]


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


def _left_pad(t: torch.Tensor, width: int, value: int = 0) -> torch.Tensor:
    """Left-pad the sequence dimension (-2 for 4-D KV, else the last) with ``value`` to ``width``."""
    seq_dim = -2 if t.dim() == 4 else -1
    missing = width - t.shape[seq_dim]
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[seq_dim] = missing
    return torch.cat([t.new_full(shape, value), t], dim=seq_dim)


def _output_cache(out: Any, fallback: DynamicCache) -> DynamicCache:
    for name in ("cache", "past_key_values"):
        cache = getattr(out, name, None)
        if cache is not None:
            return cache
    return fallback


def _load_generation_config(path: str) -> GenerationConfig | None:
    try:
        return GenerationConfig.from_pretrained(path)
    except OSError:
        return None


def _eos_ids(gen: GenerationConfig | None, tokenizer: Any) -> frozenset[int]:
    ids: set[int] = set()
    eos = getattr(gen, "eos_token_id", None) if gen is not None else None
    if isinstance(eos, int):
        ids.add(eos)
    elif eos:
        ids.update(int(i) for i in eos)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return frozenset(ids)
