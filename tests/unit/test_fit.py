"""engine/fit.py: a prompt against the context, the KV cache and the image-token limit."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from vlserve.engine.fields import OUTPUT_TOKENS, PROMPT
from vlserve.engine.fit import fit, prompt_limit
from vlserve.engine.request import SamplingParams
from vlserve.errors import ContextLengthError, InvalidRequestError


def _fit(tokens: int, max_tokens: int | None, *, images: int = 0, kv: int = 10_000) -> int | None:
    prepared = SimpleNamespace(num_tokens=tokens, num_image_tokens=images)
    params = SamplingParams(max_tokens=max_tokens)
    out = fit(
        prepared,  # type: ignore[arg-type]  (only the two counts are read)
        params,
        max_model_len=1000,
        kv_tokens=kv,
        max_image_tokens=500,
        default_max_tokens=300,
    )
    return out.max_tokens


def test_an_unset_max_tokens_is_the_default_capped_by_the_context_and_the_kv_cache() -> None:
    assert _fit(100, None) == 300
    assert _fit(900, None) == 100  # the context's room
    assert _fit(100, None, kv=250) == 150  # the KV cache's room
    assert _fit(100, None, kv=50) == 1  # never zero: the scheduler refuses it with a 400


def test_a_given_max_tokens_must_fit_beside_the_prompt() -> None:
    assert _fit(100, 900) == 900
    with pytest.raises(ContextLengthError, match=r"at most 900 \(got 901\)") as info:
        _fit(100, 901)
    assert info.value.field == OUTPUT_TOKENS and info.value.param == "max_tokens"


@pytest.mark.parametrize(
    ("tokens", "images", "error"), [(1000, 0, ContextLengthError), (10, 501, InvalidRequestError)]
)
def test_the_prompt_itself_is_refused(tokens: int, images: int, error: type[Exception]) -> None:
    with pytest.raises(error) as info:
        _fit(tokens, None, images=images)
    assert info.value.field == PROMPT  # type: ignore[attr-defined]


def test_the_prompt_limit_is_the_smaller_of_context_and_kv_cache() -> None:
    assert prompt_limit(1000, 4000) == (1000, "the model's context of 1000 tokens")
    limit, what = prompt_limit(8000, 4000)
    assert limit == 4000 and "--kv-cache-tokens" in what
