"""`vlserve serve`: flags and the prototype's env vars → ServerConfig → uvicorn."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

from vlserve.config import ServerConfig
from vlserve.engine.scheduler import SchedulerConfig
from vlserve.media.config import MediaConfig

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
        "--default-max-tokens",
        type=int,
        default=2048,
        help="max_tokens when a request gives none (capped by the context)",
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
    b = p.add_argument_group("batching")
    b.add_argument("--max-num-seqs", type=int, default=16, help="requests decoded together")
    b.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=65536,
        help="KV budget: sum of prompt + max_tokens over running requests",
    )
    b.add_argument(
        "--max-queue", type=int, default=256, help="waiting requests beyond which new ones get 429"
    )
    i = p.add_argument_group("images")
    i.add_argument(
        "--max-image-pixels",
        type=int,
        default=int(_env("MAX_IMAGE_PIXELS", "2621440") or 2621440),
        help="larger images are downsized to this many pixels (env MAX_IMAGE_PIXELS)",
    )
    i.add_argument("--max-images-per-request", type=int, default=16)
    i.add_argument("--max-image-bytes", type=int, default=20 * 1024 * 1024)
    i.add_argument("--image-fetch-timeout", type=float, default=10.0, metavar="SECONDS")
    i.add_argument(
        "--allowed-local-media-path",
        default=None,
        metavar="DIR",
        help="serve file:// and absolute-path images from below DIR only (off by default)",
    )
    i.add_argument(
        "--allowed-media-domains",
        nargs="+",
        default=(),
        metavar="DOMAIN",
        help="only fetch image URLs from these hosts (and their subdomains)",
    )
    i.add_argument(
        "--allow-private-media-urls",
        action="store_true",
        help="let image URLs reach loopback/private addresses (trusted networks only)",
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
        default_max_tokens=args.default_max_tokens,
        request_timeout_s=args.request_timeout,
        shutdown_timeout_s=args.shutdown_timeout,
        log_level=args.log_level,
        media=MediaConfig(
            max_image_pixels=args.max_image_pixels,
            max_images_per_request=args.max_images_per_request,
            max_image_bytes=args.max_image_bytes,
            fetch_timeout_s=args.image_fetch_timeout,
            allowed_local_media_path=args.allowed_local_media_path,
            allowed_media_domains=tuple(args.allowed_media_domains),
            allow_private_networks=args.allow_private_media_urls,
        ),
        scheduler=SchedulerConfig(
            max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens,
            max_queue=args.max_queue,
        ),
    )


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        config = config_from_args(args)
    except ValueError as exc:
        log.error("invalid configuration: %s", exc)
        return 2
    if not os.path.isdir(config.model_path):
        log.error("model directory %s does not exist (--model or MODEL_PATH)", config.model_path)
        return 2
    return serve(config)


def serve(config: ServerConfig) -> int:
    """Run the server until SIGINT/SIGTERM (exit 0) or a fatal engine error (exit 1)."""
    import uvicorn

    from vlserve.api.app import create_app
    from vlserve.engine.device import resolve_device
    from vlserve.engine.engine import AsyncEngine, EngineConfig
    from vlserve.errors import DeviceUnavailableError

    try:
        device = resolve_device(config.device, config.dtype)
    except DeviceUnavailableError as exc:
        log.error("%s", exc.message)
        return 3
    log.info("device %s, dtype %s", device.type, device.dtype_name)
    engine = AsyncEngine(
        EngineConfig(config.model_path, config.scheduler, config.request_timeout_s), device
    )
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(config, engine),
            host=config.host,
            port=config.port,
            log_level=config.log_level,
            timeout_graceful_shutdown=int(config.shutdown_timeout_s),
            access_log=False,
        )
    )
    fatal: list[BaseException] = []

    def on_fatal(exc: BaseException) -> None:
        fatal.append(exc)
        server.should_exit = True

    engine.on_fatal = on_fatal
    # uvicorn drains on SIGINT/SIGTERM, restores the previous handlers, then re-raises the signal:
    # with Python handlers in place (not SIG_DFL) that re-raise is harmless and we exit 0.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    server.run()
    if fatal:
        log.error("exiting: the engine failed (%s)", fatal[0])
        return 1
    return 0
