"""The event loop goes first (serving/priority.py): in a running gateway the threads that compute
(model calls, preprocessing, TensorFlow's pools) are niced by ``worker_nice``; the main thread
(the event loop) and gRPC's own I/O threads are not."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest

from serving.settings import Settings

pytestmark = pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="per-thread nice values: Linux only")


def threads(pid: int) -> list[tuple[int, str, int]]:
    """(tid, name, nice) of every thread of ``pid`` (nice: field 19 of /proc/<pid>/task/<tid>/stat)."""
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            stat = (task / "stat").read_text()
            name = (task / "comm").read_text().strip()
        except OSError:
            continue  # ended meanwhile
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "
        out.append((int(task.name), name, int(fields[16])))
    return out


def test_workers_are_niced_and_the_event_loop_is_not(shared_gateways):
    gw = shared_gateways.get("embedded")
    # Large enough to be tokenised in the preprocessing pool, then scored in a backend thread.
    r = httpx.post(gw.rest + "/v1/sentiment:predict", json={"texts": ["a fine film"] * 512}, timeout=30)
    assert r.status_code == 200
    seen = threads(gw.process.pid)
    base = os.getpriority(os.PRIO_PROCESS, 0)  # the gateway's, inherited from this process
    nice = min(19, base + Settings().worker_nice)
    main = [n for tid, _, n in seen if tid == gw.process.pid]
    assert main == [base]
    tf = [n for _, name, n in seen if name.startswith("tf_")]
    assert tf and set(tf) == {nice}, seen
    io = [n for _, name, n in seen if name.startswith(("event_engine", "grpc_global"))]
    assert io and set(io) == {base}, seen
    # Python worker threads (named "python" by the kernel): the backend and preprocessing pools.
    workers = [n for tid, name, n in seen if name == "python" and n == nice]
    assert len(workers) >= 2, seen


def test_worker_nice_zero_leaves_every_thread_at_the_process_priority():
    from testkit.gateway import gateway_process

    with gateway_process(models='["sentiment_lstm"]', worker_nice=0) as gw:
        r = httpx.post(gw.rest + "/v1/sentiment:predict", json={"texts": ["a fine film"] * 512}, timeout=30)
        assert r.status_code == 200
        assert {n for *_, n in threads(gw.process.pid)} == {os.getpriority(os.PRIO_PROCESS, 0)}
