"""Structured output: grammars compiled once per distinct spec, a matcher per sequence, and the
per-row token mask inside the batched sampler (xgrammar; see docs/STRUCTURED.md for why).

- ``GuideCompiler.compile`` runs on the engine's grammar thread, never on the event loop or the
  inference thread. Results are cached by the spec (an LRU of ``MAX_CACHED`` grammars); a spec
  that cannot be compiled is a 400 naming the request field it came from.
- A ``GuideMatcher`` lives on the inference thread with its sequence. ``GuideMasker`` fills
  one shared bitmask for the constrained rows of a step and applies it to their logits only;
  free rows in the same batch are untouched.
- JSON is compact (``any_whitespace=False``): a weak model offered free whitespace can loop on
  it until ``max_tokens``. Once the grammar is complete only the end-of-sequence tokens are
  allowed, so the request ends with ``finish_reason: "stop"``.
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
import xgrammar as xgr

from vlserve.engine.request import Guide
from vlserve.errors import InvalidRequestError

MAX_CACHED = 256
_COMPACT = (",", ":")


class CompiledGuide:
    """A compiled grammar; ``new_state()`` gives each sequence its own matcher."""

    def __init__(self, compiled: Any) -> None:
        self._compiled = compiled

    def new_state(self) -> GuideMatcher:
        return GuideMatcher(xgr.GrammarMatcher(self._compiled))


class GuideMatcher:
    """One sequence's position in its grammar (the ``sampling.GuideState`` protocol)."""

    def __init__(self, matcher: Any) -> None:
        self._matcher = matcher

    def fill_mask(self, bitmask: torch.Tensor, row: int) -> None:
        self._matcher.fill_next_token_bitmask(bitmask, row)

    def accept(self, token_id: int) -> None:
        # A token the mask allowed is always accepted; after termination (EOS taken) there is
        # nothing more to follow.
        if not self._matcher.is_terminated():
            self._matcher.accept_token(token_id)

    @property
    def terminated(self) -> bool:
        return bool(self._matcher.is_terminated())


class GuideMasker:
    """Masks the constrained rows of a step's logits in place (one bitmask, reused)."""

    def __init__(self, vocab_size: int, device: torch.device) -> None:
        self.vocab_size = vocab_size
        self.device = device
        self._bitmask = xgr.allocate_token_bitmask(1, vocab_size)

    def __call__(self, logits: torch.Tensor, guides: Sequence[Any]) -> None:
        rows = [i for i, g in enumerate(guides) if g is not None]
        if not rows:
            return
        if self._bitmask.shape[0] < logits.shape[0]:
            self._bitmask = xgr.allocate_token_bitmask(logits.shape[0], self.vocab_size)
        bitmask = self._bitmask[: logits.shape[0]]
        for i in rows:
            guides[i].fill_mask(bitmask, i)
        mask = (
            bitmask.to(logits.device, non_blocking=True) if logits.device.type != "cpu" else bitmask
        )
        xgr.apply_token_bitmask_inplace(logits, mask, vocab_size=self.vocab_size, indices=rows)


class GuideCompiler:
    """Compiles ``Guide``s against the model's vocabulary; thread-safe, cached by spec."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: list[int]) -> None:
        info = xgr.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=vocab_size, stop_token_ids=stop_token_ids
        )
        self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        self._cache: OrderedDict[Guide, CompiledGuide] = OrderedDict()
        self._lock = threading.Lock()

    def compile(self, guide: Guide) -> CompiledGuide:
        with self._lock:
            found = self._cache.get(guide)
            if found is not None:
                self._cache.move_to_end(guide)
                return found
        try:
            compiled = CompiledGuide(self._compiler.compile_grammar(grammar_for(guide)))
        except InvalidRequestError:
            raise
        except Exception as exc:  # xgrammar reports bad schemas as RuntimeError/ValueError
            raise InvalidRequestError(
                f"{guide.param}: the schema cannot be compiled: {_first_line(exc)}",
                param=guide.param,
            ) from exc
        with self._lock:
            self._cache[guide] = compiled
            while len(self._cache) > MAX_CACHED:
                self._cache.popitem(last=False)
        return compiled


def grammar_for(guide: Guide) -> Any:
    """The xgrammar ``Grammar`` of a guide (pure; raises on a bad spec)."""
    if guide.kind == "json_object":
        return xgr.Grammar.from_json_schema(
            {"type": "object"}, any_whitespace=False, separators=_COMPACT
        )
    if guide.kind == "json_schema":
        return _schema_grammar(json.loads(guide.spec))
    spec = json.loads(guide.spec)
    call = xgr.Grammar.concat(
        _literal(spec["begin"]), _schema_grammar(spec["schema"]), _literal(spec["end"])
    )
    repeat = int(spec.get("repeat", 1))
    if repeat <= 1:
        return call
    # 1 to ``repeat`` calls, a newline between two (bounded: a weak model offered one more
    # call forever would take it until max_tokens)
    ebnf = re.sub(r"^root ::=", "vlserve_call ::=", str(call), count=1, flags=re.M)
    return xgr.Grammar.from_ebnf(
        ebnf + f'\nroot ::= vlserve_call ("\\n" vlserve_call){{0,{repeat - 1}}}\n',
        root_rule_name="root",
    )


def _schema_grammar(schema: Any) -> Any:
    if not isinstance(schema, dict):
        raise ValueError("a JSON schema must be an object")
    return xgr.Grammar.from_json_schema(
        json.dumps(schema), any_whitespace=False, separators=_COMPACT, strict_mode=True
    )


def _literal(text: str) -> Any:
    return xgr.Grammar.from_ebnf(f"root ::= {json.dumps(text)}")


def _first_line(exc: BaseException) -> str:
    """The error's first line without xgrammar's "[time] file.cc:line: " prefix."""
    lines = str(exc).strip().splitlines()
    text = re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", lines[0]) if lines else type(exc).__name__
    return text[:300]
