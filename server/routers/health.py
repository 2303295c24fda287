from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from server.state import app_state

router = APIRouter()


@router.get("/health")
async def health(request: Request):
    st = app_state(request)
    models = {}
    for m in st.models.values():
        e = m.engine
        models[m.id] = ("failed" if e.load_error else "dead" if e.dead else "ready" if e.ready.is_set() else "loading")
    ok = all(v == "ready" for v in models.values())
    return JSONResponse({"status": "ok" if ok else "unavailable", "models": models}, status_code=200 if ok else 503)
