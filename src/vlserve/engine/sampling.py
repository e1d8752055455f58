"""Turn one step's logits into next tokens, each row with its own sampling parameters and seed."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from vlserve.engine.request import SamplingParams


class RowSampler:
    """Sampling state of one request: its parameters, its RNG and the token counts penalties need."""

    def __init__(
        self, params: SamplingParams, prompt_token_ids: Sequence[int], device: torch.device
    ) -> None:
        self.params = params
        self.generator: torch.Generator | None = None
        if not params.greedy:
            # A generator per request keeps seeded sampling reproducible whatever else is batched.
            self.generator = torch.Generator(device=device)
            if params.seed is not None:
                self.generator.manual_seed(params.seed)
            else:
                self.generator.seed()
        self._device = device
        self._prompt_ids = torch.tensor(list(prompt_token_ids), dtype=torch.long, device=device)
        self._output_ids: list[int] = []

    def append(self, token_id: int) -> None:
        self._output_ids.append(token_id)

    def adjust(self, logits: torch.Tensor) -> torch.Tensor:
        """Apply penalties to a (vocab,) float32 row; returns a new tensor when it changes."""
        p = self.params
        if not p.needs_history:
            return logits
        logits = logits.clone()
        out = torch.tensor(self._output_ids, dtype=torch.long, device=logits.device)
        if p.repetition_penalty != 1.0:
            # Hugging Face semantics: every token seen in prompt or output, sign-aware.
            seen = torch.unique(torch.cat([self._prompt_ids, out]))
            vals = logits[seen]
            logits[seen] = torch.where(
                vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty
            )
        if (p.presence_penalty or p.frequency_penalty) and out.numel():
            # OpenAI semantics: output tokens only.
            ids, counts = torch.unique(out, return_counts=True)
            logits[ids] -= p.frequency_penalty * counts.to(logits.dtype) + p.presence_penalty
        return logits

    def sample(self, logits: torch.Tensor) -> int:
        """Pick the next token from a (vocab,) float32 row of already adjusted logits."""
        p = self.params
        if p.greedy:
            return int(torch.argmax(logits))
        logits = logits / p.temperature
        if p.top_k and p.top_k < logits.numel():
            kth = torch.topk(logits, p.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if p.min_p > 0:
            probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
        if p.top_p < 1.0:
            probs = _top_p_filter(probs, p.top_p)
        return int(torch.multinomial(probs, 1, generator=self.generator))


def _top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose mass reaches ``top_p``."""
    sorted_probs, order = torch.sort(probs, descending=True)
    cumulative = torch.cumsum(sorted_probs, dim=-1)
    # A token is dropped when the mass before it already reaches top_p; the first always stays.
    drop = (cumulative - sorted_probs) >= top_p * cumulative[-1]
    drop[0] = False  # even when top_p * total underflows to 0
    sorted_probs = sorted_probs.masked_fill(drop, 0.0)
    return torch.zeros_like(probs).scatter_(0, order, sorted_probs)


def sample_batch(logits: torch.Tensor, samplers: Sequence[RowSampler]) -> list[int]:
    """Next token of each row of (batch, vocab) logits; greedy rows without penalties share one argmax."""
    logits = logits.float()
    plain_greedy = [s.params.greedy and not s.params.needs_history for s in samplers]
    argmax = torch.argmax(logits, dim=-1).tolist() if any(plain_greedy) else []
    tokens: list[int] = []
    for i, sampler in enumerate(samplers):
        token = argmax[i] if plain_greedy[i] else sampler.sample(sampler.adjust(logits[i]))
        sampler.append(token)
        tokens.append(token)
    return tokens
