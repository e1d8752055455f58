"""Grammars with the real Qwen vocabulary: masks per row, compact JSON, tags, EOS, errors."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch

from vlserve.engine.guided import GuideCompiler, GuideMasker
from vlserve.engine.request import Guide, SamplingParams
from vlserve.engine.sampling import SamplerState, sample
from vlserve.errors import InvalidRequestError

VOCAB = 151_936
EOS = [151645, 151643]
SCHEMA = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}, "kind": {"enum": ["a", "b"]}},
    "required": ["ok", "kind"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def compiler(tiny_tokenizer: Any) -> GuideCompiler:
    return GuideCompiler(tiny_tokenizer, VOCAB, EOS)


def _allowed(state: Any) -> set[int]:
    logits = torch.zeros(1, VOCAB)
    GuideMasker(VOCAB, torch.device("cpu"))(logits, [state])
    return set((logits[0] == 0).nonzero().view(-1).tolist())


def _walk(state: Any, ids: list[int]) -> None:
    for token in ids:
        assert token in _allowed(state)
        state.accept(token)


def test_compact_json_then_only_eos(compiler: GuideCompiler, tiny_tokenizer: Any) -> None:
    state = compiler.compile(Guide("json_schema", json.dumps(SCHEMA))).new_state()
    _walk(state, tiny_tokenizer.encode('{"ok":true,"kind":"b"}', add_special_tokens=False))
    assert _allowed(state) == set(EOS)


def test_free_whitespace_is_not_offered(compiler: GuideCompiler, tiny_tokenizer: Any) -> None:
    state = compiler.compile(Guide("json_object")).new_state()
    state.accept(tiny_tokenizer.encode("{", add_special_tokens=False)[0])
    spaces = [tiny_tokenizer.encode(s, add_special_tokens=False)[0] for s in (" ", "\n", "  ")]
    assert not set(spaces) & _allowed(state)


def test_the_mask_touches_only_constrained_rows(compiler: GuideCompiler) -> None:
    state = compiler.compile(Guide("json_schema", json.dumps(SCHEMA))).new_state()
    logits = torch.randn(3, VOCAB)
    before = logits.clone()
    GuideMasker(VOCAB, torch.device("cpu"))(logits, [None, state, None])
    assert torch.equal(logits[0], before[0]) and torch.equal(logits[2], before[2])
    assert int((logits[1] > -1e30).sum()) < 10  # only the few tokens a JSON object starts with


def test_tagged_calls_use_the_single_tool_call_token(
    compiler: GuideCompiler, tiny_tokenizer: Any
) -> None:
    spec = {"begin": "<tool_call>\n", "end": "\n</tool_call>", "schema": SCHEMA, "repeat": 2}
    state = compiler.compile(Guide("tagged_json", json.dumps(spec))).new_state()
    assert 151657 in _allowed(state)  # <tool_call> as one token
    call = '<tool_call>\n{"ok":false,"kind":"a"}\n</tool_call>'
    _walk(state, tiny_tokenizer.encode(call, add_special_tokens=False))
    newline = tiny_tokenizer.encode("\n", add_special_tokens=False)[0]
    assert _allowed(state) == {*EOS, newline}  # another call may follow
    _walk(state, tiny_tokenizer.encode("\n" + call, add_special_tokens=False))
    assert _allowed(state) == set(EOS)  # the bound: at most 2 calls


def test_bad_schemas_are_400s_naming_the_field(compiler: GuideCompiler) -> None:
    bad = {"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}
    with pytest.raises(InvalidRequestError) as info:
        compiler.compile(Guide("json_schema", json.dumps(bad)))
    assert info.value.param == "response_format" and "nowhere" in info.value.message
    with pytest.raises(InvalidRequestError) as info:
        compiler.compile(Guide("tagged_json", json.dumps({"schema": 3}), param="tool_choice"))
    assert info.value.param == "tool_choice"


def test_compiled_grammars_are_cached_by_spec(compiler: GuideCompiler) -> None:
    guide = Guide("json_schema", json.dumps(SCHEMA))
    assert compiler.compile(guide) is compiler.compile(Guide("json_schema", json.dumps(SCHEMA)))


def test_guided_and_free_rows_sample_together_reproducibly(compiler: GuideCompiler) -> None:
    compiled = compiler.compile(Guide("json_schema", json.dumps(SCHEMA)))
    logits = torch.randn(2, VOCAB, generator=torch.Generator().manual_seed(1))
    masker = GuideMasker(VOCAB, torch.device("cpu"))

    def run() -> list[list[int]]:
        params = SamplingParams(temperature=1.0, seed=11)
        states = [SamplerState(params, [1], VOCAB, torch.device("cpu")) for _ in range(2)]
        states[1].guide = compiled.new_state()
        return [sample(logits.clone(), states, masker)[0] for _ in range(4)]  # masks in place

    first = run()
    assert first == run()
    check = compiled.new_state()
    for _, constrained in first:
        assert constrained in _allowed(check)
        check.accept(constrained)
