"""The dynamic batcher on its own, with a real (NumPy) model function."""

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from serving.batching import RETRY_AFTER_SPREAD, Batcher, Contention
from serving.errors import Internal, Overloaded, Unavailable


def run(coro):
    return asyncio.run(coro)


def make(fn, calls, **kw):
    def model(x):
        calls.append(len(x))
        return fn(x)

    opts = {"max_batch_size": 8, "max_batch_wait_s": 0.05, "max_queue_items": 100}
    opts.update(kw)
    return Batcher("m", model, executor=ThreadPoolExecutor(1), **opts)


def test_concurrent_requests_share_a_call_and_get_their_own_rows_back():
    calls = []

    async def main():
        b = make(lambda x: x * 2, calls)
        b.start()
        inputs = [np.full((n, 3), i, np.float32) for i, n in enumerate([1, 2, 3, 1])]
        outs = await asyncio.gather(*(b.submit(x) for x in inputs))
        await b.stop()
        return inputs, outs

    inputs, outs = run(main())
    for x, y in zip(inputs, outs):
        np.testing.assert_array_equal(y, x * 2)
    assert calls == [7]


def test_an_idle_model_gets_a_lone_request_at_once_and_a_busy_one_collects_rows():
    """Adaptive batching: with nothing in flight the first request is dispatched at once, even
    with a 60 s batching wait; rows arriving while that call runs go together in the next call,
    as soon as the model is free (it is idle again then), not after the wait."""
    calls, started, release = [], threading.Event(), threading.Event()

    def model(x):
        calls.append(len(x))
        if len(calls) == 1:
            started.set()
            release.wait(10)
        return x

    async def main():
        b = Batcher("m", model, max_batch_size=8, max_batch_wait_s=60, max_queue_items=100,
                    executor=ThreadPoolExecutor(1))
        b.start()
        first = asyncio.ensure_future(b.submit(np.zeros((1, 2), np.float32)))
        assert await asyncio.to_thread(started.wait, 10), "a lone request waited for the batching delay"
        rest = [asyncio.ensure_future(b.submit(np.full((n, 2), n, np.float32))) for n in (1, 2, 3)]
        await asyncio.sleep(0.05)
        assert calls == [1]  # the model is busy: the three wait in the queue
        release.set()
        outs = await asyncio.wait_for(asyncio.gather(first, *rest), 10)
        await b.stop()
        return outs

    outs = run(main())
    assert calls == [1, 6]
    assert [len(o) for o in outs] == [1, 1, 2, 3]


def test_wait_when_idle_keeps_the_fixed_batching_delay():
    calls = []

    async def main():
        b = make(lambda x: x, calls, max_batch_wait_s=0.2, wait_when_idle=True)
        b.start()
        first = asyncio.ensure_future(b.submit(np.zeros((1, 1), np.float32)))
        await asyncio.sleep(0.05)  # inside the wait: this one joins the first
        second = asyncio.ensure_future(b.submit(np.zeros((2, 1), np.float32)))
        await asyncio.gather(first, second)
        await b.stop()

    run(main())
    assert calls == [3]


def test_large_requests_are_cut_to_max_batch_size_and_reassembled():
    calls = []

    async def main():
        b = make(lambda x: x + 1, calls, max_batch_wait_s=0)
        b.start()
        x = np.arange(20, dtype=np.float32).reshape(20, 1)
        y = await b.submit(x)
        await b.stop()
        return x, y

    x, y = run(main())
    np.testing.assert_array_equal(y, x + 1)
    assert sorted(calls) == [4, 8, 8] and sum(calls) == 20


def test_full_queue_refuses_at_once():
    calls, gate = [], threading.Event()

    def slow(x):
        gate.wait(10)
        return x

    async def main():
        b = make(slow, calls, max_queue_items=4, max_batch_size=4, max_batch_wait_s=0)
        b.start()
        first = asyncio.create_task(b.submit(np.zeros((4, 1))))
        while not calls:
            await asyncio.sleep(0.001)
        second = asyncio.create_task(b.submit(np.zeros((4, 1))))
        await asyncio.sleep(0.01)
        with pytest.raises(Overloaded, match="max_queue_items=4"):
            await b.submit(np.zeros((1, 1)))
        gate.set()
        out = await asyncio.gather(first, second)
        await b.stop()
        return out

    a, b = run(main())
    assert a.shape == b.shape == (4, 1)


def test_the_pushback_grows_with_refusals_per_admission_up_to_its_cap_and_is_spread():
    """Many refused for each admitted: each is told to wait longer (not all "when the work ahead
    is done", which brings them back together); at most max_retry_after_s; never less than the
    work ahead; spread by RETRY_AFTER_SPREAD so that clients refused together do not return together."""
    calls, gate = [], threading.Event()

    def held(x):
        gate.wait(10)
        return x

    async def main():
        b = make(held, calls, max_queue_items=4, max_batch_size=4, max_batch_wait_s=0, max_queue_wait_s=0.1,
                 max_retry_after_s=2.0)
        b.start()
        first = asyncio.create_task(b.submit(np.zeros((4, 1))))
        while not calls:
            await asyncio.sleep(0.001)
        second = asyncio.create_task(b.submit(np.zeros((4, 1))))  # two admitted; the queue is full
        await asyncio.sleep(0.01)
        waits = []
        for _ in range(40):
            with pytest.raises(Overloaded) as e:
                b.admit(1)
            waits.append(e.value.retry_after_s)
        gate.set()
        await asyncio.gather(first, second)
        await b.stop()
        return waits

    waits = run(main())
    lo, hi = RETRY_AFTER_SPREAD
    assert 0.1 * lo <= waits[0] <= 0.1 * hi  # nothing refused yet: the work ahead (its floor, max_queue_wait_s)
    # The k-th refusal (k from 0) sees k refusals per 2 admissions: 0.1 x (1 + k / 2), spread.
    for k, w in enumerate(waits[:20]):
        assert 0.1 * (1 + k / 2) * lo * 0.95 <= w <= 0.1 * (1 + k / 2) * hi * 1.05, (k, w)
    assert max(waits) == 2.0 and all(w <= 2.0 for w in waits)  # capped
    assert len({round(w, 6) for w in waits[:20]}) == 20  # spread, not one value


def test_contention_counts_decay_and_admissions_count_at_least_one():
    now = [0.0]
    c = Contention(tau_s=5.0, clock=lambda: now[0])
    for _ in range(3):
        c.refused()
    assert c.ratio() == 3.0  # no admission yet: over 1, not over 0
    for _ in range(6):
        c.admitted()
    assert c.ratio() == 0.5
    now[0] = 5.0  # one time constant: both counts x 1/e, the ratio stays
    assert c.ratio() == pytest.approx(0.5)
    c.refused()
    assert c.ratio() == pytest.approx((3 / 2.718281828 + 1) / (6 / 2.718281828))
    now[0] = 60.0  # long quiet: the refusals are forgotten (admissions floor at 1)
    assert c.ratio() < 1e-4


def test_a_failing_model_call_fails_every_request_in_the_batch_and_the_batcher_goes_on():
    calls = []

    def sometimes(x):
        if len(calls) == 1:
            raise RuntimeError("boom")
        return x

    async def main():
        b = make(sometimes, calls)
        b.start()
        results = await asyncio.gather(b.submit(np.ones((1, 1))), b.submit(np.ones((2, 1))), return_exceptions=True)
        after = await b.submit(np.ones((1, 1)))
        await b.stop()
        return results, after

    results, after = run(main())
    assert all(isinstance(r, Internal) and "RuntimeError" in r.message for r in results)
    assert after.shape == (1, 1)


@pytest.mark.parametrize("concurrent", [1, 2])
def test_max_concurrent_batches_are_in_flight_together(concurrent):
    """Two batches meet at a barrier inside the model call: only possible if both are in flight."""
    barrier = threading.Barrier(2, timeout=2)
    calls = []

    def model(x):
        calls.append(len(x))
        barrier.wait()
        return x

    async def main():
        b = Batcher("m", model, max_batch_size=4, max_batch_wait_s=0, max_queue_items=100,
                    executor=ThreadPoolExecutor(2), max_concurrent=concurrent)
        b.start()
        results = await asyncio.gather(*(b.submit(np.full((4, 1), i, np.float32)) for i in range(2)),
                                       return_exceptions=True)
        depth_after = b.depth
        await b.stop()
        return results, depth_after

    results, depth_after = run(main())
    assert calls == [4, 4] and depth_after == 0
    if concurrent == 2:
        for i, y in enumerate(results):
            np.testing.assert_array_equal(y, np.full((4, 1), i, np.float32))
    else:  # one at a time: the first call waits at the barrier alone and breaks it
        assert all(isinstance(r, Internal) for r in results)


def test_admission_refuses_when_the_measured_wait_exceeds_max_queue_wait():
    """Refused by time, not rows: after measuring >= 1 ms/row, 128 rows ahead is >= 0.128 s > 0.1 s."""
    release = threading.Event()
    calls = []

    def model(x):
        calls.append(len(x))
        if len(calls) == 1:
            time.sleep(0.064)  # the call it learns from: 64 rows in (at least) 64 ms
        else:
            release.wait(5)
        return x

    async def main():
        b = Batcher("m", model, max_batch_size=64, max_batch_wait_s=0, max_queue_items=10_000,
                    executor=ThreadPoolExecutor(1), max_queue_wait_s=0.1)
        b.start()
        await b.submit(np.zeros((64, 1)))  # what a 64-row call that took 64 ms teaches it
        first = asyncio.create_task(b.submit(np.zeros((64, 1))))
        await asyncio.sleep(0.05)  # taken into a call, held
        second = asyncio.create_task(b.submit(np.zeros((64, 1))))  # queued: ~0.064 s ahead, admitted
        await asyncio.sleep(0.01)
        with pytest.raises(Overloaded) as refused:
            b.admit(1)
        release.set()
        await asyncio.gather(first, second)
        after = b.refusal(64)
        await b.stop()
        return refused.value, after

    refused, after = run(main())
    assert "max_queue_wait_s=0.1" in refused.message
    assert 0.05 <= refused.retry_after_s < 1
    assert after is None  # once the queue drained, work is admitted again
    assert calls == [64, 64, 64]


def test_cancelled_and_expired_entries_are_dropped_never_computed():
    release = threading.Event()
    calls, dropped = [], []

    def model(x):
        calls.append(len(x))
        release.wait(5)
        return x

    async def main():
        b = Batcher("m", model, max_batch_size=4, max_batch_wait_s=0, max_queue_items=100,
                    executor=ThreadPoolExecutor(1), on_drop=lambda rows, why: dropped.append((rows, why)))
        b.start()
        loop = asyncio.get_running_loop()
        held = asyncio.create_task(b.submit(np.zeros((4, 1))))
        await asyncio.sleep(0.05)
        gone = asyncio.create_task(b.submit(np.zeros((8, 1))))  # two queued entries of 4
        late = asyncio.create_task(asyncio.wait_for(b.submit(np.zeros((2, 1)), deadline=loop.time() + 0.05), 0.05))
        await asyncio.sleep(0.01)
        gone.cancel()
        with pytest.raises(TimeoutError):
            await late
        depth = b.depth
        release.set()
        await held
        kept = await b.submit(np.ones((3, 1)))
        await b.stop()
        return depth, kept

    depth, kept = run(main())
    assert depth == 4  # only the held call's rows remain
    assert sorted(dropped) == [(2, "deadline"), (4, "cancelled"), (4, "cancelled")]
    assert calls == [4, 3]  # the dropped rows never reached the model
    np.testing.assert_array_equal(kept, np.ones((3, 1)))


def test_stop_answers_everything_queued_or_in_flight():
    release = threading.Event()

    async def main():
        b = Batcher("m", lambda x: (release.wait(5), x)[1], max_batch_size=4, max_batch_wait_s=0,
                    max_queue_items=100, executor=ThreadPoolExecutor(1))
        b.start()
        tasks = [asyncio.create_task(b.submit(np.zeros((4, 1)))) for _ in range(3)]
        await asyncio.sleep(0.05)
        await b.stop()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        release.set()
        return results

    results = run(main())
    assert all(isinstance(r, Unavailable) and "shutting down" in r.message for r in results)


def test_a_refusal_leaves_no_reference_cycle():
    """At high overload most requests are refused: each refusal must be freed by reference counting,
    not left to the cyclic garbage collector (an exception whose traceback holds a frame that holds
    the exception; thousands of them made full collections of ~0.1-0.2 s, stalling the event loop)."""
    import gc

    b = Batcher("m", lambda x: x, max_batch_size=4, max_batch_wait_s=0, max_queue_items=2,
                executor=ThreadPoolExecutor(1))
    gc.collect()
    gc.disable()
    try:
        for _ in range(100):
            try:
                b.admit(3)
            except Overloaded as e:
                assert "max_queue_items=2" in e.message
            else:
                raise AssertionError("not refused")
        assert gc.collect() == 0, "refusals left objects only the cyclic collector can free"
    finally:
        gc.enable()


def test_timing_gets_the_seconds_of_each_call_that_carried_its_rows_once():
    """A request's ``timing.infer_s`` (the statistics' compute_infer, serving/statistics.py): the
    seconds of every backend call with its rows, each call once however many of its entries it
    holds; a request without timing is not timed."""
    calls = []

    class Timing:
        infer_s = 0.0

    def model(x):
        calls.append(len(x))
        time.sleep(0.05)
        return x

    async def main():
        b = Batcher("m", model, max_batch_size=4, max_batch_wait_s=0.0, max_queue_items=100,
                    executor=ThreadPoolExecutor(1))
        b.start()
        big, small = Timing(), Timing()
        # 10 rows cut into entries of 4, 4, 2; the lone 1-row request joins the last call
        await asyncio.gather(b.submit(np.zeros((10, 1)), timing=big), b.submit(np.zeros((1, 1)), timing=small),
                             b.submit(np.zeros((1, 1))))
        await b.stop()
        return big.infer_s, small.infer_s

    big, small = run(main())
    assert sum(calls) == 12 and len(calls) >= 3
    assert 0.05 * len(calls) <= big <= 0.05 * len(calls) + 0.5  # every call held some of its rows
    assert 0.05 <= small < big
