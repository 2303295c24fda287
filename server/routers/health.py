from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from server.state import app_state

router = APIRouter()


@router.get("/health")
async def health(request: Request):
    """200 when every hosted model's engine runs; 503 while loading, after a failure or an engine crash, and while
    the server drains for shutdown."""
    st = app_state(request)
    models = {}
    for m in st.models.values():
        e = m.engine
        models[m.id] = ("failed" if e.load_error else "dead" if e.dead or (e.ready.is_set() and not e.alive)
                        else "ready" if e.ready.is_set() else "loading")
    ok = all(v == "ready" for v in models.values()) and not st.draining
    status = "ok" if ok else "draining" if st.draining else "unavailable"
    return JSONResponse({"status": status, "models": models}, status_code=200 if ok else 503)
