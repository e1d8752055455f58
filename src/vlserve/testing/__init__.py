"""Test support: a tiny random-weights Qwen3-VL checkpoint with the real Qwen vocabulary."""

from __future__ import annotations

from vlserve.testing.tiny_model import build_tiny_model, ensure_tiny_model

__all__ = ["build_tiny_model", "ensure_tiny_model"]
