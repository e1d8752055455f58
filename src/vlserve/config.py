"""ServerConfig: every setting of `vlserve serve`, frozen and validated once."""

from __future__ import annotations

from dataclasses import dataclass, field

from vlserve.engine.scheduler import SchedulerConfig
from vlserve.media.config import MediaConfig


@dataclass(frozen=True)
class ServerConfig:
    model_path: str
    host: str = "0.0.0.0"
    port: int = 9000
    served_model_names: tuple[str, ...] = ()  # empty: the model path is the name
    device: str = "auto"
    dtype: str = "auto"
    load_format: str = "auto"  # dummy: random weights of the config's shape (vLLM's name)
    model_impl: str = "auto"  # transformers: HF's forward of the text stack (vLLM's name)
    enforce_eager: bool = False  # no decode graphs (vLLM's name)
    default_max_tokens: int = 2048
    max_n: int = 16  # choices per request
    request_timeout_s: float = 600.0
    encoder_thread: bool = True
    shutdown_timeout_s: float = 30.0
    log_level: str = "info"
    api_keys: tuple[str, ...] = ()  # empty: no authentication
    cors_origins: tuple[str, ...] = ()  # empty: CORS off
    max_request_body_bytes: int = 64 * 1024 * 1024
    max_header_bytes: int = 16 * 1024  # all request headers together (h11's incomplete-event cap)
    max_headers: int = 100
    header_timeout_s: float = 10.0  # a connection's request line and headers, complete
    body_timeout_s: float = 30.0  # a request body, complete, once its headers are in
    max_connections: int = 1024  # open connections and tasks; over it uvicorn answers 503
    metrics_auth: bool = False  # /metrics needs the API key too
    max_image_tokens_per_request: int = 16_384  # all of a request's images together
    media: MediaConfig = field(default_factory=MediaConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    kv_cache_tokens: int | None = None  # None: sized from free memory (EngineConfig)
    kv_cache_memory_fraction: float = 0.8
    prefix_caching: bool = True
    encoder_cache_mb: int = 256

    def __post_init__(self) -> None:
        if not self.model_path:
            raise ValueError("a model path is required (--model or MODEL_PATH)")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in 0..65535, got {self.port}")
        if self.device not in ("auto", "npu", "cuda", "cpu"):
            raise ValueError(f"device must be auto, npu, cuda or cpu, got {self.device!r}")
        if self.dtype not in ("auto", "bfloat16", "float16", "float32"):
            raise ValueError(
                f"dtype must be auto, bfloat16, float16 or float32, got {self.dtype!r}"
            )
        if self.load_format not in ("auto", "dummy"):
            raise ValueError(f"load_format must be auto or dummy, got {self.load_format!r}")
        if self.model_impl not in ("auto", "vlserve", "transformers"):
            raise ValueError(
                f"model_impl must be auto, vlserve or transformers, got {self.model_impl!r}"
            )
        if self.max_n < 1:
            raise ValueError("max_n must be at least 1")
        if self.default_max_tokens < 1:
            raise ValueError("default_max_tokens must be at least 1")
        if self.request_timeout_s <= 0 or self.shutdown_timeout_s < 0:
            raise ValueError("timeouts must be positive")
        if any(not key or key != key.strip() for key in self.api_keys):
            raise ValueError("API keys must be non-empty and have no surrounding whitespace")
        if self.header_timeout_s <= 0 or self.body_timeout_s <= 0 or self.max_connections < 1:
            raise ValueError("header/body timeouts must be > 0 and max_connections >= 1")
        if self.max_image_tokens_per_request < 1:
            raise ValueError("max_image_tokens_per_request must be at least 1")
        if self.max_request_body_bytes < 1024 or self.max_header_bytes < 1024:
            raise ValueError("max_request_body_bytes and max_header_bytes must be at least 1024")
        if self.kv_cache_tokens is not None and self.kv_cache_tokens < 64:
            raise ValueError("kv_cache_tokens must be at least 64")
        if not 0 < self.kv_cache_memory_fraction <= 1:
            raise ValueError("kv_cache_memory_fraction must be in (0, 1]")
        if self.encoder_cache_mb < 0:
            raise ValueError("encoder_cache_mb must be >= 0")
        if self.max_headers < 8:
            raise ValueError("max_headers must be at least 8")

    @property
    def model_names(self) -> tuple[str, ...]:
        """Names listed by /v1/models."""
        return self.served_model_names or (self.model_path,)

    @property
    def accepted_model_names(self) -> tuple[str, ...]:
        """Names a request may use: the served names and, as in the prototype, the model path."""
        names = self.model_names
        return names if self.model_path in names else (*names, self.model_path)
