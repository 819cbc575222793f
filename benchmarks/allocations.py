"""Memory allocated by each process's hot loop, measured inside the real running processes.

Runs the three fesloop processes on the simulated patient (as ``latency.py`` does),
each under tracemalloc, which sees Python objects and numpy's array data alike. The
per-message work of each process is wrapped: before each call the traced peak is
reset, after it the rise of the peak above the start is that call's transient
allocation (what it allocated at once, freed or not), and the rise of the traced
total is what it kept. Calls in the first ``--warmup`` seconds are left out (buffers
sized at the first chunk). The traced total's growth over each half of the measured
calls tells a leak (growing in both halves alike) from buffers growing to the largest
chunk seen (a late wake-up reads two chunks at once), which stop.

    python benchmarks/allocations.py [--duration 10] [--channels 64] [--fs 4000] [--json out.json]

What is wrapped, per process (one message each, never nested):
  acquisition  ``read``: the source's read (the simulated patient renders here);
               ``publish``: encode and send the EMG (and ``truth``) chunk.
  controller   ``receive``: receive and decode what waits on a link (EMG, pulses);
               ``estimate``: the chunk through the estimator (``on_emg``);
               ``command``: compute, encode and send a command.
  stimulator   ``step``: one loop step (poll, commands through the safety kernel,
               the output to the driver, due pulses).
Tracing slows every allocation, so the processes run slower than in ``latency.py``;
the bytes, not the times, are the result here.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.latency import ROLES, WARMUP_S, _status, pipeline_config, start_pipeline, stop_pipeline  # noqa: E402
from fesloop.lsl import MACHINE_SCOPE_CONFIG  # noqa: E402

CAPACITY = 1 << 18  # calls recorded per wrapped function (preallocated: the probe must not allocate per call)


class _Probe:
    """Transient and kept allocation of every call of one function (times on the monotonic clock)."""

    def __init__(self) -> None:
        self.time_s = np.zeros(CAPACITY)
        self.peak_b = np.zeros(CAPACITY, dtype=np.int64)
        self.kept_b = np.zeros(CAPACITY, dtype=np.int64)
        self.total_b = np.zeros(CAPACITY, dtype=np.int64)  # traced total after the call
        self.n = 0

    def wrap(self, cls: type, name: str) -> None:
        original = getattr(cls, name)
        probe = self

        def probed(*args, **kwargs):
            start_b = tracemalloc.get_traced_memory()[0]
            tracemalloc.reset_peak()
            try:
                return original(*args, **kwargs)
            finally:
                total_b, peak_b = tracemalloc.get_traced_memory()
                i = probe.n % CAPACITY
                probe.time_s[i] = time.monotonic()
                probe.peak_b[i] = peak_b - start_b
                probe.kept_b[i] = total_b - start_b
                probe.total_b[i] = total_b
                probe.n += 1

        setattr(cls, name, probed)

    def summary(self, since_s: float) -> dict:
        n = min(self.n, CAPACITY)
        keep = self.time_s[:n] >= since_s
        peak, kept, total = self.peak_b[:n][keep], self.kept_b[:n][keep], self.total_b[:n][keep]
        if not peak.size:
            return {"calls": 0}
        order = np.argsort(self.time_s[:n][keep])
        total = total[order]
        half = total.size // 2
        return {
            "calls": int(peak.size),
            "transient_bytes": {
                "p50": float(np.percentile(peak, 50)),
                "p99": float(np.percentile(peak, 99)),
                "max": int(peak.max()),
            },
            "kept_bytes_per_call": float(kept.mean()),
            # A leak grows in both halves alike; buffers reaching their largest chunk grow early, then stop.
            "traced_growth_bytes": [int(total[half - 1] - total[0]), int(total[-1] - total[half])],
        }


def _probe_targets(role: str) -> dict[str, tuple[type, str]]:
    if role == "acquisition":
        from acquisition.loop import Acquisition

        return {"read": (Acquisition, "_read"), "publish": (Acquisition, "_publish")}
    if role == "controller":
        from controller.loop import Controller
        from fesloop.sockets import Link

        return {"receive": (Link, "drain"), "estimate": (Controller, "on_emg"), "command": (Controller, "publish_command")}
    from stimulator.loop import Stimulator

    return {"step": (Stimulator, "step")}


def run_probed(role: str, config_path: str, out_path: str, warmup_s: float) -> int:
    """One process under tracemalloc with its hot-loop calls wrapped; the summary goes to ``out_path`` at exit."""
    probes = {label: _Probe() for label in _probe_targets(role)}
    for label, (cls, name) in _probe_targets(role).items():
        probes[label].wrap(cls, name)
    started_s = time.monotonic()

    def dump() -> None:
        first = [p.time_s[0] for p in probes.values() if p.n]
        since_s = (min(first) if first else started_s) + warmup_s
        summary = {label: probe.summary(since_s) for label, probe in probes.items()}
        Path(out_path).write_text(json.dumps(summary))

    atexit.register(dump)
    tracemalloc.start()
    from fesloop.cli import main as fesloop_main

    return fesloop_main([role, config_path])


def run_case(n_channels: int, fs_hz: float, duration_s: float, warmup_s: float, workdir: Path) -> dict:
    path = workdir / f"alloc-{n_channels}-{int(fs_hz)}.toml"
    path.write_text(pipeline_config(n_channels, fs_hz))
    outs = {role: workdir / f"alloc-{role}.json" for role in ROLES}
    procs, clients, ctx = start_pipeline(
        path,
        lambda role: [sys.executable, __file__, "--probe", role, str(path), str(outs[role]), "--warmup", str(warmup_s)],
        ready_timeout_s=60.0,
    )
    try:
        time.sleep(warmup_s + duration_s)
        status = {role: _status(c) for role, c in clients.items()}
    finally:
        stop_pipeline(procs, clients, ctx)
    return {
        "probes": {role: json.loads(outs[role].read_text()) for role in ROLES if outs[role].exists()},
        "stimulator_state": status["stimulator"].get("state"),
        "chunk_bytes": 4 * n_channels * round(fs_hz * 2e-3),
    }


def table(case: str, result: dict) -> str:
    lines = [
        f"{case}: one EMG chunk is {result['chunk_bytes']} bytes of float32; stimulator {result['stimulator_state']}",
        "",
        "| process | call | calls | transient p50 B | p99 B | max B | kept per call B | traced growth 1st / 2nd half B |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for role, probes in result["probes"].items():
        for label, s in probes.items():
            if not s["calls"]:
                continue
            t = s["transient_bytes"]
            lines.append(
                f"| {role} | {label} | {s['calls']} | {t['p50']:.0f} | {t['p99']:.0f} | {t['max']} "
                f"| {s['kept_bytes_per_call']:.1f} | {' / '.join(str(g) for g in s['traced_growth_bytes'])} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--probe", nargs=3, metavar=("ROLE", "CONFIG", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds measured after the warm-up")
    parser.add_argument("--warmup", type=float, default=2 * WARMUP_S + 1.0, help="seconds left out at the start")
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--fs", type=float, default=4000.0, help="sampling rate, Hz")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    if args.probe:
        sys.exit(run_probed(*args.probe, warmup_s=args.warmup))
    with tempfile.TemporaryDirectory() as tmp:
        lsl_cfg = Path(tmp) / "lsl_api.cfg"
        lsl_cfg.write_text(MACHINE_SCOPE_CONFIG)
        os.environ["LSLAPICFG"] = str(lsl_cfg)
        case = f"{args.channels} ch x {args.fs / 1000:g} kHz, 2 ms chunks"
        result = run_case(args.channels, args.fs, args.duration, args.warmup, Path(tmp))
    if args.json:
        args.json.write_text(json.dumps({"case": case, "duration_s": args.duration, **result}, indent=2))
    print(table(case, result))


if __name__ == "__main__":
    main()
