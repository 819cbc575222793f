"""A long run of the whole loop checking for leaks (fault matrix: "no leak over a long run").

The three processes run the demo for 45 s while a client polls every process's status
at 10 Hz and disarms and re-arms the stimulator every 5 s. From 15 s (after warm-up)
to the end, each process must keep the same number of open file descriptors and
threads, and its resident memory may grow by no more than ``MAX_RSS_GROWTH_KB``
(measured here: under 100 kB in 2 minutes).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import zmq

from fesloop.config import load_config
from fesloop.sockets import ControlClient, ControlTimeout
from tests.conftest import wait_until

MAX_RSS_GROWTH_KB = 3000
WARM_UP_S = 15.0
SOAK_S = 30.0


def _resources(pid: int) -> dict[str, int]:
    proc = Path(f"/proc/{pid}")
    rss_kb = next(int(line.split()[1]) for line in (proc / "status").read_text().splitlines() if line.startswith("VmRSS"))
    return {"rss_kb": rss_kb, "fds": len(os.listdir(proc / "fd")), "threads": len(os.listdir(proc / "task"))}


@pytest.mark.timeout(120)
def test_a_long_run_leaks_no_memory_descriptors_or_threads(write_config, processes) -> None:
    path = write_config("demo.toml")
    config = load_config(path)
    ctx = zmq.Context()
    clients = {
        "acquisition": ControlClient(ctx, config.endpoints.acquisition_control),
        "controller": ControlClient(ctx, config.endpoints.controller_control),
        "stimulator": ControlClient(ctx, config.endpoints.stimulator_control),
    }
    try:
        pids = processes.start_loop(path)

        def armed() -> bool:
            try:
                return clients["stimulator"].request("status", timeout_s=1.0)["state"] == "ARMED"
            except ControlTimeout:
                return False

        wait_until(armed, 30, what="armed")
        start = time.monotonic()
        before: dict[str, dict[str, int]] = {}
        cycles = 0
        next_cycle_s = start + 5.0
        while time.monotonic() - start < WARM_UP_S + SOAK_S:
            if not before and time.monotonic() - start >= WARM_UP_S:
                before = {role: _resources(pid) for role, pid in pids.items()}
            for client in clients.values():
                assert client.request("status", timeout_s=2.0)["ok"]
            if time.monotonic() >= next_cycle_s:
                assert clients["stimulator"].request("disarm", timeout_s=2.0)["ok"]
                assert clients["stimulator"].request("arm", timeout_s=2.0)["ok"]
                cycles += 1
                next_cycle_s += 5.0
            time.sleep(0.1)
        after = {role: _resources(pid) for role, pid in pids.items()}
    finally:
        for client in clients.values():
            client.close()
        ctx.destroy(linger=0)
    assert cycles >= 8
    for role in pids:
        growth_kb = after[role]["rss_kb"] - before[role]["rss_kb"]
        print(f"{role}: {before[role]} -> {after[role]} ({growth_kb:+d} kB in {SOAK_S:.0f} s)")
        assert after[role]["fds"] == before[role]["fds"], role
        assert after[role]["threads"] == before[role]["threads"], role
        assert growth_kb <= MAX_RSS_GROWTH_KB, role
