"""Detection latency on the simulated patient: scripted voluntary onset -> stimulator output change.

Runs the three real processes (the demo's two muscles, proportional control) with a
contraction of each muscle every ``PERIOD_S``, and listens to the published streams:
``truth`` (the scripted drive) and ``pulses`` (what the stimulator delivered). For
each envelope setting:

- detection latency: from the first sample of a contraction's drive above 0 (its
  raised-cosine ramp starts there) to the first delivered pulse of that muscle's
  channel after it (the simulated driver fires at once when output leaves 0);
  p50/p99 over every onset (an onset with no pulse before the contraction ends is missed);
- false activations at rest: stimulation bursts (first pulse after >= 0.5 s without
  one) starting while the muscle's drive has been 0 for >= 0.5 s, per minute of rest.

    python benchmarks/detection.py [--duration 45] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import zmq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.latency import _status, free_ports, machine, stop_pipeline  # noqa: E402
from fesloop import protocol  # noqa: E402
from fesloop.config import load_config  # noqa: E402
from fesloop.lsl import MACHINE_SCOPE_CONFIG  # noqa: E402
from fesloop.sockets import ControlClient  # noqa: E402

FS_HZ = 2000.0
PERIOD_S = 3.0
CONTRACTION_S = 1.0
WARMUP_S = 2.0
QUIET_S = 0.5  # a burst or a rest this far from any activity counts as separate
SETTINGS = {  # name: (envelope_lowpass_hz, tkeo)
    "default (6 Hz low-pass)": (6.0, False),
    "15 Hz low-pass, TKEO": (15.0, True),
    "25 Hz low-pass, TKEO": (25.0, True),
}


def config_text(lowpass_hz: float, tkeo: bool) -> str:
    ports = free_ports(6)
    muscles = stimulation = contractions = ""
    for i, name in enumerate(("quadriceps_l", "tibialis_l")):
        contractions += (
            f'\n[[acquisition.simulated.contractions]]\nmuscle = "{name}"\nstart_s = {0.5 + i * PERIOD_S / 2}\n'
            f"duration_s = {CONTRACTION_S}\nlevel = 0.5\n"
        )
        muscles += f'\n[[muscles]]\nname = "{name}"\nemg_channel = {i}\nrest_uv = 3.0\nmvc_uv = 240.0\n'
        stimulation += (
            f'\n[[stimulation]]\nname = "{name}"\nmuscle = "{name}"\ndevice_channel = {i}\nelectrode_area_cm2 = 25.0\n'
            "threshold_ma = 12.0\nmax_ma = 40.0\npulse_width_us = 300.0\nfrequency_hz = 30.0\n"
            'law = { kind = "proportional", gain = 1.5, offset = 0.1, max_intensity = 1.0 }\n'
        )
    endpoints = ("emg", "command", "pulses", "acquisition_control", "controller_control", "stimulator_control")
    return (
        'name = "detection"\n[endpoints]\n'
        + "".join(f'{key} = "tcp://127.0.0.1:{port}"\n' for key, port in zip(endpoints, ports))
        + f"[acquisition]\nsource = \"simulated\"\nchunk_ms = 2.0\nlsl = false\n"
        f"[acquisition.simulated]\nsampling_rate_hz = {FS_HZ}\nschedule_period_s = {PERIOD_S}\n{contractions}"
        f"[controller.filters]\nenvelope_lowpass_hz = {lowpass_hz}\ntkeo = {str(tkeo).lower()}\n"
        f"[controller.blanking]\npre_ms = 1.0\npost_ms = 20.0\n"
        f"[stimulator]\narm_at_start = true\n{muscles}{stimulation}"
    )


def record(path: Path, duration_s: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(truth times, truth drive (n, 2), pulse times, pulse channels) from the running pipeline."""
    config = load_config(path)
    roles = ("stimulator", "controller", "acquisition")
    procs = {
        role: subprocess.Popen([sys.executable, "-m", "fesloop", role, str(path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for role in roles
    }
    ctx = zmq.Context()
    clients = {role: ControlClient(ctx, getattr(config.endpoints, f"{role}_control")) for role in roles}
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.RCVHWM, 100_000)
    sub.setsockopt(zmq.SUBSCRIBE, protocol.TOPICS[protocol.Kind.TRUTH])
    sub.setsockopt(zmq.SUBSCRIBE, protocol.TOPICS[protocol.Kind.PULSES])
    sub.connect(config.endpoints.emg)
    sub.connect(config.endpoints.pulses)
    truth_t, truth, pulse_t, pulse_ch = [], [], [], []
    try:
        deadline = time.monotonic() + 30
        while not all(_status(c).get("ready") for c in clients.values()):
            if time.monotonic() > deadline:
                raise RuntimeError("pipeline not ready in 30 s")
        end = time.monotonic() + duration_s
        while time.monotonic() < end:
            if not sub.poll(100):
                continue
            body = protocol.decode(sub.recv_multipart()).body
            if isinstance(body, protocol.EmgChunk):
                truth_t.append(body.first_sample_time_s + np.arange(len(body.data)) / body.sampling_rate_hz)
                truth.append(body.data)
            elif isinstance(body, protocol.Pulses):
                keep = body.amplitude_ma > 0
                pulse_t.append(body.time_s[keep])
                pulse_ch.append(body.channel[keep].astype(int))
    finally:
        stop_pipeline(procs, clients, ctx)
    empty = [np.zeros(0)]
    return np.concatenate(truth_t), np.vstack(truth), np.concatenate(pulse_t or empty), np.concatenate(pulse_ch or empty)


def analyse(truth_t: np.ndarray, truth: np.ndarray, pulse_t: np.ndarray, pulse_ch: np.ndarray) -> dict:
    start_s = truth_t[0] + WARMUP_S
    latencies_ms, missed, false_bursts, rest_s = [], 0, 0, 0.0
    dt_s = 1.0 / FS_HZ
    for muscle in range(truth.shape[1]):
        active = truth[:, muscle] > 0
        onsets = truth_t[1:][active[1:] & ~active[:-1]]
        mine = np.sort(pulse_t[pulse_ch == muscle])
        for onset_s in onsets[(onsets > start_s) & (onsets < truth_t[-1] - CONTRACTION_S)]:
            after = mine[mine >= onset_s]
            if len(after) and after[0] < onset_s + CONTRACTION_S:
                latencies_ms.append((after[0] - onset_s) * 1e3)
            else:
                missed += 1
        # rest: drive 0 for >= QUIET_S (so contraction tails are not counted as rest)
        last_active_s = np.maximum.accumulate(np.where(active, truth_t, -np.inf))
        at_rest = (~active) & (truth_t - last_active_s >= QUIET_S) & (truth_t > start_s)
        rest_s += at_rest.sum() * dt_s
        bursts = mine[np.diff(mine, prepend=-np.inf) >= QUIET_S]
        index = np.clip(np.searchsorted(truth_t, bursts), 0, len(truth_t) - 1)
        false_bursts += int(np.sum(at_rest[index] & (bursts > start_s)))
    values = np.asarray(latencies_ms)
    return {
        "onsets": len(values),
        "missed": missed,
        "latency_ms": {
            "p50": float(np.percentile(values, 50)) if len(values) else None,
            "p99": float(np.percentile(values, 99)) if len(values) else None,
            "max": float(values.max()) if len(values) else None,
        },
        "false_activations": false_bursts,
        "rest_minutes": round(rest_s / 60.0, 2),
        "false_per_rest_minute": round(false_bursts / (rest_s / 60.0), 3) if rest_s else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=45.0, help="seconds recorded per setting")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        lsl_cfg = Path(tmp) / "lsl_api.cfg"
        lsl_cfg.write_text(MACHINE_SCOPE_CONFIG)
        os.environ["LSLAPICFG"] = str(lsl_cfg)
        for name, (lowpass_hz, tkeo) in SETTINGS.items():
            print(f"running {name} ...", file=sys.stderr)
            path = Path(tmp) / "detection.toml"
            path.write_text(config_text(lowpass_hz, tkeo))
            results[name] = analyse(*record(path, args.duration))
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "duration_s": args.duration, "results": results}, indent=2))
    print("| envelope | detected (missed) onsets | p50 ms | p99 ms | max ms | false activations at rest |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        lat = r["latency_ms"]
        fmt = lambda v: f"{v:.1f}" if v is not None else "-"  # noqa: E731
        print(f"| {name} | {r['onsets']} ({r['missed']}) | {fmt(lat['p50'])} | {fmt(lat['p99'])} | {fmt(lat['max'])} "
              f"| {r['false_activations']} in {r['rest_minutes']} min |")


if __name__ == "__main__":
    main()
