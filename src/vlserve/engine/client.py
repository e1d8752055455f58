"""The engine as the API sees it: a protocol a fake can implement in the API's unit tests."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Protocol

from vlserve.engine.prompt import ChatPrompt
from vlserve.engine.request import SamplingParams
from vlserve.engine.stream import RequestStream


class EngineState(str, enum.Enum):
    LOADING = "loading"
    READY = "ready"
    STALLED = "stalled"  # ready, but no step has finished for --engine-stall-timeout with work
    FAILED = "failed"
    STOPPED = "stopped"


@dataclass(frozen=True)
class ModelInfo:
    """What the API needs to know of the loaded model."""

    model_path: str
    max_model_len: int
    vocab_size: int
    generation_config: Any  # transformers.GenerationConfig | None: the sampling defaults
    device: str
    dtype: str


class EngineClient(Protocol):
    """One request in, one stream out; the engine owns its stages, admission and readiness."""

    @property
    def state(self) -> EngineState: ...

    @property
    def model_info(self) -> ModelInfo | None:
        """None until the model is loaded."""
        ...

    @property
    def num_running(self) -> int: ...

    @property
    def num_waiting(self) -> int: ...

    @property
    def stalled_s(self) -> float:
        """Seconds since the last finished step while work is pending (0 while idle)."""
        ...

    def cache_bytes(self) -> dict[str, int]:
        """Bytes held by each of the engine's content caches, by name (the same names always)."""
        ...

    async def generate(
        self, prompt: ChatPrompt, params: SamplingParams, request_id: str
    ) -> RequestStream:
        """Prepare, admit and encode ``prompt``, then queue it; raises the request's 4xx/503
        before anything is streamed."""
        ...

    def start(self) -> None: ...

    async def wait_ready(self) -> None: ...

    def shutdown(self, timeout_s: float = 10.0) -> None: ...
