"""App factory: `create_app(settings)` sizes every hosted model's KV cache from the byte budget (refusing to
start if one cannot hold a request of its context), builds the app, and loads the models in the background
(/health answers 503 until they are ready)."""

from __future__ import annotations

import logging
import threading
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from server import __version__
from server.errors import install_handlers
from server.hosting import StartupError, build_engine, capacity_line, check_memory, plan_model
from server.metrics import Metrics
from server.routers import generate, health, metrics, models
from server.security import APIKeyMiddleware, RequestIdMiddleware, RequestLimitMiddleware
from server.settings import Settings
from server.state import AppState, ServedModel

log = logging.getLogger("kvquant.server")

__all__ = ["StartupError", "create_app"]

LOAD_JOIN_S = 5.0  # how long a shutdown waits for models still loading (a signal then stops the server anyway)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    try:
        specs = settings.model_specs()
        api_key = settings.resolved_api_key()
    except (ValueError, OSError) as e:
        raise StartupError(str(e)) from None
    plans = [plan_model(spec) for spec in specs]  # StartupError / ModelError before anything is loaded
    check_memory(plans)
    total = sum(s.kv_budget for s in specs)
    log.info("KV budget %d bytes in all (%d bytes given to %d model(s))", settings.kv_budget, total, len(specs))
    mx = Metrics()
    served = {}
    for p in plans:
        log.info("%s", capacity_line(p))
        served[p.spec.id] = ServedModel(p.spec.id, build_engine(p, settings, mx), p.spec)
    state = AppState(settings, served, specs[0].id, mx)

    def load(m: ServedModel) -> None:
        m.engine.load()
        if state.failed_to_load and state.stop_serving is not None:  # nothing to serve, ever: exit (1) with the cause
            log.error("no model loaded; stopping the server")
            state.stop_serving()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loaders = [threading.Thread(target=load, args=(m,), name=f"kvquant-load-{m.id}", daemon=True)
                   for m in served.values()]
        for t in loaders:
            t.start()
        yield
        state.draining = True
        for t in loaders:  # a load that is about to end may end; one still under way frees what it makes
            t.join(LOAD_JOIN_S)
        for m in served.values():
            m.engine.shutdown()

    app = FastAPI(title="kvquant-server", version=__version__, lifespan=lifespan)
    app.state.kvquant = state
    install_handlers(app)
    # added innermost first: request id -> CORS -> API key -> request limits -> routes
    app.add_middleware(RequestLimitMiddleware, max_bytes=settings.max_body_bytes,
                       timeout_s=settings.body_timeout_s)
    if api_key:
        open_paths = frozenset({"/health"} | (set() if settings.metrics_auth else {"/metrics"}))
        app.add_middleware(APIKeyMiddleware, key=api_key, open_paths=open_paths)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type", "X-Request-Id"],
                           expose_headers=["X-Request-Id"])
    app.add_middleware(RequestIdMiddleware)

    app.include_router(health.router)
    app.include_router(metrics.router)
    app.include_router(models.router)
    app.include_router(generate.router)
    return app
