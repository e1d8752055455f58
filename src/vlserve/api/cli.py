"""`vlserve serve`: flags and the prototype's env vars → ServerConfig → uvicorn."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from types import FrameType

from vlserve.api.auth import parse_keys
from vlserve.api.faults import ENV_VAR as FAULT_ENV_VAR
from vlserve.api.faults import FaultInjector
from vlserve.api.media_cli import add_media_arguments, media_config_from_args
from vlserve.config import ServerConfig
from vlserve.engine.scheduler import SchedulerConfig

log = logging.getLogger("vlserve")


def _env(name: str, default: str | None = None) -> str | None:
    value = os.environ.get(name)
    return value if value not in (None, "") else default


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.ArgumentDefaultsHelpFormatter
    m = p.add_argument_group("model")
    m.add_argument(
        "--model",
        default=_env("MODEL_PATH", "/mnt/model_weights"),
        help="checkpoint directory (env MODEL_PATH)",
    )
    m.add_argument(
        "--served-model-name",
        nargs="+",
        default=None,
        metavar="NAME",
        help="name(s) clients use; the first is listed first (env MODEL_ID; default: "
        "the model path, which is always accepted too)",
    )
    m.add_argument(
        "--device",
        default=_env("DEVICE", "auto"),
        choices=["auto", "npu", "cuda", "cpu"],
        help="auto prefers npu, then cuda, then cpu (env DEVICE)",
    )
    m.add_argument(
        "--dtype",
        default=_env("VLSERVE_DTYPE", "auto"),
        choices=["auto", "bfloat16", "float16", "float32"],
        help="auto: bfloat16 on accelerators, float32 on cpu",
    )
    m.add_argument(
        "--load-format",
        default="auto",
        choices=["auto", "dummy"],
        help="dummy (vLLM's name): random weights of the shape in the model directory's "
        "config.json, for benchmarks without a checkpoint; the directory needs no weights",
    )
    m.add_argument(
        "--model-impl",
        default=_env("VLSERVE_MODEL_IMPL", "auto"),
        choices=["auto", "vlserve", "transformers"],
        help="the text stack's forward (vLLM's name): vlserve's own over the KV pool "
        "(auto), or transformers' (the reference)",
    )
    m.add_argument(
        "--enforce-eager",
        action="store_true",
        default=_env("VLSERVE_ENFORCE_EAGER", "") in ("1", "true"),
        help="run every decode step eagerly (vLLM's name); by default, on CUDA, the decode "
        "step is captured as a CUDA graph per row bucket at startup",
    )
    m.add_argument(
        "--default-max-tokens",
        type=int,
        default=2048,
        help="max_tokens when a request gives none (capped by the context)",
    )
    m.add_argument(
        "--max-n",
        type=int,
        default=16,
        help="the most choices (n) one request may ask for; each is a sequence in the batch",
    )
    s = p.add_argument_group("server")
    s.add_argument("--host", default=_env("SERVER_HOST", "0.0.0.0"), help="env SERVER_HOST")
    s.add_argument(
        "--port", type=int, default=int(_env("SERVER_PORT", "9000") or 9000), help="env SERVER_PORT"
    )
    s.add_argument(
        "--request-timeout",
        type=float,
        default=600.0,
        metavar="SECONDS",
        help="a request still unfinished after this fails with 504",
    )
    s.add_argument(
        "--shutdown-timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="on SIGTERM, how long in-flight requests may finish",
    )
    s.add_argument(
        "--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"]
    )
    _add_hardening_arguments(p)
    b = p.add_argument_group("batching")
    b.add_argument("--max-num-seqs", type=int, default=32, help="requests decoded together")
    b.add_argument(
        "--kv-cache-tokens",
        "--max-num-batched-tokens",  # its name before the paged cache, kept for old scripts
        dest="kv_cache_tokens",
        type=int,
        default=None,
        help="KV cache size in tokens, preallocated; requests hold what they use (prompt plus "
        "tokens generated so far). Default: --kv-cache-memory-fraction of the free device "
        "memory after loading; on CPU 65536 tokens (at most a quarter of the available RAM)",
    )
    b.add_argument(
        "--kv-cache-memory-fraction",
        type=float,
        default=0.8,
        help="on accelerators, the share of free device memory (after loading the model) the KV "
        "cache takes when --kv-cache-tokens is not given",
    )
    b.add_argument(
        "--prefix-cache",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="reuse the KV of an earlier prompt's longest matching prefix (images included, by "
        "content; isolated per cache_salt)",
    )
    b.add_argument(
        "--encoder-cache-mb",
        type=int,
        default=256,
        help="images kept by content, each cache LRU in MiB (0 = off): decoded images, processed "
        "images and vision-tower outputs, so a repeated image skips all three",
    )
    b.add_argument(
        "--max-prefill-tokens",
        type=int,
        default=None,
        help="token positions computed in one prefill step (rows x the longest row's new "
        "tokens: a batch is padded to its longest row); longer prompts are prefilled in "
        "chunks, interleaved with decode steps, so nobody waits for a whole long prompt "
        "(default: 2048 on CPU, 8192 on accelerators)",
    )
    b.add_argument(
        "--max-queue",
        type=int,
        default=256,
        help="requests waiting beyond the batch's free rows, past which new ones get 429",
    )
    b.add_argument(
        "--encoder-thread",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run the vision tower on its own thread, ahead of the prefill (off: inside the "
        "prefill, on the inference thread)",
    )
    add_media_arguments(p)


def _add_hardening_arguments(p: argparse.ArgumentParser) -> None:
    h = p.add_argument_group("access and limits (docs/HARDENING.md)")
    h.add_argument(
        "--api-key",
        action="append",
        default=[],
        metavar="KEY",
        help="require 'Authorization: Bearer KEY' on /v1 routes; repeat for several keys "
        "(env VLSERVE_API_KEY, comma-separated; default: no authentication)",
    )
    h.add_argument(
        "--cors-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="allow browser requests from ORIGIN (repeatable; '*' for any); default: CORS off",
    )
    h.add_argument(
        "--max-request-body-bytes",
        type=int,
        default=64 * 1024 * 1024,
        metavar="N",
        help="larger request bodies get 413 (counted while reading)",
    )
    h.add_argument(
        "--max-header-bytes",
        type=int,
        default=16 * 1024,
        metavar="N",
        help="request line and headers together; more gets 431",
    )
    h.add_argument(
        "--max-headers", type=int, default=100, metavar="N", help="more request headers gets 431"
    )
    h.add_argument(
        "--header-timeout",
        type=float,
        default=10.0,
        metavar="S",
        help="a connection that has not sent a complete request line and headers within S "
        "seconds gets 408 and is closed",
    )
    h.add_argument(
        "--body-timeout",
        type=float,
        default=30.0,
        metavar="S",
        help="a request body not complete within S seconds of its headers gets 408 and is closed",
    )
    h.add_argument(
        "--max-connections",
        type=int,
        default=1024,
        metavar="N",
        help="open connections (and their requests) beyond N get 503",
    )
    h.add_argument(
        "--metrics-auth",
        action="store_true",
        help="with --api-key, /metrics needs the key too (/health stays open for probes)",
    )
    h.add_argument(
        "--max-image-tokens-per-request",
        type=int,
        default=16_384,
        metavar="N",
        help="image tokens of all of a request's images together; more gets 400 (a 1600x1600 "
        "image is about 2500 tokens)",
    )


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    names = tuple(args.served_model_name or ())
    if not names and _env("MODEL_ID"):
        names = (str(_env("MODEL_ID")),)
    return ServerConfig(
        model_path=args.model,
        host=args.host,
        port=args.port,
        served_model_names=names,
        device=args.device,
        dtype=args.dtype,
        load_format=args.load_format,
        model_impl=args.model_impl,
        enforce_eager=args.enforce_eager,
        default_max_tokens=args.default_max_tokens,
        max_n=args.max_n,
        request_timeout_s=args.request_timeout,
        encoder_thread=args.encoder_thread,
        shutdown_timeout_s=args.shutdown_timeout,
        log_level=args.log_level,
        api_keys=parse_keys(args.api_key, _env("VLSERVE_API_KEY")),
        cors_origins=tuple(dict.fromkeys(args.cors_origin)),
        max_request_body_bytes=args.max_request_body_bytes,
        max_header_bytes=args.max_header_bytes,
        max_headers=args.max_headers,
        header_timeout_s=args.header_timeout,
        body_timeout_s=args.body_timeout,
        max_connections=args.max_connections,
        metrics_auth=args.metrics_auth,
        max_image_tokens_per_request=args.max_image_tokens_per_request,
        media=media_config_from_args(args),
        scheduler=SchedulerConfig(
            max_num_seqs=args.max_num_seqs,
            max_prefill_tokens=args.max_prefill_tokens,
            max_queue=args.max_queue,
        ),
        kv_cache_tokens=args.kv_cache_tokens,
        kv_cache_memory_fraction=args.kv_cache_memory_fraction,
        prefix_caching=args.prefix_cache,
        encoder_cache_mb=args.encoder_cache_mb,
    )


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        config = config_from_args(args)
        faults = FaultInjector.from_spec(os.environ.get(FAULT_ENV_VAR))
    except ValueError as exc:
        log.error("invalid configuration: %s", exc)
        return 2
    if not os.path.isdir(config.model_path):
        log.error("model directory %s does not exist (--model or MODEL_PATH)", config.model_path)
        return 2
    if faults is not None:
        log.warning("%s is set: requests will fail on purpose (testing only)", FAULT_ENV_VAR)
    return serve(config, faults)


def serve(config: ServerConfig, faults: FaultInjector | None = None) -> int:
    """Run the server until SIGINT/SIGTERM (exit 0) or a fatal engine error (exit 1)."""
    from vlserve.engine import openmp

    openmp.apply_defaults()  # before anything below imports torch
    import uvicorn

    from vlserve.api.app import begin_drain, create_app
    from vlserve.api.http11 import with_header_timeout
    from vlserve.api.metrics import Metrics
    from vlserve.engine.device import resolve_device
    from vlserve.engine.engine import AsyncEngine, EngineConfig, EngineHooks
    from vlserve.errors import DeviceUnavailableError

    try:
        device = resolve_device(config.device, config.dtype)
    except DeviceUnavailableError as exc:
        log.error("%s", exc.message)
        return 3
    log.info("device %s, dtype %s, %s", device.type, device.dtype_name, openmp.describe())
    fatal: list[BaseException] = []
    metrics = Metrics()
    engine = AsyncEngine(
        EngineConfig(
            config.model_path,
            config.scheduler,
            config.request_timeout_s,
            config.encoder_thread,
            load_format=config.load_format,
            model_impl=config.model_impl,
            decode_graph="none" if config.enforce_eager else "auto",
            default_max_tokens=config.default_max_tokens,
            max_image_tokens=config.max_image_tokens_per_request,
            kv_cache_tokens=config.kv_cache_tokens,
            kv_cache_memory_fraction=config.kv_cache_memory_fraction,
            prefix_caching=config.prefix_caching,
            encoder_cache_mb=config.encoder_cache_mb,
        ),
        device,
        hooks=EngineHooks(
            before_prefill=faults.before_prefill if faults is not None else None,
            on_step=metrics.observe_step,
            on_fatal=lambda exc: on_fatal(exc),
        ),
    )
    app = create_app(config, engine, metrics, faults)

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            first = not self.should_exit
            super().handle_exit(sig, frame)
            if first:
                begin_drain(app, config.shutdown_timeout_s)

    server = Server(
        uvicorn.Config(
            app,
            host=config.host,
            port=config.port,
            log_level=config.log_level,
            timeout_graceful_shutdown=config.shutdown_timeout_s,  # type: ignore[arg-type]
            access_log=False,  # one line per request comes from vlserve.request instead
            # h11 explicitly: its header-size limit is the one enforced (httptools has none)
            http=with_header_timeout(config.header_timeout_s),
            h11_max_incomplete_event_size=config.max_header_bytes,
            limit_concurrency=config.max_connections,
        )
    )

    def on_fatal(exc: BaseException) -> None:
        fatal.append(exc)
        server.should_exit = True

    # uvicorn drains on SIGINT/SIGTERM, restores the previous handlers, then re-raises the signal:
    # with Python handlers in place (not SIG_DFL) that re-raise is harmless and we exit 0.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    server.run()
    if fatal:
        log.error("exiting: the engine failed (%s)", fatal[0])
        return 1
    return 0
