"""``fesloop run``: start the three processes, show live status, stop them in order.

A convenience, never a requirement: each process runs alone just as well. The
supervisor waits until every process reports ready, prints a status line at ~5 Hz,
and on Ctrl+C, SIGTERM, ``--duration``, any child dying or (with ``--record``) the
recorder dying stops the stimulator first (output to zero), then the controller, then
acquisition: a session asked to be recorded never goes on unrecorded. Children exit by
themselves if the supervisor disappears, so none is ever orphaned.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import zmq

from fesloop.config import Config
from fesloop.console import DetachedOutput
from fesloop.record import Recorder, RecordingError
from fesloop.runtime import HOLD_AUTO_ARM_ENV, PARENT_PID_ENV, SESSION_ENV
from fesloop.session import Confirmation
from fesloop.security import Security
from fesloop.sockets import ControlClient, ControlTimeout

ROLES = ("stimulator", "controller", "acquisition")  # start order; shutdown order too
READY_TIMEOUT_S = 30.0
STATUS_PERIOD_S = 0.2
STOP_TIMEOUT_S = 3.0
DEVICE_READY_TIMEOUT_S = 10.0  # a real stimulator's handshake before arming
# Arm refusals that mean "not yet" while the loop starts (device handshake, first fresh EMG): retried.
NOT_READY_YET = ("device not ready", "EMG is not within", "no fresh command")


@dataclass
class Child:
    role: str
    process: subprocess.Popen
    client: ControlClient
    last_status: dict[str, Any] = field(default_factory=dict)
    heard_s: float = math.inf  # monotonic time of its last status reply (inf: not yet)


def format_status_line(elapsed_s: float, ctl: dict[str, Any], stim: dict[str, Any], acq: dict[str, Any]) -> str:
    """One line from the latest status of each process: what the operator watches.

    Closed gates are named with their reason (why a channel gives nothing), and the crank
    is shown when a cycling law reads one.
    """
    activation = " ".join(f"{k} {v:.2f}" for k, v in ctl.get("activation", {}).items())
    channels = stim.get("channels", [])
    output = " ".join(f"{name} {ma:.1f}" for name, ma in zip(channels, stim.get("output_ma", [])))
    closed = [f"{name} {reason}" for name, reason in zip(channels, ctl.get("gate", [])) if reason != "OPEN"]
    gates = f"gates closed: {', '.join(closed)}" if closed else "gates open"
    crank = ctl.get("crank")
    crank_text = f" | crank {crank['angle_deg']:.0f} deg {crank['cadence_rpm']:.1f} rpm" if crank else ""
    latency = stim.get("latency_ms", {})
    p50, p99 = latency.get("p50"), latency.get("p99")
    lat = f"{p50:.1f}/{p99:.1f} ms" if p50 is not None else "-"
    shares = [
        f"{role} {share['p50']:.3f}"
        for role, status in (("acq", acq), ("ctl", ctl), ("stim", stim))
        if (share := status.get("latency_share_ms", {})).get("p50") is not None
    ]
    if shares:
        lat += f" (p50 shares ms: {' '.join(shares)})"
    state = stim.get("state", "?") + (f" ({stim['fault_reason']})" if stim.get("fault_reason") else "")
    lost = acq.get("lost_samples", 0)
    rejected = sum(s.get("rejected", 0) for s in (ctl, stim, acq))
    dropped = sum(s.get("dropped", 0) for s in (ctl, stim, acq))
    return (
        f"{elapsed_s:6.1f}s | activation {activation} | mA {output} | {gates}{crank_text} | stim {state} | "
        f"e2e p50/p99 {lat} | lost {lost} dropped {dropped} rejected {rejected}"
    )


SILENT_AFTER_S = 1.0  # a child whose last status reply is older is flagged on the status line
CONSOLE_DRAIN_S = 5.0  # at exit, how long the last lines may take to reach a slow or blocked stdout
# SIGHUP (the terminal closed, an ssh session dropped) and SIGTSTP (Ctrl+Z: a suspended supervisor would
# leave the stimulation running unwatched) stop the session in order too (POSIX only).
STOP_SIGNALS = tuple(
    getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP", "SIGTSTP") if hasattr(signal, name)
)


class Supervisor:
    def __init__(
        self,
        config: Config,
        config_path: Path,
        out: TextIO = sys.stdout,
        record: Path | None = None,
        confirmation: Confirmation | None = None,
    ) -> None:
        self.config = config
        self.confirmation = confirmation  # required to arm a real stimulator
        self._skin_check_shown = False
        self.config_path = config_path
        self.out = DetachedOutput(out)  # the stop path never waits for a terminal or pipe
        self.ctx = zmq.Context()
        self.children: list[Child] = []
        self.failures: list[str] = []
        self.stop_requested = False
        self._faults_seen: set[str] = set()
        self._faults_noted = 0  # of the stimulator's fault_count
        self._dose_final = False  # the stimulator answered after its output went to zero at shutdown
        self.session = uuid.uuid4().hex  # its children's status carries it: no other process is taken for one
        self.recorder = Recorder(record, config) if record is not None else None

    def _endpoint(self, role: str) -> str:
        return getattr(self.config.endpoints, f"{role}_control")

    def start(self) -> None:
        env = {**os.environ, PARENT_PID_ENV: str(os.getpid()), SESSION_ENV: self.session}
        if self.recorder is not None and self.config.stimulator.arm_at_start:
            env[HOLD_AUTO_ARM_ENV] = "1"  # armed by _start_recording, once the recording runs
        security = Security.for_role(self.config.security, self.config.security.operator_key)
        for role in ROLES:
            # A session of its own, without the terminal as its controlling terminal: the terminal's
            # signals (Ctrl+C, Ctrl+Z, SIGHUP when it closes, SIGTTOU under `stty tostop`) reach the
            # supervisor only, which stops the stimulator first.
            process = subprocess.Popen(
                [sys.executable, "-m", "fesloop", role, str(self.config_path)], env=env, start_new_session=True
            )
            self.children.append(Child(role, process, ControlClient(self.ctx, self._endpoint(role), security, role)))

    def _on_signal(self, signum: int, _frame: Any) -> None:
        self.stop_requested = True

    def _check_alive(self) -> bool:
        """Every process runs, and so does the recording if one was asked for (else the session stops)."""
        for child in self.children:
            code = child.process.poll()
            if code is not None:
                self.failures.append(f"{child.role} exited unexpectedly with code {code}")
                return False
        if self.recorder is not None and (code := self.recorder.exit_code()) is not None:
            self.out.write(f"\nfesloop: the recording stopped (LabRecorderCLI exited with code {code}): stopping\n")
            return False  # the cause is reported when the recording is closed
        return True

    def _poll_status(self, child: Child, timeout_s: float = 0.2) -> dict[str, Any]:
        """The child's status; a reply from another process on its port (another session on the same
        config: its status carries another session id) is never taken for it: nothing is sent there
        on the strength of it. (An id, not the pid: a Windows venv's python is a launcher process.)"""
        try:
            reply = child.client.request("status", timeout_s=timeout_s)
        except ControlTimeout:
            return child.last_status
        if reply.get("session") != self.session:
            note = (
                f"another process (pid {reply.get('pid')}) answers on the {child.role}'s control port: "
                "is another session running on these ports?"
            )
            if note not in self.failures:
                self.failures.append(note)
            return child.last_status
        child.last_status, child.heard_s = reply, time.monotonic()
        return reply

    def _answers_for_itself(self, child: Child) -> bool:
        """Whether the child itself was heard on its control port (not another session's process)."""
        return bool(child.last_status) and child.last_status.get("session") == self.session

    def _asked_to_shut_down(self, child: Child) -> bool:
        """Ask the child to shut down over its port, only if it answers there itself (else a signal
        reaches it alone)."""
        if not self._answers_for_itself(child):
            return False
        try:
            child.client.request("shutdown", timeout_s=1.0)
        except ControlTimeout:
            return False
        return True

    def wait_ready(self) -> bool:
        deadline = time.monotonic() + READY_TIMEOUT_S
        pending = list(self.children)
        while pending:
            if self.stop_requested or not self._check_alive():
                return False
            if time.monotonic() > deadline:
                self.failures.append("not ready in time: " + ", ".join(c.role for c in pending))
                return False
            pending = [c for c in pending if not self._poll_status(c, 0.5).get("ready")]
        return True

    def status_line(self, elapsed_s: float) -> str:
        """The status line; a process that stopped answering is named with how long (its figures are old)."""
        by_role = {c.role: c.last_status for c in self.children}
        line = format_status_line(elapsed_s, by_role["controller"], by_role["stimulator"], by_role["acquisition"])
        now_s = time.monotonic()
        silent = [f"{c.role} {now_s - c.heard_s:.1f} s" for c in self.children if now_s - c.heard_s > SILENT_AFTER_S]
        return line + (f" | NOT ANSWERING (figures are old): {', '.join(silent)}" if silent else "")

    def _note_faults(self) -> None:
        """Every FAULT the stimulator latched since the last look (its count, not its state at 5 Hz:
        one latched and reset between two polls, or in the last poll period, counts too)."""
        stim = self._stimulator().last_status
        new = stim.get("fault_count", 0) - self._faults_noted
        if new <= 0:
            return
        self._faults_noted += new
        reasons = stim.get("recent_faults", [])[-new:]
        for reason in reasons:
            self._faults_seen.add(reason)
            self.failures.append(f"stimulator FAULT: {reason}")
        if new > len(reasons):
            self.failures.append(f"stimulator: {new - len(reasons)} more FAULTs (reasons no longer in its status)")

    def monitor(self, duration_s: float | None) -> None:
        start = time.monotonic()
        tty = self.out.isatty()
        last_print = 0.0
        while not self.stop_requested and self._check_alive():
            now = time.monotonic()
            if duration_s is not None and now - start >= duration_s:
                break
            for child in self.children:
                self._poll_status(child)
            self._note_faults()
            self._remind_skin_check()
            line = self.status_line(now - start)
            if tty:
                self.out.status("\r\033[K" + line)
            elif now - last_print >= 1.0:
                self.out.status(line + "\n")
                last_print = now
            time.sleep(max(0.0, STATUS_PERIOD_S - (time.monotonic() - now)))
        if tty:
            self.out.write("\n")

    def _remind_skin_check(self) -> None:
        if not self._skin_check_shown and self._stimulator().last_status.get("skin_check_due"):
            self._skin_check_shown = True
            self.out.write("\nfesloop: REMINDER: check the skin under every electrode now\n")

    def _stimulator(self) -> Child:
        return next(c for c in self.children if c.role == "stimulator")

    def _arm_real_device(self) -> bool:
        """A real stimulator is armed here, with the operator's confirmation, never by itself."""
        if self.config.stimulator.driver == "simulated":
            return True
        if self.confirmation is None:
            self.failures.append("no operator confirmation: the real stimulator was not armed")
            return False
        for line in self.confirmation.markers():
            self.out.write(f"fesloop: {line}\n")
        deadline = time.monotonic() + DEVICE_READY_TIMEOUT_S
        while True:  # the device handshake may still be under way
            try:
                reply = self._stimulator().client.request("arm", timeout_s=2.0, confirmation=self.confirmation.as_dict())
            except ControlTimeout as exc:
                reply = {"ok": False, "error": str(exc)}
            waiting = any(reason in str(reply.get("error", "")) for reason in NOT_READY_YET)
            if reply.get("ok") or not waiting or time.monotonic() > deadline or self.stop_requested:
                break
            time.sleep(0.2)
        if not reply.get("ok"):
            self.failures.append(f"arming the stimulator was refused: {reply.get('error')}")
            return False
        return True

    def session_summary(self) -> str:
        """Per channel: time stimulated, charge, pulses, peak and mean amplitude, limits; and faults."""
        rows = self._stimulator().last_status.get("dose", [])
        lines = [
            f"# Session summary: {self.config.name}",
            "",
            "| channel | stimulated s | charge mC | pulses | peak mA | mean mA | limit reached | overrides |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            lines.append(
                f"| {r['channel']} | {r['stimulated_s']:.1f} | {r['charge_mc']:.3f} | {r['pulses']} | "
                f"{r['peak_ma']:.1f} | {r['mean_ma']:.1f} | {r['limit_reached'] or '-'} | {r['overrides']} |"
            )
        if not self._dose_final:
            lines += ["", "INCOMPLETE: the stimulator did not answer at the end; these are its last figures, and the "
                      "device may have stimulated after them until its own watchdog stopped it (RehaStim2: 1.2 s)."]
        faults = sorted(self._faults_seen)
        lines += ["", "Faults: " + ("; ".join(faults) if faults else "none")]
        return "\n".join(lines) + "\n"

    def _write_summary(self) -> None:
        summary = self.session_summary()
        self.out.write(summary)
        if self.recorder is not None:
            path = self.recorder.path.with_name(self.recorder.path.stem + "-summary.md")
            path.write_text(summary)
            self.out.write(f"fesloop: session summary saved to {path}\n")

    def shutdown(self) -> None:
        """Stimulator first (output to zero), then the others; kill what will not stop."""
        stimulator = self._stimulator() if self.children else None
        if stimulator is not None and stimulator.process.poll() is None and self._answers_for_itself(stimulator):
            try:  # output to zero before anything else; then no pulse is missing from the final totals
                stimulator.client.request("disarm", timeout_s=1.0)
            except ControlTimeout:
                self.failures.append("the stimulator did not answer disarm at shutdown: terminated")
            heard_s = stimulator.heard_s
            self._poll_status(stimulator, timeout_s=1.0)  # the final dose totals for the summary
            self._dose_final = stimulator.heard_s != heard_s
            self._note_faults()  # one latched since the last poll (a frozen controller just before the stop)
        for child in self.children:
            if child.process.poll() is None:
                if not self._asked_to_shut_down(child):
                    child.process.terminate()
                try:
                    child.process.wait(STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    child.process.kill()
                    child.process.wait()
                    self.failures.append(f"{child.role} did not stop in {STOP_TIMEOUT_S} s and was killed")
            if child.process.returncode not in (0, None) and not any(child.role in f for f in self.failures):
                self.failures.append(f"{child.role} exited with code {child.process.returncode}")
            child.client.close()
        self.ctx.destroy(linger=0)

    def _start_recording(self) -> bool:
        """Recording starts before arming: with ``arm_at_start`` the stimulator waits for this arm."""
        if self.recorder is None:
            return True
        try:
            self.recorder.start()
        except RecordingError as exc:
            self.failures.append(f"recording: {exc}")
            return False
        self.out.write(f"fesloop: recording to {self.recorder.path}\n")
        if self.config.stimulator.arm_at_start:
            stimulator = next(c for c in self.children if c.role == "stimulator")
            try:
                reply = stimulator.client.request("arm", timeout_s=1.0)
            except ControlTimeout as exc:
                reply = {"ok": False, "error": str(exc)}
            if not reply.get("ok"):
                self.failures.append(f"arming after the recording started was refused: {reply.get('error')}")
                return False
        return True

    def _stop_recording(self) -> None:
        """After every process stopped (stimulator output at zero first), close the XDF file."""
        if self.recorder is None or not self.recorder.started:
            return
        try:
            self.recorder.stop()
        except RecordingError as exc:
            self.failures.append(f"recording: {exc}")
        else:
            self.out.write(f"fesloop: recorded {self.recorder.path}\n")

    def run(self, duration_s: float | None) -> int:
        previous = {s: signal.signal(s, self._on_signal) for s in STOP_SIGNALS}
        try:
            self.start()
            if self.wait_ready() and self._start_recording() and self._arm_real_device():
                self.out.write(f"fesloop: {self.config.name} running (Ctrl+C to stop)\n")
                self.monitor(duration_s)
        finally:
            self.shutdown()
            self._stop_recording()
            if self.children:
                self._write_summary()
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        for failure in self.failures:
            self.out.write(f"fesloop: {failure}\n")
        self.out.write("fesloop: stopped" + (" with failures\n" if self.failures else " cleanly\n"))
        if not self.out.close(CONSOLE_DRAIN_S):
            print(f"fesloop: stdout did not take all output ({self.out.lost} writes refused)", file=sys.stderr)
        return 1 if self.failures else 0
