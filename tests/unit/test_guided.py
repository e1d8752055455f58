"""Grammars with the real Qwen vocabulary: masks per row, compact JSON, tags, EOS, errors."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch

from vlserve.engine.guided import GuideCompiler, GuideMasker
from vlserve.engine.request import Guide, SamplingParams
from vlserve.engine.sampling import SamplerState, sample
from vlserve.engine.vocab import TokenBytes
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
    return GuideCompiler(TokenBytes(tiny_tokenizer, VOCAB), tiny_tokenizer, EOS)


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


@pytest.mark.parametrize(
    ("schema", "says"),
    [
        ({"type": "integer", "minimum": -1e30}, "outside the 64-bit range"),
        ({"type": "object", "properties": {"a": {"type": "integer", "maximum": 1e19}}}, "64-bit"),
        ({"type": "array", "minItems": 1e20}, "minItems must be an integer"),
    ],
)
def test_a_schema_error_says_what_is_wrong_not_the_engines_internals(
    compiler: GuideCompiler, schema: dict, says: str
) -> None:
    with pytest.raises(InvalidRequestError) as info:
        compiler.compile(Guide("json_schema", json.dumps(schema)))
    message = info.value.message
    assert says in message
    for internal in ("Check failed", "MIN_INT64", "MAX_INT64", ".cc:", "/project/"):
        assert internal not in message, message


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


def test_special_tokens_never_appear_inside_strings(
    compiler: GuideCompiler, tiny_tokenizer: Any
) -> None:
    state = compiler.compile(Guide("json_object")).new_state()
    _walk(state, tiny_tokenizer.encode('{"', add_special_tokens=False))
    allowed = _allowed(state)
    assert len(allowed) > 100_000  # inside a string: almost anything
    assert not allowed & {151643, 151644, 151645, 151652, 151655}  # eos, im_start, vision
    assert 151657 in allowed  # <tool_call> is an added token, not a special one: plain text


def test_the_mask_equals_xgrammars_own(compiler: GuideCompiler) -> None:
    import xgrammar as xgr

    states = [compiler.compile(Guide("json_object")).new_state() for _ in range(3)]
    logits = torch.randn(4, VOCAB)
    ours = logits.clone()
    GuideMasker(VOCAB, torch.device("cpu"))(ours, [states[0], None, states[1], states[2]])
    bitmask = xgr.allocate_token_bitmask(4, VOCAB)
    for row, state in ((0, states[0]), (2, states[1]), (3, states[2])):
        state.fill_mask(bitmask, row)
    theirs = logits.clone()
    xgr.apply_token_bitmask_inplace(theirs, bitmask, vocab_size=VOCAB, indices=[0, 2, 3])
    assert torch.equal(ours, theirs)


def test_a_completed_grammar_terminates_on_eos(
    compiler: GuideCompiler, tiny_tokenizer: Any
) -> None:
    state = compiler.compile(Guide("json_schema", json.dumps(SCHEMA))).new_state()
    _walk(state, tiny_tokenizer.encode('{"ok":true,"kind":"b"}', add_special_tokens=False))
    assert not state.terminated
    state.accept(EOS[0])
    assert state.terminated  # the engine ends the request here, even with ignore_eos
    state.accept(EOS[0])  # and a matcher that ended ignores what follows


def test_a_greedy_choice_the_grammar_allows_skips_the_mask(
    compiler: GuideCompiler, tiny_tokenizer: Any
) -> None:
    """Inside a string the unmasked greedy choice is (almost always) allowed: that row is left
    unmasked and keeps it; at a structural position it is not, and the row is masked in full.
    Either way sample() picks what the fully masked row's argmax picks."""
    schema = {"type": "object", "properties": {"s": {"type": "string"}}, "required": ["s"]}
    compiled = compiler.compile(Guide("json_schema", json.dumps(schema)))
    masker = GuideMasker(VOCAB, torch.device("cpu"))
    for seed in range(5):
        in_string = compiled.new_state()
        _walk(in_string, tiny_tokenizer.encode('{"s":"ab', add_special_tokens=False))
        at_start = compiled.new_state()
        logits = torch.randn(3, VOCAB, generator=torch.Generator().manual_seed(seed))
        full = logits.clone()
        assert masker(full, [in_string, None, at_start]) == [0, 2]
        best = [int(full[0].argmax()), int(logits[1].argmax()), int(full[2].argmax())]
        lazy = logits.clone()
        masked = masker(lazy, [in_string, None, at_start], {0: best[0], 2: int(logits[2].argmax())})
        assert masked == [2] and torch.equal(lazy[0], logits[0])
        states = [
            SamplerState(SamplingParams(temperature=0), [1], VOCAB, torch.device("cpu"))
            for _ in range(3)
        ]
        states[0].guide, states[2].guide = in_string, at_start
        tokens, _ = sample(logits.clone(), states, masker)
        assert tokens == best


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_sample_advances_each_guided_row_by_the_token_it_returns(
    compiler: GuideCompiler, tiny_tokenizer: Any, temperature: float
) -> None:
    """A guided row beside a free one, sampled step by step from random logits until EOS:
    what it returned is JSON of the schema, so its matcher followed every token sample()
    chose (greedy: the masked row's pick, not the unmasked proposal)."""
    compiled = compiler.compile(Guide("json_schema", json.dumps(SCHEMA)))
    masker = GuideMasker(VOCAB, torch.device("cpu"))
    noise = torch.Generator().manual_seed(3)
    params = SamplingParams(temperature=temperature, seed=5)
    states = [SamplerState(params, [1], VOCAB, torch.device("cpu")) for _ in range(2)]
    states[0].guide = guide = compiled.new_state()
    out: list[int] = []
    for _ in range(64):
        tokens, _ = sample(torch.randn(2, VOCAB, generator=noise), states, masker)
        if tokens[0] in EOS:
            break
        out.append(tokens[0])
    assert guide.terminated, tiny_tokenizer.decode(out)
    assert set(json.loads(tiny_tokenizer.decode(out))) == {"ok", "kind"}
