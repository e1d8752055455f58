"""Build (and cache) a tiny random-weights Qwen3-VL checkpoint with the real Qwen vocabulary.

Other shapes (``SMALL``, ``QWEN3_VL_8B``) share every file but the weights: benchmarks whose
result depends on the model's proportions write them with ``write_model_files(shape=...)`` and
serve them with ``--load-format dummy``. The tiny model's layers are about 1% of its 151936-row
output head, so its step time is that head's and its vision tower is nearly free; Qwen3-VL-8B's
layers are about 11 times its head.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from vlserve.testing.tokenizer import (
    NUM_BPE_TOKENS,
    added_token_ids,
    build_tokenizer_json,
    write_tokenizer_files,
)

# Bump whenever the files written change: it is part of the cache key.
BUILDER_VERSION = 2  # 2: the chat template renders tools, tool calls and results
VOCAB_SIZE = 151_936


@dataclass(frozen=True)
class ModelShape:
    """Widths and depths of a random checkpoint; everything else (vocabulary, template,
    processor, special tokens) is the same for every shape."""

    name: str
    text_hidden: int
    text_layers: int
    text_intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    mrope_section: tuple[int, int, int]  # sums to head_dim / 2
    vision_hidden: int
    vision_depth: int
    vision_intermediate: int
    vision_heads: int
    deepstack: tuple[int, ...]  # vision layers whose outputs feed the first text layers


TINY = ModelShape("tiny", 64, 2, 128, 4, 2, 32, (6, 5, 5), 64, 2, 128, 2, (0, 1))
# The text layers of the decode-step measurement (benchmarks/kv_memory.py builds the same
# in memory); heads 4:1 and deepstack layers placed as in Qwen3-VL-8B (8, 16, 24 of 27). 187M
# parameters, 156M of them the embeddings and the head.
SMALL = ModelShape("small", 512, 8, 1024, 8, 2, 64, (12, 10, 10), 256, 8, 1024, 4, (2, 5, 7))
# The released Qwen3-VL-8B-Instruct's dimensions.
QWEN3_VL_8B = ModelShape(
    "8b", 4096, 36, 12288, 32, 8, 128, (24, 20, 20), 1152, 27, 4304, 16, (8, 16, 24)
)
TEXT_HIDDEN = TINY.text_hidden
DTYPES = ("bfloat16", "float32")
# Untied head: real rows get logits of this standard deviation, so the distribution is peaked
# (like a trained model's) and rows left at zero (no tokenizer entry, or added tokens) never win.
_HEAD_LOGIT_STD = 4.0
_INIT_STD = 0.02

_IDS = added_token_ids()


def tiny_config(
    *, tied: bool = False, dtype: str = "bfloat16", shape: ModelShape = TINY
) -> dict[str, Any]:
    """``config.json`` in the legacy form (``rope_scaling`` + ``rope_theta``) both 4.57 and 5.x read."""
    text = {
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": _IDS["<|endoftext|>"],
        "dtype": dtype,
        "eos_token_id": _IDS["<|im_end|>"],
        "head_dim": shape.head_dim,
        "hidden_act": "silu",
        "hidden_size": shape.text_hidden,
        "initializer_range": _INIT_STD,
        "intermediate_size": shape.text_intermediate,
        "max_position_embeddings": 262_144,
        "model_type": "qwen3_vl_text",
        "num_attention_heads": shape.heads,
        "num_hidden_layers": shape.text_layers,
        "num_key_value_heads": shape.kv_heads,
        "rms_norm_eps": 1e-6,
        # Sections sum to head_dim / 2 (t, h, w frequencies), interleaved as in the release.
        "rope_scaling": {
            "mrope_interleaved": True,
            "mrope_section": list(shape.mrope_section),
            "rope_type": "default",
        },
        "rope_theta": 5_000_000,
        "tie_word_embeddings": tied,
        "use_cache": True,
        "vocab_size": VOCAB_SIZE,
    }
    vision = {
        "deepstack_visual_indexes": list(shape.deepstack),
        "depth": shape.vision_depth,
        "hidden_act": "gelu_pytorch_tanh",
        "hidden_size": shape.vision_hidden,
        "in_channels": 3,
        "initializer_range": _INIT_STD,
        "intermediate_size": shape.vision_intermediate,
        "model_type": "qwen3_vl",
        "num_heads": shape.vision_heads,
        "num_position_embeddings": 2304,
        # Vision tokens are added to text embeddings: the merger must output the text width.
        "out_hidden_size": shape.text_hidden,
        "patch_size": 16,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    }
    return {
        "architectures": ["Qwen3VLForConditionalGeneration"],
        "dtype": dtype,
        "image_token_id": _IDS["<|image_pad|>"],
        "model_type": "qwen3_vl",
        "text_config": text,
        "tie_word_embeddings": tied,
        "video_token_id": _IDS["<|video_pad|>"],
        "vision_config": vision,
        "vision_end_token_id": _IDS["<|vision_end|>"],
        "vision_start_token_id": _IDS["<|vision_start|>"],
    }


def generation_config() -> dict[str, Any]:
    """The released Qwen3-VL Instruct sampling defaults (callers wanting greedy must say so)."""
    return {
        "bos_token_id": _IDS["<|endoftext|>"],
        "do_sample": True,
        "eos_token_id": [_IDS["<|im_end|>"], _IDS["<|endoftext|>"]],
        "pad_token_id": _IDS["<|endoftext|>"],
        "repetition_penalty": 1.0,
        "temperature": 0.7,
        "top_k": 20,
        "top_p": 0.8,
    }


def processor_configs() -> dict[str, dict[str, Any]]:
    """Image and video processor files with the released checkpoints' values."""
    common = {
        "patch_size": 16,
        "temporal_patch_size": 2,
        "merge_size": 2,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "processor_class": "Qwen3VLProcessor",
    }
    image = {
        **common,
        "size": {"longest_edge": 16_777_216, "shortest_edge": 65_536},
        "image_processor_type": "Qwen2VLImageProcessorFast",
    }
    video = {
        **common,
        "size": {"longest_edge": 25_165_824, "shortest_edge": 4096},
        "video_processor_type": "Qwen3VLVideoProcessor",
    }
    return {"preprocessor_config.json": image, "video_preprocessor_config.json": video}


def chat_template() -> str:
    """vlserve's own Qwen-format chat template (package data)."""
    return resources.files("vlserve.testing").joinpath("chat_template.jinja").read_text("utf-8")


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def random_state_dict(config_dir: Path, *, tied: bool, seed: int) -> dict[str, Any]:
    """Fresh weights for every parameter, drawn in name order from one seeded generator."""
    import torch
    from transformers import AutoConfig, Qwen3VLForConditionalGeneration

    config = AutoConfig.from_pretrained(config_dir)
    # Meta tensors give names and shapes without paying for transformers' own random init.
    with torch.device("meta"):
        model = Qwen3VLForConditionalGeneration(config)
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters(remove_duplicate=True)}
    gen = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for name in sorted(shapes):
        shape = shapes[name]
        if name.endswith(".bias"):
            state[name] = torch.zeros(shape)
        elif len(shape) == 1:  # RMSNorm / LayerNorm scales
            state[name] = torch.ones(shape)
        else:
            state[name] = torch.randn(shape, generator=gen) * _INIT_STD
    if tied:
        state.pop("lm_head.weight", None)
    else:
        state["lm_head.weight"] = _visible_text_head(gen)
    return state


def _visible_text_head(gen: Any) -> Any:
    """An untied lm_head whose greedy (and sampled) choices are real, decodable BPE tokens.

    There is no bias, so "never wins" needs logits far below the top: real rows get a scale
    that puts the best of them many units above zero, and rows without a BPE entry (added
    tokens, and the padding ids 151669..151935 that decode to "") are zero.
    """
    import torch

    head = torch.zeros(VOCAB_SIZE, TEXT_HIDDEN)
    # The final RMSNorm leaves hidden states of norm ~sqrt(hidden), hence this row scale.
    std = _HEAD_LOGIT_STD / TEXT_HIDDEN**0.5
    head[:NUM_BPE_TOKENS] = torch.randn(NUM_BPE_TOKENS, TEXT_HIDDEN, generator=gen) * std
    return head


def save_weights(state: dict[str, Any], path: Path, dtype: str) -> None:
    import torch
    from safetensors.torch import save_file

    torch_dtype = getattr(torch, dtype)
    tensors = {k: v.to(torch_dtype).contiguous() for k, v in sorted(state.items())}
    save_file(tensors, str(path), metadata={"format": "pt"})
    path.chmod(0o644)


def write_model_files(
    out_dir: Path, *, tied: bool = False, dtype: str = "bfloat16", shape: ModelShape = TINY
) -> None:
    """Write every file of a checkpoint except its weights (``model.safetensors``)."""
    _write_json(out_dir / "config.json", tiny_config(tied=tied, dtype=dtype, shape=shape))
    _write_json(out_dir / "generation_config.json", generation_config())
    for name, data in processor_configs().items():
        _write_json(out_dir / name, data)
    # Both 4.57 and 5.x processors and tokenizers read the template from this file.
    (out_dir / "chat_template.jinja").write_text(chat_template(), encoding="utf-8")
    write_tokenizer_files(out_dir, build_tokenizer_json())


def build_tiny_model(
    out_dir: Path, *, tied: bool = False, seed: int = 0, dtype: str = "bfloat16"
) -> Path:
    """Write a complete tiny Qwen3-VL checkpoint into ``out_dir`` and return it.

    Same options give byte-identical files. ``tied=False`` unties the embeddings and makes
    greedy decoding emit visible text (see ``_visible_text_head``).
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_model_files(out_dir, tied=tied, dtype=dtype)
    state = random_state_dict(out_dir, tied=tied, seed=seed)
    save_weights(state, out_dir / "model.safetensors", dtype)
    return out_dir


def count_parameters(model_dir: Path) -> int:
    """Number of stored parameters in ``model_dir/model.safetensors`` (tied head counted once)."""
    from safetensors import safe_open

    total = 0
    with safe_open(str(Path(model_dir) / "model.safetensors"), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
            n = 1
            for dim in f.get_slice(key).get_shape():
                n *= dim
            total += n
    return total


def default_cache_dir() -> Path:
    """``$VLSERVE_CACHE_DIR`` or ``~/.cache/vlserve``."""
    env = os.environ.get("VLSERVE_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "vlserve"


def cache_key(*, tied: bool, seed: int = 0, dtype: str = "bfloat16") -> str:
    """Folder name for a cached build: a hash of the builder version and options."""
    options = {"builder": BUILDER_VERSION, "tied": tied, "seed": seed, "dtype": dtype}
    digest = hashlib.sha256(json.dumps(options, sort_keys=True).encode()).hexdigest()[:16]
    return f"tiny-qwen3-vl-{'tied' if tied else 'untied'}-{digest}"


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    import fcntl

    with open(path, "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def cached_build(name: str, build: Callable[[Path], object], cache_dir: Path | None = None) -> Path:
    """``cache_dir/name``, made on first use by ``build(tmp)`` and an atomic rename.

    Safe across parallel processes: builds run under a file lock, and temp folders left by a
    builder that died are removed by the next build.
    """
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    final = root / name
    if final.is_dir():  # only ever created by an atomic rename of a finished build
        return final
    root.mkdir(parents=True, exist_ok=True)
    with _file_lock(root / f"{final.name}.lock"):
        if final.is_dir():  # another process finished while we waited
            return final
        # Temp dirs are only made under this lock, so any left are from a builder that died.
        for stale in root.glob(f".{final.name}.*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
        try:
            build(tmp)
            tmp.chmod(0o755)  # mkdtemp makes it 0700
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


def ensure_tiny_model(*, tied: bool = False, cache_dir: Path | None = None) -> Path:
    """Path of a cached tiny checkpoint, built on first use (safe across parallel processes)."""
    return cached_build(
        cache_key(tied=tied), lambda tmp: build_tiny_model(tmp, tied=tied), cache_dir
    )
