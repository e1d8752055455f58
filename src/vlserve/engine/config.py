"""EngineConfig: the engine's settings, those with a flag declared once (vlserve.settings)."""

from __future__ import annotations

from dataclasses import dataclass

from vlserve.engine.scheduler import SchedulerConfig
from vlserve.settings import check, option, section


@dataclass(frozen=True)
class EngineConfig:
    """The engine's settings; those with a flag are declared here once (vlserve.settings)."""

    model_path: str = option(
        "/mnt/model_weights",
        group="model",
        flag="--model",
        env_aliases=("MODEL_PATH",),
        metavar="DIR",
        help="checkpoint directory (local; nothing is downloaded)",
    )
    scheduler: SchedulerConfig = section(SchedulerConfig)
    request_timeout_s: float = option(
        600.0,
        group="server",
        flag="--request-timeout",
        above=0,
        metavar="SECONDS",
        help="a request unfinished after this many seconds ends with 504",
    )
    engine_stall_timeout_s: float = option(
        120.0,
        group="server",
        flag="--engine-stall-timeout",
        min=0,
        metavar="SECONDS",
        help="with work pending and no engine step finished for this long, the engine counts "
        "as stalled: /health answers 503 {\"status\": \"stalled\"} (so launch restarts the "
        "instance and a liveness probe fails) and new requests get 503; 0 turns it off. One "
        "step is one prefill chunk or one decode step: longer than a minute only when stuck",
    )
    encoder_thread: bool = option(
        True,
        group="batching",
        help="run the vision tower on its own thread, ahead of the prefill, so newcomers' "
        "images overlap the running batch's decode steps (off: inside the prefill, on the "
        "inference thread)",
    )
    encoder_batch_patches: int | None = None  # None: 0 (one request at a time) on CPU, else 32768
    load_format: str = option(
        "auto",
        group="model",
        choices=("auto", "dummy"),
        help="dummy (vLLM's name): random weights of the shape in the model directory's "
        "config.json, made on the device from seed 0, for benchmarks without a checkpoint",
    )
    model_impl: str = option(
        "auto",
        group="model",
        choices=("auto", "vlserve", "transformers"),
        help="the text stack's forward (vLLM's name): vlserve's compact forward over the KV "
        "pool (auto), or transformers' own (the reference); both are exact against generate",
    )
    enforce_eager: bool = option(
        False,
        group="model",
        help="run every decode step eagerly (vLLM's name); by default, on CUDA with the compact "
        "forward, the decode step is captured as a CUDA graph per row bucket before /health "
        "turns 200 (the log gives the capture time and memory)",
    )
    attention: str = "auto"  # decode attention: "paged" (Triton), "portable"; auto: by device
    # the decode step as a device graph per row bucket (engine/graphs.py): "auto" (CUDA graphs
    # with paged attention), "none" (what --enforce-eager gives), "static" (no capture: CPU tests)
    decode_graph: str = "auto"
    default_max_tokens: int = option(
        2048,
        group="model",
        min=1,
        metavar="N",
        help="max_tokens when a request gives none (capped by the context and the KV cache)",
    )
    max_image_tokens: int = option(
        16_384,
        group="limits",
        flag="--max-image-tokens-per-request",
        min=1,
        metavar="N",
        help="image tokens of all of a request's images together; more gets 400 "
        "too_many_image_tokens (a 1600x1600 image is about 2500 tokens)",
    )
    grammar_compile_timeout_s: float = option(
        5.0,
        group="limits",
        flag="--grammar-compile-timeout",
        above=0,
        metavar="SECONDS",
        help="a response_format or tools schema whose grammar does not compile within this "
        "many seconds gets 400 grammar_too_complex (compiled first in a grammar worker "
        "process, killed past the budget or when its client leaves; ordinary schemas take "
        "milliseconds)",
    )
    grammar_workers: int = option(
        2,
        group="limits",
        min=1,
        metavar="N",
        help="grammar worker processes: compiles of new schemas that run at once (cached "
        "schemas and json_object never wait for one); started with the first schema, each "
        "about 80 MB of its own beside a fork server of about 0.7 GB (mostly shared libraries)",
    )
    kv_cache_tokens: int | None = option(
        None,
        group="batching",
        aliases=("--max-num-batched-tokens",),  # its name before the paged cache
        min=64,
        metavar="N",
        doc_default="--kv-cache-memory-fraction of free device memory; on CPU 65536 (at most "
        "a quarter of the available RAM)",
        help="the KV cache, preallocated, in tokens; requests hold what they use (prompt plus "
        "tokens generated so far, in blocks of 16); when it runs out the newest request is "
        "preempted and recomputed later; a request whose prompt + max_tokens exceeds the whole "
        "cache gets 400",
    )
    kv_cache_memory_fraction: float = option(
        0.8,
        group="batching",
        above=0,
        max=1,
        metavar="F",
        help="on accelerators without --kv-cache-tokens: the share of free device memory "
        "(after loading the model) the KV cache takes",
    )
    block_size: int = 16
    prefix_caching: bool = option(
        True,
        group="batching",
        flag="--prefix-cache",
        help="reuse the KV of an earlier prompt's longest matching prefix (block hashes include "
        "each image's content and the request's cache_salt)",
    )
    encoder_cache_mb: int = option(
        256,
        group="batching",
        min=0,
        metavar="MIB",
        help="images and videos kept by content, each cache LRU in MiB (0 = off): decoded "
        "images, processed images and vision-tower outputs, so a repeated one skips all three",
    )
    decode_row_buckets: bool | None = None  # None: on accelerators (graph-ready shapes), not CPU

    def __post_init__(self) -> None:
        check(self)
        if not self.model_path:
            raise ValueError("a model path is required (--model or MODEL_PATH)")
        if self.kv_cache_tokens is not None and self.kv_cache_tokens < self.block_size:
            raise ValueError(f"kv_cache_tokens must be at least one block ({self.block_size})")
        if self.block_size < 1:
            raise ValueError("block_size must be >= 1")
        if self.enforce_eager and self.decode_graph != "none":
            object.__setattr__(self, "decode_graph", "none")
