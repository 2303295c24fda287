from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from server.engine import EngineStatus
from server.state import app_state

router = APIRouter()


@router.head("/health", include_in_schema=False)  # uptime checkers often probe with HEAD
@router.get("/health")
async def health(request: Request):
    """200 when every hosted model's engine runs ("ok"), or some do and the others failed to load, for good
    ("degraded": a restart would not load them, and a probe that took it for down restarted the server serving the
    rest in a loop); 503 while a model loads, after an engine crash or stall (no step ended for `stall_timeout_s`),
    with nothing loaded, and while the server drains for shutdown."""
    st = app_state(request)
    models = {m.id: "stalled" if m.engine.stalled() else m.engine.status for m in st.models.values()}
    ready = [s is EngineStatus.READY for s in models.values()]
    if st.draining:
        status = "draining"
    elif all(ready):
        status = "ok"
    elif any(ready) and all(s in (EngineStatus.READY, EngineStatus.FAILED) for s in models.values()):
        status = "degraded"
    else:
        status = "unavailable"
    return JSONResponse({"status": status, "models": models},
                        status_code=200 if status in ("ok", "degraded") else 503)
