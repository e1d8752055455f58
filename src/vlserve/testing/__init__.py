"""Test support: tiny Qwen3-VL checkpoints with the real Qwen vocabulary.

``ensure_tiny_model`` gives random weights; ``ensure_scripted_model`` gives weights whose answer
to every chat prompt is a fixed script of token ids, then EOS.
"""

from __future__ import annotations

from vlserve.testing.scripted_model import (
    DEFAULT_SCRIPT_IDS,
    DEFAULT_SCRIPT_TEXT,
    INCOMPLETE_UTF8_SCRIPT_IDS,
    build_scripted_model,
    ensure_scripted_model,
    script_token_ids,
)
from vlserve.testing.tiny_model import build_tiny_model, ensure_tiny_model

__all__ = [
    "DEFAULT_SCRIPT_IDS",
    "DEFAULT_SCRIPT_TEXT",
    "INCOMPLETE_UTF8_SCRIPT_IDS",
    "build_scripted_model",
    "build_tiny_model",
    "ensure_scripted_model",
    "ensure_tiny_model",
    "script_token_ids",
]
