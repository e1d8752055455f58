"""EngineLoop without a model: a runner that follows a script over a simulated KV pool, so the
loop's own bookkeeping (usage's cached_tokens, preemption, the final UTF-8 flush) is tested in
a second, through the real scheduler, block manager, sampler and detokenizer."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest
import torch

from tests.unit.simulated_kv import ByteDecoder, SimulatedKV
from vlserve.engine.engine import EngineConfig, EngineHooks
from vlserve.engine.loop import EngineLoop
from vlserve.engine.request import FinishReason, SamplingParams, TokenEvent
from vlserve.engine.scheduler import SchedulerConfig
from vlserve.engine.sequence import Sequence

BS = 4
VOCAB = 260
EOS = 259


class ScriptedRunner:
    """The runner's seams only: ``run`` computes each row over the simulated pool (every read
    checked) and answers the request's script, token ``i`` of the output at output position
    ``i``, then EOS."""

    def __init__(self, script: list[int]) -> None:
        self.script = script
        self.device = SimpleNamespace(type="cpu", torch_device=torch.device("cpu"))
        self.vocab_size = VOCAB
        self.tokenizer = ByteDecoder()
        self.eos_token_ids = {EOS}
        self.max_model_len = 10_000
        self.kv = SimulatedKV(BS)

    def allocate_kv(self, num_blocks: int, block_size: int) -> None:
        assert block_size == BS

    def run(self, seqs: list[Sequence], is_prefill: bool, ends: list[int]) -> torch.Tensor:
        logits = torch.zeros(len(seqs), VOCAB)
        for i, (seq, end) in enumerate(zip(seqs, ends, strict=True)):
            self.kv.compute(seq, seq.num_cached_tokens, end)
            out = end - seq.num_prompt_tokens
            logits[i, self.script[out] if out < len(self.script) else EOS] = 1.0
        return logits


def _loop(script: list[int], kv_tokens: int, prefill_tokens: int, seqs: int = 4) -> EngineLoop:
    config = EngineConfig(
        "scripted",
        SchedulerConfig(max_num_seqs=seqs, max_prefill_tokens=prefill_tokens, reserve_fraction=0),
        kv_cache_tokens=kv_tokens,
        block_size=BS,
        decode_graph="none",
    )
    return EngineLoop(config, ScriptedRunner(script), threading.Condition(), EngineHooks())  # type: ignore[arg-type]


def _submit(loop: EngineLoop, name: str, prompt: list[int], max_tokens: int) -> list[TokenEvent]:
    prepared = SimpleNamespace(
        token_ids=prompt,
        num_tokens=len(prompt),
        visuals=(),
        cache_salt=None,
        num_image_tokens=0,
        num_video_tokens=0,
    )
    events: list[TokenEvent] = []
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    seq = loop.new_sequence(
        SimpleNamespace(prepared=prepared),  # type: ignore[arg-type]
        params,
        name,
        events.append,
        600.0,
    )
    loop.scheduler.add(seq)
    return events


def _drain(loop: EngineLoop) -> None:
    while loop.scheduler.has_work():
        plan = loop.scheduler.schedule()
        assert plan.seqs or plan.preempted, "nothing could run"
        loop.step(plan)


def _text(events: list[TokenEvent]) -> str:
    return "".join(e.text for e in events)


SCRIPT = list("a tale of 你好 and 🎉, told twice. ".encode() * 2)


def test_cached_tokens_are_the_hit_at_admission_for_a_prompt_of_several_chunks() -> None:
    """The second prompt extends the first: 60 of its 90 tokens are a hit and 30 are computed
    in four chunks of 8. Usage reports the 60 on every event; each chunk's progress is not a
    prefix hit."""
    loop = _loop(SCRIPT, kv_tokens=1024, prefill_tokens=8)
    prompt = [ord("p")] * 30 + list(range(100, 131))
    first = _submit(loop, "first", prompt, max_tokens=3)
    _drain(loop)
    assert {e.num_cached_tokens for e in first} == {0}
    longer = prompt + list(range(131, 160))
    second = _submit(loop, "second", longer, max_tokens=3)
    assert loop.blocks.lookup(loop.scheduler.waiting[0]) == 60
    _drain(loop)
    assert {e.num_cached_tokens for e in second} == {60}
    assert second[-1].finish_reason is FinishReason.LENGTH and _text(second) == "a t"


def test_a_preempted_request_keeps_its_cached_tokens_and_every_token() -> None:
    """Four requests in a KV cache too small for them all: the newest are preempted and
    recomputed, mostly from their own cached blocks. Each still emits its script exactly once,
    and usage's cached_tokens stays what the prefix cache gave at its first admission (0: the
    prompts share no block), not what the recompute found of its own blocks."""
    loop = _loop(SCRIPT, kv_tokens=96, prefill_tokens=64)
    streams = [
        _submit(loop, f"r{i}", [200 + i] * 10 + list(range(i, i + 10)), max_tokens=18)
        for i in range(4)
    ]
    _drain(loop)
    assert loop.scheduler.num_preemptions > 0
    for events in streams:
        assert [t for e in events for t in e.token_ids] == SCRIPT[:18]
        assert _text(events) == bytes(SCRIPT[:18]).decode()
        assert {e.num_cached_tokens for e in events} == {0}


@pytest.mark.parametrize("max_tokens", [3, 50])
def test_a_trailing_incomplete_character_is_flushed_as_u_fffd(max_tokens: int) -> None:
    """The script ends with the first byte of a four-byte character: the tokenizer decodes
    that to U+FFFD, and so must the answer, whether EOS (50) or the length limit (3) ends it."""
    loop = _loop([ord("a"), ord("b"), 0xF0], kv_tokens=256, prefill_tokens=64)
    events = _submit(loop, "r", [1, 2, 3, 4, 5], max_tokens=max_tokens)
    _drain(loop)
    assert _text(events) == "ab\ufffd"
    finish = FinishReason.LENGTH if max_tokens == 3 else FinishReason.STOP
    assert events[-1].finish_reason is finish
