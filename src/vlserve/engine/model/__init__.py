"""Compact forwards of the model families vlserve serves, over the KV pool."""

from vlserve.engine.model.qwen3_vl import Qwen3VLText

__all__ = ["Qwen3VLText"]
