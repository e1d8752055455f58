"""A prepared prompt against the model's context and the server's limits: the 400s, and
``max_tokens`` resolved when the request gave none. Pure: no model, no threads."""

from __future__ import annotations

import dataclasses

from vlserve.engine.fields import OUTPUT_TOKENS, PROMPT, about
from vlserve.engine.prompt import PreparedPrompt
from vlserve.engine.request import SamplingParams
from vlserve.errors import ContextLengthError, InvalidRequestError


def prompt_limit(max_model_len: int, kv_tokens: int) -> tuple[int, str]:
    """The most tokens a prompt may have, and what imposes it (for the error message): the
    model's context or the KV cache, whichever is smaller."""
    if max_model_len <= kv_tokens:
        return max_model_len, f"the model's context of {max_model_len} tokens"
    return kv_tokens, f"the server's KV cache of {kv_tokens} tokens (--kv-cache-tokens)"


def fit(
    prepared: PreparedPrompt,
    params: SamplingParams,
    *,
    max_model_len: int,
    kv_tokens: int,
    max_image_tokens: int,
    default_max_tokens: int,
) -> SamplingParams:
    """``params`` for ``prepared``: a 400 when its images pass ``max_image_tokens``, when the
    prompt fills the context, or when ``max_tokens`` does not fit beside it; without
    ``max_tokens``, the default capped by the room left in the context and in the KV cache."""
    images = prepared.num_image_tokens
    if images > max_image_tokens:
        raise about(
            PROMPT,
            InvalidRequestError(
                f"the request's images make {images} image tokens, more than the server's "
                f"{max_image_tokens} per request (--max-image-tokens-per-request); send fewer "
                "or smaller images, or use image_url.detail 'low'",
                code="too_many_image_tokens",
            ),
        )
    n = prepared.num_tokens
    room = max_model_len - n
    if room < 1:
        raise about(
            PROMPT,
            ContextLengthError(
                f"the prompt is {n} tokens, which leaves no room in the model's context of "
                f"{max_model_len} tokens"
            ),
        )
    if params.max_tokens is None:
        return dataclasses.replace(
            params, max_tokens=min(default_max_tokens, room, max(kv_tokens - n, 1))
        )
    if params.max_tokens > room:
        raise about(
            OUTPUT_TOKENS,
            ContextLengthError(
                f"this model's context is {max_model_len} tokens; the prompt uses {n}, so "
                f"max_tokens can be at most {room} (got {params.max_tokens})"
            ),
        )
    return params
