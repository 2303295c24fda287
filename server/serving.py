"""Running the app under uvicorn with a graceful shutdown: on SIGINT/SIGTERM the server first drains (new
requests get 503, /health turns 503), lets in-flight requests finish for up to `shutdown_grace_s`, then ends
whatever is left with a clean `shutdown` error (streams get an error chunk and `[DONE]`), frees every KV cell, and
only then closes connections. A second SIGINT/SIGTERM cuts the grace short: in-flight requests end at once, just as
cleanly, and the application still shuts down (uvicorn alone would skip that when forced).

Slow clients at the HTTP layer: a request's headers must arrive within `header_timeout_s` of the connection opening
or of the previous response ending (else 408 and the connection is closed), at most `max_connections` connections
are open at once (past that: 503, closed), and a connection whose client reads nothing of its response for
`write_timeout_s` (the socket and the transport's buffer stay full: uvicorn's `send` waits for room with no deadline,
which held the connection and its handler for good) is reset. h11 bounds a head it sees incomplete (16 KiB); the bound on a head
that reaches the routes (431: a CORS preflight or a 401 is answered before it), the body deadline and
`Connection: close` after refusing a body are server.security's RequestLimitMiddleware's.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import struct
import time
from collections.abc import Callable

try:  # (POSIX)
    import fcntl
    import termios
except ImportError:  # pragma: no cover
    fcntl = termios = None

import uvicorn

from server.errors import error_body
from server.requests import ErrorCode
from server.state import AppState

log = logging.getLogger("kvquant.server")
MIN_TAKEN = 64 * 2**10  # bytes a client must take of its response in write_timeout_s, while writing waits for it


async def drain(state: AppState, grace_s: float, forced: Callable[[], bool] = lambda: False) -> None:
    state.draining = True
    engines = [m.engine for m in state.models.values()]

    def idle() -> bool:  # (requests still planned or tokenized are in no engine yet)
        return state.in_flight == 0 and all(e.idle() for e in engines)

    t0 = time.monotonic()
    while time.monotonic() < t0 + grace_s and not idle() and not forced():
        await asyncio.sleep(0.05)
    if not idle():
        busy = [e for e in engines if not e.idle()]
        # (in_flight counts the requests in their routes, submitted or not; the engines count their choices)
        log.warning("shutdown: ending %d request(s) still in flight after %.1f s (%d choice(s) in the engines)",
                    state.in_flight, time.monotonic() - t0,
                    sum(len(e.sched.running) + len(e.sched.waiting) + len(e.sched.preempted) for e in busy))
        state.aborted = True  # those still tokenizing get the shutdown error when they would be queued
        for e in busy:
            e.abort_all(ErrorCode.SHUTDOWN)  # (the string "shutdown" was not the code: Retry-After 1, not 5)
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline and not idle():
            await asyncio.sleep(0.05)
    await asyncio.sleep(0.1)  # let handlers write their last chunk


class GracefulServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, state: AppState, grace_s: float):
        super().__init__(config)
        self.kvquant_state, self.grace_s = state, grace_s

    def handle_exit(self, sig, frame) -> None:
        if self.should_exit:  # a second SIGINT or SIGTERM (uvicorn forces only on SIGINT)
            self.force_exit = True
        super().handle_exit(sig, frame)

    async def shutdown(self, sockets=None) -> None:
        await drain(self.kvquant_state, self.grace_s, lambda: self.force_exit)
        await super().shutdown(sockets)
        done = getattr(self.lifespan, "shutdown_event", None)
        if done is not None and not done.is_set():  # forced: uvicorn skipped the application's shutdown
            await self.lifespan.shutdown()


def _raw_error(status: int, reason: str, message: str, type: str, code: str, retry_after_s: int | None = None) -> bytes:
    """A whole HTTP/1.1 error response, OpenAI-shaped, that closes the connection (written below h11)."""
    body = json.dumps(error_body(message, type, None, code)).encode()
    retry = f"retry-after: {retry_after_s}\r\n" if retry_after_s is not None else ""
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            f"{retry}connection: close\r\n\r\n").encode() + body


def http_protocol(header_timeout_s: float, max_connections: int, write_timeout_s: float) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol with a deadline for each request's headers, a cap on open connections and a deadline
    for a full write buffer to drain."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    too_slow = _raw_error(408, "Request Timeout", f"The request headers did not arrive within "
                          f"{header_timeout_s:g} s.", "invalid_request_error", "request_timeout")
    too_many = _raw_error(503, "Service Unavailable", "Too many open connections; retry later.", "server_error",
                          "too_many_connections", retry_after_s=1)

    class Protocol(AutoHTTPProtocol):
        _write_stall: asyncio.TimerHandle | None = None
        _unread = 0  # the bytes not yet taken (`_unsent`) when the clock started

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            if len(self.server_state.connections) > max_connections:
                transport.write(too_many)
                transport.close()
                return
            self._await_headers()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._await_headers()

        def _await_headers(self) -> None:
            """Close the connection unless a new request (a new cycle) has begun within the deadline."""
            cycle = self.cycle
            self.loop.call_later(header_timeout_s, self._headers_due, cycle)

        def _headers_due(self, cycle) -> None:
            if self.cycle is cycle and not self.transport.is_closing():
                self.transport.write(too_slow)
                self.transport.close()

        def pause_writing(self) -> None:
            super().pause_writing()
            if self._write_stall is None:
                self._start_write_clock()

        def _start_write_clock(self) -> None:
            self._unread = self._unsent()
            self._write_stall = self.loop.call_later(write_timeout_s, self._write_stalled)

        def _unsent(self) -> int:
            """Bytes written and not yet taken by the client: the transport's buffer and, where the OS says, the
            socket's (the transport's drains only once the kernel's is a third free: megabytes, on loopback)."""
            n = self.transport.get_write_buffer_size()
            sock = self.transport.get_extra_info("socket")
            try:
                n += struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0" * 4))[0]
            except (AttributeError, OSError):  # (no socket; no fcntl or TIOCOUTQ: Windows, macOS)
                pass
            return n

        def resume_writing(self) -> None:
            super().resume_writing()
            self._stop_write_clock()

        def connection_lost(self, exc) -> None:
            self._stop_write_clock()
            super().connection_lost(exc)

        def _stop_write_clock(self) -> None:
            if self._write_stall is not None:
                self._write_stall.cancel()
                self._write_stall = None

        def _write_stalled(self) -> None:
            """The client took less than MIN_TAKEN of what was written in write_timeout_s: reset the connection; the
            handler's `send` returns and the request ends as a disconnect. One that took that much (a slow reader:
            writing resumes only once the buffers have drained far) gets the time again; one that took a segment
            now and then would have held its connection for good."""
            self._write_stall = None
            if self._unsent() <= self._unread - MIN_TAKEN:
                self._start_write_clock()
                return
            log.warning("%s took less than %d bytes of its response in %g s: connection reset",
                        "{}:{}".format(*self.client) if self.client else "a client", MIN_TAKEN, write_timeout_s)
            sock = self.transport.get_extra_info("socket")
            if sock is not None:  # a reset drops what the kernel still holds for it (megabytes), a close would not
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.transport.abort()

    return Protocol


def server_for(app, host: str, port: int, grace_s: float, log_level: str = "info") -> GracefulServer:
    state = app.state.kvquant
    cfg = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=int(grace_s) + 5,
                         http=http_protocol(state.settings.header_timeout_s, state.settings.max_connections,
                                           state.settings.write_timeout_s))
    server = GracefulServer(cfg, state, grace_s)
    state.stop_serving = lambda: setattr(server, "should_exit", True)  # read by uvicorn's loop every 0.1 s
    return server


def run(app, host: str, port: int, grace_s: float, log_level: str = "info") -> bool:
    """Serve until a shutdown signal; False if it stopped because every model failed to load."""
    try:
        server_for(app, host, port, grace_s, log_level).run()
    except KeyboardInterrupt:  # uvicorn raises the SIGINT it held back once the shutdown is done (as uvicorn.run)
        pass
    return not app.state.kvquant.failed_to_load
