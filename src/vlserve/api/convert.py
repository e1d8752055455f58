"""Request fields → engine inputs: unsupported values refused, sampling defaults applied."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vlserve.api.protocol import MAX_STOP_STRINGS, ChatCompletionRequest
from vlserve.engine.request import MAX_LOGIT_BIAS, Guide, SamplingParams
from vlserve.errors import InvalidRequestError

MIN_TEMPERATURE = 1e-5  # below: greedy, as in vLLM
MIN_TOP_P = 1e-8
DEFAULT_MAX_N = 16  # below any top token's probability (>= 1 / vocab): keeps that token only


@dataclass(frozen=True)
class SamplingDefaults:
    """Used for fields a request leaves out: the model's generation_config, else OpenAI's defaults."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0

    @classmethod
    def from_generation_config(cls, gen: Any) -> SamplingDefaults:
        def get(name: str, fallback: Any) -> Any:
            value = getattr(gen, name, None) if gen is not None else None
            return fallback if value is None else value

        do_sample = bool(get("do_sample", True))
        return cls(
            temperature=float(get("temperature", 1.0)) if do_sample else 0.0,
            top_p=float(get("top_p", 1.0)),
            top_k=max(int(get("top_k", 0)), 0),
            min_p=float(get("min_p", 0.0)),
            repetition_penalty=float(get("repetition_penalty", 1.0)),
        )


def check_supported(req: ChatCompletionRequest, max_n: int = DEFAULT_MAX_N) -> None:
    """Refuse, naming the field, what the server cannot honour (never ignore it silently)."""
    if req.n > max_n:
        raise InvalidRequestError(
            f"n is {req.n}; this server allows at most {max_n} choices (--max-n)", param="n"
        )
    if req.top_logprobs is not None and not req.logprobs:
        raise InvalidRequestError("top_logprobs needs logprobs: true", param="top_logprobs")
    if (
        req.max_tokens is not None
        and req.max_completion_tokens is not None
        and (req.max_tokens != req.max_completion_tokens)
    ):
        raise InvalidRequestError(
            "max_tokens and max_completion_tokens disagree; send only one", param="max_tokens"
        )


def logit_bias(bias: dict[str, float] | None, vocab_size: int) -> tuple[tuple[int, float], ...]:
    """OpenAI's ``logit_bias`` (token id as a decimal string -> bias in [-100, 100]) as sorted
    (id, bias) pairs; a 400 naming ``logit_bias`` for a key that is no token id of this model or
    a bias out of range."""
    pairs = []
    for key, value in (bias or {}).items():
        # short canonical decimals only: no two keys name one token ("7" and "007"), and int()
        # never sees thousands of digits
        decimal = len(key) <= 12 and key.isascii() and key.isdigit()
        token = int(key) if decimal and key == str(int(key)) else None
        if token is None or token >= vocab_size:
            shown = key if len(key) <= 32 else key[:32] + "..."
            raise InvalidRequestError(
                f"Invalid key in 'logit_bias': {shown!r}; keys are token ids from 0 to "
                f"{vocab_size - 1}",
                param="logit_bias",
            )
        if not -MAX_LOGIT_BIAS <= value <= MAX_LOGIT_BIAS:
            raise InvalidRequestError(
                f"Invalid value in 'logit_bias' for token {token}: {value}; biases are from "
                f"{-MAX_LOGIT_BIAS:g} to {MAX_LOGIT_BIAS:g}",
                param="logit_bias",
            )
        pairs.append((token, float(value)))
    return tuple(sorted(pairs))


def stop_strings(stop: str | list[str] | None) -> tuple[str, ...]:
    if stop is None:
        return ()
    items = [stop] if isinstance(stop, str) else stop
    if len(items) > MAX_STOP_STRINGS:
        raise InvalidRequestError(f"at most {MAX_STOP_STRINGS} stop strings", param="stop")
    return tuple(s for s in items if s)


def to_sampling(
    req: ChatCompletionRequest,
    defaults: SamplingDefaults,
    *,
    vocab_size: int,
    guide: Guide | None = None,
) -> SamplingParams:
    """The request's sampling parameters over the defaults; ``max_tokens`` stays None when the
    request gives none (the engine fits it to the prompt)."""
    bad_ids = [t for t in req.stop_token_ids or () if not 0 <= t < vocab_size]
    if bad_ids:
        raise InvalidRequestError(
            f"stop_token_ids {bad_ids} are outside the vocabulary (0..{vocab_size - 1})",
            param="stop_token_ids",
        )
    top_k = defaults.top_k if req.top_k is None else max(req.top_k, 0)
    temperature = defaults.temperature if req.temperature is None else req.temperature
    top_p = defaults.top_p if req.top_p is None else req.top_p
    return SamplingParams(
        max_tokens=req.max_completion_tokens or req.max_tokens,
        # Tiny values mean the same as these floors, and below them float32 under/overflows
        # (logits / 1e-300 is inf, top_p * mass is 0) and the sampler has no distribution left.
        temperature=0.0 if temperature < MIN_TEMPERATURE else temperature,
        top_p=max(top_p, MIN_TOP_P),
        top_k=top_k,
        min_p=defaults.min_p if req.min_p is None else req.min_p,
        repetition_penalty=(
            defaults.repetition_penalty
            if req.repetition_penalty is None
            else req.repetition_penalty
        ),
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        stop=stop_strings(req.stop),
        stop_token_ids=tuple(req.stop_token_ids or ()),
        ignore_eos=req.ignore_eos,
        seed=req.seed,
        n=req.n,
        logprobs=(req.top_logprobs or 0) if req.logprobs else None,
        guide=guide,
        logit_bias=logit_bias(req.logit_bias, vocab_size),
    )
