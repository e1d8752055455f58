"""engine.model.Qwen3VLText (our forward over the pool) against HF's text model over the same
pool layout: the same hidden states for a prefill with images' deepstack and for a decode step
that reads the cache, on the tiny checkpoint (fp32, CPU)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vlserve.engine.attention import PoolAttention
from vlserve.engine.kv_cache import KVPool, PagedCache, RowSpan, build_layout
from vlserve.engine.model import Qwen3VLText


@pytest.fixture(scope="module")
def model(tiny_model_path: Path):  # type: ignore[no-untyped-def]
    from transformers import Qwen3VLForConditionalGeneration

    return Qwen3VLForConditionalGeneration.from_pretrained(
        tiny_model_path, dtype=torch.float32, attn_implementation="sdpa"
    ).eval()


def _pool(model, blocks: int = 16, block: int = 4) -> KVPool:  # type: ignore[no-untyped-def]
    cfg = model.config.text_config
    return KVPool(
        cfg.num_hidden_layers, blocks, block, cfg.num_key_value_heads, cfg.head_dim,
        torch.float32, torch.device("cpu"),
    )  # fmt: skip


def _hf(model, embeds, positions, pool, layout, mask=None, deep=None):  # type: ignore[no-untyped-def]
    import transformers

    key = "cache" if int(transformers.__version__.split(".")[0]) >= 5 else "past_key_values"
    text = torch.arange(positions.shape[-1]).expand(1, positions.shape[1], -1)
    return model.model.language_model(
        inputs_embeds=embeds,
        attention_mask=layout.mask,
        position_ids=torch.cat([text, positions]),
        use_cache=True,
        visual_pos_masks=mask,
        deepstack_visual_embeds=deep,
        **{key: PagedCache(pool, layout)},
    ).last_hidden_state


@torch.inference_mode()
def test_prefill_and_decode_match_hf_over_the_pool(model) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    hidden = model.config.text_config.hidden_size
    ours = Qwen3VLText(model.model.language_model, model.config.text_config)
    pools = _pool(model), _pool(model)
    tables = [[1, 2, 3], [4, 5, 6]]
    # a prefill of two rows (7 and 5 tokens), MRoPE positions that differ per axis, and
    # deepstack visual embeds on a few positions
    spans = [RowSpan(tables[0], 0, 7), RowSpan(tables[1], 0, 5)]
    layout = build_layout(spans, 4, torch.device("cpu"))
    embeds = torch.randn(2, 7, hidden)
    positions = torch.stack([torch.arange(7).expand(2, 7) + k for k in range(3)])
    mask = torch.zeros(2, 7, dtype=torch.bool)
    mask[0, 2:5] = True
    mask[1, 1:3] = True
    layers = len(model.model.visual.deepstack_visual_indexes)
    deep = [torch.randn(int(mask.sum()), hidden) for _ in range(layers)]
    expected = _hf(model, embeds, positions, pools[0], layout, mask, deep)
    got = ours.forward(embeds, positions, PoolAttention(pools[1], layout, ours.scale), mask, deep)
    for row, n in enumerate((7, 5)):
        torch.testing.assert_close(got[row, :n], expected[row, :n], rtol=0, atol=2e-5)
    for a, b in zip(pools[0].keys + pools[0].values, pools[1].keys + pools[1].values, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=2e-5)  # the same K/V written in place
    # a decode step: one token per row, reading the cached ones back from the pool
    spans = [RowSpan(tables[0], 7, 8), RowSpan(tables[1], 5, 6)]
    layout = build_layout(spans, 4, torch.device("cpu"), 8)
    step = torch.randn(2, 1, hidden)
    positions = torch.tensor([[[7], [5]]]).expand(3, 2, 1)
    expected = _hf(model, step, positions, pools[0], layout)
    got = ours.forward(step, positions, PoolAttention(pools[1], layout, ours.scale))
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-5)
