"""Structured-output grammar engines (xgrammar, llguidance, outlines-core) on the real Qwen vocabulary.

For each engine, in its own fresh process (so "cold" means cold), with the tiny Qwen3-VL checkpoint's
tokenizer (151,643 BPE ranks + 26 added tokens, logits width 151,936), on CPU:

  1. tokenizer-info / vocabulary setup (first call in the process, and the median of --repeats);
  2. compile of an "invoice extraction" JSON schema (compact: no free whitespace, separators ","
     and ":"), of a second distinct schema, the cached path (xgrammar: GrammarCompiler cache hit;
     llguidance: deep_copy of a template matcher; outlines-core: a new Guide on a kept Index), and
     "any JSON" (xgrammar builtin JSON grammar; the others {"type":"object"}); plus the first mask
     after a cold compile (llguidance builds lexer states lazily);
  3. per-step mask cost at batch --batch (32): each matcher walks the tokens of a different valid
     compact instance; per step fill the int32 bitmask [32, ceil(151936/32)] row by row (and with
     the engine's parallel batch API where it has one), apply it to float32 logits [32, 151936]
     with the engine's own CPU kernel, then accept the token;
  4. checks: the compact instance is accepted token by token and the matcher ends accepting; no
     token starting with whitespace is allowed outside strings; the ", "/": " variant's token is
     masked; the mask once complete allows exactly the EOS ids [151645, 151643]; a grammar
     <tool_call> "\\n" JSON "\\n" </tool_call> that must open with the single added token 151657;
     whether added tokens (<|image_pad|>, <tool_call>, ...) are allowed inside a JSON string;
     rollback; and whether a compile in a worker thread stalls mask filling in the main thread.

    .venv/bin/python benchmarks/grammar_engines.py [--engines xgrammar,llguidance,outlines-core]
        [--repeats 3] [--batch 32] [--torch-threads 1] [--apply-eager] [--json out.json]

llguidance's and outlines-core's CPU apply kernels are torch.compile'd: their first call compiles
(reported as "apply warmup"; tens of seconds without a warm inductor cache). --apply-eager runs the
same functions uncompiled instead.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

VOCAB = 151936  # model logits width
EOS_IDS = [151645, 151643]  # <|im_end|>, <|endoftext|>
TOOL_CALL, TOOL_CALL_END = 151657, 151658
ENGINES = ["xgrammar", "llguidance", "outlines-core"]
SLOW_COMPILE_S = 5.0  # a cold compile slower than this is not repeated

INVOICE = {
    "type": "object",
    "properties": {
        "invoice_number": {"type": "string"},
        "issue_date": {"type": "string"},
        "currency": {"type": "string", "enum": ["USD", "EUR", "GBP", "JPY"]},
        "paid": {"type": "boolean"},
        "vendor": {
            "type": "object",
            "properties": {
                "name": {"type": "string"},
                "tax_id": {"type": "string"},
                "address": {
                    "type": "object",
                    "properties": {
                        "street": {"type": "string"},
                        "city": {"type": "string"},
                        "postal_code": {"type": "string"},
                        "country": {"type": "string"},
                    },
                    "required": ["street", "city", "country"],
                    "additionalProperties": False,
                },
            },
            "required": ["name", "address"],
            "additionalProperties": False,
        },
        "line_items": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "properties": {
                    "description": {"type": "string"},
                    "quantity": {"type": "integer", "minimum": 0},
                    "unit_price": {"type": "number"},
                    "amount": {"type": "number"},
                },
                "required": ["description", "quantity", "unit_price", "amount"],
                "additionalProperties": False,
            },
        },
        "subtotal": {"type": "number"},
        "tax": {"type": "number"},
        "total": {"type": "number"},
        "notes": {"type": "string"},
    },
    "required": [
        "invoice_number",
        "issue_date",
        "currency",
        "paid",
        "vendor",
        "line_items",
        "total",
    ],
    "additionalProperties": False,
}

TICKET = {
    "type": "object",
    "properties": {
        "ticket_id": {"type": "string"},
        "priority": {"type": "string", "enum": ["low", "medium", "high", "urgent"]},
        "category": {"type": "string", "enum": ["billing", "technical", "account", "other"]},
        "customer": {
            "type": "object",
            "properties": {
                "name": {"type": "string"},
                "email": {"type": "string"},
                "tier": {"type": "integer", "minimum": 1, "maximum": 3},
            },
            "required": ["name", "email"],
            "additionalProperties": False,
        },
        "tags": {"type": "array", "items": {"type": "string"}},
        "sentiment": {"type": "number"},
        "escalate": {"type": "boolean"},
        "messages": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "role": {"type": "string", "enum": ["customer", "agent"]},
                    "text": {"type": "string"},
                    "ts": {"type": "integer"},
                },
                "required": ["role", "text"],
                "additionalProperties": False,
            },
        },
    },
    "required": ["ticket_id", "priority", "customer", "escalate", "messages"],
    "additionalProperties": False,
}

ANY_OBJECT = {"type": "object"}
TINY = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}

WORDS = [
    "widget",
    "gadget",
    "shipping",
    "consulting",
    "license",
    "support",
    "cable",
    "adapter",
    "sensor",
    "panel",
]
CITIES = ["Berlin", "Paris", "Leeds", "Osaka", "Austin", "Milan"]


def invoice_instance(rng: random.Random) -> dict:
    items = []
    for _ in range(rng.randint(1, 3)):
        qty = rng.randint(1, 20)
        price = round(rng.uniform(1, 500), 2)
        items.append(
            {
                "description": f"{rng.choice(WORDS).title()} {rng.choice(WORDS)}",
                "quantity": qty,
                "unit_price": price,
                "amount": round(qty * price, 2),
            }
        )
    sub = round(sum(i["amount"] for i in items), 2)
    tax = round(sub * 0.19, 2)
    inst = {
        "invoice_number": f"INV-{rng.randint(2019, 2025)}-{rng.randint(1, 9999):04d}",
        "issue_date": f"{rng.randint(2019, 2025)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}",
        "currency": rng.choice(["USD", "EUR", "GBP", "JPY"]),
        "paid": rng.random() < 0.5,
        "vendor": {
            "name": f"{rng.choice(WORDS).title()} {rng.choice(['GmbH', 'Ltd', 'Inc', 'SA'])}",
            "address": {
                "street": f"{rng.randint(1, 200)} {rng.choice(WORDS).title()} Street",
                "city": rng.choice(CITIES),
                "country": rng.choice(["DE", "FR", "GB", "JP", "US", "IT"]),
            },
        },
        "line_items": items,
        "subtotal": sub,
        "tax": tax,
        "total": round(sub + tax, 2),
    }
    if rng.random() < 0.5:
        inst["vendor"] = {
            "name": inst["vendor"]["name"],
            "tax_id": f"VAT{rng.randint(10**8, 10**9)}",
            "address": inst["vendor"]["address"],
        }
    if rng.random() < 0.5:
        inst["notes"] = f"Net {rng.choice([15, 30, 60])} days"
    return inst


def compact(obj) -> str:
    return json.dumps(obj, separators=(",", ":"))


def stats_ms(xs: list[float]) -> dict:
    import numpy as np

    a = np.asarray(xs) * 1000.0
    return {
        "mean": float(a.mean()),
        "p50": float(np.percentile(a, 50)),
        "p90": float(np.percentile(a, 90)),
        "max": float(a.max()),
    }


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def repeat_cold(make, repeats: int) -> tuple[object, dict]:
    """Run make() (a cold operation) up to `repeats` times; first value and median, in ms."""
    out, first = timed(make)
    times = [first]
    if first < SLOW_COMPILE_S:
        for _ in range(repeats - 1):
            out, dt = timed(make)
            times.append(dt)
    return out, {"first": first * 1000, "median": statistics.median(times) * 1000, "n": len(times)}


# --------------------------------------------------------------------------------------------
# Engine adapters. Each exposes the same small surface used by the measurements below.
# --------------------------------------------------------------------------------------------


class XGrammarEngine:
    name = "xgrammar"
    cache_note = "GrammarCompiler cache (keyed by schema text + options; cache_limit_bytes)"
    batch_fill_name = "BatchGrammarMatcher"

    def __init__(self, hf_tok):
        import xgrammar as xgr

        self.xgr = xgr
        self.hf_tok = hf_tok
        self.version = xgr.__version__ if hasattr(xgr, "__version__") else _dist_version("xgrammar")

    def setup(self):
        xgr = self.xgr
        self.info = xgr.TokenizerInfo.from_huggingface(
            self.hf_tok, vocab_size=VOCAB, stop_token_ids=EOS_IDS
        )
        self.compiler = xgr.GrammarCompiler(self.info, max_threads=os.cpu_count() or 2)

    def fresh_compiler(self):
        """A new compiler (empty cache) for cold-compile repeats; construction is not timed."""
        return self.xgr.GrammarCompiler(self.info, max_threads=os.cpu_count() or 2)

    def compile_schema(self, schema: dict, *, compiler=None, flexible: bool = False):
        c = compiler or self.compiler
        if flexible:
            return c.compile_json_schema(json.dumps(schema), any_whitespace=True)
        return c.compile_json_schema(
            json.dumps(schema), any_whitespace=False, separators=(",", ":")
        )

    def compile_any(self, *, compiler=None):
        return (compiler or self.compiler).compile_builtin_json_grammar()

    def compile_tool_call(self, schema: dict, *, compiler=None):
        xgr = self.xgr
        js = xgr.Grammar.from_json_schema(
            json.dumps(schema), any_whitespace=False, separators=(",", ":")
        )
        lark = 'start: <tool_call> "\\n" @args "\\n" </tool_call>'
        return (compiler or self.compiler).compile_lark(lark, named_grammars={"args": js})

    def compile_tool_call_text(self, schema: dict):
        """Same, but the tags written as plain text literals (EBNF concat)."""
        xgr = self.xgr
        js = xgr.Grammar.from_json_schema(
            json.dumps(schema), any_whitespace=False, separators=(",", ":")
        )
        g = xgr.Grammar.concat(
            xgr.Grammar.from_ebnf('root ::= "<tool_call>\\n"'),
            js,
            xgr.Grammar.from_ebnf('root ::= "\\n</tool_call>"'),
        )
        return self.compiler.compile_grammar(g)

    def matcher(self, compiled):
        return self.xgr.GrammarMatcher(compiled)

    def cached_matcher(self, schema: dict, template=None):
        return self.xgr.GrammarMatcher(self.compile_schema(schema))  # cache hit

    def fill(self, m, bitmask, i):
        m.fill_next_token_bitmask(bitmask, i)

    def batch_fill(self, matchers, bitmask):
        if not hasattr(self, "_batch"):
            self._batch = self.xgr.BatchGrammarMatcher(max_threads=os.cpu_count() or 2)
        self._batch.batch_fill_next_token_bitmask(matchers, bitmask)

    def accept(self, m, tok) -> bool:
        return m.accept_token(tok)

    def done(self, m) -> bool:
        return m.is_completed()

    def rollback(self, m, n) -> bool:
        m.rollback(n)
        return True

    def apply(self, logits, bitmask, indices=None):
        self.xgr.apply_token_bitmask_inplace(logits, bitmask, vocab_size=VOCAB, indices=indices)

    def apply_warmup(self, logits, bitmask):
        self.apply(logits, bitmask)


class _TorchKernelApply:
    """Mask application for the engines whose torch kernel takes no row indices: gather the
    rows, mask, scatter back; ``eager_apply`` runs the kernel undecorated (no torch.compile)."""

    eager_apply: bool
    _eager_kernel: Any
    _inplace: Any  # the library's apply_token_bitmask_inplace

    def _init_kernel(self, kernel, inplace, eager_apply: bool) -> None:
        self._eager_kernel = (
            getattr(kernel, "_torchdynamo_orig_callable", None) or kernel.__wrapped__
        )
        self._inplace = inplace
        self.eager_apply = eager_apply

    def apply(self, logits, bitmask, indices=None):
        if indices is not None:
            sub = logits[indices]
            self.apply(sub, bitmask[indices])
            logits[indices] = sub
            return
        if self.eager_apply:
            self._eager_kernel(logits, bitmask)
        else:
            self._inplace(logits, bitmask)

    def apply_warmup(self, logits, bitmask):
        self.apply(logits, bitmask)


class LLGuidanceEngine(_TorchKernelApply):
    name = "llguidance"
    cache_note = "none for grammars; keep a template LLMatcher per schema and deep_copy() it"
    batch_fill_name = "LLExecutor (fill_next_token_bitmask_par)"

    def __init__(self, hf_tok, eager_apply: bool):
        import llguidance
        import llguidance.hf
        import llguidance.torch

        self.llg = llguidance
        self.lt = llguidance.torch
        self.hf_tok = hf_tok
        self.version = llguidance.__version__
        self._init_kernel(
            llguidance.torch.apply_token_bitmask_inplace_kernel,
            llguidance.torch.apply_token_bitmask_inplace,
            eager_apply,
        )

    def setup(self):
        import llguidance.hf

        self.tok = llguidance.hf.from_tokenizer(self.hf_tok, n_vocab=VOCAB, eos_token=EOS_IDS)

    def fresh_compiler(self):
        return None

    @staticmethod
    def _opts(flexible: bool) -> dict:
        if flexible:
            return {"whitespace_flexible": True}
        return {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}

    def _matcher_checked(self, grammar: str):
        m = self.llg.LLMatcher(self.tok, grammar, log_level=0)
        if m.is_error():
            raise RuntimeError(m.get_error())
        return m

    def compile_schema(self, schema: dict, *, compiler=None, flexible: bool = False):
        g = self.llg.LLMatcher.grammar_from_json_schema(schema, overrides=self._opts(flexible))
        return self._matcher_checked(g)  # the "compiled grammar" is a template matcher

    def compile_any(self, *, compiler=None):
        return self.compile_schema(ANY_OBJECT)

    def compile_tool_call(self, schema: dict, *, compiler=None):
        s = dict(schema)
        s["x-guidance"] = self._opts(False)
        lark = 'start: <tool_call> "\\n" args "\\n" </tool_call>\nargs: %json ' + json.dumps(s)
        return self._matcher_checked(self.llg.LLMatcher.grammar_from_lark(lark))

    def compile_tool_call_text(self, schema: dict):
        s = dict(schema)
        s["x-guidance"] = self._opts(False)
        lark = 'start: "<tool_call>\\n" args "\\n</tool_call>"\nargs: %json ' + json.dumps(s)
        return self._matcher_checked(self.llg.LLMatcher.grammar_from_lark(lark))

    def matcher(self, compiled):
        return compiled.deep_copy()

    def cached_matcher(self, schema: dict, template=None):
        return template.deep_copy()

    def fill(self, m, bitmask, i):
        self.lt.fill_next_token_bitmask(m, bitmask, i)

    def batch_fill(self, matchers, bitmask):
        if not hasattr(self, "_exec"):
            self._exec = self.llg.LLExecutor(num_threads=os.cpu_count() or 2)
        self.lt.fill_next_token_bitmask_par(
            self._exec, [(m, i) for i, m in enumerate(matchers)], bitmask
        )

    def accept(self, m, tok) -> bool:
        return m.consume_token(tok)

    def done(self, m) -> bool:
        return m.is_accepting()

    def rollback(self, m, n) -> bool:
        return m.rollback(n)


class OutlinesCoreEngine(_TorchKernelApply):
    name = "outlines-core"
    cache_note = "none; keep Index objects in your own dict (Guide(index) is cheap)"
    batch_fill_name = None

    def __init__(self, hf_tok, eager_apply: bool):
        import outlines_core
        import outlines_core.kernels.torch as okt

        self.oc = outlines_core
        self.okt = okt
        self.hf_tok = hf_tok
        self.version = _dist_version("outlines_core")
        self._init_kernel(
            okt._apply_token_bitmask_inplace_kernel, okt.apply_token_bitmask_inplace, eager_apply
        )

    def setup(self):
        """outlines-core wants {token bytes: [ids]} without the EOS; byte-level BPE strings are
        mapped back to bytes, added tokens keep their text (as outlines' own backend does)."""
        from vlserve.engine.vocab import _byte_decoder

        u2b = _byte_decoder()  # printable char -> byte, GPT-2's byte-level alphabet
        added = {t.content for t in self.hf_tok.added_tokens_decoder.values()}
        vocab_map: dict[bytes, list[int]] = {}
        for s, i in self.hf_tok.get_vocab().items():
            if i == EOS_IDS[0]:
                continue
            b = s.encode() if s in added else bytes(u2b[c] for c in s)
            vocab_map.setdefault(b, []).append(i)
        self.vocab = self.oc.Vocabulary(EOS_IDS[0], vocab_map)  # one EOS id only

    def fresh_compiler(self):
        return None

    def regex(self, schema: dict, flexible: bool = False) -> str:
        ws = None if flexible else ""
        return self.oc.json_schema.build_regex_from_schema(
            json.dumps(schema), whitespace_pattern=ws
        )

    def compile_schema(self, schema: dict, *, compiler=None, flexible: bool = False):
        return self.oc.Index(self.regex(schema, flexible), self.vocab)

    def compile_any(self, *, compiler=None):
        return self.compile_schema(ANY_OBJECT)  # depth-limited (max_recursion_depth=3)

    def compile_tool_call(self, schema: dict, *, compiler=None):
        return self.oc.Index("<tool_call>\n" + self.regex(schema) + "\n</tool_call>", self.vocab)

    compile_tool_call_text = compile_tool_call  # regex only: no way to name the token itself

    def matcher(self, compiled):
        return self.oc.Guide(compiled)

    def cached_matcher(self, schema: dict, template=None):
        return self.oc.Guide(template)

    def fill(self, m, bitmask, i):
        row = bitmask[i]
        m.write_mask_into(row.data_ptr(), row.numel(), row.element_size())

    batch_fill = None

    def accept(self, m, tok) -> bool:
        try:
            m.advance(tok, return_tokens=False)
            return True
        except Exception:
            return False

    def done(self, m) -> bool:
        return m.is_finished()

    def rollback(self, m, n) -> bool:
        m.rollback_state(n)
        return True


def _dist_version(dist: str) -> str:
    from importlib.metadata import version

    return version(dist)


# --------------------------------------------------------------------------------------------
# Worker: all measurements for one engine, in a fresh process.
# --------------------------------------------------------------------------------------------


class Bits:
    """Reads an int32 bitmask row (bit j of word j // 32, LSB first)."""

    @staticmethod
    def allowed(bitmask, row: int):
        import numpy as np

        bits = np.unpackbits(bitmask[row].numpy().view(np.uint8), bitorder="little")[:VOCAB]
        return np.nonzero(bits)[0]

    @staticmethod
    def has(bitmask, row: int, tok: int) -> bool:
        return bool((int(bitmask[row, tok // 32]) >> (tok % 32)) & 1)


def outside_string_positions(text: str) -> set[int]:
    """Character offsets k such that after text[:k] a JSON scanner is not inside a string."""
    out, in_str, esc = {0}, False, False
    for k, ch in enumerate(text, start=1):
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
        if not in_str:
            out.add(k)
    return out


def walk(engine, compiled, tokens, bitmask, *, ws_lead=None, text_offsets=None, outside=None):
    """Feed tokens one by one, checking each is allowed by the mask first. Returns a report."""
    m = engine.matcher(compiled)
    ws_violations = 0
    for k, tok in enumerate(tokens):
        engine.fill(m, bitmask, 0)
        if not Bits.has(bitmask, 0, tok):
            return {"ok": False, "failed_at": k, "ws_violations": ws_violations, "matcher": m}
        if ws_lead is not None and text_offsets[k] in outside:
            allowed = set(Bits.allowed(bitmask, 0).tolist())
            ws_violations += len(allowed & ws_lead)
        if not engine.accept(m, tok):
            return {"ok": False, "failed_at": k, "ws_violations": ws_violations, "matcher": m}
    return {"ok": True, "failed_at": None, "ws_violations": ws_violations, "matcher": m}


def first_masked(eng, compiled, tokens, bitmask, hf_tok) -> str:
    """Feed tokens while the mask allows them; describe the first one it refuses."""
    m = eng.matcher(compiled)
    for k, tok in enumerate(tokens):
        eng.fill(m, bitmask, 0)
        if not Bits.has(bitmask, 0, tok) or not eng.accept(m, tok):
            return f"#{k} {hf_tok.decode([tok])!r}"
    return "none (all accepted)"


def worker(engine_name: str, args) -> dict:
    import torch

    # 1 by default: with 2 threads on a 2-vCPU VM the apply kernels turn bimodal (~1 ms / ~10 ms)
    torch.set_num_threads(args.torch_threads)
    from transformers import AutoTokenizer

    from vlserve.testing.tiny_model import ensure_tiny_model

    res: dict = {"engine": engine_name}
    hf_tok, dt = timed(lambda: AutoTokenizer.from_pretrained(str(ensure_tiny_model())))
    res["hf_tokenizer_load_ms"] = dt * 1000

    def enc(s: str) -> list[int]:
        return hf_tok.encode(s, add_special_tokens=False)

    if engine_name == "xgrammar":
        (eng, res["import_ms"]) = timed(lambda: XGrammarEngine(hf_tok))
    elif engine_name == "llguidance":
        (eng, res["import_ms"]) = timed(lambda: LLGuidanceEngine(hf_tok, args.apply_eager))
    else:
        (eng, res["import_ms"]) = timed(lambda: OutlinesCoreEngine(hf_tok, args.apply_eager))
    res["import_ms"] *= 1000
    res["version"] = eng.version
    res["cache"] = eng.cache_note

    # 1. setup
    _, res["setup"] = repeat_cold(eng.setup, args.repeats)

    bitmask = torch.full((args.batch, (VOCAB + 31) // 32), -1, dtype=torch.int32)

    # 2./3. compile: cold A, cold B, cached A, any JSON; first mask after a cold compile
    def cold(schema):
        def make():
            comp = eng.fresh_compiler()  # xgrammar: new compiler = empty cache (not timed)
            t0 = time.perf_counter()
            out = eng.compile_schema(schema, compiler=comp)
            dt = time.perf_counter() - t0
            t1 = time.perf_counter()
            eng.fill(eng.matcher(out), bitmask, 0)
            make.first_mask = time.perf_counter() - t1
            make.dt = dt
            return out

        times, masks = [], []
        out = None
        for r in range(args.repeats):
            out = make()
            times.append(make.dt)
            masks.append(make.first_mask)
            if r == 0 and make.dt > SLOW_COMPILE_S:
                break
        return out, {
            "first": times[0] * 1000,
            "median": statistics.median(times) * 1000,
            "n": len(times),
            "first_mask_ms": statistics.median(masks) * 1000,
        }

    comp_a, res["compile_invoice"] = cold(INVOICE)
    _, res["compile_ticket"] = cold(TICKET)
    # the engine's own cache / template path: obtain a ready matcher for a schema seen before
    if eng.name == "xgrammar":
        eng.compile_schema(INVOICE)  # populate the long-lived compiler's cache
    cached = []
    for _ in range(50):
        _, dt = timed(lambda: eng.fill(eng.cached_matcher(INVOICE, comp_a), bitmask, 0))
        cached.append(dt)
    cached_nomask = []
    for _ in range(50):
        _, dt = timed(lambda: eng.cached_matcher(INVOICE, comp_a))
        cached_nomask.append(dt)
    res["cached_matcher_ms"] = statistics.median(cached_nomask) * 1000
    res["cached_matcher_first_mask_ms"] = statistics.median(cached) * 1000

    def cold_any():
        comp = eng.fresh_compiler()
        t0 = time.perf_counter()
        out = eng.compile_any(compiler=comp)
        return out, time.perf_counter() - t0

    times = []
    for r in range(args.repeats):
        any_c, dt = cold_any()
        times.append(dt)
        if r == 0 and dt > SLOW_COMPILE_S:
            break
    res["compile_any"] = {"first": times[0] * 1000, "median": statistics.median(times) * 1000}

    # 4. per-step mask cost at batch B
    rng = random.Random(1234)
    instances = [invoice_instance(rng) for _ in range(args.batch)]
    seqs = [enc(compact(x)) for x in instances]
    steps = min(len(s) for s in seqs)
    res["batch"] = args.batch
    res["steps"] = steps
    res["seq_len_range"] = [min(len(s) for s in seqs), max(len(s) for s in seqs)]
    logits = torch.randn(args.batch, VOCAB, dtype=torch.float32)
    base_logits = logits.clone()
    _, res["apply_warmup_ms"] = timed(lambda: eng.apply_warmup(logits.clone(), bitmask))
    res["apply_warmup_ms"] *= 1000

    def run_steps(batch_mode: bool) -> dict:
        matchers = [eng.matcher(comp_a) for _ in range(args.batch)]
        fill_t, apply_t, accept_t = [], [], []
        bad = 0
        for k in range(steps):
            t0 = time.perf_counter()
            if batch_mode:
                eng.batch_fill(matchers, bitmask)
            else:
                for i, m in enumerate(matchers):
                    eng.fill(m, bitmask, i)
            t1 = time.perf_counter()
            logits.copy_(base_logits)  # not timed
            t2 = time.perf_counter()
            eng.apply(logits, bitmask)
            t3 = time.perf_counter()
            for i in range(args.batch):  # correctness, not timed
                tok = seqs[i][k]
                if not Bits.has(bitmask, i, tok) or not torch.isfinite(logits[i, tok]):
                    bad += 1
            t4 = time.perf_counter()
            oks = [eng.accept(m, seqs[i][k]) for i, m in enumerate(matchers)]
            t5 = time.perf_counter()
            bad += oks.count(False)
            fill_t.append(t1 - t0)
            apply_t.append(t3 - t2)
            accept_t.append(t5 - t4)
        # the applied logits must agree with the mask: finite <=> bit set (row 0, last step)
        allowed = Bits.allowed(bitmask, 0)
        finite = torch.isfinite(logits[0]).nonzero().flatten().numpy()
        return {
            "fill": stats_ms(fill_t),
            "apply": stats_ms(apply_t),
            "accept": stats_ms(accept_t),
            "bad_tokens": bad,
            "apply_matches_mask": bool(len(allowed) == len(finite) and (allowed == finite).all()),
        }

    res["serial"] = run_steps(False)
    res["fill_per_row_ms"] = res["serial"]["fill"]["mean"] / args.batch
    res["batch_fill_api"] = eng.batch_fill_name
    if eng.batch_fill is not None:
        res["parallel"] = run_steps(True)
    # apply to a subset of rows (half the batch constrained)
    idx = list(range(0, args.batch, 2))
    sub_t = []
    for _ in range(10):
        _, dt = timed(lambda: eng.apply(logits, bitmask, indices=idx))
        sub_t.append(dt)
    res["apply_half_rows"] = stats_ms(sub_t)

    # 5. whitespace / termination checks on the invoice schema
    text = compact(instances[0])
    toks = enc(text)
    offsets, pos = [], 0
    for t in toks:
        offsets.append(pos)
        pos += len(hf_tok.decode([t]))
    outside = outside_string_positions(text)
    ws_chars = {"Ġ", "Ċ", "ĉ", "č"}
    ws_lead = {i for s, i in hf_tok.get_vocab().items() if i < 151643 and s[:1] in ws_chars}
    w = walk(eng, comp_a, toks, bitmask, ws_lead=ws_lead, text_offsets=offsets, outside=outside)
    chk: dict = {
        "compact_accepted": w["ok"],
        "ws_tokens_allowed_outside_strings": w["ws_violations"],
    }
    m = w["matcher"]
    chk["done_after_instance"] = bool(w["ok"] and eng.done(m))
    if w["ok"]:
        eng.fill(m, bitmask, 0)
        chk["end_mask_ids"] = [int(x) for x in Bits.allowed(bitmask, 0)]
        if eng.name == "outlines-core":  # the mask allows EOS, but advance(EOS) raises
            try:
                m.advance(EOS_IDS[0], return_tokens=False)
                chk["accept_eos"] = True
            except ValueError:
                chk["accept_eos"] = "advance raises"
        else:
            chk["accept_eos"] = eng.accept(m, EOS_IDS[0])
        if eng.name == "xgrammar":
            chk["terminated_after_eos"] = m.is_terminated()
    # the ", "/": " rendering of the same instance: the first token the mask refuses
    spaced = enc(json.dumps(instances[0], separators=(", ", ": ")))
    chk["spaced_first_masked"] = first_masked(eng, comp_a, spaced, bitmask, hf_tok)
    # does the whitespace knob matter at all? after '{"a":' of a tiny schema, is ' 1' allowed?
    for flex in (False, True):
        tiny = eng.compile_schema(TINY, flexible=flex)
        m = eng.matcher(tiny)
        pre = enc('{"a":')
        for t in pre:
            eng.accept(m, t)
        eng.fill(m, bitmask, 0)
        chk[f"tiny_{'flexible' if flex else 'compact'}_allows_space"] = Bits.has(
            bitmask, 0, enc(" 1")[0]
        )
    # rollback
    m = eng.matcher(comp_a)
    for t in toks[:5]:
        eng.accept(m, t)
    try:
        eng.rollback(m, 2)
        chk["rollback_ok"] = eng.accept(m, toks[3]) and eng.accept(m, toks[4])
    except Exception as e:  # noqa: BLE001
        chk["rollback_ok"] = f"error: {e}"[:80]

    # 6. special tokens: <tool_call> JSON </tool_call>, EOS, added tokens inside strings
    tc_text = "<tool_call>\n" + text + "\n</tool_call>"
    tc_toks = enc(tc_text)
    chk["tool_call_tokenized_as_single_id"] = (
        tc_toks[0] == TOOL_CALL and tc_toks[-1] == TOOL_CALL_END
    )
    try:
        tc, dt = timed(lambda: eng.compile_tool_call(INVOICE))
        chk["tool_call_compile_ms"] = dt * 1000
        m = eng.matcher(tc)
        eng.fill(m, bitmask, 0)
        chk["tool_call_first_mask"] = [int(x) for x in Bits.allowed(bitmask, 0)][:6]
        w = walk(eng, tc, tc_toks, bitmask)
        chk["tool_call_accepted"] = w["ok"] if w["ok"] else f"failed at token {w['failed_at']}"
        if w["ok"]:
            eng.fill(w["matcher"], bitmask, 0)
            chk["tool_call_end_mask"] = [int(x) for x in Bits.allowed(bitmask, 0)]
        sp = enc("<tool_call>\n" + json.dumps(instances[0]) + "\n</tool_call>")
        chk["tool_call_spaced_first_masked"] = first_masked(eng, tc, sp, bitmask, hf_tok)
    except Exception as e:  # noqa: BLE001
        chk["tool_call_error"] = str(e)[:200]
    # plain-text tag literals: which first tokens are allowed, and does the real token pass?
    try:
        tct = eng.compile_tool_call_text(INVOICE)
        m = eng.matcher(tct)
        eng.fill(m, bitmask, 0)
        chk["text_literal_first_mask"] = [int(x) for x in Bits.allowed(bitmask, 0)][:6]
        w = walk(eng, tct, tc_toks, bitmask)
        chk["text_literal_accepts_token_151657"] = (
            w["ok"] if w["ok"] else f"NO (failed at token {w['failed_at']})"
        )
    except Exception as e:  # noqa: BLE001
        chk["text_literal_error"] = str(e)[:200]
    # inside a JSON string value (after '{"invoice_number":"'): which added tokens pass the mask?
    m = eng.matcher(comp_a)
    for t in enc('{"invoice_number":"'):
        eng.accept(m, t)
    eng.fill(m, bitmask, 0)
    chk["added_tokens_allowed_in_string"] = [
        int(x) for x in Bits.allowed(bitmask, 0) if 151643 <= x < 151669
    ]
    res["checks"] = chk

    # 7. compile in a worker thread while the main thread fills masks
    if not args.no_thread_check:
        res["thread"] = thread_check(eng, comp_a, seqs, bitmask, args)
    return res


def thread_check(eng, comp_a, seqs, bitmask, args) -> dict:
    n_steps = min(40, min(len(s) for s in seqs))

    def fill_loop():
        matchers = [eng.matcher(comp_a) for _ in range(args.batch)]
        ts = []
        for k in range(n_steps):
            t0 = time.perf_counter()
            for i, m in enumerate(matchers):
                eng.fill(m, bitmask, i)
            ts.append(time.perf_counter() - t0)
            for i, m in enumerate(matchers):
                eng.accept(m, seqs[i][k])
        return ts

    base = fill_loop()
    stop = threading.Event()
    done = {"n": 0, "err": None, "busy_s": 0.0}

    def compile_loop():
        n = 0
        while not stop.is_set():
            s = json.loads(json.dumps(TICKET))
            s["properties"]["ticket_id"]["description"] = f"variant {n}"  # defeat any cache
            s["properties"][f"extra_{n}"] = {"type": "string"}
            try:
                t0 = time.perf_counter()
                eng.compile_schema(s, compiler=eng.fresh_compiler())
                done["busy_s"] += time.perf_counter() - t0
            except Exception as e:  # noqa: BLE001
                done["err"] = str(e)[:120]
                return
            n += 1
            done["n"] = n

    th = threading.Thread(target=compile_loop, daemon=True)
    th.start()
    time.sleep(0.01)
    t0 = time.perf_counter()
    during: list[float] = []
    # keep filling until the thread has finished at least one compile (and >= 1 s), cap 20 s
    while (done["n"] < 1 or time.perf_counter() - t0 < 1.0) and time.perf_counter() - t0 < 20:
        during += fill_loop()
    wall = time.perf_counter() - t0
    # longest gap between iterations of a pure-Python loop in this thread while the worker
    # compiles (~ the GIL switch interval, 5 ms, if the compile releases the GIL)
    n0, gap, last = done["n"], 0.0, time.perf_counter()
    while done["n"] < n0 + 1 and done["err"] is None and time.perf_counter() - t0 < 40:
        now = time.perf_counter()
        gap, last = max(gap, now - last), now
    stop.set()
    th.join()
    return {
        "fill_p50_ms_alone": stats_ms(base)["p50"],
        "fill_p50_ms_during": stats_ms(during)["p50"],
        "fill_max_ms_during": stats_ms(during)["max"],
        "compiles_done": done["n"],
        "compile_busy_s": done["busy_s"],
        "main_loop_wall_s": wall,
        "max_python_stall_ms": gap * 1000,
        "error": done["err"],
    }


# --------------------------------------------------------------------------------------------
# Parent: run one worker process per engine, print tables.
# --------------------------------------------------------------------------------------------


def fmt(x, nd=1):
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return str(x)


def print_report(results: list[dict], args) -> None:
    ok = [r for r in results if "error" not in r]
    for r in results:
        if "error" in r:
            print(f"{r['engine']}: FAILED: {r['error']}")
    if not ok:
        return
    cols = [r["engine"] + " " + r["version"] for r in ok]
    w = max(22, *(len(c) for c in cols)) + 2

    def row(label, vals):
        print(f"{label:<46}" + "".join(f"{v:>{w}}" for v in vals))

    print(
        f"\nQwen vocabulary (151,669 tokens, logits width {VOCAB}); CPU x{os.cpu_count()}; "
        f"torch threads {args.torch_threads}; batch {args.batch}; repeats {args.repeats} "
        "(medians; first = cold, first in process); "
        f"loadavg at end {os.getloadavg()[0]:.2f}"
    )
    row("", cols)
    print("-- setup / compile (ms)")
    row("import module", [fmt(r["import_ms"]) for r in ok])
    row("tokenizer info / vocabulary setup, first", [fmt(r["setup"]["first"]) for r in ok])
    row("tokenizer info / vocabulary setup, median", [fmt(r["setup"]["median"]) for r in ok])
    for key, label in (("compile_invoice", "invoice schema"), ("compile_ticket", "ticket schema")):
        row(f"compile {label} (compact), first", [fmt(r[key]["first"]) for r in ok])
        row(f"compile {label} (compact), median", [fmt(r[key]["median"]) for r in ok])
        row("  first mask after that compile", [fmt(r[key]["first_mask_ms"], 2) for r in ok])
    row("cached path: new matcher (invoice)", [fmt(r["cached_matcher_ms"], 3) for r in ok])
    row(
        "cached path: new matcher + first mask",
        [fmt(r["cached_matcher_first_mask_ms"], 3) for r in ok],
    )
    row("compile any-JSON, first", [fmt(r["compile_any"]["first"]) for r in ok])
    row("compile any-JSON, median", [fmt(r["compile_any"]["median"]) for r in ok])
    row(
        "compile <tool_call>+invoice+</tool_call>",
        [fmt(r["checks"].get("tool_call_compile_ms")) for r in ok],
    )
    print(f"-- per decode step, batch {args.batch}, ms (steps: {ok[0]['steps']})")
    for mode in ("serial", "parallel"):
        for part in ("fill", "apply", "accept"):
            vals = []
            for r in ok:
                s = r.get(mode)
                vals.append(
                    "-"
                    if s is None
                    else f"{s[part]['mean']:.2f}/{s[part]['p50']:.2f}/{s[part]['p90']:.2f}"
                )
            label = {"serial": "row loop", "parallel": "batch API"}[mode]
            row(f"{part} ({label}) mean/p50/p90", vals)
    row("fill per row (row loop, mean)", [fmt(r["fill_per_row_ms"], 3) for r in ok])
    row("batch fill API", [str(r["batch_fill_api"] or "none").split(" ")[0] for r in ok])
    row("apply to 16 of 32 rows mean", [fmt(r["apply_half_rows"]["mean"], 2) for r in ok])
    row("apply first call (warmup, torch.compile)", [fmt(r["apply_warmup_ms"]) for r in ok])
    row("tokens rejected / mask-apply mismatch", [
        f"{r['serial']['bad_tokens']}/{'ok' if r['serial']['apply_matches_mask'] else 'BAD'}" for r in ok])  # fmt: skip
    print("-- checks")
    keys = [
        ("compact_accepted", "compact instance accepted token by token"),
        ("done_after_instance", "accepting/completed after the instance"),
        ("ws_tokens_allowed_outside_strings", "ws-leading tokens allowed outside strings"),
        ("spaced_first_masked", "', '/': ' variant: first masked token"),
        ("tiny_compact_allows_space", "compact mode allows ' 1' after ':'"),
        ("tiny_flexible_allows_space", "flexible mode allows ' 1' after ':'"),
        ("end_mask_ids", "mask once complete"),
        ("accept_eos", "accepts <|im_end|> at the end"),
        ("rollback_ok", "rollback(2) then re-accept"),
        ("tool_call_tokenized_as_single_id", "HF encodes <tool_call> as id 151657"),
        ("tool_call_first_mask", "tool-call grammar: first mask"),
        ("tool_call_accepted", "tool-call grammar accepts the sequence"),
        ("tool_call_spaced_first_masked", "tool-call grammar, ': ' variant: masked"),
        ("tool_call_end_mask", "tool-call grammar: mask once complete"),
        ("text_literal_first_mask", 'text literal "<tool_call>": first mask'),
        ("text_literal_accepts_token_151657", "text literal accepts token 151657"),
        ("added_tokens_allowed_in_string", "added ids allowed inside a string"),
    ]
    for key, label in keys:
        vals = []
        for r in ok:
            v = r["checks"].get(key, r["checks"].get(key.split("_")[0] + "_error", "-"))
            if isinstance(v, list) and len(v) > 3:
                v = f"{len(v)}: {v[0]},{v[1]}..{v[-1]}"
            vals.append(str(v)[: w - 2])
        row(label, vals)
    if all("thread" in r for r in ok):
        print("-- compile in a worker thread while the main thread fills 32 rows")
        row("fill p50 ms alone / during", [
            f"{r['thread']['fill_p50_ms_alone']:.2f}/{r['thread']['fill_p50_ms_during']:.2f}" for r in ok])  # fmt: skip
        row("fill max ms during", [fmt(r["thread"]["fill_max_ms_during"], 2) for r in ok])
        row("longest pure-Python stall during a compile", [
            fmt(r["thread"]["max_python_stall_ms"], 1) for r in ok])  # fmt: skip
        row("compiles finished in the thread", [
            f"{r['thread']['compiles_done']} ({r['thread']['compile_busy_s']:.1f}s)" for r in ok])  # fmt: skip
    print("-- cache")
    for r in ok:
        print(f"  {r['engine']}: {r['cache']}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engines", default=",".join(ENGINES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--apply-eager", action="store_true", help="skip torch.compile kernels")
    parser.add_argument("--torch-threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--no-thread-check", action="store_true")
    parser.add_argument("--json", help="also write the raw results here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        res = worker(args.worker, args)
        Path(args.worker_out).write_text(json.dumps(res))
        return 0

    results = []
    t_all = time.perf_counter()
    for name in [e.strip() for e in args.engines.split(",") if e.strip()]:
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
            out = f.name
        cmd = [sys.executable, __file__, "--worker", name, "--worker-out", out,
               "--repeats", str(args.repeats), "--batch", str(args.batch),
               "--torch-threads", str(args.torch_threads)]  # fmt: skip
        if args.apply_eager:
            cmd.append("--apply-eager")
        if args.no_thread_check:
            cmd.append("--no-thread-check")
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        print(f"[{name}] {time.perf_counter() - t0:.1f}s", file=sys.stderr)
        if proc.returncode != 0:
            results.append({"engine": name, "error": proc.stderr.strip().splitlines()[-1:]})
            print(proc.stderr[-3000:], file=sys.stderr)
        else:
            results.append(json.loads(Path(out).read_text()))
        Path(out).unlink(missing_ok=True)
    print_report(results, args)
    print(f"\ntotal {time.perf_counter() - t_all:.1f}s")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
