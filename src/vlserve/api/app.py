"""create_app(): the FastAPI application, its lifespan (load, warm up, ready), middleware, errors."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware

from vlserve.api.auth import ApiKeys
from vlserve.api.convert import SamplingDefaults
from vlserve.api.errors import install_error_handlers
from vlserve.api.faults import FaultInjector
from vlserve.api.metrics import Metrics
from vlserve.api.middleware import RequestContextMiddleware
from vlserve.api.otel import RequestSpans
from vlserve.api.routes import ServerState, router
from vlserve.config import ServerConfig
from vlserve.engine.client import EngineClient
from vlserve.errors import VLServeError
from vlserve.media import MediaLoader

log = logging.getLogger(__name__)


def create_app(
    config: ServerConfig,
    engine: EngineClient,
    metrics: Metrics | None = None,
    faults: FaultInjector | None = None,
    spans: RequestSpans | None = None,
) -> FastAPI:
    """The app serves /health at once; the engine loads on its own thread meanwhile.

    ``metrics`` is the registry the engine's hooks already report to (a new one otherwise);
    ``faults`` the test-only fault injector whose hook the engine was built with; ``spans``
    the OpenTelemetry exporter (``--otlp-traces-endpoint``), flushed at shutdown.
    """
    metrics = metrics or Metrics(config.model_names[0])
    metrics.watch_engine(engine)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        media = MediaLoader(config.media)
        metrics.watch_memory(
            lambda: media.memory.held,
            lambda: {"decoded_media": media.cached_bytes, **engine.cache_bytes()},
        )
        state = ServerState(
            engine=engine,
            media=media,
            model_names=config.accepted_model_names,
            listed_names=config.model_names,
            metrics=metrics,
            started=int(time.time()),
            faults=faults,
            max_n=config.max_n,
            num_api_keys=len(config.api_keys),
        )
        app.state.vl = state
        app.state.loop = asyncio.get_running_loop()
        engine.start()
        task = asyncio.ensure_future(_when_ready(engine, state, config))
        try:
            yield
        finally:
            task.cancel()
            await state.media.aclose()
            engine.shutdown(config.shutdown_timeout_s)
            if spans is not None:
                spans.shutdown()

    # no redirect_slashes: "/v1/chat/completions/" is a 404, not a bodiless 307
    app = FastAPI(title="vlserve", version="0.1.0", lifespan=lifespan, redirect_slashes=False)
    install_error_handlers(app)
    app.include_router(router)
    # add_middleware puts each new layer outside the previous ones: CORS goes outermost, so
    # preflights need no key and even refusals carry headers a browser can read.
    app.add_middleware(
        RequestContextMiddleware,
        metrics=metrics,
        max_body_bytes=config.max_request_body_bytes,
        max_inflight_body_bytes=config.max_inflight_body_mb * 1024 * 1024,
        max_headers=config.max_headers,
        max_header_bytes=config.max_header_bytes,
        keys=ApiKeys(config.api_keys) if config.api_keys else None,
        body_timeout_s=config.body_timeout_s,
        metrics_auth=config.metrics_auth,
        spans=spans,
    )
    if config.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(config.cors_origins),
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["authorization", "content-type", "x-request-id"],
            expose_headers=["x-request-id", "retry-after"],
            max_age=600,
        )
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


def begin_drain(app: FastAPI, timeout_s: float) -> None:
    """From the SIGTERM handler: hand the drain over to the event loop (signal-safe)."""
    state: ServerState | None = getattr(app.state, "vl", None)
    loop: asyncio.AbstractEventLoop | None = getattr(app.state, "loop", None)
    if state is not None and loop is not None:
        loop.call_soon_threadsafe(state.start_draining, timeout_s)


async def wait_for_drain(app: FastAPI, timeout_s: float, force: Callable[[], bool]) -> float:
    """After :func:`begin_drain`: wait, still listening, until no generation is in flight (the
    drain's deadline ends the stragglers with 503), or ``force()`` turns true. Meanwhile new
    requests and ``/health`` get 503 + Retry-After instead of a refused connection. Returns the
    seconds of ``timeout_s`` left."""
    state: ServerState | None = getattr(app.state, "vl", None)
    deadline = time.monotonic() + timeout_s
    while state is not None and state.draining and state.streams and not force():
        if time.monotonic() >= deadline:
            break
        await asyncio.sleep(0.05)
    return max(0.0, deadline - time.monotonic())


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema, minus the 422 it documents by default: validation errors are 400s."""
    if app.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi

        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        for path in schema.get("paths", {}).values():
            for operation in path.values():
                operation.get("responses", {}).pop("422", None)
        for name in ("HTTPValidationError", "ValidationError"):
            schema.get("components", {}).get("schemas", {}).pop(name, None)
        app.openapi_schema = schema
    return app.openapi_schema


async def _when_ready(engine: EngineClient, state: ServerState, config: ServerConfig) -> None:
    try:
        await engine.wait_ready()
    except VLServeError:
        return  # engine.on_fatal has already asked the server to exit
    info = engine.model_info
    if info is None:
        return
    state.defaults = SamplingDefaults.from_generation_config(info.generation_config)
    log.info(
        "ready: serving %s on http://%s:%d", ", ".join(config.model_names), config.host, config.port
    )
