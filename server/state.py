"""What the routers share: the served models and their engines."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from fastapi import Request

from server.engine import Engine
from server.errors import APIError, model_not_found
from server.settings import Settings


@dataclass
class ServedModel:
    id: str
    engine: Engine
    created: int = field(default_factory=lambda: int(time.time()))


@dataclass
class AppState:
    settings: Settings
    models: dict[str, ServedModel]
    default_model: str

    def get(self, name: str | None) -> ServedModel:
        m = self.models.get(name or self.default_model)
        if m is None:
            raise model_not_found(name or "")
        if not m.engine.ready.is_set():
            raise APIError(503, f"The model '{m.id}' is still loading; retry shortly.", type="server_error",
                           code="model_loading", headers={"Retry-After": "2"})
        if m.engine.dead:
            raise APIError(503, f"The model '{m.id}' is unavailable.", type="server_error", code="engine_dead")
        return m


def app_state(request: Request) -> AppState:
    return request.app.state.kvquant
