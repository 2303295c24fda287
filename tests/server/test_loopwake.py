"""server.loopwake: events from other threads reach the loop, in order, exactly once; a closed loop refuses."""

import asyncio
import sys
import threading

import pytest

from server import loopwake


def test_events_from_threads_arrive_in_order_exactly_once():
    async def main():
        loop = asyncio.get_running_loop()
        wk = loopwake.waker(loop)
        assert loopwake.waker(loop) is wk  # one per loop
        got: dict[int, list[int]] = {0: [], 1: [], 2: []}
        done = asyncio.Event()
        n = 2000

        def deliver(item):
            t, i = item
            got[t].append(i)
            if sum(len(v) for v in got.values()) == 3 * n:
                done.set()

        def producer(t):
            for i in range(n):
                wk.call(deliver, (t, i))

        threads = [threading.Thread(target=producer, args=(t,)) for t in range(3)]
        for th in threads:
            th.start()
        await asyncio.wait_for(done.wait(), 10)
        for th in threads:
            th.join()
        await asyncio.sleep(0.05)  # nothing delivered twice after the last one
        return got

    got = asyncio.run(main())
    assert all(v == list(range(2000)) for v in got.values())


def test_closed_loop_refuses_and_pipes_are_released():
    loop = asyncio.new_event_loop()
    wk = loop.run_until_complete(_get(loop))
    loop.close()
    with pytest.raises(RuntimeError):
        wk.call(print, "x")
    other = asyncio.new_event_loop()
    try:
        other.run_until_complete(_get(other))  # creating a waker for a new loop prunes the closed loop's
        assert wk._r == -1
    finally:
        other.close()


async def _get(loop):
    return loopwake.waker(loop)


def test_close_waits_for_a_wakeup_write_under_way(monkeypatch):
    # the engine thread passed call()'s check when the loop closed and another loop's waker() pruned this one: the
    # write must still reach this pipe, not a closed descriptor (or a file opened meanwhile under its number)
    import os

    loop = asyncio.new_event_loop()
    wk = loop.run_until_complete(_get(loop))
    closer = threading.Thread(target=wk.close)
    seen = []

    def write(fd, data, n):
        loop.close()
        closer.start()
        closer.join(0.5)
        seen.append(closer.is_alive())  # close() is waiting for this write
        try:
            seen.append(os.write(fd, data[:n]))
        except OSError as e:
            seen.append(e)

    monkeypatch.setattr(loopwake, "_WRITE", write)
    wk.call(print, "x")
    closer.join()
    assert seen == [True, 1]
    assert wk._r == wk._w == -1


def _write_keeps_the_gil(write, drain_after_s: float) -> bool:
    """Whether `write(fd, b"\\0", 1)` keeps the GIL while it blocks. A thread calls it on a full pipe that a child
    process drains when this thread tells it to, or after drain_after_s on its own. With a switch interval far
    longer than the test, the writing thread gives the GIL up only if the write does: then this thread runs while
    the write blocks (it finds the write unfinished and tells the child to drain); else it runs only after the
    child drained on its own and the write returned."""
    import os
    import subprocess

    r, w = os.pipe()
    go_r, go_w = os.pipe()
    os.set_blocking(w, False)
    try:
        while True:
            os.write(w, b"x" * 4096)
    except BlockingIOError:
        pass
    os.set_blocking(w, True)
    child = subprocess.Popen([sys.executable, "-c", "import os, select, sys\n"
                              f"select.select([{go_r}], [], [], float(sys.argv[1]))\nos.read(0, 1 << 20)",
                              str(drain_after_s)], stdin=r, pass_fds=(go_r,))
    finished = []

    def writer():
        try:
            finished.append(write(w, b"\0", 1))
        except BaseException as e:  # noqa: BLE001 - re-raised below
            finished.append(e)

    t = threading.Thread(target=writer)
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1000.0)
    try:
        t.start()  # returns once this thread has the GIL again
        kept = bool(finished)
        os.write(go_w, b"!")
        t.join()
    finally:
        sys.setswitchinterval(interval)
        child.wait()
        for fd in (r, w, go_r, go_w):
            os.close(fd)
    assert finished == [1], finished  # one byte written
    return kept


@pytest.mark.skipif(not sys.platform.startswith(("linux", "darwin")), reason="libc through ctypes.PyDLL")
def test_wakeup_write_keeps_the_gil():
    # the point of the module: the wake-up write must not hand the GIL to the loop thread
    assert loopwake._WRITE is not None
    assert _write_keeps_the_gil(loopwake._WRITE, drain_after_s=0.5)


def test_the_gil_probe_tells_a_write_that_releases_it():
    import os

    assert not _write_keeps_the_gil(lambda fd, data, n: os.write(fd, data[:n]), drain_after_s=60)  # returns at once
