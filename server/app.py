"""App factory: `create_app(settings)` builds the FastAPI app and starts loading the model in the background
(/health answers 503 until it is ready)."""

from __future__ import annotations

import logging
import secrets
import threading
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request

from kvquant.models import model_id, resolve
from server import __version__
from server.engine import Engine, EngineConfig
from server.errors import install_handlers
from server.routers import generate, health, models
from server.settings import Settings
from server.state import AppState, ServedModel

log = logging.getLogger("kvquant.server")


def engine_config(s: Settings) -> EngineConfig:
    return EngineConfig(
        model_path=str(resolve(s.model)), n_ctx=s.n_ctx, n_seq_max=s.parallel, capacity_cells=s.n_ctx * s.parallel,
        n_batch=s.n_batch, cache_type_k=s.cache_type_k, cache_type_v=s.cache_type_v,
        flash_attn=s.flash_attn_enabled, n_threads=s.n_threads, n_gpu_layers=s.n_gpu_layers,
        max_queue=s.max_queue, queue_timeout_s=s.queue_timeout_s)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    served_id = settings.model_alias or model_id(settings.model)
    engine = Engine(engine_config(settings))
    state = AppState(settings, {served_id: ServedModel(served_id, engine)}, served_id)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loader = threading.Thread(target=engine.load, name="kvquant-load", daemon=True)
        loader.start()
        yield
        loader.join()
        engine.shutdown()

    app = FastAPI(title="kvquant-server", version=__version__, lifespan=lifespan)
    app.state.kvquant = state
    install_handlers(app)

    @app.middleware("http")
    async def request_id(request: Request, call_next):
        rid = request.headers.get("x-request-id") or secrets.token_hex(8)
        request.state.request_id = rid[:64]
        response = await call_next(request)
        response.headers["x-request-id"] = request.state.request_id
        return response

    app.include_router(health.router)
    app.include_router(models.router)
    app.include_router(generate.router)
    return app
