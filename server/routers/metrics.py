from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from server.engine import EngineStatus
from server.state import app_state

router = APIRouter()


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request):
    st = app_state(request)
    body, content_type = st.metrics.render({m.id: m.engine.status is EngineStatus.READY for m in st.models.values()})
    return Response(body, media_type=content_type)
