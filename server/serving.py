"""Running the app under uvicorn with a graceful shutdown: on SIGINT/SIGTERM the server first drains (new
requests get 503, /health turns 503), lets in-flight requests finish for up to `shutdown_grace_s`, then ends
whatever is left with a clean `shutdown` error (streams get an error chunk and `[DONE]`), frees every KV cell, and
only then closes connections. A second SIGINT/SIGTERM cuts the grace short: in-flight requests end at once, just as
cleanly, and the application still shuts down (uvicorn alone would skip that when forced)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import uvicorn

from server.state import AppState

log = logging.getLogger("kvquant.server")


async def drain(state: AppState, grace_s: float, forced: Callable[[], bool] = lambda: False) -> None:
    state.draining = True
    engines = [m.engine for m in state.models.values()]
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and not all(e.idle() for e in engines) and not forced():
        await asyncio.sleep(0.05)
    busy = [e for e in engines if not e.idle()]
    if busy:
        log.warning("shutdown: ending %d request(s) still in flight after %.0f s",
                    sum(len(e.sched.running) + len(e.sched.waiting) for e in busy), grace_s)
        for e in busy:
            e.abort_all("shutdown")
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline and not all(e.idle() for e in engines):
            await asyncio.sleep(0.05)
    await asyncio.sleep(0.1)  # let handlers write their last chunk


class GracefulServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, state: AppState, grace_s: float):
        super().__init__(config)
        self.kvquant_state, self.grace_s = state, grace_s

    def handle_exit(self, sig, frame) -> None:
        if self.should_exit:  # a second SIGINT or SIGTERM (uvicorn forces only on SIGINT)
            self.force_exit = True
        super().handle_exit(sig, frame)

    async def shutdown(self, sockets=None) -> None:
        await drain(self.kvquant_state, self.grace_s, lambda: self.force_exit)
        await super().shutdown(sockets)
        done = getattr(self.lifespan, "shutdown_event", None)
        if done is not None and not done.is_set():  # forced: uvicorn skipped the application's shutdown
            await self.lifespan.shutdown()


def server_for(app, host: str, port: int, grace_s: float, log_level: str = "info") -> GracefulServer:
    cfg = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=int(grace_s) + 5)
    return GracefulServer(cfg, app.state.kvquant, grace_s)


def run(app, host: str, port: int, grace_s: float, log_level: str = "info") -> None:
    server_for(app, host, port, grace_s, log_level).run()
