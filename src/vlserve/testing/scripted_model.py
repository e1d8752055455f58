"""A tiny Qwen3-VL whose answer to any chat prompt is a fixed script of token ids, then EOS.

Same architecture, config, tokenizer and chat template as the tiny random model
(``tiny_model.py``), but the language model's weights are *constructed*, not trained: the build
takes seconds and its behaviour follows from the construction (docs/TINY_MODEL.md):

- Layer 0's four attention heads read a constant direction of every text token through RoPE
  only, with equal weight on the ten fastest frequencies, so head ``h`` attends to the token
  exactly ``δ_h`` positions back (the logit margin over every other position up to 262,144
  tokens away is ~45). Image and video tokens have a zero key and never win.
- The residual stream holds a *vote* per script position ``k``: the current token votes for every
  ``k`` where it is the script's token ``k-1``; the heads add the votes of the ``n`` previous
  tokens (shifted by ``δ``). Exactly at the true position all ``n + 1`` tokens agree.
- Layer 1's MLP has one detector neuron per script position (fires when the vote is full) that
  writes a large value on that position; ``lm_head`` maps each position to its script token, and
  every other vocabulary row is zero, so the script token wins the full 151,936-way argmax by ~64
  logits (sampling at temperature <= 1 gives the script too).

The next token is therefore a function of the last ``n + 1`` tokens of the sequence, the
generation prompt included, for the smallest ``n`` (at most 4) that tells all script positions
apart; what came before (system prompt, images, earlier turns, even the same script in an earlier
assistant turn) does not matter.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

from vlserve.testing.tiny_model import (
    BUILDER_VERSION,
    TEXT_HIDDEN,
    VOCAB_SIZE,
    cached_build,
    random_state_dict,
    save_weights,
    write_model_files,
)
from vlserve.testing.tokenizer import added_token_ids, build_tokenizer_json

logger = logging.getLogger(__name__)

# Bump whenever the construction or the files change: it is part of the cache key.
SCRIPTED_FORMAT_VERSION = 1

_IDS = added_token_ids()
EOS_ID = _IDS["<|im_end|>"]  # 151645
TOOL_CALL_START_ID = _IDS["<tool_call>"]  # 151657
TOOL_CALL_END_ID = _IDS["</tool_call>"]  # 151658
PAD_ID = _IDS["<|endoftext|>"]  # 151643

DEFAULT_SCRIPT_TEXT = (
    "Hello! 你好, I will check the weather.\n"
    "<tool_call>\n"
    '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n'
    "</tool_call>"
)
# DEFAULT_SCRIPT_TEXT with the checkpoint's tokenizer (a test checks they agree).
DEFAULT_SCRIPT_IDS: tuple[int, ...] = (
    9707, 0, 220, 108386, 11, 358, 686, 1779, 279, 9104, 624,  # "Hello! 你好, I will check the weather.\n"
    151657, 198,  # "<tool_call>\n"
    4913, 606, 788, 330, 455, 69364, 497, 330, 16370, 788, 5212, 8926, 788, 330, 59604, 497,
    330, 3843, 788, 330, 66, 40247, 95642,  # '{"name": ... "celsius"}}\n'
    151658,  # "</tool_call>"
)  # fmt: skip
# "ab" then the byte 0xF0 alone (the first of a 4-byte emoji's bytes): the answer decodes to
# "ab\ufffd", a UTF-8 sequence the EOS cuts short.
INCOMPLETE_UTF8_SCRIPT_IDS: tuple[int, ...] = (370, 172)

# What the chat template puts before every answer: "...<|im_end|>\n<|im_start|>assistant\n".
ANSWER_PREFIX_IDS: tuple[int, ...] = (EOS_ID, 198, _IDS["<|im_start|>"], 77091, 198)
MAX_PREVIOUS = 4  # layer 0 has 4 heads
_HEAD_DIM = 32
_NUM_HEADS = 4
_NUM_KV_HEADS = 2
_INTERMEDIATE = 128
_ROPE_THETA = 5_000_000
# Layer-0 heads: equal amplitude on the 10 fastest RoPE frequencies. Normalised score
# sum_j cos(theta_j (d - delta)) / 10 is 1 at d = delta and at most 1 - 0.054 elsewhere for every
# d in 0..262,144 (the worst are the neighbours); the norm weights turn that into ~45 logits.
_ROPE_FREQS = 10
_QK_NORM_WEIGHT = 12.0
_GATE = 64.0  # detector neurons: gain on (vote - threshold), in units of the text constant
_UP = 64.0  # detector neurons: output scale
_LOGIT_SCALE = 8.0  # lm_head rows; the winning logit is about 8 x this
_T, _Z, _VOTES = 0, 1, 2  # residual layout: text constant, norm padding, one dim per position


@lru_cache(maxsize=1)
def _tokenizer() -> Any:
    from tokenizers import Tokenizer

    return Tokenizer.from_str(build_tokenizer_json())


def script_token_ids(text: str) -> list[int]:
    """``text`` as the checkpoint's tokenizer encodes it (``<tool_call>`` etc. are single ids)."""
    return list(_tokenizer().encode(text, add_special_tokens=False).ids)


def decode_script(ids: Sequence[int]) -> str:
    """The text of ``ids`` as the checkpoint's tokenizer decodes it (special tokens kept)."""
    return str(_tokenizer().decode(list(ids), skip_special_tokens=False))


class _Plan:
    """Everything the construction needs, derived from the script alone."""

    def __init__(self, script: Sequence[int]) -> None:
        self.script = [int(t) for t in script]
        for t in self.script:
            if not 0 <= t < VOCAB_SIZE:
                raise ValueError(
                    f"script token {t} is outside the vocabulary (0..{VOCAB_SIZE - 1})"
                )
            if t in (EOS_ID, PAD_ID):
                raise ValueError(
                    f"script token {t} ends generation; EOS is appended by the builder"
                )
        self.targets = [*self.script, EOS_ID]  # the token to emit at answer step k = 0..K
        self.seq = [*ANSWER_PREFIX_IDS, *self.script]  # t_{-5} .. t_{K-1}
        self.offset = len(ANSWER_PREFIX_IDS)  # t_i is seq[i + offset]
        self.num_prev = self._context_length()
        self.universe = sorted(set(self.seq[self.offset - 1 - self.num_prev :]))
        self.positions = list(range(-self.num_prev, len(self.targets)))  # vote dims, virtual first
        self.kv_groups = 1 if len(self.universe) <= _HEAD_DIM else 2
        dims = _VOTES + len(self.positions)
        if dims > TEXT_HIDDEN or len(self.universe) > _HEAD_DIM * _NUM_KV_HEADS:
            raise ValueError(
                f"script of {len(self.script)} tokens ({len(self.universe)} distinct with the "
                f"prompt's end) does not fit the tiny model: it needs {dims} of {TEXT_HIDDEN} "
                f"hidden dims; keep scripts to {TEXT_HIDDEN - _VOTES - self.num_prev - 1} tokens"
            )
        if self.num_prev > _NUM_HEADS // self.kv_groups:
            raise ValueError(
                f"script needs {self.num_prev + 1} tokens of context but has more than "
                f"{_HEAD_DIM} distinct tokens, which allows only {_NUM_HEADS // self.kv_groups}"
            )

    def tok(self, i: int) -> int:
        return self.seq[i + self.offset]

    def context(self, k: int, n: int) -> tuple[int, ...]:
        return tuple(self.tok(k - 1 - d) for d in range(n + 1))

    def _context_length(self) -> int:
        """Smallest number of previous tokens that, with the current one, fixes the next."""
        for n in range(MAX_PREVIOUS + 1):
            seen: dict[tuple[int, ...], int] = {}
            if all(
                seen.setdefault(self.context(k, n), target) == target
                for k, target in enumerate(self.targets)
            ):
                return n
        for k, target in enumerate(self.targets):
            for k2 in range(k):
                same = self.context(k, MAX_PREVIOUS) == self.context(k2, MAX_PREVIOUS)
                if same and self.targets[k2] != target:
                    raise ValueError(
                        f"script positions {k2} and {k} follow the same {MAX_PREVIOUS + 1} "
                        f"tokens but differ ({self.targets[k2]} vs {target}); the tiny model "
                        f"looks back at most {MAX_PREVIOUS + 1} tokens"
                    )
        raise AssertionError("unreachable")  # pragma: no cover

    def dim(self, k: int) -> int:
        """Residual dimension of script position ``k`` (virtual positions are negative)."""
        return _VOTES + k + self.num_prev

    def current_votes(self, token: int) -> list[int]:
        """Positions ``k`` (virtual included) whose current token is ``token``."""
        return [k for k in self.positions if self.tok(k - 1) == token]

    def previous_votes(self, token: int, delta: int) -> list[int]:
        """Real positions ``k`` whose token ``delta`` steps before the current one is ``token``."""
        return [k for k in range(len(self.targets)) if self.tok(k - 1 - delta) == token]


def _rope_vectors(deltas: Sequence[int]) -> tuple[Any, list[Any]]:
    """The key vector and one query vector per ``delta`` (rotate-half layout, head_dim 32)."""
    import torch

    half = _HEAD_DIM // 2
    inv_freq = [_ROPE_THETA ** (-j / half) for j in range(half)]
    amp = math.sqrt(1.0 / _ROPE_FREQS)
    key = torch.zeros(_HEAD_DIM, dtype=torch.float64)
    key[:_ROPE_FREQS] = amp
    queries = []
    for delta in deltas:
        q = torch.zeros(_HEAD_DIM, dtype=torch.float64)
        for j in range(_ROPE_FREQS):  # rotated back by delta positions: score peaks at d = delta
            q[j] = amp * math.cos(inv_freq[j] * delta)
            q[j + half] = -amp * math.sin(inv_freq[j] * delta)
        queries.append(q)
    return key, queries


def _text_weights(plan: _Plan) -> dict[str, Any]:
    """The language model's weights (embeddings, 2 layers, norm, lm_head) for ``plan``."""
    import torch

    f64 = torch.float64
    hidden = TEXT_HIDDEN
    real = range(len(plan.targets))
    n_slots = plan.num_prev + 1

    # Embeddings: text constant 1, the current token's votes, padding so every row has norm N.
    votes = {u: plan.current_votes(u) for u in plan.universe}
    norm_sq = 2.0 + max(len(v) for v in votes.values())
    embed = torch.zeros(VOCAB_SIZE, hidden, dtype=f64)
    embed[:, _T] = 1.0
    embed[:, _Z] = math.sqrt(norm_sq - 1.0)
    for u, ks in votes.items():
        embed[u, _Z] = math.sqrt(norm_sq - 1.0 - len(ks))
        for k in ks:
            embed[u, plan.dim(k)] = 1.0
    rms = math.sqrt(norm_sq / hidden)  # the same for every row, so layer 0 sees x = embed / rms

    # Layer 0 attention: head h looks delta_h back; kv head g carries the one-hot of its tokens.
    groups = [plan.universe[i : i + _HEAD_DIM] for i in range(0, len(plan.universe), _HEAD_DIM)]
    heads_per_kv = _NUM_HEADS // _NUM_KV_HEADS
    if plan.kv_groups == 1:
        head_delta = [h + 1 for h in range(_NUM_HEADS)]
        head_group = [0] * _NUM_HEADS
        kv_group = [0] * _NUM_KV_HEADS
    else:
        head_delta = [h % heads_per_kv + 1 for h in range(_NUM_HEADS)]
        head_group = [h // heads_per_kv for h in range(_NUM_HEADS)]
        kv_group = list(range(_NUM_KV_HEADS))
    key, queries = _rope_vectors(head_delta)
    q_proj = torch.zeros(_NUM_HEADS * _HEAD_DIM, hidden, dtype=f64)
    k_proj = torch.zeros(_NUM_KV_HEADS * _HEAD_DIM, hidden, dtype=f64)
    v_proj = torch.zeros(_NUM_KV_HEADS * _HEAD_DIM, hidden, dtype=f64)
    o_proj = torch.zeros(hidden, _NUM_HEADS * _HEAD_DIM, dtype=f64)
    for h in range(_NUM_HEADS):
        q_proj[h * _HEAD_DIM : (h + 1) * _HEAD_DIM, _T] = queries[h]
    for g in range(_NUM_KV_HEADS):
        k_proj[g * _HEAD_DIM : (g + 1) * _HEAD_DIM, _T] = key
        for slot, u in enumerate(groups[kv_group[g]] if kv_group[g] < len(groups) else []):
            for k in votes[u]:  # votes of different tokens never overlap: an exact inverse
                v_proj[g * _HEAD_DIM + slot, plan.dim(k)] = rms / len(votes[u])
    for h in range(_NUM_HEADS):
        delta = head_delta[h]
        if delta > plan.num_prev or head_group[h] >= len(groups):
            continue
        for slot, u in enumerate(groups[head_group[h]]):
            for k in plan.previous_votes(u, delta):
                o_proj[plan.dim(k), h * _HEAD_DIM + slot] = 1.0

    # Layer 1 MLP: neuron k fires when all n + 1 votes for position k are in; it writes there.
    gate = torch.zeros(_INTERMEDIATE, hidden, dtype=f64)
    up = torch.zeros(_INTERMEDIATE, hidden, dtype=f64)
    down = torch.zeros(hidden, _INTERMEDIATE, dtype=f64)
    for k in real:
        gate[k, plan.dim(k)] = _GATE
        gate[k, _T] = -_GATE * (n_slots - 0.5)
        up[k, _T] = _UP
        down[plan.dim(k), k] = 1.0

    lm_head = torch.zeros(VOCAB_SIZE, hidden, dtype=f64)
    for k in real:
        lm_head[plan.targets[k], plan.dim(k)] = _LOGIT_SCALE

    zeros_attn = {
        "q_proj.weight": torch.zeros_like(q_proj),
        "k_proj.weight": torch.zeros_like(k_proj),
        "v_proj.weight": torch.zeros_like(v_proj),
        "o_proj.weight": torch.zeros_like(o_proj),
        "q_norm.weight": torch.ones(_HEAD_DIM, dtype=f64),
        "k_norm.weight": torch.ones(_HEAD_DIM, dtype=f64),
    }
    layer0_attn = {
        "q_proj.weight": q_proj,
        "k_proj.weight": k_proj,
        "v_proj.weight": v_proj,
        "o_proj.weight": o_proj,
        "q_norm.weight": torch.full((_HEAD_DIM,), _QK_NORM_WEIGHT, dtype=f64),
        "k_norm.weight": torch.full((_HEAD_DIM,), _QK_NORM_WEIGHT, dtype=f64),
    }
    zero_mlp = {
        "gate_proj.weight": torch.zeros_like(gate),
        "up_proj.weight": torch.zeros_like(up),
        "down_proj.weight": torch.zeros_like(down),
    }
    mlp1 = {"gate_proj.weight": gate, "up_proj.weight": up, "down_proj.weight": down}
    prefix = "model.language_model."
    state: dict[str, Any] = {
        f"{prefix}embed_tokens.weight": embed,
        f"{prefix}norm.weight": torch.ones(hidden, dtype=f64),
        "lm_head.weight": lm_head,
    }
    for layer, (attn, mlp) in enumerate([(layer0_attn, zero_mlp), (zeros_attn, mlp1)]):
        base = f"{prefix}layers.{layer}."
        state[f"{base}input_layernorm.weight"] = torch.ones(hidden, dtype=f64)
        state[f"{base}post_attention_layernorm.weight"] = torch.ones(hidden, dtype=f64)
        state.update({f"{base}self_attn.{k}": v for k, v in attn.items()})
        state.update({f"{base}mlp.{k}": v for k, v in mlp.items()})
    # Image (and video) tokens: the merger outputs a constant with no text component (zero key,
    # zero value), the deepstack features are zero. The vision tower itself keeps its weights.
    image = torch.zeros(hidden, dtype=f64)
    image[_Z] = math.sqrt(norm_sq)
    state["model.visual.merger.linear_fc2.bias"] = image
    return state


def _zero_vision_outputs(state: dict[str, Any]) -> None:
    import torch

    for name in list(state):
        if name.startswith("model.visual.") and ".linear_fc2." in name and "merger" in name:
            state[name] = torch.zeros_like(state[name])


def build_scripted_model(
    out_dir: Path,
    script_ids: Sequence[int] | None = None,
    *,
    seed: int = 0,
    dtype: str = "float32",
    verify: bool = True,
) -> Path:
    """Write a scripted checkpoint into ``out_dir``, verify it (``scripted_verify``).

    ``script_ids`` defaults to ``DEFAULT_SCRIPT_IDS``; ``seed`` only draws the vision tower's
    weights (the answer never depends on images). Raises ``ValueError`` for a script the tiny
    model cannot hold (too long, ends generation, or needs more than 5 tokens of context).
    """
    import torch

    script = list(DEFAULT_SCRIPT_IDS if script_ids is None else script_ids)
    plan = _Plan(script)
    start = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_model_files(out_dir, tied=False, dtype=dtype)
    state = random_state_dict(out_dir, tied=False, seed=seed)
    _zero_vision_outputs(state)
    text = _text_weights(plan)
    missing = set(text) - set(state)
    if missing:
        raise RuntimeError(f"unexpected parameter names for this transformers: {sorted(missing)}")
    state.update({k: v.to(torch.float32) for k, v in text.items()})
    save_weights(state, out_dir / "model.safetensors", dtype)
    (out_dir / "script.json").write_text(
        json.dumps({"format": SCRIPTED_FORMAT_VERSION, "script_ids": script, "eos": EOS_ID}) + "\n",
        encoding="utf-8",
    )
    built_s = time.perf_counter() - start
    if verify:
        from vlserve.testing.scripted_verify import verify_scripted_model

        verify_scripted_model(out_dir, script)
    logger.info(
        "scripted Qwen3-VL (%d tokens, context %d) written to %s in %.1f s, verified in %.1f s",
        len(script),
        plan.num_prev + 1,
        out_dir,
        built_s,
        time.perf_counter() - start - built_s,
    )
    return out_dir


def scripted_cache_key(script_ids: Sequence[int], *, dtype: str = "float32") -> str:
    """Folder name for a cached build: a hash of the format versions, the script and the dtype."""
    options = {
        "builder": BUILDER_VERSION,
        "format": SCRIPTED_FORMAT_VERSION,
        "script": [int(t) for t in script_ids],
        "dtype": dtype,
    }
    digest = hashlib.sha256(json.dumps(options, sort_keys=True).encode()).hexdigest()[:16]
    return f"scripted-qwen3-vl-{digest}"


def ensure_scripted_model(
    script_ids: Sequence[int] | None = None, *, cache_dir: Path | None = None
) -> Path:
    """Path of a cached, verified scripted checkpoint (``DEFAULT_SCRIPT_IDS`` by default).

    Built on first use under ``$VLSERVE_CACHE_DIR`` (else ``~/.cache/vlserve``), atomically and
    once across parallel processes, like ``ensure_tiny_model``.
    """
    script = list(DEFAULT_SCRIPT_IDS if script_ids is None else script_ids)
    _Plan(script)  # refuse a script that cannot be built before taking any lock
    return cached_build(
        scripted_cache_key(script), lambda tmp: build_scripted_model(tmp, script), cache_dir
    )
