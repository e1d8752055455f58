"""ModelRunner: the model, the encoder stage (vision tower + positions) and the forward of a step."""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Sequence as Seq
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import AutoProcessor, AutoTokenizer, GenerationConfig

from vlserve.engine.attention import PoolAttention
from vlserve.engine.device import DeviceInfo
from vlserve.engine.graphs import DecodeGraphs
from vlserve.engine.kv_cache import PAD_ROW, KVPool, PagedCache, RowSpan, build_layout, row_bucket
from vlserve.engine.model import Qwen3VLText
from vlserve.engine.preprocess import Preprocessor
from vlserve.engine.prompt import EncodedPrompt, ImageFeatures, PreparedPrompt, VisualInput
from vlserve.engine.sequence import Sequence
from vlserve.engine.vocab import TokenBytes
from vlserve.lru import BytesLRU

log = logging.getLogger(__name__)

_TF5 = int(transformers.__version__.split(".")[0]) >= 5
# transformers 4.57 reads the cache from `past_key_values=` (and silently ignores `cache=`);
# 5.x reads `cache=` and deprecates the old name. See FACTS.md.
_CACHE_KW = "cache" if _TF5 else "past_key_values"
DECODE_KV_BUCKET = 128  # decode reads are padded to a multiple of this many positions
MODEL_IMPLS = ("auto", "vlserve", "transformers")  # vLLM's --model-impl, with our name for ours


class ModelRunner:
    """Owns the model. ``preprocess`` runs on the preprocessing thread, ``encode`` on the encoder
    thread (or the inference thread), everything else on the inference thread."""

    def __init__(
        self,
        model_path: str | Path,
        device: DeviceInfo,
        model: torch.nn.Module | None = None,
        encoder_cache: BytesLRU[ImageFeatures] | None = None,
        image_cache_bytes: int = 0,
        load_format: str = "auto",
        model_impl: str = "auto",
        attention: str = "auto",
    ) -> None:
        """Load from ``model_path`` (``load_format``: see ``load_model``); or, with ``model``
        (already on the device), take only the processor, tokenizer and generation config from
        ``model_path``. ``model_impl``: ``vlserve`` (or ``auto``) runs the text stack with our
        compact forward over the pool (``engine.model``), ``transformers`` with HF's own.
        ``attention`` (the compact forward's decode steps): ``paged`` reads the pool in place
        with the Triton kernel (``engine.paged_decode``), ``portable`` gathers; ``auto``: paged
        on CUDA when triton imports."""
        self.device = device
        self.model_path = str(model_path)
        processor = AutoProcessor.from_pretrained(self.model_path)
        # A second tokenizer for detokenizing on the inference thread while the processor encodes
        # prompts on another: Rust tokenizers must not be shared across threads that mutate them.
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        if model is None:
            model = load_model(self.model_path, device, load_format)
        self.model = model.eval()
        self.generation_config = _load_generation_config(self.model_path)
        self.eos_token_ids = _eos_ids(self.generation_config, self.tokenizer)
        self.text_config = getattr(self.model.config, "text_config", self.model.config)
        self.max_model_len = int(self.text_config.max_position_embeddings)
        self.vocab_size = int(self.text_config.vocab_size)
        self._rope_params = set(inspect.signature(self.model.model.get_rope_index).parameters)
        visual = self.model.model.visual
        self.preprocess = Preprocessor(
            processor,
            int(self.model.config.image_token_id),
            int(visual.spatial_merge_size),
            BytesLRU(image_cache_bytes),
            video_token_id=int(self.model.config.video_token_id),
        )
        self.encoder_cache = encoder_cache if encoder_cache is not None else BytesLRU(0)
        if model_impl not in MODEL_IMPLS:
            raise ValueError(f"model_impl must be one of {MODEL_IMPLS}, got {model_impl!r}")
        self.model_impl = "transformers" if model_impl == "transformers" else "vlserve"
        self.text = (
            Qwen3VLText(self.model.model.language_model, self.text_config)
            if self.model_impl == "vlserve"
            else None
        )
        self.paged_decode = self.text is not None and _paged(attention, device)
        log.info(
            "text stack: %s forward (--model-impl %s), %s decode attention",
            self.model_impl,
            model_impl,
            "paged (Triton)" if self.paged_decode else "portable",
        )
        self.pool: KVPool | None = None
        self.graphs: DecodeGraphs | None = None  # captured decode steps (EngineLoop sets them)
        # Pad decode batches to row_bucket() sizes (shapes a device graph can capture); off on
        # CPU, where a padded row costs as much as a real one.
        self.pad_decode_rows = False

    @functools.cached_property
    def token_bytes(self) -> TokenBytes:
        """Each token's bytes, for logprobs: built on first use (about 0.5 s for 152k tokens)."""
        return TokenBytes(self.tokenizer, self.vocab_size)

    # -- KV cache ------------------------------------------------------------------------------
    @property
    def kv_bytes_per_token(self) -> int:
        return KVPool.bytes_per_token(*self._kv_shape(), self.device.dtype)

    def _kv_shape(self) -> tuple[int, int, int]:
        cfg = self.text_config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        return int(cfg.num_hidden_layers), int(cfg.num_key_value_heads), int(head_dim)

    def allocate_kv(self, num_blocks: int, block_size: int) -> KVPool:
        layers, heads, dim = self._kv_shape()
        self.pool = KVPool(
            layers, num_blocks, block_size, heads, dim, self.device.dtype, self.device.torch_device
        )
        return self.pool

    # -- encoder stage -------------------------------------------------------------------------
    @torch.inference_mode()
    def encode(
        self, prompts: Seq[PreparedPrompt], *, with_features: bool = True
    ) -> list[EncodedPrompt]:
        """What each prompt needs before its prefill: the vision tower's outputs for its images
        (from the encoder cache when it has them; the rest of all ``prompts`` in one forward,
        whose attention stays within each image) and its multimodal positions. Without
        ``with_features`` the prefill computes the features."""
        images = [image for p in prompts for image in p.visuals] if with_features else []
        features = self.image_features(images)
        encoded = []
        for prompt in prompts:
            positions, delta = self._positions(prompt)
            mine = tuple(features[i.key] for i in prompt.visuals) if with_features else ()
            encoded.append(EncodedPrompt(prompt, positions, delta, mine))
        return encoded

    def encode_cached(self, prompt: PreparedPrompt) -> EncodedPrompt | None:
        """``encode`` without device work: the prompt's encoding when the encoder cache holds
        the features of all its visual inputs (or it has none), else None. Any thread."""
        features = []
        for visual in prompt.visuals:
            found = self.encoder_cache.get(visual.key)
            if found is None:
                return None
            features.append(found)
        positions, delta = self._positions(prompt)
        return EncodedPrompt(prompt, positions, delta, tuple(features))

    def image_features(self, images: Seq[VisualInput]) -> dict[bytes, ImageFeatures]:
        """Features of ``images`` by key: cached ones reused, the others computed and cached."""
        found: dict[bytes, ImageFeatures] = {}
        todo: list[VisualInput] = []
        for image in images:
            if image.key in found or any(t.key == image.key for t in todo):
                continue
            cached = self.encoder_cache.get(image.key)
            if cached is not None:
                found[image.key] = cached
            else:
                todo.append(image)
        if todo:
            for image, feats in zip(todo, self._vision(todo), strict=True):
                self.encoder_cache.put(image.key, feats)
                found[image.key] = feats
        return found

    def _vision(self, images: list[VisualInput]) -> list[ImageFeatures]:
        dev = self.device.torch_device
        visual = self.model.model.visual
        pixels = torch.cat([i.pixel_values for i in images]).to(dev, visual.dtype)
        grids = torch.cat([i.grid_thw for i in images]).to(dev)
        out = visual(pixels, grid_thw=grids)
        # transformers 4.57 returns (embeds, deepstack); 5.x a ModelOutput
        embeds, deepstack = (
            out if isinstance(out, tuple) else (out.pooler_output, out.deepstack_features)
        )
        sizes = [i.num_tokens for i in images]
        if embeds.shape[0] != sum(sizes):
            raise ValueError("image features do not match the images' placeholder tokens")
        split_deep = [torch.split(layer, sizes) for layer in deepstack]
        return [
            ImageFeatures(e, tuple(layer[k] for layer in split_deep))
            for k, e in enumerate(torch.split(embeds, sizes))
        ]

    def _positions(self, prompt: PreparedPrompt) -> tuple[torch.Tensor, int]:
        """4-row position ids (text, t, h, w) of one prompt, computed per request.

        The model's own ``rope_deltas`` attribute is shared mutable state (``generate``
        overwrites it), so it is never read: each request keeps its delta.
        """
        length = prompt.num_tokens
        text = torch.arange(length).view(1, length)
        if not prompt.visuals:
            return text.expand(4, length).clone(), 0
        inputs = prompt.rope_inputs
        kwargs = {k: v for k, v in inputs.items() if k in self._rope_params and k != "input_ids"}
        vision, delta = self.model.model.get_rope_index(inputs["input_ids"], **kwargs)
        return torch.cat([text, vision.view(3, length).to(text.dtype)]), int(delta.view(-1)[0])

    # -- one step (inference thread) -----------------------------------------------------------
    @torch.inference_mode()
    def run(
        self, seqs: Seq[Sequence], is_prefill: bool, ends: Seq[int] | None = None
    ) -> torch.Tensor:
        """One forward over ``seqs``: each computes its tokens past ``num_cached_tokens`` up to
        its end in ``ends`` (default: all; a prefill) or its last token (a decode step), writing
        their K/V into the pool. Returns the next-token logits of each row, (rows, vocab) float32 (a chunk
        that stops before the end of its prompt has logits nobody samples)."""
        if self.pool is None:
            raise RuntimeError("the KV cache is not allocated")
        graphs = self.graphs
        if not is_prefill and graphs is not None and len(seqs) <= graphs.max_rows:
            return graphs.run(seqs)
        dev = self.device.torch_device
        ends = ends if ends is not None else [s.num_tokens for s in seqs]
        spans = [
            RowSpan(s.block_table, s.num_cached_tokens, end)
            for s, end in zip(seqs, ends, strict=True)
        ]
        pad = 0
        if not is_prefill and self.pad_decode_rows:
            pad = row_bucket(len(seqs)) - len(seqs)
            spans += [PAD_ROW] * pad
        layout = build_layout(
            spans, self.pool.block_size, dev, 1 if is_prefill else DECODE_KV_BUCKET
        )
        if is_prefill:
            ids, positions = _prefill_inputs(seqs, spans, layout.q_len)
        else:
            ids, positions = _decode_inputs(seqs, pad)
        embeds = self.model.get_input_embeddings()(ids.to(dev))
        visual_mask, deepstack = None, None
        if is_prefill:
            embeds, visual_mask, deepstack = self._scatter_images(seqs, spans, embeds)
        positions = positions.to(dev)
        if self.text is not None:
            attention = PoolAttention(self.pool, layout, self.text.scale, self.paged_decode)
            hidden = self.text.forward(embeds, positions[1:], attention, visual_mask, deepstack)
        else:
            hidden = self.model.model.language_model(
                inputs_embeds=embeds,
                attention_mask=layout.mask,
                position_ids=positions,
                use_cache=True,
                visual_pos_masks=visual_mask,
                deepstack_visual_embeds=deepstack,
                **{_CACHE_KW: PagedCache(self.pool, layout)},
            ).last_hidden_state
        rows = torch.arange(len(seqs), device=dev)
        last = hidden[rows, layout.last_index[: len(seqs)]]
        return self.model.lm_head(last).float()

    def _scatter_images(
        self, seqs: Seq[Sequence], spans: list[RowSpan], embeds: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None, list[torch.Tensor] | None]:
        """Put the image features of the tokens being computed in place of their placeholders."""
        mask = torch.zeros(embeds.shape[:2], dtype=torch.bool)
        pieces: list[tuple[ImageFeatures, int, int]] = []
        for b, (seq, span) in enumerate(zip(seqs, spans, strict=True)):
            prompt: EncodedPrompt = seq.prompt
            images = prompt.prepared.visuals
            needed = [i for i in images if i.span.start < span.end and i.span.end > span.start]
            if not needed:
                continue
            features = prompt.features
            if len(features) != len(images):  # not encoded ahead (no encoder thread)
                by_key = self.image_features(needed)
                features = tuple(by_key.get(i.key) for i in images)  # type: ignore[misc]
            for image, feats in zip(images, features, strict=True):
                lo, hi = max(image.span.start, span.start), min(image.span.end, span.end)
                if lo >= hi:
                    continue
                mask[b, lo - span.start : hi - span.start] = True
                pieces.append((feats, lo - image.span.start, hi - image.span.start))
        if not pieces:
            return embeds, None, None
        dev = embeds.device
        flat = torch.cat([f.embeds[lo:hi] for f, lo, hi in pieces]).to(dev, embeds.dtype)
        mask = mask.to(dev)
        embeds = embeds.masked_scatter(mask.unsqueeze(-1).expand_as(embeds), flat)
        layers = len(pieces[0][0].deepstack)
        deepstack = [
            torch.cat([f.deepstack[k][lo:hi] for f, lo, hi in pieces]).to(dev)
            for k in range(layers)
        ]
        return embeds, mask, deepstack


def load_model(path: str, device: DeviceInfo, load_format: str = "auto") -> torch.nn.Module:
    """The checkpoint in ``path`` on ``device``. With ``load_format="dummy"`` (vLLM's name), random
    weights of the shape in ``path/config.json``, made on the device itself from seed 0: a
    real-size model without a checkpoint, and the same weights in every process that asks."""
    from transformers import AutoConfig, Qwen3VLForConditionalGeneration

    if load_format == "dummy":
        config = AutoConfig.from_pretrained(path)
        config._attn_implementation = "sdpa"
        torch.manual_seed(0)
        with torch.device(device.torch_device):
            model = Qwen3VLForConditionalGeneration._from_config(config, dtype=device.dtype)
        return model.to(device.dtype)  # 4.57 keeps config.json's dtype for the text layers
    if load_format != "auto":
        raise ValueError(f"load_format must be auto or dummy, got {load_format!r}")
    model = Qwen3VLForConditionalGeneration.from_pretrained(
        path, dtype=device.dtype, attn_implementation="sdpa"
    )
    return model.to(device.torch_device)


def _prefill_inputs(
    seqs: Seq[Sequence], spans: list[RowSpan], q_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (rows, q_len) and positions (4, rows, q_len), right-padded."""
    ids = torch.zeros(len(seqs), q_len, dtype=torch.long)
    positions = torch.zeros(4, len(seqs), q_len, dtype=torch.long)
    for b, (seq, span) in enumerate(zip(seqs, spans, strict=True)):
        ids[b, : span.end - span.start] = torch.tensor(seq.token_ids[span.start : span.end])
        positions[:, b, : span.end - span.start] = seq.prompt.positions_for(span.start, span.end)
    return ids, positions


def _decode_inputs(seqs: Seq[Sequence], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One generated token per row: its position continues the text, ``[p, p+d, p+d, p+d]``;
    ``pad`` padding rows after them (token 0 at position 0)."""
    ids = torch.tensor([[seq.token_ids[-1]] for seq in seqs] + [[0]] * pad, dtype=torch.long)
    pos = torch.tensor([seq.num_tokens - 1 for seq in seqs] + [0] * pad, dtype=torch.long)
    delta = torch.tensor([seq.prompt.rope_delta for seq in seqs] + [0] * pad, dtype=torch.long)
    mrope = (pos + delta).expand(3, -1)
    return ids, torch.cat([pos.view(1, -1), mrope]).view(4, len(seqs) + pad, 1)


def _paged(attention: str, device: DeviceInfo) -> bool:
    """Whether decode steps read the pool with the Triton kernel: asked for, or on CUDA when
    triton imports and the kernel agrees with the reference there (else the gather, logged)."""
    if attention not in ("auto", "paged", "portable"):
        raise ValueError(f"attention must be auto, paged or portable, got {attention!r}")
    if attention != "auto":
        return attention == "paged"
    if device.type != "cuda":
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    from vlserve.engine.paged_decode import self_check

    problem = self_check(device.torch_device, device.dtype)
    if problem is not None:
        log.warning("paged decode kernel unusable here (%s): decode attention gathers", problem)
    return problem is None


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
