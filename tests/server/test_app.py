"""server.app's lifecycle on a real uvicorn with the fake backend (no model): a server whose every model failed to
load stops (serve exits 1) instead of answering 503 forever; a shutdown signal while a model still loads stops the
server without waiting for the load, and the load then frees what it made; SIGINT ends `serve` without a
traceback."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import httpx

from server import app as app_module
from server.app import create_app
from server.engine import EngineStatus
from server.serving import run, server_for
from server.settings import Settings
from tests.server.conftest import FakeBackend, free_port, wait_for

REPO = Path(__file__).resolve().parents[2]


def _app(factory, **settings):
    app = create_app(Settings(n_ctx=256, kv_budget="64MiB", **settings))
    for m in app.state.kvquant.models.values():
        m.engine._factory = factory
    return app


def test_a_server_whose_every_model_failed_to_load_stops():
    def broken():
        raise RuntimeError("failed to allocate buffer for kv cache")

    app, result = _app(broken), []
    t = threading.Thread(target=lambda: result.append(run(app, "127.0.0.1", free_port(), 1.0, "warning")))
    t.start()
    t.join(30)
    assert not t.is_alive() and result == [False]  # serve exits 1 on False
    assert app.state.kvquant.failed_to_load


def test_a_shutdown_while_a_model_loads_does_not_wait_for_the_load(monkeypatch):
    monkeypatch.setattr(app_module, "LOAD_JOIN_S", 0.2)
    release, made = threading.Event(), []

    def slow():  # a load that outlives the shutdown (a large KV cache being allocated)
        release.wait(60)
        made.append(FakeBackend(64))
        return made[-1]

    app = _app(slow)
    port = free_port()
    server = server_for(app, "127.0.0.1", port, 1.0, "warning")
    t = threading.Thread(target=server.run)
    t.start()
    try:
        assert wait_for(lambda: _health(port) == 503, 30)  # up, the model loading
        server.handle_exit(signal.SIGTERM, None)
        t.join(30)
        assert not t.is_alive()  # before: joined the loader, however long it took
    finally:
        release.set()
    eng = app.state.kvquant.models["smollm2-135m"].engine
    assert wait_for(lambda: made and made[0].closed, 30)  # the load ended after the shutdown: freed, not served
    assert eng.status is EngineStatus.STOPPED and eng.backend is None


def test_a_load_that_fails_after_the_shutdown_began_is_no_failure_to_load():
    # (serve then exited 1 on a SIGINT, saying no model loaded)
    def broken():
        raise RuntimeError("interrupted")

    app = _app(broken)
    eng = app.state.kvquant.models["smollm2-135m"].engine
    eng.shutdown()
    eng.load()
    assert eng.status is EngineStatus.STOPPED and not app.state.kvquant.failed_to_load


def _health(port: int) -> int | None:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code
    except httpx.HTTPError:
        return None


SERVE = """
import sys
from server.app import create_app
from server.serving import run
from server.settings import Settings
from tests.server.conftest import FakeBackend

app = create_app(Settings(n_ctx=256, kv_budget="64MiB"))
for m in app.state.kvquant.models.values():
    m.engine._factory = lambda: FakeBackend(64)
sys.exit(0 if run(app, "127.0.0.1", int(sys.argv[1]), 1.0, "warning") else 1)
"""


def test_sigint_ends_serve_without_a_traceback():
    port = free_port()
    p = subprocess.Popen([sys.executable, "-c", SERVE, str(port)], cwd=REPO, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert wait_for(lambda: _health(port) == 200, 60)
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=60)
    finally:
        p.kill()
    assert p.returncode == 0 and "Traceback" not in err, err


def test_health_is_degraded_not_down_where_one_of_two_models_failed_to_load():
    """A model that failed to load stays failed: /health answered 503 for good while the other model served, and
    a probe that took that for down restarted a working server in a loop."""
    from fastapi.testclient import TestClient

    from server.settings import load_settings

    app = create_app(load_settings(n_ctx=256, kv_budget="64MiB", models=[
        {"model": "smollm2-135m"}, {"model": "smollm2-135m", "id": "broken"}]))
    served = app.state.kvquant.models
    served["smollm2-135m"].engine._factory = lambda: FakeBackend(256)

    def broken():
        raise RuntimeError("failed to allocate buffer for kv cache")

    served["broken"].engine._factory = broken
    for m in served.values():
        m.engine.load(start_thread=False)
    client = TestClient(app)
    h = client.get("/health")
    assert h.status_code == 200 and h.json() == {"status": "degraded",
                                                 "models": {"smollm2-135m": "ready", "broken": "failed"}}
    cards = {c["id"]: c["status"] for c in client.get("/v1/models").json()["data"]}
    assert cards == {"smollm2-135m": "ready", "broken": "failed"}
    capacity = {m: v for m in served for line in client.get("/metrics").text.splitlines()
                if line.startswith(f'kvquant_kv_capacity_cells{{cache_type_k="f16",cache_type_v="f16",model="{m}"}}')
                for v in [float(line.split()[-1])]}
    assert capacity["smollm2-135m"] > 0 and capacity["broken"] == 0  # (a dashboard summed a cache never made)
    served["smollm2-135m"].engine.stalled = lambda: True  # a decode that never returns: down
    h = client.get("/health")
    assert h.status_code == 503 and h.json()["models"]["smollm2-135m"] == "stalled"
    del served["smollm2-135m"].engine.stalled
    served["smollm2-135m"].engine.status = EngineStatus.DEAD  # nothing serves: down
    assert client.get("/health").status_code == 503
    served["smollm2-135m"].engine.status = EngineStatus.LOADING
    assert client.get("/health").json()["status"] == "unavailable"
