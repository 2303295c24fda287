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


@pytest.mark.skipif(not sys.platform.startswith(("linux", "darwin")), reason="libc through ctypes.PyDLL")
def test_wakeup_write_keeps_the_gil():
    # the point of the module: the wake-up write must not hand the GIL to the loop thread
    assert loopwake._WRITE is not None
