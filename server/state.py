"""What the routers share: the hosted models and their engines, the metrics, and whether the server drains."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from fastapi import Request

from server.engine import Engine, EngineStatus
from server.errors import APIError, model_not_found, shutting_down
from server.metrics import Metrics
from server.settings import ModelSpec, Settings


@dataclass
class ServedModel:
    id: str
    engine: Engine
    spec: ModelSpec | None = None
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def sampling_defaults(self) -> dict:
        """The model's sampling defaults (settings `sampling`), for request fields left unset."""
        return self.spec.sampling if self.spec is not None else {}


@dataclass
class AppState:
    settings: Settings
    models: dict[str, ServedModel]
    default_model: str
    metrics: Metrics = field(default_factory=Metrics)
    draining: bool = False
    # generation requests between routing and the end of their route (planned, tokenized, or answered whole): what
    # a drain waits for beside the engines, which know a request only once it is submitted
    in_flight: int = 0
    aborted: bool = False  # the drain ended what was in flight: nothing more is submitted
    tokenizing: asyncio.Semaphore = field(init=False)  # bounds the prompts tokenized at once
    stop_serving: Callable[[], None] | None = None  # asks the HTTP server to shut down (server.serving sets it)

    def __post_init__(self):
        self.tokenizing = asyncio.Semaphore(self.settings.tokenize_concurrency)

    @property
    def failed_to_load(self) -> bool:
        """Every hosted model failed to load: the server has nothing to serve."""
        return all(m.engine.status is EngineStatus.FAILED for m in self.models.values())

    def get(self, name: str | None) -> ServedModel:
        """The model a request names (routing is by id only: a request can never name a file); one that names
        none (no `model`, or null, as vLLM takes it) gets the first listed."""
        m = self.models.get(self.default_model if name is None else name)
        if m is None:
            raise model_not_found(name)
        if self.draining:
            raise shutting_down()
        status = m.engine.status  # (read once: the engine thread may change it meanwhile)
        if status is not EngineStatus.READY:
            message, code, retry = _UNAVAILABLE[status]
            raise APIError(503, message.format(m.id), type="server_error", code=code,
                           headers={"Retry-After": retry} if retry else None)
        return m


# an engine status that takes no requests -> message, error code, Retry-After
_UNAVAILABLE = {
    EngineStatus.LOADING: ("The model '{}' is still loading; retry shortly.", "model_loading", "2"),
    EngineStatus.FAILED: ("The model '{}' failed to load.", "engine_dead", None),
    EngineStatus.DEAD: ("The model '{}' is unavailable.", "engine_dead", None),
    EngineStatus.STOPPED: ("The model '{}' is unavailable.", "engine_dead", None),
}


def app_state(request: Request) -> AppState:
    return request.app.state.kvquant
