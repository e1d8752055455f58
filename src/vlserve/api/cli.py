"""`vlserve serve`: flags and environment → ServerConfig (declared once, vlserve.settings) →
uvicorn."""

from __future__ import annotations

import argparse
import gc
import logging
import math
import os
import signal
import socket
from collections.abc import Mapping
from types import FrameType
from typing import TYPE_CHECKING

from vlserve import settings
from vlserve.api import accesslog
from vlserve.api.faults import ENV_VAR as FAULT_ENV_VAR
from vlserve.api.faults import FaultInjector
from vlserve.config import ServerConfig

if TYPE_CHECKING:
    from vlserve.api.otel import RequestSpans

log = logging.getLogger("vlserve")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = (p.description or "") + (
        ". Every flag has a VLSERVE_* environment variable (the flag wins); the prototype's "
        "MODEL_PATH, MODEL_ID, SERVER_HOST, SERVER_PORT, DEVICE and MAX_IMAGE_PIXELS still work."
    )
    settings.add_arguments(p, ServerConfig)


def config_from_args(
    args: argparse.Namespace, environ: Mapping[str, str] | None = None
) -> ServerConfig:
    return settings.build(ServerConfig, args, os.environ if environ is None else environ)


def run(args: argparse.Namespace) -> int:
    accesslog.configure("text", "info")
    try:
        config = config_from_args(args)
        faults = FaultInjector.from_spec(os.environ.get(FAULT_ENV_VAR))
        spans = _spans(config.otlp_traces_endpoint)
    except ValueError as exc:
        log.error("invalid configuration: %s", exc)
        return 2
    accesslog.configure(config.log_format, config.log_level)
    if not os.path.isdir(config.model_path):
        log.error("model directory %s does not exist (--model or MODEL_PATH)", config.model_path)
        return 2
    if faults is not None:
        log.warning("%s is set: requests will fail on purpose (testing only)", FAULT_ENV_VAR)
    if spans is not None:
        log.info("OpenTelemetry: each request's span goes to %s", config.otlp_traces_endpoint)
    return serve(config, faults, spans)


def _spans(endpoint: str) -> RequestSpans | None:
    if not endpoint:
        return None
    from vlserve.api.otel import RequestSpans

    return RequestSpans.to_endpoint(endpoint)


def serve(
    config: ServerConfig, faults: FaultInjector | None = None, spans: RequestSpans | None = None
) -> int:
    """Run the server until SIGINT/SIGTERM (exit 0) or a fatal engine error (exit 1)."""
    from vlserve.engine import openmp

    openmp.apply_defaults()  # before anything below imports torch
    import uvicorn

    from vlserve.api.app import begin_drain, create_app, wait_for_drain
    from vlserve.api.http11 import with_header_timeout
    from vlserve.api.metrics import Metrics
    from vlserve.engine.device import resolve_device
    from vlserve.engine.engine import AsyncEngine, EngineHooks
    from vlserve.errors import DeviceUnavailableError

    try:
        device = resolve_device(config.device, config.dtype)
    except DeviceUnavailableError as exc:
        log.error("%s", exc.message)
        return 3
    log.info("device %s, dtype %s, %s", device.type, device.dtype_name, openmp.describe())
    fatal: list[BaseException] = []
    metrics = Metrics(config.model_names[0])
    engine = AsyncEngine(
        config.engine,
        device,
        hooks=EngineHooks(
            before_prefill=faults.before_prefill if faults is not None else None,
            on_step=metrics.observe_step,
            on_fatal=lambda exc: on_fatal(exc),
        ),
    )
    app = create_app(config, engine, metrics, faults, spans)

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            first = not self.should_exit
            super().handle_exit(sig, frame)
            if first:
                begin_drain(app, config.shutdown_timeout_s)

        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            # uvicorn closes the listener first: a client would see "connection refused". Keep
            # it open while in-flight generations finish, so newcomers get 503 + Retry-After.
            left_s = await wait_for_drain(app, config.shutdown_timeout_s, lambda: self.force_exit)
            self.config.timeout_graceful_shutdown = max(1, math.ceil(left_s))
            await super().shutdown(sockets)

    server = Server(
        uvicorn.Config(
            app,
            host=config.host,
            port=config.port,
            log_level=config.log_level,
            # json: uvicorn's own lines go through the root logger's formatter too
            **({"log_config": None} if config.log_format == "json" else {}),
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
    # Everything is shut down: spare the interpreter's final collection of the model and
    # library objects (2 of 2.3 s of a tiny model's SIGTERM-to-exit on two cores); atexit
    # handlers and reference counting still run, so logs flush and worker processes end.
    gc.freeze()
    if fatal:
        log.error("exiting: the engine failed (%s)", fatal[0])
        return 1
    return 0
