"""The event loop goes first: thread priorities, and the garbage collector's pauses.

Thread priorities: the threads that compute (model calls, preprocessing, TensorFlow's own
pools) run at a lower priority (a higher nice value) than the event loop and gRPC's I/O threads.

On a busy machine the compute threads are always runnable; at equal priority the kernel makes
the event loop wait its turn behind them every time it wakes (a refusal, a small request, a
health check then takes tens of ms at high overload, bench/overload.py). With the workers
niced, the loop runs as soon as it has work and the workers get every cycle it leaves:
throughput is unchanged (the scheduler is work-conserving), only who goes first changes.
Raising nice needs no privilege. Linux per-thread nice; elsewhere nothing is done.

Garbage collection: once the models are loaded their objects are frozen (``gc.freeze``), and
automatic collection is replaced by a full collection on the event loop every
``gc_interval_s`` (:func:`collect_garbage`). An automatic collection runs in whichever thread
allocates, usually a (niced) preprocessing thread, holding the GIL all along: at 50x overload
full collections there took 90-200 ms each, ~8 in 30 s, stalling the loop (refusals p99
~80 ms); run on the loop they take 1-4 ms.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import threading
import time
from pathlib import Path

log = logging.getLogger("serving.priority")


def _set(tid: int, nice: int) -> None:
    """The thread's nice value := the main thread's + ``nice`` (not relative to its own: a thread
    started by a worker already inherited the worker's)."""
    os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, os.getpid()) + nice))


def lower_this_thread(nice: int) -> None:
    """Lower the calling thread's priority by ``nice`` (a ThreadPoolExecutor initializer)."""
    if nice > 0 and hasattr(os, "setpriority"):
        try:
            _set(threading.get_native_id(), nice)
        except OSError as e:  # not permitted or not supported: run at the normal priority
            log.debug("could not lower the priority of a worker thread: %s", e)


def lower_threads_named(prefixes: tuple[str, ...], nice: int) -> int:
    """Lower the priority of this process's threads whose name (``/proc/self/task/*/comm``) starts with
    one of ``prefixes`` (threads made by native libraries, e.g. TensorFlow's ``tf_`` pools); how many."""
    done = 0
    if nice <= 0 or not hasattr(os, "setpriority"):
        return done
    for task in Path("/proc/self/task").glob("*"):
        try:
            if (task / "comm").read_text().strip().startswith(prefixes):
                _set(int(task.name), nice)
                done += 1
        except (OSError, ValueError):  # the thread ended meanwhile, or no /proc
            continue
    return done


async def collect_garbage(interval_s: float) -> None:
    """Until cancelled: automatic collection off, a full collection every ``interval_s`` on the
    event loop (cyclic garbage lives at most that long); automatic collection back on at the end."""
    gc.disable()
    try:
        while True:
            await asyncio.sleep(interval_s)
            t0 = time.perf_counter()
            found = gc.collect()
            if (took := time.perf_counter() - t0) > 0.02:
                log.info("garbage collection took %.0f ms (%d objects unreachable)", took * 1000, found)
    finally:
        gc.enable()
