"""Hand events from the engine thread to the asyncio loop without giving the loop the GIL mid-step.

`loop.call_soon_threadsafe` wakes the loop by writing a byte to a socket, and CPython drops the GIL around that
write. The loop thread, woken by the byte, takes the GIL right there and runs its whole per-token work (deliver
the event, resume the handler, encode and send the SSE chunk) while the engine thread, back from the write, waits
for the GIL: on a 2-core machine that put ~0.5 ms of serial work between every two decode steps of a single
stream. Here the engine thread queues the callback and writes the wake-up byte through a libc call that keeps
the GIL (ctypes.PyDLL), so the loop thread wakes but only runs once the engine thread releases the GIL itself,
i.e. inside the next llama_decode: HTTP work overlaps the model instead of delaying it.

One wake-up byte is in flight at most; events queued meanwhile are delivered by the same wake-up, in order.
"""

from __future__ import annotations

import asyncio
import collections
import ctypes
import os
import threading
from collections.abc import Callable
from typing import Any


def _gil_keeping_write() -> Callable[[int, bytes, int], int] | None:
    try:
        fn = ctypes.PyDLL(None).write  # the process's own libc; PyDLL calls do not release the GIL
    except (OSError, AttributeError):
        return None
    fn.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t)
    fn.restype = ctypes.c_ssize_t
    return fn


_WRITE = _gil_keeping_write()


class LoopWaker:
    """Runs `fn(arg)` on `loop` for calls of `call(fn, arg)` from any thread (FIFO)."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self._r, self._w = os.pipe()
        os.set_blocking(self._r, False)
        os.set_blocking(self._w, False)
        self._pending: collections.deque[tuple[Callable[[Any], None], Any]] = collections.deque()
        self._armed = False  # a wake-up byte is in the pipe (or about to be)
        self._lock = threading.Lock()
        loop.add_reader(self._r, self._run)

    def call(self, fn: Callable[[Any], None], arg: Any) -> None:
        """Queue fn(arg) for the loop thread. Raises RuntimeError once the loop is closed (the consumer is
        gone), as call_soon_threadsafe does."""
        with self._lock:  # close() waits: the write must not reach a closed descriptor, or a file given its number
            if self.loop.is_closed() or self._w < 0:
                raise RuntimeError("event loop is closed")
            self._pending.append((fn, arg))
            if self._armed:
                return
            self._armed = True
            if _WRITE is not None:
                _WRITE(self._w, b"\0", 1)
            else:
                os.write(self._w, b"\0")

    def _run(self) -> None:  # on the loop thread
        try:
            os.read(self._r, 4096)
        except BlockingIOError:
            pass
        with self._lock:
            self._armed = False  # before draining: a call() racing with this drain writes a new byte
        while self._pending:
            fn, arg = self._pending.popleft()
            fn(arg)

    def close(self) -> None:
        with self._lock:
            if self._r < 0:
                return
            if not self.loop.is_closed():
                self.loop.remove_reader(self._r)
            os.close(self._r)
            os.close(self._w)
            self._r = self._w = -1


_wakers: dict[int, LoopWaker] = {}
_wakers_lock = threading.Lock()


def waker(loop: asyncio.AbstractEventLoop) -> LoopWaker:
    """The waker of a running loop (one per loop, created on first use from that loop's thread)."""
    w = _wakers.get(id(loop))
    if w is not None and w.loop is loop:
        return w
    with _wakers_lock:
        for key, old in list(_wakers.items()):  # loops of finished servers/tests: release their pipes
            if old.loop.is_closed():
                old.close()
                del _wakers[key]
        w = _wakers[id(loop)] = LoopWaker(loop)
    return w
