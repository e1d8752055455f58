"""Per-row sampling: filters, penalties, seeds and the shared greedy fast path."""

from __future__ import annotations

import torch

from vlserve.engine.request import SamplingParams
from vlserve.engine.sampling import RowSampler, _top_p_filter, sample_batch

CPU = torch.device("cpu")


def _sampler(prompt: tuple[int, ...] = (), **kw: object) -> RowSampler:
    return RowSampler(SamplingParams(max_tokens=10, **kw), prompt, CPU)  # type: ignore[arg-type]


def test_top_p_keeps_smallest_set_reaching_mass() -> None:
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    kept = _top_p_filter(probs, 0.8)
    assert kept.nonzero().view(-1).tolist() == [0, 1]
    assert torch.equal(kept[:2], probs[:2])
    assert _top_p_filter(probs, 0.1).nonzero().view(-1).tolist() == [0]
    assert _top_p_filter(probs, 5e-324).nonzero().view(-1).tolist() == [0]  # never empty


def test_top_k_and_min_p_restrict_candidates() -> None:
    logits = torch.tensor([5.0, 4.0, 3.0, -10.0])
    k1 = {_sampler(temperature=1.0, top_k=1, seed=s).sample(logits) for s in range(20)}
    assert k1 == {0}
    minp = {_sampler(temperature=1.0, min_p=0.5, seed=s).sample(logits) for s in range(50)}
    assert minp <= {0, 1}


def test_seed_reproducible_and_independent_of_batch() -> None:
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))

    def run(rows: list[int]) -> list[int]:
        samplers = [
            _sampler(temperature=1.0, seed=7) if r == 0 else _sampler(temperature=0.9, seed=r)
            for r in rows
        ]
        out = []
        for _ in range(5):
            out.append(sample_batch(logits[rows], samplers)[0])
        return out

    assert run([0]) == run([0, 1, 2]) == run([0, 2])


def test_repetition_penalty_uses_prompt_and_output_sign_aware() -> None:
    s = _sampler(prompt=(1,), temperature=0, repetition_penalty=2.0)
    s.append(2)
    out = s.adjust(torch.tensor([1.0, 4.0, -1.0, 3.0]))
    assert out.tolist() == [1.0, 2.0, -2.0, 3.0]


def test_presence_and_frequency_penalties_count_output_only() -> None:
    s = _sampler(prompt=(0,), temperature=0, presence_penalty=1.0, frequency_penalty=0.5)
    for t in (1, 1, 2):
        s.append(t)
    out = s.adjust(torch.zeros(4))
    assert out.tolist() == [0.0, -2.0, -1.5, 0.0]


def test_greedy_rows_share_argmax_and_penalised_rows_do_not() -> None:
    logits = torch.tensor([[0.0, 3.0, 1.0], [0.0, 3.0, 2.9]])
    plain, penalised = (
        _sampler(temperature=0),
        _sampler(prompt=(1,), temperature=0, repetition_penalty=2.0),
    )
    assert sample_batch(logits, [plain, penalised]) == [1, 2]
