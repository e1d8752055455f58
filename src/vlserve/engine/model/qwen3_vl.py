"""Qwen3-VL's text stack, our forward over the KV pool, on the HF module's own weights.

What HF's ``Qwen3VLTextModel`` computes, layer for layer (RMSNorm in fp32, per-head q/k norms,
interleaved MRoPE, GQA, SwiGLU, the deepstack visual embeds added after the first layers), with
none of its per-step machinery: no ``Cache`` object, no mask building, no module dispatch, no
kwargs plumbing. Attention goes through ``engine.attention`` (the pool written in place, the
step's mask from ``kv_cache.StepLayout``). The weights are the HF modules' tensors themselves,
never copied; the HF forward stays as the reference (``--model-impl transformers``), and the
exactness tests run this one against ``generate``.

The rotary cos/sin come from the HF module's own rotary embedding (one call per step): it
carries the checkpoint's rope type and scaling, and its formula differs between transformers
4.57 and 5.x in form only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from vlserve.engine.attention import PoolAttention


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF's Qwen3 RMSNorm: the statistics in fp32, the weight applied in the input's dtype."""
    dtype = x.dtype
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding (rotate-half form): x (rows, heads, q_len, dim), cos/sin (rows, q_len,
    dim)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos.unsqueeze(1) + rotated * sin.unsqueeze(1)


@dataclass(frozen=True)
class _Layer:
    """One decoder layer's weights (the HF module's parameters, not copies)."""

    norm_in: torch.Tensor
    norm_post: torch.Tensor
    q: torch.nn.Linear
    k: torch.nn.Linear
    v: torch.nn.Linear
    o: torch.nn.Linear
    q_norm: torch.Tensor
    k_norm: torch.Tensor
    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor


class Qwen3VLText:
    """The text stack of a loaded ``Qwen3VLForConditionalGeneration``: embeds in, final hidden
    states out, K/V into the pool."""

    def __init__(self, language_model: Any, text_config: Any) -> None:
        cfg = text_config
        self.eps = float(cfg.rms_norm_eps)
        self.head_dim = int(
            getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        )
        self.num_heads = int(cfg.num_attention_heads)
        self.num_kv_heads = int(cfg.num_key_value_heads)
        self.scale = self.head_dim**-0.5
        if getattr(cfg, "hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported activation {cfg.hidden_act!r}")
        self.rotary = language_model.rotary_emb
        self.norm = language_model.norm.weight
        self.layers = [_layer(layer) for layer in language_model.layers]

    @torch.inference_mode()
    def forward(
        self,
        embeds: torch.Tensor,
        positions: torch.Tensor,
        attention: PoolAttention,
        visual_mask: torch.Tensor | None = None,
        deepstack: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """embeds (rows, q_len, hidden); positions (3, rows, q_len): MRoPE's t, h, w rows.
        Returns the final-normed hidden states (rows, q_len, hidden)."""
        cos, sin = self.rotary(embeds, positions)
        h = embeds
        for i, layer in enumerate(self.layers):
            h = h + self._attention(
                i, layer, rms_norm(h, layer.norm_in, self.eps), cos, sin, attention
            )
            x = rms_norm(h, layer.norm_post, self.eps)
            h = h + F.linear(F.silu(F.linear(x, layer.gate)) * F.linear(x, layer.up), layer.down)
            if deepstack is not None and visual_mask is not None and i < len(deepstack):
                h = h.clone()
                h[visual_mask] = h[visual_mask] + deepstack[i].to(h.dtype)
        return rms_norm(h, self.norm, self.eps)

    def _attention(
        self,
        index: int,
        layer: _Layer,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attention: PoolAttention,
    ) -> torch.Tensor:
        rows, q_len, _ = x.shape
        d = self.head_dim
        q = rms_norm(layer.q(x).view(rows, q_len, self.num_heads, d), layer.q_norm, self.eps)
        k = rms_norm(layer.k(x).view(rows, q_len, self.num_kv_heads, d), layer.k_norm, self.eps)
        v = layer.v(x).view(rows, q_len, self.num_kv_heads, d)
        q = rotate(q.transpose(1, 2), cos, sin)
        k = rotate(k.transpose(1, 2), cos, sin).transpose(1, 2)
        return layer.o(attention(index, q, k, v))


def _layer(module: Any) -> _Layer:
    attn, mlp = module.self_attn, module.mlp
    return _Layer(
        norm_in=module.input_layernorm.weight,
        norm_post=module.post_attention_layernorm.weight,
        q=attn.q_proj,
        k=attn.k_proj,
        v=attn.v_proj,
        o=attn.o_proj,
        q_norm=attn.q_norm.weight,
        k_norm=attn.k_norm.weight,
        gate=mlp.gate_proj.weight,
        up=mlp.up_proj.weight,
        down=mlp.down_proj.weight,
    )
