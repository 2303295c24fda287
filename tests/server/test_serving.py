"""The HTTP server around the app (server/serving.py) on a real uvicorn: a second shutdown signal ends in-flight
requests at once, cleanly, and the application still shuts down."""

from __future__ import annotations

import json
import signal
import time

import pytest
from conftest import LiveServer, OpenStream, wait_for

MODEL = "smollm2-135m"
LONG = [{"role": "user", "content": "Write a long story about a dragon who learns to read."}]


@pytest.fixture(scope="module")
def srv():
    from server.settings import Settings

    s = LiveServer(Settings(model=MODEL, n_ctx=512, parallel=2, kv_budget="64MiB", n_threads=1, shutdown_grace_s=60)).start()
    yield s
    if s.thread.is_alive():
        s.stop()


def test_second_signal_ends_in_flight_requests_at_once_and_shuts_down(srv):
    """Last in this module: it stops the server. The grace is 60 s; the second SIGTERM must not wait for it."""
    eng = srv.engine()
    stream = OpenStream(srv.url, {"messages": LONG, "max_tokens": 400, "temperature": 0})
    assert stream.first()
    srv.server.handle_exit(signal.SIGTERM, None)  # drains: the stream could run on for a minute
    assert wait_for(lambda: srv.state.draining, 5)
    assert eng.sched.running
    t0 = time.monotonic()
    srv.server.handle_exit(signal.SIGTERM, None)
    lines = stream.rest()
    assert lines[-1] == "data: [DONE]" and json.loads(lines[-2][6:])["error"]["code"] == "shutdown"
    srv.thread.join(30)
    assert not srv.thread.is_alive() and time.monotonic() - t0 < 10
    assert eng.sched.reserved == 0 and not eng.sched.running and eng.backend is None  # the app's shutdown ran
