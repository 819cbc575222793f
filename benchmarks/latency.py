"""End-to-end latency of the real pipeline against the bare ZeroMQ relay floor.

For each case (channels x sampling rate) this runs the three fesloop processes on the
simulated patient, then, in the same run, the bare three-process relay of
``relay.py`` with the same message sizes and rates, and that relay again speaking
fesloop's protocol (``wire``: decode and encode, no processing). It reports p50/p99/p99.9/max
latency, CPU per process (share of one core, from /proc; split into the main loop,
libzmq's I/O thread and the rest), lost samples and rejected messages, as JSON and
as Markdown tables. ``--lsl`` runs the pipeline with its LSL outlets open, as the
demo does (no consumer).

Pipeline latency is the stimulator's own figure: the time it handed an update to
the driver minus the time the newest EMG sample behind it reached acquisition. The
relay's is source send -> sink receipt over the same two hops.

    python benchmarks/latency.py [--duration 10] [--quick] [--chunk-ms 2] [--lsl] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import zmq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fesloop.lsl import MACHINE_SCOPE_CONFIG  # noqa: E402
from fesloop.sockets import ControlClient, ControlTimeout  # noqa: E402

ROLES = ("stimulator", "controller", "acquisition")  # started in this order, stopped in this order
CASES = [(16, 2000.0), (64, 2000.0), (16, 4000.0), (64, 4000.0)]
CHUNK_MS = 2.0  # the demo's acquisition chunk
WARMUP_S = 2.0
CLK_TCK = os.sysconf("SC_CLK_TCK")
WHATS = ("pipeline", "relay", "wire")  # the processes; the bare relay; the relay speaking our protocol


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def pipeline_config(n_channels: int, fs_hz: float, chunk_ms: float = CHUNK_MS, lsl: bool = False) -> str:
    ports = free_ports(6)
    muscles = "".join(
        f'\n[[muscles]]\nname = "m{i}"\nemg_channel = {i}\nrest_uv = 3.0\nmvc_uv = 240.0\n' for i in range(n_channels)
    )
    stimulation = "".join(
        f'\n[[stimulation]]\nname = "s{i}"\nmuscle = "m{i}"\ndevice_channel = {i}\nelectrode_area_cm2 = 25.0\n'
        f"threshold_ma = 12.0\nmax_ma = 40.0\npulse_width_us = 300.0\nfrequency_hz = 30.0\n"
        f'law = {{ kind = "proportional", gain = 1.5, offset = 0.1, max_intensity = 1.0 }}\n'
        for i in range(2)
    )
    contractions = "".join(
        f'\n[[acquisition.simulated.contractions]]\nmuscle = "m{i}"\nstart_s = {1.0 + 2 * i}\n'
        f"duration_s = 1.5\nlevel = 0.6\n"
        for i in range(2)
    )
    return f"""name = "bench{n_channels}x{int(fs_hz)}"
[endpoints]
emg = "tcp://127.0.0.1:{ports[0]}"
command = "tcp://127.0.0.1:{ports[1]}"
pulses = "tcp://127.0.0.1:{ports[2]}"
acquisition_control = "tcp://127.0.0.1:{ports[3]}"
controller_control = "tcp://127.0.0.1:{ports[4]}"
stimulator_control = "tcp://127.0.0.1:{ports[5]}"
[acquisition]
source = "simulated"
chunk_ms = {chunk_ms}
lsl = {str(lsl).lower()}
[acquisition.simulated]
sampling_rate_hz = {fs_hz}
schedule_period_s = 5.0
{contractions}
[stimulator]
arm_at_start = true
{muscles}{stimulation}"""


def _stat_cpu_s(stat_path: Path) -> float:
    fields = stat_path.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def cpu_seconds(pid: int) -> dict[str, float]:
    """User+system seconds of a process: in all (threads that ended included), its main
    thread (the loop), libzmq's I/O threads."""
    times = {"all": _stat_cpu_s(Path(f"/proc/{pid}/stat")), "main": 0.0, "zmq_io": 0.0}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
            cpu_s = _stat_cpu_s(task / "stat")
        except FileNotFoundError:  # the thread ended meanwhile
            continue
        if task.name == str(pid):
            times["main"] += cpu_s
        elif name.startswith("ZMQbg/IO"):
            times["zmq_io"] += cpu_s
    return times


def cpu_shares(before: dict[str, dict[str, float]], after: dict[str, dict[str, float]], elapsed_s: float) -> dict:
    """Per process: its share of one core in all, and split into main loop / libzmq I/O / other threads."""
    shares = {}
    for role in before:
        share = {k: (after[role][k] - before[role][k]) / elapsed_s for k in ("all", "main", "zmq_io")}
        share["other"] = max(share["all"] - share["main"] - share["zmq_io"], 0.0)
        shares[role] = {k: round(v, 4) for k, v in share.items()}
    return shares


def percentiles(values_ms: np.ndarray) -> dict[str, float]:
    p50, p99, p999 = np.percentile(values_ms, [50, 99, 99.9])
    return {"p50": float(p50), "p99": float(p99), "p99.9": float(p999), "max": float(values_ms.max()), "n": len(values_ms)}


def _status(client: ControlClient) -> dict:
    try:
        return client.request("status", timeout_s=1.0)
    except ControlTimeout:
        return {}


def stop_pipeline(procs: dict[str, subprocess.Popen], clients: dict[str, ControlClient], ctx: zmq.Context) -> None:
    """Ask each process to shut down (in the given order), kill what does not."""
    for role, client in clients.items():
        try:
            client.request("shutdown", timeout_s=1.0)
        except ControlTimeout:
            procs[role].kill()
        client.close()
    for proc in procs.values():
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
    ctx.destroy(linger=0)


def start_pipeline(
    config_path: Path, argv: Callable[[str], list[str]], ready_timeout_s: float = 30.0
) -> tuple[dict[str, subprocess.Popen], dict[str, ControlClient], zmq.Context]:
    """Start the three processes (``argv(role)``) and return once each reports ready."""
    from fesloop.config import load_config

    config = load_config(config_path)
    procs = {role: subprocess.Popen(argv(role), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for role in ROLES}
    ctx = zmq.Context()
    clients = {role: ControlClient(ctx, getattr(config.endpoints, f"{role}_control")) for role in ROLES}
    deadline = time.monotonic() + ready_timeout_s
    while not all(_status(c).get("ready") for c in clients.values()):
        if time.monotonic() > deadline:
            stop_pipeline(procs, clients, ctx)
            raise RuntimeError(f"pipeline not ready in {ready_timeout_s:g} s")
    return procs, clients, ctx


def run_pipeline(n_channels: int, fs_hz: float, duration_s: float, workdir: Path, chunk_ms: float, lsl: bool) -> dict:
    path = workdir / f"bench-{n_channels}-{int(fs_hz)}.toml"
    path.write_text(pipeline_config(n_channels, fs_hz, chunk_ms, lsl))
    procs, clients, ctx = start_pipeline(path, lambda role: [sys.executable, "-m", "fesloop", role, str(path)])
    try:
        time.sleep(WARMUP_S)
        cpu0 = {role: cpu_seconds(p.pid) for role, p in procs.items()}
        t0 = time.monotonic()
        time.sleep(duration_s)
        elapsed = time.monotonic() - t0
        cpu = cpu_shares(cpu0, {role: cpu_seconds(p.pid) for role, p in procs.items()}, elapsed)
        status = {role: _status(c) for role, c in clients.items()}
    finally:
        stop_pipeline(procs, clients, ctx)
    stim = status["stimulator"]
    return {
        "latency_ms": stim.get("latency_ms", {}),
        "latency_share_ms": {role: s.get("latency_share_ms", {}) for role, s in status.items()},
        "cpu_share": cpu,
        "cpu_total": round(sum(c["all"] for c in cpu.values()), 4),
        "stimulator_state": stim.get("state"),
        "lost_samples": status["acquisition"].get("lost_samples"),
        "rejected": sum(s.get("rejected", 0) for s in status.values()),
        "gap_samples": status["controller"].get("gap_samples"),
    }


def run_relay(n_channels: int, fs_hz: float, duration_s: float, chunk_ms: float, mode: str = "bytes") -> dict:
    """The relay of relay.py in ``mode``: ``bytes`` (the transport floor) or ``wire`` (plus our protocol)."""
    samples = int(round(fs_hz * chunk_ms * 1e-3))
    p = free_ports(2)
    a, b = f"tcp://127.0.0.1:{p[0]}", f"tcp://127.0.0.1:{p[1]}"
    script = str(Path(__file__).with_name("relay.py"))
    common = [str(n_channels), str(samples), str(chunk_ms * 1e-3), str(duration_s + WARMUP_S), mode]
    roles = {"sink": ["sink", b, "-"], "relay": ["relay", a, b], "source": ["source", "-", a]}
    procs = {
        role: subprocess.Popen([sys.executable, script, *args, *common], stdout=subprocess.PIPE, text=True)
        for role, args in roles.items()
    }
    time.sleep(1.0 + WARMUP_S)
    cpu0 = {role: cpu_seconds(proc.pid) for role, proc in procs.items()}
    t0 = time.monotonic()
    time.sleep(duration_s)
    elapsed = time.monotonic() - t0
    cpu = cpu_shares(cpu0, {role: cpu_seconds(proc.pid) for role, proc in procs.items()}, elapsed)
    out, _ = procs["sink"].communicate(timeout=duration_s + 30)
    for proc in procs.values():
        proc.wait(30)
    latencies = np.asarray(json.loads(out)["latencies_ms"])
    skip = int(WARMUP_S / (chunk_ms * 1e-3))
    return {
        "latency_ms": percentiles(latencies[skip:]),
        "cpu_share": cpu,
        "cpu_total": round(sum(c["all"] for c in cpu.values()), 4),
        "messages": len(latencies),
    }


def machine() -> dict:
    model = re.search(r"model name\s*:\s*(.*)", Path("/proc/cpuinfo").read_text())
    return {
        "cpu": model.group(1) if model else platform.processor(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "zmq": zmq.zmq_version(),
    }


def table(results: list[dict]) -> str:
    lines = [
        "| case | what | p50 ms | p99 ms | p99.9 ms | max ms | CPU (one core) | lost / rejected | p50 shares acq / ctl / stim ms |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        for what in WHATS:
            x = r[what]
            lat = x["latency_ms"]
            fmt = lambda v: f"{v:.2f}" if isinstance(v, (int, float)) else "-"  # noqa: E731
            losses = f"{x.get('lost_samples', 0)} / {x.get('rejected', 0)}" if what == "pipeline" else "-"
            shares = x.get("latency_share_ms", {})
            share_text = " / ".join(
                fmt(shares.get(role, {}).get("p50")) for role in ("acquisition", "controller", "stimulator")
            ) if shares else "-"
            lines.append(
                f"| {r['case']} | {what} | {fmt(lat.get('p50'))} | {fmt(lat.get('p99'))} | {fmt(lat.get('p99.9'))} "
                f"| {fmt(lat.get('max'))} | {x['cpu_total'] * 100:.0f} % | {losses} | {share_text} |"
            )
    return "\n".join(lines)


def cpu_table(results: list[dict]) -> str:
    """Each process's share of one core, by thread: main loop / libzmq I/O / other (LSL, clocks)."""
    lines = ["| case | what | process | main loop | libzmq I/O | other | all |", "|---|---|---|---|---|---|---|"]
    for r in results:
        for what in WHATS:
            for role, share in r[what]["cpu_share"].items():
                cells = " | ".join(f"{share[k] * 100:.1f} %" for k in ("main", "zmq_io", "other", "all"))
                lines.append(f"| {r['case']} | {what} | {role} | {cells} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds measured per case")
    parser.add_argument("--quick", action="store_true", help="16 channels x 2 kHz only")
    parser.add_argument("--chunk-ms", type=float, default=CHUNK_MS, help="acquisition chunk (and relay message period)")
    parser.add_argument("--lsl", action="store_true", help="open the pipeline's LSL outlets, as the demo does")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        lsl_cfg = Path(tmp) / "lsl_api.cfg"
        lsl_cfg.write_text(MACHINE_SCOPE_CONFIG)
        os.environ["LSLAPICFG"] = str(lsl_cfg)
        results = []
        for n_channels, fs_hz in CASES[:1] if args.quick else CASES:
            case = f"{n_channels} ch x {fs_hz / 1000:g} kHz"
            print(f"running {case} ...", file=sys.stderr)
            pipeline = run_pipeline(n_channels, fs_hz, args.duration, Path(tmp), args.chunk_ms, args.lsl)
            relay = run_relay(n_channels, fs_hz, args.duration, args.chunk_ms)
            wire = run_relay(n_channels, fs_hz, args.duration, args.chunk_ms, "wire")
            results.append({"case": case, "pipeline": pipeline, "relay": relay, "wire": wire})
    report = {
        "machine": machine(), "duration_s": args.duration, "chunk_ms": args.chunk_ms, "lsl": args.lsl, "results": results,
    }
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    print(table(results))
    print()
    print(cpu_table(results))


if __name__ == "__main__":
    main()
