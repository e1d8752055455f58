"""Batched sampling: filters per row, penalties kept incrementally, seeds independent of the batch."""

from __future__ import annotations

import pytest
import torch

from vlserve.engine.request import SamplingParams
from vlserve.engine.sampling import (
    SamplerState,
    _draw,
    apply_penalties,
    inverse_cdf,
    probabilities,
    sample,
    top_p_filter,
)

CPU = torch.device("cpu")


def _state(prompt: tuple[int, ...] = (), vocab: int = 4, **kw: object) -> SamplerState:
    return SamplerState(SamplingParams(max_tokens=10, **kw), prompt, vocab, CPU)  # type: ignore[arg-type]


def test_top_p_keeps_smallest_set_reaching_mass_per_row() -> None:
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.5, 0.3, 0.15, 0.05]])
    kept = top_p_filter(probs, torch.tensor([0.8, 0.1]))
    assert kept[0].nonzero().view(-1).tolist() == [0, 1]
    assert torch.equal(kept[0, :2], probs[0, :2])
    assert kept[1].nonzero().view(-1).tolist() == [0]
    tiny = top_p_filter(probs[:1], torch.tensor([5e-324]))
    assert tiny.nonzero()[:, 1].tolist() == [0]  # never empty


def test_filters_apply_per_row_in_one_batch() -> None:
    logits = torch.tensor([[5.0, 4.0, 3.0, -10.0]] * 4)
    params = [
        SamplingParams(temperature=1.0, top_k=1),
        SamplingParams(temperature=1.0, min_p=0.5),
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=1.0, top_k=2, top_p=0.5),
    ]
    probs, ids = probabilities(logits, params)
    assert ids is None  # not every row has a top-k: the whole vocabulary
    assert probs[0].nonzero().view(-1).tolist() == [0]
    assert set(probs[1].nonzero().view(-1).tolist()) <= {0, 1}
    assert probs[2].nonzero().view(-1).tolist() == [0, 1, 2, 3]  # the unfiltered row is untouched
    assert probs[3].nonzero().view(-1).tolist() == [0]
    assert torch.allclose(probs[2], torch.softmax(logits[2], -1))


@pytest.mark.parametrize(
    "first_row",
    [{"temperature": 1.0}, {"temperature": 0.7, "top_k": 20, "top_p": 0.8}],  # drawn apart
    ids=["whole-vocabulary", "top-k-candidates"],
)
def test_seed_reproducible_and_independent_of_batch(first_row: dict[str, float]) -> None:
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))

    def run(rows: list[int]) -> list[int]:
        states = [
            _state(vocab=50, seed=7, **first_row)
            if r == 0
            else _state(vocab=50, temperature=0.9, seed=r)
            for r in rows
        ]
        return [sample(logits[rows], states)[0][0] for _ in range(8)]

    first = run([0])
    assert first == run([0, 1, 2]) == run([0, 2])
    assert len(set(first)) > 1  # really sampling, not a constant


def _top_k_rows() -> list[SamplingParams]:
    return [
        SamplingParams(temperature=0.7, top_k=20, top_p=0.8),  # Qwen3-VL's defaults
        SamplingParams(temperature=1.0, top_k=5),
        SamplingParams(temperature=1.3, top_k=300, min_p=0.01),
        SamplingParams(temperature=0.5, top_k=999, top_p=0.5),
        SamplingParams(temperature=1.0, top_k=1),
    ]


def test_top_k_rows_get_their_distribution_over_candidates_only() -> None:
    """Rows that all have a top-k are filtered over their k candidates; the distribution is the
    one the whole-vocabulary form gives (a row without a top-k in the batch forces that form)."""
    logits = torch.randn(5, 1000, generator=torch.Generator().manual_seed(1)) * 3
    params = _top_k_rows()
    probs, ids = probabilities(logits, params)
    assert ids is not None and probs.shape == ids.shape == (5, 999)
    assert bool((ids[:, 1:] > ids[:, :-1]).all())  # token order
    full, none = probabilities(torch.cat([logits, logits[:1]]), [*params, SamplingParams()])
    assert none is None
    dense = torch.zeros(5, 1000).scatter_(1, ids, probs)
    assert torch.allclose(
        dense / dense.sum(1, keepdim=True), full[:5] / full[:5].sum(1, keepdim=True), atol=1e-6
    )
    assert [int((full[i] > 0).sum()) for i in range(5)] == [
        int((dense[i] > 0).sum()) for i in range(5)
    ]
    assert (dense[1] > 0).sum() == 5 and (dense[4] > 0).sum() == 1


def test_top_k_rows_draw_the_token_the_whole_vocabulary_draws() -> None:
    """The candidates are in token order, so one draw lands on the same token either way."""
    logits = torch.randn(5, 1000, generator=torch.Generator().manual_seed(2)) * 3
    params = _top_k_rows()
    full, _ = probabilities(torch.cat([logits, logits[:1]]), [*params, SamplingParams()])
    rng = torch.Generator().manual_seed(3)
    for _ in range(200):
        draws = torch.rand(5, generator=rng, dtype=torch.float64)
        assert _draw(logits, params, draws).tolist() == _full_cdf(full[:5], draws).tolist()


def test_sampling_follows_the_distribution() -> None:
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1, 0.0]]))
    state = _state(temperature=1.0, seed=3)
    counts = [0, 0, 0, 0]
    for _ in range(2000):
        counts[sample(logits, [state])[0][0]] += 1
    assert counts[3] == 0
    assert 0.65 < counts[0] / 2000 < 0.75 and 0.15 < counts[1] / 2000 < 0.25


def _full_cdf(probs: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
    """The reference: one float64 cumulative sum over each whole row."""
    cdf = probs.double().cumsum(-1)
    target = (draws * cdf[:, -1]).unsqueeze(1)
    return torch.searchsorted(cdf, target, right=True).view(-1)


def test_two_level_inverse_cdf_is_the_full_cdf_where_sums_are_exact() -> None:
    """Small integer weights sum exactly in float32, so the block lookup must pick the very
    token a whole-row CDF picks, for every draw: vocabularies that fill the blocks (151,936 =
    128 x 1187, Qwen's) and that do not (padding), zeros included."""
    g = torch.Generator().manual_seed(0)
    for vocab in (1000, 151_936, 129, 7):
        probs = torch.randint(0, 4, (3, vocab), generator=g).float()
        probs[:, 0] = 1.0  # never an all-zero row
        ends = torch.tensor([0.0, 1 - 2**-53], dtype=torch.float64)
        count = 64 if vocab > 10_000 else 2000
        draws = torch.cat([ends, torch.rand(count, generator=g).double()])
        for row in range(3):
            rows = probs[row : row + 1].expand(len(draws), vocab).contiguous()
            picked = inverse_cdf(rows, draws)
            assert torch.equal(picked, _full_cdf(rows, draws)), vocab
            assert bool((rows.gather(1, picked.unsqueeze(1)) > 0).all())  # never a zero token


def test_two_level_inverse_cdf_follows_float_distributions() -> None:
    """Float weights: each token's frequency over many draws matches its probability."""
    g = torch.Generator().manual_seed(1)
    probs = torch.softmax(torch.randn(1, 300, generator=g) * 2, -1)
    draws = torch.rand(200_000, generator=g).double()
    picked = inverse_cdf(probs.expand(len(draws), 300).contiguous(), draws)
    freq = torch.bincount(picked, minlength=300).double() / len(draws)
    assert float((freq - probs[0].double()).abs().sum()) / 2 < 0.02  # total variation
    one_hot = torch.zeros(2, 300)
    one_hot[:, 123] = 1.0
    assert inverse_cdf(one_hot, torch.tensor([0.0, 1 - 2**-24])).tolist() == [123, 123]


def test_repetition_penalty_uses_prompt_and_output_sign_aware() -> None:
    s = _state(prompt=(1,), temperature=0, repetition_penalty=2.0)
    s.append(2)
    out = apply_penalties(torch.tensor([[1.0, 4.0, -1.0, 3.0]]), [s])
    assert out.tolist() == [[1.0, 2.0, -2.0, 3.0]]


def test_presence_and_frequency_penalties_count_output_only() -> None:
    s = _state(prompt=(0,), temperature=0, presence_penalty=1.0, frequency_penalty=0.5)
    for t in (1, 1, 2):
        s.append(t)
    out = apply_penalties(torch.zeros(1, 4), [s])
    assert out.tolist() == [[0.0, -2.0, -1.5, 0.0]]


def test_logit_bias_is_added_before_the_repetition_penalty() -> None:
    # vLLM's order: (4 + 2) / 2 = 3 for the seen token 1, not 4 / 2 + 2 = 4
    s = _state(prompt=(1,), temperature=0, repetition_penalty=2.0, logit_bias=((1, 2.0), (3, -5.0)))
    out = apply_penalties(torch.tensor([[1.0, 4.0, -1.0, 3.0]]), [s])
    assert out.tolist() == [[1.0, 3.0, -1.0, -2.0]]


def test_logit_bias_steers_its_rows_only_greedy_sampled_and_in_logprobs() -> None:
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]] * 3)
    banned = _state(temperature=0, logit_bias=((0, -100.0),), logprobs=1)
    forced = _state(temperature=1.0, seed=3, logit_bias=((3, 100.0),))
    plain = _state(temperature=0)
    tokens, logprobs = sample(logits.clone(), [banned, forced, plain])
    assert tokens == [1, 3, 0]
    expected = torch.log_softmax(torch.tensor([-97.0, 2.0, 1.0, 0.0]), -1)
    assert logprobs[0] == (expected[1].item(), [1], [expected[1].item()])
    assert apply_penalties(logits, [plain] * 3) is logits  # no bias, no penalty: no copy


def test_sample_updates_penalty_state_incrementally() -> None:
    s = _state(temperature=0, frequency_penalty=10.0)
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    assert [sample(logits, [s])[0][0] for _ in range(3)] == [0, 1, 2]


def test_greedy_rows_and_penalised_rows_share_a_batch() -> None:
    logits = torch.tensor([[0.0, 3.0, 1.0], [0.0, 3.0, 2.9]])
    plain = _state(vocab=3, temperature=0)
    penalised = _state(prompt=(1,), vocab=3, temperature=0, repetition_penalty=2.0)
    assert sample(logits, [plain, penalised])[0] == [1, 2]


def test_greedy_is_argmax_with_the_first_maximum_on_ties() -> None:
    from vlserve.engine.sampling import greedy

    gen = torch.Generator().manual_seed(5)
    for vocab in (151936, 1000, 129):  # chunked, and the plain fallback
        x = torch.randn(9, vocab, generator=gen)
        x[0] = 0.0  # every entry ties
        x[1, 7] = x[1, vocab - 3] = 1e6  # two tied maxima in different chunks
        x[2, -1] = 1e6  # the last entry
        assert torch.equal(greedy(x), x.argmax(-1))


def test_logprobs_are_of_the_tempered_penalised_distribution_for_asking_rows_only() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0], [2.5, 1.0, 0.5, -1.0], [0.0, 3.0, 1.0, 2.0]])
    greedy_row = _state(temperature=0, logprobs=2)
    hot = _state(temperature=2.0, seed=1, logprobs=3, frequency_penalty=1.0)
    hot.append(0)  # token 0 counted once: its logit drops by 1
    silent = _state(temperature=0)
    tokens, logprobs = sample(logits.clone(), [greedy_row, hot, silent])
    assert logprobs[2] is None and tokens[0] == 0 and tokens[2] == 1
    chosen, top_ids, top_values = logprobs[0]  # type: ignore[misc]
    expected = torch.log_softmax(logits[0], -1)
    assert top_ids == [0, 1] and chosen == top_values[0] == expected[0].item()
    chosen, top_ids, top_values = logprobs[1]  # type: ignore[misc]
    expected = torch.log_softmax((logits[1] - torch.tensor([1.0, 0, 0, 0])) / 2.0, -1)
    assert top_ids == expected.argsort(descending=True)[:3].tolist()
    assert chosen == expected[tokens[1]].item()
    assert top_values == sorted(top_values, reverse=True)


def test_logprobs_zero_gives_the_chosen_token_only() -> None:
    _, logprobs = sample(torch.tensor([[1.0, 0.0]]), [_state(vocab=2, temperature=0, logprobs=0)])
    assert logprobs[0] is not None and logprobs[0][1:] == ([], [])


def test_a_step_reads_back_from_the_device_once(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Greedy, sampled (temperature, top-k, top-p, min-p, penalties, bias, seeds) and logprob
    rows in one batch: the token ids and the logprobs come back in one copy, and no filter
    reads a device value to decide anything (each such read is a host sync on an accelerator)."""
    reads: list[str] = []
    for name in ("tolist", "item", "__bool__", "__int__", "__float__"):
        real = getattr(torch.Tensor, name)

        def counted(self, *a, _real=real, _name=name):  # type: ignore[no-untyped-def]
            reads.append(_name)
            return _real(self, *a)

        monkeypatch.setattr(torch.Tensor, name, counted)
    vocab = 50
    states = [
        _state(vocab=vocab, temperature=0.0),
        _state(vocab=vocab, temperature=0.0, logprobs=3),
        _state((1, 2), vocab, temperature=0.9, top_k=5, top_p=0.8, seed=3, logprobs=0),
        _state(
            (4,),
            vocab,
            temperature=1.2,
            min_p=0.1,
            repetition_penalty=1.3,
            seed=5,
            presence_penalty=0.5,
            logit_bias=((7, 5.0),),
        ),  # fmt: skip
    ]
    logits = torch.randn(4, vocab, generator=torch.Generator().manual_seed(0))
    reads.clear()
    tokens, logprobs = sample(logits, states)
    assert reads == ["tolist"], reads
    assert len(tokens) == 4 and all(isinstance(t, int) for t in tokens)
    assert logprobs[0] is None and logprobs[3] is None
    chosen, top_ids, top_values = logprobs[1]  # type: ignore[misc]
    assert top_ids[0] == tokens[1] and chosen == top_values[0] and len(top_ids) == 3
    assert all(isinstance(i, int) for i in top_ids)
    assert logprobs[2] is not None and logprobs[2][1:] == ([], [])
