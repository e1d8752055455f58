"""Next tokens for a batch: logit bias, penalties, grammar masks, temperature, top-k/top-p/min-p,
each row with its own seed, and log-probabilities for the rows that ask.

Every row's filters are applied to the whole batch at once (rows that do not use a filter get a
neutral value). Penalty and grammar state is kept per request and updated with each token
(``SamplerState.append``), never rebuilt from the history. The one random draw of a row comes
from its own generator, so seeded sampling is reproducible whatever else is batched.

Log-probabilities are those of the distribution the token is drawn from before truncation:
log-softmax of the logits after bias, penalties, the grammar mask and temperature (1 for
greedy rows); top-k, top-p and min-p do not change them (vLLM's ``processed_logprobs``). Only
rows that ask pay for them.

Everything runs on the logits' device for the whole batch; a step reads back from it once
(the token ids, with the logprobs of the rows that ask in the same copy), plus once more
before the grammar masks when a row is guided (the grammar runs on the host).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

import torch

from vlserve.engine.request import SamplingParams

# What a masked-out token's log-probability is reported as (JSON has no -inf); OpenAI's value.
MIN_LOGPROB = -9999.0


class GuideState(Protocol):
    """One request's grammar matcher (``engine.guided``)."""

    def fill_mask(self, bitmask: torch.Tensor, row: int) -> None: ...

    def accept(self, token_id: int) -> None: ...


class Masker(Protocol):
    """Applies the grammar masks of a batch's guided rows in place, except rows whose proposed
    token the grammar allows (``engine.guided.GuideMasker``); returns the rows it masked."""

    def __call__(
        self,
        logits: torch.Tensor,
        guides: Sequence[GuideState | None],
        proposals: Mapping[int, int] = ...,
    ) -> list[int]: ...


# (chosen token's logprob, top token ids, their logprobs) of one row
RowLogprobs = tuple[float, list[int], list[float]]


class SamplerState:
    """One request's sampling parameters, generator and penalty counts."""

    def __init__(
        self,
        params: SamplingParams,
        prompt_token_ids: Sequence[int],
        vocab_size: int,
        device: torch.device,
    ) -> None:
        self.params = params
        self.generator: torch.Generator | None = None
        self.guide: GuideState | None = None
        if not params.greedy:
            self.generator = torch.Generator(device=device)
            if params.seed is not None:
                self.generator.manual_seed(params.seed % 2**64)
            else:
                self.generator.seed()
        self.seen: torch.Tensor | None = None  # tokens of prompt and output (repetition penalty)
        self.counts: torch.Tensor | None = None  # output token counts (presence, frequency)
        if params.repetition_penalty != 1.0:
            self.seen = torch.zeros(vocab_size, dtype=torch.bool, device=device)
            ids = torch.tensor(list(prompt_token_ids), dtype=torch.long, device=device)
            self.seen[ids[(ids >= 0) & (ids < vocab_size)]] = True
        if params.presence_penalty or params.frequency_penalty:
            self.counts = torch.zeros(vocab_size, dtype=torch.float32, device=device)
        self.bias: tuple[torch.Tensor, torch.Tensor] | None = None  # (token ids, biases)
        if params.logit_bias:
            ids, values = zip(*params.logit_bias, strict=True)
            self.bias = (
                torch.tensor(ids, dtype=torch.long, device=device),
                torch.tensor(values, dtype=torch.float32, device=device),
            )

    def append(self, token_id: int) -> None:
        if self.guide is not None:
            self.guide.accept(token_id)
        if self.seen is not None and 0 <= token_id < self.seen.numel():
            self.seen[token_id] = True
        if self.counts is not None and 0 <= token_id < self.counts.numel():
            self.counts[token_id] += 1


def apply_penalties(logits: torch.Tensor, states: Sequence[SamplerState]) -> torch.Tensor:
    """OpenAI's logit bias (added to the model's logits), then the repetition (Hugging Face:
    prompt and output, sign-aware), presence and frequency (OpenAI: output only) penalties on
    (rows, vocab) logits, in vLLM's order; a new tensor when any applies."""
    biased = [i for i, s in enumerate(states) if s.bias is not None]
    rep = [i for i, s in enumerate(states) if s.seen is not None]
    cnt = [i for i, s in enumerate(states) if s.counts is not None]
    if not biased and not rep and not cnt:
        return logits
    logits = logits.clone()
    dev = logits.device
    for i in biased:
        ids, values = states[i].bias  # type: ignore[misc]
        logits[i, ids] += values
    if rep:
        index = torch.tensor(rep, device=dev)
        seen = torch.stack([states[i].seen for i in rep])  # type: ignore[misc]
        penalty = torch.tensor([states[i].params.repetition_penalty for i in rep], device=dev)
        rows = logits[index]
        scaled = torch.where(rows > 0, rows / penalty[:, None], rows * penalty[:, None])
        logits[index] = torch.where(seen, scaled, rows)
    if cnt:
        index = torch.tensor(cnt, device=dev)
        counts = torch.stack([states[i].counts for i in cnt])  # type: ignore[misc]
        freq = torch.tensor([states[i].params.frequency_penalty for i in cnt], device=dev)
        pres = torch.tensor([states[i].params.presence_penalty for i in cnt], device=dev)
        logits[index] -= counts * freq[:, None] + (counts > 0).float() * pres[:, None]
    return logits


def greedy(logits: torch.Tensor, chunks: int = 128) -> torch.Tensor:
    """``argmax(-1)`` of (rows, vocab), the first maximum on ties, computed as the max of chunks
    then the argmax within the best chunk: on CPU ``argmax`` over a 151,936-token vocabulary cost
    5.3 ms for 32 rows, this 0.6 ms (two cores)."""
    rows, vocab = logits.shape
    if vocab % chunks or logits.device.type != "cpu":
        return logits.argmax(-1)
    by_chunk = logits.view(rows, chunks, vocab // chunks)
    best = by_chunk.amax(-1).argmax(-1)
    inside = by_chunk[torch.arange(rows, device=logits.device), best].argmax(-1)
    return best * (vocab // chunks) + inside


def sample(
    logits: torch.Tensor, states: Sequence[SamplerState], mask: Masker | None = None
) -> tuple[list[int], list[RowLogprobs | None]]:
    """Next token of each row of (rows, vocab) float32 logits, and each row's logprobs (None
    where not asked); updates each state. Grammar masks are applied to ``logits`` in place."""
    logits = apply_penalties(logits.float(), states)
    logits = logits.contiguous()
    random_rows = [i for i, s in enumerate(states) if not s.params.greedy]
    guides = [s.guide for s in states]
    if mask is not None and any(g is not None for g in guides):
        # A greedy row without logprobs needs only its best allowed token: when the grammar
        # allows its unmasked choice, that is it, and its row is never masked.
        lazy = [
            i
            for i, s in enumerate(states)
            if s.params.greedy and s.params.logprobs is None and guides[i] is not None
        ]
        chosen = greedy(logits[lazy]).tolist() if lazy else []
        mask(logits, guides, dict(zip(lazy, chosen, strict=True)))
    if random_rows and len(random_rows) == len(states):  # no greedy row: no argmax, no copy
        tokens = _sample_rows(logits, states)
    else:
        tokens = greedy(logits)
        if random_rows:
            index = torch.tensor(random_rows, device=logits.device)
            tokens[index] = _sample_rows(logits[index], [states[i] for i in random_rows])
    out, logprobs = _read_back(tokens, _logprob_tensors(logits, tokens, states), states)
    for state, token in zip(states, out, strict=True):
        state.append(token)
    return out, logprobs


def _logprob_tensors(
    logits: torch.Tensor, tokens: torch.Tensor, states: Sequence[SamplerState]
) -> tuple[list[int], torch.Tensor] | None:
    """For the rows that ask: (their indices, one (rows, 1 + 2k) float64 tensor on the device:
    the chosen token's logprob, then the top k ids, then their logprobs)."""
    rows = [i for i, s in enumerate(states) if s.params.logprobs is not None]
    if not rows:
        return None
    dev = logits.device
    every = len(rows) == len(states)  # then no copy of the rows
    index = torch.tensor(rows, device=dev)
    asking = logits if every else logits[index]
    temperatures = [states[i].params.temperature or 1.0 for i in rows]
    if any(t != 1.0 for t in temperatures):
        asking = asking / torch.tensor(temperatures, device=dev).unsqueeze(1)
    logp = torch.log_softmax(asking, dim=-1)
    chosen = logp.gather(1, (tokens if every else tokens[index]).unsqueeze(1))
    chosen = chosen.clamp(min=MIN_LOGPROB)
    k = max(int(states[i].params.logprobs or 0) for i in rows)
    parts = [chosen.double()]
    if k:
        top = torch.topk(logp, k, dim=-1)  # ids are exact in float64 (below 2**53)
        parts += [top.indices.double(), top.values.clamp(min=MIN_LOGPROB).double()]
    return rows, torch.cat(parts, dim=1)


def _read_back(
    tokens: torch.Tensor,
    logprobs: tuple[list[int], torch.Tensor] | None,
    states: Sequence[SamplerState],
) -> tuple[list[int], list[RowLogprobs | None]]:
    """The step's one device-to-host copy: the token ids, with the logprobs when asked."""
    result: list[RowLogprobs | None] = [None] * len(states)
    if logprobs is None:
        return tokens.tolist(), result
    rows, table = logprobs
    n = len(states)
    flat = torch.cat([tokens.double(), table.reshape(-1)]).tolist()
    width = table.shape[1]
    k = (width - 1) // 2
    for j, i in enumerate(rows):
        row = flat[n + j * width : n + (j + 1) * width]
        want = int(states[i].params.logprobs or 0)
        ids = [int(t) for t in row[1 : 1 + k]]
        result[i] = (row[0], ids[:want], row[1 + k : 1 + k + want])
    return [int(t) for t in flat[:n]], result


def probabilities(
    logits: torch.Tensor, params: Sequence[SamplingParams]
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The distribution each row samples from: temperature, then top-k, min-p and top-p.

    When every row has a top-k (``0 < top_k < vocab``) it is computed over the rows'
    candidates only: ``(probs, ids)``, both (rows, largest k), ids ascending within each row.
    ``torch.topk`` gives them sorted by logit, so top-p needs no sort, and nothing after the
    top-k touches the vocabulary (a top-p over the whole vocabulary sorted 151,936 logits per
    row per step: Qwen3-VL's defaults, top-k 20 and top-p 0.8, then cost about 80 ms a step at
    16 rows on two CPU cores). A token tied with the k-th logit past k is dropped there; the
    whole-vocabulary form keeps ties. Otherwise ``(probs, None)`` over the vocabulary."""
    dev = logits.device
    if any(p.temperature != 1.0 for p in params):
        temperature = torch.tensor([p.temperature for p in params], device=dev).unsqueeze(1)
        logits = logits / temperature
    vocab = logits.shape[-1]
    top_k = [p.top_k if 0 < p.top_k < vocab else 0 for p in params]
    ids = None
    if all(top_k):
        logits, ids = torch.topk(logits, max(top_k), dim=-1)  # descending
        if min(top_k) < logits.shape[-1]:
            beyond = torch.arange(logits.shape[-1], device=dev) >= torch.tensor(
                top_k, device=dev
            ).unsqueeze(1)
            logits = logits.masked_fill(beyond, float("-inf"))
    elif any(top_k):
        k_max = max(top_k)
        kth = torch.topk(logits, k_max, dim=-1).values  # (rows, k_max), descending
        index = torch.tensor([max(k, 1) - 1 if k else k_max - 1 for k in top_k], device=dev)
        threshold = kth.gather(1, index.unsqueeze(1))
        use = torch.tensor([bool(k) for k in top_k], device=dev).unsqueeze(1)
        logits = logits.masked_fill(use & (logits < threshold), float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if any(p.min_p > 0 for p in params):  # decided on the host: no device read
        min_p = torch.tensor([p.min_p for p in params], device=dev).unsqueeze(1)
        probs = probs.masked_fill(probs < min_p * probs.max(dim=-1, keepdim=True).values, 0.0)
    top_p = [p.top_p for p in params]
    if any(p < 1.0 for p in top_p):
        mass = torch.tensor(top_p, device=dev, dtype=probs.dtype)
        probs = top_p_filter(probs, mass) if ids is None else _top_p_sorted(probs, mass)
    if ids is None:
        return probs, None
    # back in token order: a draw lands where the vocabulary's CDF would put it
    ids, order = torch.sort(ids, dim=-1)
    return probs.gather(1, order), ids


def top_p_filter(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Keep, per row, the smallest set of most likely tokens whose mass reaches ``top_p``."""
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
    return torch.zeros_like(probs).scatter_(-1, order, _top_p_sorted(sorted_probs, top_p))


def _top_p_sorted(sorted_probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """``top_p_filter`` of rows already sorted in descending order."""
    cumulative = torch.cumsum(sorted_probs, dim=-1)
    # A token is dropped when the mass before it already reaches top_p; the first always stays.
    drop = (cumulative - sorted_probs) >= top_p.unsqueeze(-1) * cumulative[..., -1:]
    drop[..., 0] = False  # even when top_p * total underflows to 0
    return sorted_probs.masked_fill(drop, 0.0)


def _sample_rows(logits: torch.Tensor, states: Sequence[SamplerState]) -> torch.Tensor:
    """Inverse-CDF sampling: one uniform draw per row from that row's own generator. Rows with
    a top-k and rows without are drawn apart, so which form a row's distribution takes depends
    on its own parameters only, never on the rest of the batch."""
    draws = torch.cat(
        [torch.rand(1, generator=s.generator, device=s.generator.device) for s in states]  # type: ignore[union-attr]
    ).to(logits.device, torch.float64)
    draws = draws.clamp(0.0, 1.0 - 2**-52)  # never the whole mass: a token past the last
    params = [s.params for s in states]
    vocab = logits.shape[-1]
    few = [0 < p.top_k < vocab for p in params]
    if all(few) or not any(few):
        return _draw(logits, params, draws)
    tokens = torch.empty(len(params), dtype=torch.long, device=logits.device)
    for group in (True, False):
        rows = [i for i, f in enumerate(few) if f is group]
        index = torch.tensor(rows, device=logits.device)
        tokens[index] = _draw(logits[index], [params[i] for i in rows], draws[index])
    return tokens


def _draw(
    logits: torch.Tensor, params: Sequence[SamplingParams], draws: torch.Tensor
) -> torch.Tensor:
    probs, ids = probabilities(logits, params)
    if ids is None:
        picked = inverse_cdf(probs, draws)
    else:  # at most k candidates: one float64 CDF
        cdf = probs.double().cumsum(-1)
        target = (draws * cdf[:, -1]).unsqueeze(1)
        picked = torch.searchsorted(cdf, target, right=True).view(-1).clamp(max=cdf.shape[1] - 1)
    # never a zero-probability token, even where float rounding lands on one (decided on the
    # device: no read back)
    zero = probs.gather(1, picked.unsqueeze(1)).view(-1) <= 0
    picked = torch.where(zero, greedy(probs), picked)
    return picked if ids is None else ids.gather(1, picked.unsqueeze(1)).view(-1)


CDF_BLOCKS = 128


def inverse_cdf(probs: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
    """Per row of (rows, vocab) unnormalized float32 ``probs``, the first token whose
    cumulative mass exceeds ``draws`` (rows,) x the row's total. Two levels, so a step never
    builds a whole-vocabulary CDF: block totals (``CDF_BLOCKS`` per row) pick the draw's block,
    then the draw's place within that block picks the token from the block's float64 CDF. A
    token's chance is then its probability up to the float32 rounding of its block's total,
    the precision ``probs`` has anyway. On two CPU cores, 32 rows of a 151,936-token vocabulary:
    one float64 cumulative sum over each row took 37 ms a step, this about 1 ms."""
    rows, vocab = probs.shape
    width = -(-vocab // CDF_BLOCKS)
    pad = width * CDF_BLOCKS - vocab
    blocks = torch.nn.functional.pad(probs, (0, pad)) if pad else probs
    blocks = blocks.view(rows, CDF_BLOCKS, width)
    totals = blocks.sum(-1).double()  # (rows, blocks)
    block_cdf = totals.cumsum(-1)
    target = (draws.double().clamp(0.0, 1.0 - 2**-52) * block_cdf[:, -1]).unsqueeze(1)
    block = torch.searchsorted(block_cdf, target, right=True).clamp(max=CDF_BLOCKS - 1)
    # the draw's place within its block, in [0, 1)
    place = (target - (block_cdf.gather(1, block) - totals.gather(1, block))) / totals.gather(
        1, block
    )
    place = place.nan_to_num(0.0).clamp(0.0, 1.0 - 2**-52)
    inside_cdf = blocks[torch.arange(rows, device=probs.device), block.view(-1)].double().cumsum(-1)
    inside = torch.searchsorted(inside_cdf, place * inside_cdf[:, -1:], right=True)
    return (block * width + inside.clamp(max=width - 1)).view(-1).clamp(max=vocab - 1)
