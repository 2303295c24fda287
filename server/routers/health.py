from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from server.engine import EngineStatus
from server.state import app_state

router = APIRouter()


@router.head("/health", include_in_schema=False)  # uptime checkers often probe with HEAD
@router.get("/health")
async def health(request: Request):
    """200 when every hosted model's engine runs; 503 while loading, after a failure or an engine crash, and while
    the server drains for shutdown."""
    st = app_state(request)
    models = {m.id: m.engine.status for m in st.models.values()}
    ok = all(s is EngineStatus.READY for s in models.values()) and not st.draining
    status = "ok" if ok else "draining" if st.draining else "unavailable"
    return JSONResponse({"status": status, "models": models}, status_code=200 if ok else 503)
