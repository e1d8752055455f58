"""create_app(): the FastAPI application, its lifespan (load, warm up, ready) and error handlers."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator

from fastapi import FastAPI

from vlserve.api.convert import SamplingDefaults
from vlserve.api.errors import install_error_handlers
from vlserve.api.routes import ServerState, router
from vlserve.config import ServerConfig
from vlserve.engine.engine import AsyncEngine
from vlserve.errors import VLServeError
from vlserve.media import MediaLoader

log = logging.getLogger(__name__)


def create_app(config: ServerConfig, engine: AsyncEngine) -> FastAPI:
    """The app serves /health at once; the engine loads on its own thread meanwhile."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state = ServerState(
            engine=engine,
            media=MediaLoader(config.media),
            model_names=config.accepted_model_names,
            listed_names=config.model_names,
            started=int(time.time()),
        )
        app.state.vl = state
        engine.start()
        ready = _when_ready(engine, state, config)
        import asyncio

        task = asyncio.ensure_future(ready)
        try:
            yield
        finally:
            task.cancel()
            await state.media.aclose()
            engine.shutdown(config.shutdown_timeout_s)

    app = FastAPI(title="vlserve", version="0.1.0", lifespan=lifespan)
    install_error_handlers(app)
    app.include_router(router)
    return app


async def _when_ready(engine: AsyncEngine, state: ServerState, config: ServerConfig) -> None:
    try:
        await engine.wait_ready()
    except VLServeError:
        return  # engine.on_fatal has already asked the server to exit
    runner = engine.runner
    assert runner is not None
    state.defaults = SamplingDefaults.from_generation_config(
        runner.generation_config, config.default_max_tokens
    )
    log.info(
        "ready: serving %s on http://%s:%d", ", ".join(config.model_names), config.host, config.port
    )
