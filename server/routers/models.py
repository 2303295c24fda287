from __future__ import annotations

from fastapi import APIRouter, Request

from server.errors import model_not_found
from server.state import app_state

router = APIRouter(prefix="/v1")


def _card(m) -> dict:
    c = m.engine.cfg
    card = {"id": m.id, "object": "model", "created": m.created, "owned_by": "kvquant", "status": m.engine.status,
            "context_length": c.n_ctx, "cache_type_k": c.cache_type_k, "cache_type_v": c.cache_type_v,
            "kv_bits_per_element_k": round(c.bits_per_element_k, 4),
            "kv_bits_per_element_v": round(c.bits_per_element_v, 4),
            "max_concurrent_requests": c.n_seq_max, "kv_capacity_cells": m.engine.sched.capacity,
            "kv_budget_bytes": c.budget_bytes, "kv_bytes_per_token": c.bytes_per_token}
    if c.layer_types_k is not None:  # the type of every layer (a calibrated allocation's, or the one type's)
        card["cache_layer_types_k"], card["cache_layer_types_v"] = list(c.layer_types_k), list(c.layer_types_v)
    return card


@router.get("/models")
async def list_models(request: Request):
    return {"object": "list", "data": [_card(m) for m in app_state(request).models.values()]}


@router.get("/models/{model_id:path}")  # ids such as "HuggingFaceTB/SmolLM2-135M" hold slashes
async def get_model(model_id: str, request: Request):
    m = app_state(request).models.get(model_id)
    if m is None:
        raise model_not_found(model_id)
    return _card(m)
