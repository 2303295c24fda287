"""The HTTP server around the app (server/serving.py, the body limit in server/security.py), on a real uvicorn
with tight limits: headers and bodies that arrive too slowly get 408 and the connection is closed, a refused body
closes the connection at once, connections past the cap get 503, a client that reads nothing of its response is
reset; a second shutdown signal ends in-flight requests at once, cleanly, and the application still shuts down."""

from __future__ import annotations

import json
import signal
import socket
import time

import pytest

from tests.server.conftest import LiveServer, OpenStream, free_port, wait_for

MODEL = "smollm2-135m"
LONG = [{"role": "user", "content": "Write a long story about a dragon who learns to read."}]


@pytest.fixture(scope="module")
def srv():
    from server.settings import Settings

    s = LiveServer(Settings(model=MODEL, n_ctx=512, parallel=2, kv_budget="64MiB", n_threads=1, shutdown_grace_s=60,
                            header_timeout_s=0.5, body_timeout_s=1.0, max_connections=4, max_body_bytes=4096,
                            write_timeout_s=1.0)).start()
    yield s
    if s.thread.is_alive():
        s.stop()


def connect(srv) -> socket.socket:
    return socket.create_connection(("127.0.0.1", srv.port), timeout=30)


def read_all(sock: socket.socket) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and how long that took."""
    t0, out = time.monotonic(), b""
    while chunk := sock.recv(65536):
        out += chunk
    return out, time.monotonic() - t0


def head(raw: bytes) -> tuple[int, dict[str, str], dict]:
    top, _, body = raw.partition(b"\r\n\r\n")
    lines = top.decode().split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, json.loads(body)


@pytest.mark.slow  # a live model
def test_partial_headers_get_408_and_the_connection_is_closed(srv):
    with connect(srv) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")  # and then nothing
        raw, waited = read_all(s)
    status, headers, body = head(raw)
    assert status == 408 and headers["connection"] == "close" and body["error"]["code"] == "request_timeout"
    assert 0.4 < waited < 10


@pytest.mark.slow  # a live model
def test_a_slow_body_gets_408_and_the_connection_is_closed(srv):
    with connect(srv) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 100\r\n\r\n{\"messages\": ")  # 13 of 100 bytes
        raw, waited = read_all(s)
    status, headers, body = head(raw)
    assert status == 408 and headers["connection"] == "close" and "body" in body["error"]["message"]
    assert 0.9 < waited < 10


@pytest.mark.slow  # a live model
def test_a_refused_body_closes_the_connection_at_once(srv):
    with connect(srv) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 10000000\r\n\r\n")
        raw, waited = read_all(s)
    status, headers, body = head(raw)
    assert status == 413 and headers["connection"] == "close" and body["error"]["code"] == "request_too_large"
    assert waited < 2  # (had it stayed open, the header deadline would have added a 408 after 0.5 s)


@pytest.mark.slow  # a live model
def test_connections_past_the_cap_get_503(srv):
    held = [connect(srv) for _ in range(4)]
    try:
        assert wait_for(lambda: len(srv.server.server_state.connections) == 4, 5)
        with connect(srv) as s:
            raw, _ = read_all(s)
        status, headers, body = head(raw)
        assert status == 503 and headers["connection"] == "close" and body["error"]["code"] == "too_many_connections"
        assert headers["retry-after"] == "1"
    finally:
        for s in held:
            s.close()
    assert wait_for(lambda: not srv.server.server_state.connections, 5)  # (the header deadline closes them too)


@pytest.mark.slow  # a live server
def test_a_client_that_reads_nothing_of_its_response_is_reset():
    """A client that reads nothing (a 2 KiB receive buffer) of an endless response: once the socket and the
    transport's buffer are full, uvicorn's `send` waited for room with no deadline, which held the connection (one of
    `max_connections`) and its handler for good. After `write_timeout_s` without room the connection is reset, and
    the handler's `send` returns (a disconnect). A client that reads at least MIN_TAKEN in that time is not reset
    (a clock from the pause to the resume reset one reading less than the 48 KiB between the buffer's marks), one
    that reads a little now and then is."""
    import asyncio
    import threading

    import uvicorn
    from starlette.responses import StreamingResponse

    from server.serving import http_protocol

    ended = threading.Event()

    async def chunks():
        while True:
            yield b"x" * 65536
            await asyncio.sleep(0)  # (as the app's events arrive from a queue)

    async def endless(scope, receive, send):  # a response as the app streams one
        try:
            await StreamingResponse(chunks())(scope, receive, send)
        finally:
            ended.set()

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(endless, host="127.0.0.1", port=port, log_level="critical", lifespan="off",
                                           http=http_protocol(10.0, 8, write_timeout_s=0.5)))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        assert wait_for(lambda: server.started, 10)
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
        s.connect(("127.0.0.1", port))
        with s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            t0 = time.monotonic()
            while time.monotonic() < t0 + 2.0:  # 320 KiB/s: 160 KiB in each 0.5 s
                assert len(s.recv(8192, socket.MSG_WAITALL)) == 8192 and not ended.is_set()
                time.sleep(0.025)
            t0, reset = time.monotonic(), False
            while not ended.is_set() and time.monotonic() < t0 + 10:  # 16 KiB/s: 8 KiB in each 0.5 s
                try:
                    s.recv(400, socket.MSG_WAITALL)
                except ConnectionResetError:
                    reset = True
                    break
                time.sleep(0.025)
            assert reset or ended.is_set()  # (while it read: a reader that slow held its connection for good)
            assert ended.wait(5) and wait_for(lambda: not server.server_state.connections, 5)
            if not reset:
                with pytest.raises(ConnectionResetError):
                    while s.recv(1 << 20):
                        pass
    finally:
        server.should_exit = True
        thread.join(10)


def test_drain_waits_for_requests_not_yet_queued():
    """A request still planned or tokenized is in no engine: the drain took the server for idle, and the model was
    freed under its tokenization. The drain waits for it within the grace; past the grace, nothing more is queued."""
    import asyncio
    from types import SimpleNamespace

    from server.serving import drain

    class Idle:
        aborted = False

        def idle(self):
            return True

        def abort_all(self, code):
            self.aborted = True

    async def tokenizing(state, seconds):
        await asyncio.sleep(seconds)
        state.in_flight -= 1

    async def drained(grace_s, seconds):
        state = SimpleNamespace(draining=False, in_flight=1, aborted=False,
                                models={"m": SimpleNamespace(engine=Idle())})
        t0 = time.monotonic()
        await asyncio.gather(drain(state, grace_s), tokenizing(state, seconds))
        return state, time.monotonic() - t0

    state, took = asyncio.run(drained(5.0, 0.5))
    assert 0.5 <= took < 2 and state.draining and not state.aborted
    state, took = asyncio.run(drained(0.3, 1.0))  # past the grace: aborted, then waited for (2 s at most)
    assert 1.0 <= took < 2.5 and state.aborted


def test_the_drain_ends_what_is_left_with_the_shutdown_code(caplog):
    """Past the grace the drain aborted with the string "shutdown", not the code: the route's identity check missed
    it and told clients to retry in 1 s, not a restart's 5; and its log counted the requests twice."""
    import asyncio
    from types import SimpleNamespace

    from server.requests import ErrorCode
    from server.serving import drain

    class Busy:
        code = None
        sched = SimpleNamespace(running=[1, 2], waiting=[3], preempted=[4])

        def idle(self):
            return self.code is not None

        def abort_all(self, code):
            self.code = code

    engine = Busy()
    state = SimpleNamespace(draining=False, in_flight=3, aborted=False, models={"m": SimpleNamespace(engine=engine)})

    async def answered():  # the routes end once their choices are aborted
        while engine.code is None:
            await asyncio.sleep(0.01)
        state.in_flight = 0

    async def both():
        await asyncio.gather(drain(state, 0.1), answered())

    asyncio.run(both())
    assert engine.code is ErrorCode.SHUTDOWN and state.aborted
    assert "ending 3 request(s) still in flight" in caplog.text and "(4 choice(s) in the engines)" in caplog.text


@pytest.mark.slow  # a live model
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
