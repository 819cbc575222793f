"""``fesloop calibrate``: guided rest and MVC trials on live EMG; writes the calibration file.

Subscribes to a running acquisition's ``emg`` topic and runs the controller's own
estimator on it, so the levels are measured exactly as the controller will see them.
Phases are timed on the EMG's own sample clock from the first chunk received: a
countdown, rest, then for each muscle ``--trials`` maximal contractions. A
calibration whose MVC is not clearly above rest is refused and nothing is written;
a good one replaces the file atomically, the previous one kept as ``<name>.bak``.
Where the file cannot be written is found before the first trial; a write that
fails at the end still prints the measured calibration, so no trial is lost.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pylsl
import zmq

from controller.calibration import Calibration, CalibrationError, envelope_settings, muscle_calibration
from fesloop import protocol
from fesloop.arguments import require_number
from fesloop.config import Config
from fesloop.lsl import make_outlet
from fesloop.security import Security, SecurityError
from fesloop.sockets import StreamCounters, drain, subscriber
from fesloop.telemetry import LINGER_S, config_json, stream_name

DEFAULT_OUT = "calibration.json"
MAX_TIMEOUT_S = 3600.0  # --timeout-s: longer is no calibration session (and overflows a socket poll in ms)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=None, help="calibration file (default: controller.calibration_file, else calibration.json)")
    parser.add_argument("--rest-s", type=float, default=5.0, help="rest duration (s)")
    parser.add_argument("--trials", type=int, default=3, help="MVC trials per muscle")
    parser.add_argument("--trial-s", type=float, default=3.0, help="duration of each MVC trial (s)")
    parser.add_argument("--pause-s", type=float, default=5.0, help="countdown before each phase (s)")
    parser.add_argument("--timeout-s", type=float, default=10.0, help="give up when no EMG arrives for this long")


@dataclass(frozen=True)
class Phase:
    """One recorded phase, [start_s, stop_s) on the EMG clock from the first sample."""

    label: str
    muscle: int | None  # None: rest (all muscles)
    start_s: float
    stop_s: float


def schedule(n_muscles: int, rest_s: float, trials: int, trial_s: float, pause_s: float) -> list[Phase]:
    phases = [Phase("REST: relax every muscle", None, pause_s, pause_s + rest_s)]
    t = pause_s + rest_s
    for muscle in range(n_muscles):
        for trial in range(trials):
            phases.append(Phase(f"MVC {trial + 1}/{trials}", muscle, t + pause_s, t + pause_s + trial_s))
            t += pause_s + trial_s
    return phases


class PhaseMarkers:
    """The calibration's LSL Markers stream (``<config>-calibration-markers``; nothing when LSL is off).

    Not one of a session's streams (``telemetry.STREAMS``): a recorder does not wait for
    it; list it under ``[recording]`` to record it with a session.
    """

    def __init__(self, config: Config) -> None:
        key = "calibration-markers"
        self._outlet = (
            make_outlet(
                stream_name(config.name, key), "Markers", ["event"], 0.0, f"fesloop-{config.name}-{key}",
                channel_format="string", description={"process": "calibrate", "config": config_json(config)},
            )
            if config.acquisition.lsl
            else None
        )

    def mark(self, text: str, time_s: float) -> None:
        if self._outlet is not None:
            self._outlet.push_sample([text], time_s)

    def close(self) -> None:
        """Give connected consumers time to receive the last marker before the outlet goes."""
        if self._outlet is not None and self._outlet.have_consumers():
            time.sleep(LINGER_S)
        self._outlet = None


@dataclass
class PhaseSamples:
    """One phase's envelope and contamination flags, chunk by chunk ((n, n_muscles) each)."""

    envelope_uv: list[np.ndarray] = field(default_factory=list)
    flagged: list[np.ndarray] = field(default_factory=list)

    def joined(self, n_muscles: int) -> tuple[np.ndarray, np.ndarray]:
        """(envelope_uv, flagged), each (n_samples, n_muscles)."""
        if not self.envelope_uv:
            return np.zeros((0, n_muscles)), np.zeros((0, n_muscles), dtype=bool)
        return np.vstack(self.envelope_uv), np.vstack(self.flagged)


def phase_name(phase: Phase, names: list[str]) -> str:
    """``rest``, or ``mvc 2/3 quadriceps_l``: how markers name a phase."""
    return "rest" if phase.muscle is None else f"mvc {phase.label.split()[-1]} {names[phase.muscle]}"


def record(
    config: Config, phases: list[Phase], timeout_s: float, markers: PhaseMarkers
) -> tuple[list[PhaseSamples], float]:
    """Envelope samples and their contamination flags per phase, and the sampling rate.

    Each phase's start and end go to ``markers`` stamped with the EMG sample time they refer to.
    """
    # Imported here, not at the top: every `fesloop` command builds this module's arguments,
    # and the estimator brings scipy.signal (~0.7 s) that only a calibration needs.
    from controller.estimator import EmgEstimator

    # With [security] keys the acquisition admits the process and client keys only: this is the operator.
    security = Security.for_role(config.security, config.security.operator_key)
    ctx = zmq.Context()
    sock = subscriber(
        ctx, config.endpoints.emg, [protocol.TOPICS[protocol.Kind.EMG]], hwm=10000, security=security,
        server="acquisition",
    )  # fmt: skip
    counters = StreamCounters()
    collected = [PhaseSamples() for _ in phases]
    estimator: EmgEstimator | None = None
    t0_s: float | None = None
    announced: set[tuple[int, int]] = set()
    names = [m.name for m in config.muscles]
    try:
        while True:
            if not sock.poll(int(timeout_s * 1000)):
                raise CalibrationError(f"no EMG from {config.endpoints.emg} for {timeout_s:g} s (is acquisition running?)")
            for message in drain(sock, counters):
                chunk = message.body
                if estimator is None:
                    estimator = EmgEstimator(config, chunk.sampling_rate_hz, chunk.data.shape[1])
                    t0_s = chunk.first_sample_time_s
                    print(f"EMG: {chunk.data.shape[1]} channels at {chunk.sampling_rate_hz:g} Hz", flush=True)
                    markers.mark("calibration start", t0_s)
                if not estimator.process(chunk):
                    raise CalibrationError("EMG samples were lost during calibration; repeat it")
                n = len(estimator.envelope_uv)
                times_s = chunk.first_sample_time_s - t0_s + (np.arange(n) - estimator.delay) / estimator.fs_hz
                for i, phase in enumerate(phases):
                    inside = (times_s >= phase.start_s) & (times_s < phase.stop_s)
                    if inside.any():
                        collected[i].envelope_uv.append(estimator.envelope_uv[inside].copy())
                        collected[i].flagged.append(estimator.contamination_flags[inside].copy())
                now_s = times_s[-1] if n else 0.0
                for text, phase_s in _announce(phases, names, now_s, announced):
                    markers.mark(text, t0_s + phase_s)
                if now_s >= phases[-1].stop_s:
                    print("done", flush=True)
                    return collected, estimator.fs_hz
    finally:
        ctx.destroy(linger=0)


def _announce(
    phases: list[Phase], names: list[str], now_s: float, announced: set[tuple[int, int]]
) -> list[tuple[str, float]]:
    """Countdown in whole seconds before each phase, then GO and STOP; the phase edges passed, as markers."""
    edges = []
    for i, phase in enumerate(phases):
        who = "" if phase.muscle is None else f" {names[phase.muscle]}: contract as hard as you can"
        remaining = int(np.ceil(phase.start_s - now_s))
        if 0 < remaining <= 3 and (i, remaining) not in announced:
            announced.add((i, remaining))
            print(f"{phase.label}{who} in {remaining}...", flush=True)
        if phase.start_s <= now_s and (i, 0) not in announced:
            announced.add((i, 0))
            print(f"GO: {phase.label}{who} for {phase.stop_s - phase.start_s:g} s", flush=True)
            edges.append((f"calibration {phase_name(phase, names)} start", phase.start_s))
        if phase.stop_s <= now_s and (i, -1) not in announced:
            announced.add((i, -1))
            print("STOP, relax", flush=True)
            edges.append((f"calibration {phase_name(phase, names)} end", phase.stop_s))
    return edges


def compute(config: Config, config_path: str, phases: list[Phase], collected: list[PhaseSamples], fs_hz: float) -> Calibration:
    """Each muscle's levels from its phases, leaving out the samples the contamination detector flagged."""
    joined = [c.joined(len(config.muscles)) for c in collected]
    muscles = []
    for m, muscle in enumerate(config.muscles):
        rest, rest_flagged = (a[:, m] for a in joined[0])
        trials = [i for i, p in enumerate(phases) if p.muscle == m and len(joined[i][0])]
        if not len(rest) or not trials:
            raise CalibrationError(f"{muscle.name}: no EMG recorded in its rest or MVC phases")
        muscles.append(
            muscle_calibration(
                muscle.name, rest, [joined[i][0][:, m] for i in trials], fs_hz,
                rest_flagged, [joined[i][1][:, m] for i in trials], emg_channel=muscle.emg_channel,
            )
        )
    return Calibration(
        config.name, config_path, datetime.now(timezone.utc).isoformat(timespec="seconds"), fs_hz,
        envelope_settings(config), tuple(muscles),
    )


def backup_path(path: Path) -> Path:
    """Where an existing calibration file is kept when a new one replaces it."""
    return path.with_name(path.name + ".bak")


def _temporary_path(path: Path) -> Path:
    return path.with_name(path.name + ".tmp")


def check_writable(path: Path) -> None:
    """Raise OSError unless a calibration can be written to ``path``: tried with the temporary
    file the write will use, before the patient does any trial."""
    if not path.parent.is_dir():
        raise FileNotFoundError(errno.ENOENT, "no such folder", str(path.parent))
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, "is a folder", str(path))
    temporary = _temporary_path(path)
    temporary.touch()
    temporary.unlink()


def write_atomically(path: Path, calibration: Calibration) -> Path | None:
    """Write ``path`` whole or not at all: a temporary file, fsynced, then renamed over it. An
    existing file is first copied to :func:`backup_path` (replacing an older backup), whose
    path is returned (None: there was none)."""
    temporary = _temporary_path(path)
    try:
        with open(temporary, "w", encoding="utf-8") as file:
            file.write(json.dumps(calibration.to_dict(), indent=2) + "\n")
            file.flush()
            os.fsync(file.fileno())
        backup = backup_path(path) if path.exists() else None
        if backup is not None:
            shutil.copy2(path, backup)
        os.replace(temporary, path)
    except OSError:
        with contextlib.suppress(OSError):
            temporary.unlink(missing_ok=True)
        raise
    return backup


def check_arguments(args: argparse.Namespace) -> None:
    """Durations finite and positive (nan used to pass; a negative timeout waited forever), before anything starts."""
    for option, value in (("--rest-s", args.rest_s), ("--trial-s", args.trial_s)):
        require_number("calibrate", option, value, 0.0)
    require_number("calibrate", "--pause-s", args.pause_s, 0.0, low_included=True)
    require_number("calibrate", "--trials", args.trials, 1, low_included=True)
    require_number("calibrate", "--timeout-s", args.timeout_s, 0.0, MAX_TIMEOUT_S)


def main(config: Config, args: argparse.Namespace) -> int:
    """Entry of ``fesloop calibrate``; returns the exit code (1 when refused or not written)."""
    out = args.out or Path(config.controller.calibration_file or DEFAULT_OUT)
    check_arguments(args)
    try:
        check_writable(out)
    except OSError as exc:
        sys.exit(f"fesloop calibrate: cannot write the calibration to {out}: {exc}; no trial started")
    if out.exists():
        print(f"{out} exists: it will be kept as {backup_path(out)}", flush=True)
    phases = schedule(len(config.muscles), args.rest_s, args.trials, args.trial_s, args.pause_s)
    markers = PhaseMarkers(config)
    try:
        collected, fs_hz = record(config, phases, args.timeout_s, markers)
        calibration = compute(config, str(args.config), phases, collected, fs_hz)
    except SecurityError as exc:
        markers.close()
        sys.exit(f"fesloop calibrate: {exc}")
    except CalibrationError as exc:
        markers.mark(f"calibration refused: {exc}", pylsl.local_clock())
        markers.close()
        print(f"fesloop calibrate: refused, nothing written: {exc}", file=sys.stderr)
        return 1
    for m in calibration.muscles:
        print(
            f"{m.name}: rest {m.rest_uv:.3g} uV (SD {m.rest_sd_uv:.3g}), MVC {m.mvc_uv:.3g} uV; "
            f"suggested onset: {m.onset_rest_3sd_uv:.3g} uV (rest + 3 SD) or {m.onset_10pct_mvc_uv:.3g} uV (10 % MVC)"
        )
    try:
        backup = write_atomically(out, calibration)
    except OSError as exc:
        markers.mark(f"calibration not written: {exc}", pylsl.local_clock())
        markers.close()
        print(json.dumps(calibration.to_dict(), indent=2))
        print(
            f"fesloop calibrate: could not write {out}: {exc}; the calibration measured is printed above "
            "(save it as a .json file to use it)",
            file=sys.stderr,
        )
        return 1
    markers.mark(f"calibration written to {out}", pylsl.local_clock())
    markers.close()
    print(f"wrote {out}" + (f" (the previous file is kept as {backup})" if backup else ""))
    return 0
