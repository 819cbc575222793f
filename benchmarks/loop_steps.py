"""Cost of one loop step of the controller and of the stimulator, timed in one process.

``latency.py`` measures the three processes as they run, which is what users get, but
its figures move with everything else on the machine. This benchmark isolates the
per-message work: the real ``Controller`` and ``Stimulator`` objects (real sockets on
loopback, real clock sync) are stepped in turn by one thread, fed by the simulated
patient at its real pace (one 2 ms chunk per deadline), and each ``step()`` is timed
once its input is waiting, so no wait is counted. Baseline in the same run: a plain
SUB socket on the same EMG stream, receiving and decoding each chunk (the floor of a
step). Steps are split by phase: ``rest`` (no output) and ``stim`` (a channel above
0 mA, pulses flowing back to the controller's blanker and M-wave estimator).

    python benchmarks/loop_steps.py [--seconds 10] [--channels 16] [--fs 2000]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import zmq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.latency import CHUNK_MS, pipeline_config  # noqa: E402
from fesloop import protocol  # noqa: E402
from fesloop.clocksync import clock_reply  # noqa: E402
from fesloop.config import load_config  # noqa: E402
from fesloop.lsl import configure_machine_scope  # noqa: E402
from fesloop.runtime import Pacer  # noqa: E402
from fesloop.sockets import ControlServer, StreamCounters, control_server, drain, publisher, subscriber  # noqa: E402

WAIT_MS = 50  # for a step's input to arrive


def _timed(run) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def run(seconds: float, n_channels: int, fs_hz: float, warmup_s: float) -> dict[str, dict[str, np.ndarray]]:
    from acquisition.simulated_source import SimulatedSource
    from controller.loop import Controller
    from stimulator.loop import Stimulator

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "steps.toml"
        path.write_text(pipeline_config(n_channels, fs_hz))
        config = load_config(path)
    ctx = zmq.Context()
    emg_pub = publisher(ctx, config.endpoints.emg)  # this thread plays the acquisition process
    clock_server = ControlServer(control_server(ctx, config.endpoints.acquisition_control))
    stimulator = Stimulator(config)
    controller = Controller(config)
    clock_server.handlers["clock"] = lambda _request: clock_reply(controller.rt.clock)
    floor_sub = subscriber(ctx, config.endpoints.emg, [protocol.TOPICS[protocol.Kind.EMG]])
    source = SimulatedSource(config)
    encoder = protocol.EmgEncoder()
    clock = controller.rt.clock
    source.start(clock.now())
    chunk_pacer = Pacer(CHUNK_MS * 1e-3, clock.now())
    tick_pacer = Pacer(1.0 / config.controller.control_rate_hz, clock.now())
    controller_poller, stimulator_poller = controller.poller(), stimulator.poller()
    counters = StreamCounters()
    times: dict[str, dict[str, list[float]]] = {
        role: {"rest": [], "stim": []} for role in ("floor", "controller", "stimulator")
    }
    measure_from_s = clock.now() + warmup_s
    end_s = measure_from_s + seconds
    seq = 0
    try:
        while (now_s := clock.now()) < end_s:
            time.sleep(chunk_pacer.timeout_ms(now_s) * 1e-3)
            chunk_pacer.due(clock.now())
            for block in source.read(clock.now()):
                seq += 1
                chunk = protocol.EmgChunk(
                    block.first_sample_index, block.first_sample_time_s, clock.now(), fs_hz, block.emg_uv
                )
                emg_pub.send_multipart(encoder.encode(seq, clock.now(), chunk))
            clock_server.serve_pending()
            phase = "stim" if stimulator.amplitude_ma.any() else "rest"
            keep = now_s >= measure_from_s
            steps = (
                ("floor", floor_sub, lambda: drain(floor_sub, counters)),
                ("controller", controller.emg_link.sock, lambda: controller.step(controller_poller, tick_pacer)),
                ("stimulator", stimulator.command_link.sock, lambda: stimulator.step(stimulator_poller)),
            )
            for role, sock, step in steps:
                if sock.poll(WAIT_MS):
                    elapsed_s = _timed(step)
                    if keep:
                        times[role][phase].append(elapsed_s)
    finally:
        state = stimulator.kernel.state.value
        controller.rt.close()
        stimulator.driver.close()
        stimulator.rt.close()
        ctx.destroy(linger=0)
    if state != "ARMED":
        raise RuntimeError(f"the stimulator ended {state}: the steps measured are not the closed loop's")
    return {role: {phase: np.asarray(t) * 1e6 for phase, t in phases.items()} for role, phases in times.items()}


def table(results: dict[str, dict[str, np.ndarray]]) -> str:
    """p50 x floor: the step's p50 over the baseline's in the same phase (steadier than the times,
    which move with the machine's load)."""
    lines = [
        "| step | phase | steps | p50 us | p90 us | p99 us | mean us | p50 x floor |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for role, phases in results.items():
        for phase, us in phases.items():
            floor = results["floor"][phase]
            if us.size and floor.size:
                p50, p90, p99 = np.percentile(us, [50, 90, 99])
                ratio = p50 / np.percentile(floor, 50)
                lines.append(
                    f"| {role} | {phase} | {us.size} | {p50:.0f} | {p90:.0f} | {p99:.0f} | {us.mean():.0f} | {ratio:.1f} |"
                )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="measured, after the warm-up")
    parser.add_argument("--warmup", type=float, default=4.0, help="seconds before measuring (clock sync, arming)")
    parser.add_argument("--channels", type=int, default=16)
    parser.add_argument("--fs", type=float, default=2000.0, help="sampling rate, Hz")
    args = parser.parse_args()
    configure_machine_scope()
    print(table(run(args.seconds, args.channels, args.fs, args.warmup)))


if __name__ == "__main__":
    main()
