"""``fesloop run``: ordered shutdown, non-zero exit on failure, never an orphan."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import zmq

from fesloop.config import load_config
from fesloop.sockets import ControlClient, ControlTimeout
from tests.conftest import wait_until

pytestmark = pytest.mark.timeout(90)

ROLES = ("acquisition", "controller", "stimulator")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as stat:  # a zombie is dead for our purpose
        return stat.read().split()[2] != "Z"


def _child_pids(config) -> dict[str, int]:
    """PIDs of the running children, from their own status replies."""
    ctx = zmq.Context()
    pids: dict[str, int] = {}
    try:
        for role in ROLES:
            client = ControlClient(ctx, getattr(config.endpoints, f"{role}_control"))

            def status() -> dict | None:
                try:
                    reply = client.request("status", timeout_s=0.5)
                except ControlTimeout:
                    return None
                return reply if reply.get("ready") else None

            pids[role] = wait_until(status, 30, what=f"{role} ready")["pid"]
            client.close()
    finally:
        ctx.destroy(linger=0)
    return pids


@pytest.fixture
def supervisor(write_config):
    path = write_config("demo.toml")
    process = subprocess.Popen(
        [sys.executable, "-m", "fesloop", "run", str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        yield process, load_config(path)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)


def test_sigint_stops_everything_cleanly(supervisor) -> None:
    process, config = supervisor
    pids = _child_pids(config)
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=30)
    assert process.returncode == 0, output.decode()
    assert b"stopped cleanly" in output and b"INCOMPLETE" not in output
    assert not any(_alive(pid) for pid in pids.values())


@pytest.mark.parametrize("signum", [signal.SIGHUP, signal.SIGTERM, signal.SIGTSTP], ids=["SIGHUP", "SIGTERM", "SIGTSTP"])
def test_a_signal_to_the_terminals_process_group_stops_the_session_in_order(supervisor, signum) -> None:
    """A closed terminal (SIGHUP), `timeout`/systemd (SIGTERM) or Ctrl+Z (SIGTSTP) signals the whole
    group: the children shared it, so SIGHUP killed the stimulator without zeroing its device (its
    watchdog stopped it 1.2 s later), SIGTERM could stop the controller before the stimulator, and
    Ctrl+Z froze everything. Now only the supervisor gets it, and stops the session in order."""
    process, config = supervisor
    pids = _child_pids(config)
    os.killpg(process.pid, signum)
    output, _ = process.communicate(timeout=30)
    assert process.returncode == 0, output.decode()
    assert b"stopped cleanly" in output and b"did not answer disarm" not in output
    assert not any(_alive(pid) for pid in pids.values())


def test_a_child_that_stops_answering_is_flagged_on_the_status_line(supervisor) -> None:
    """A frozen stimulator kept showing "stim ARMED" and its last mA, as if live."""
    process, config = supervisor
    pids = _child_pids(config)
    time.sleep(1.5)  # status lines with every child answering
    os.kill(pids["stimulator"], signal.SIGSTOP)
    time.sleep(2.5)
    os.kill(pids["stimulator"], signal.SIGCONT)
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=30)
    lines = output.decode().splitlines()
    flagged = [line for line in lines if "NOT ANSWERING (figures are old): stimulator" in line]
    assert flagged and all("acquisition" not in line.split("NOT ANSWERING")[1] for line in flagged)
    assert not any("NOT ANSWERING" in line for line in lines[: lines.index(flagged[0]) - 2])


def test_the_summary_says_it_is_incomplete_when_the_stimulator_died(supervisor) -> None:
    """The summary printed the stimulator's last polled totals as final after it was killed (the review's
    emulated device had delivered 113 pulses against 73 in the summary, until its watchdog fired)."""
    process, config = supervisor
    pids = _child_pids(config)
    os.kill(pids["stimulator"], signal.SIGKILL)
    output, _ = process.communicate(timeout=30)
    assert process.returncode != 0
    assert b"INCOMPLETE: the stimulator did not answer at the end" in output and b"| quadriceps_l |" in output


def test_a_dying_child_stops_the_rest_and_fails_the_run(supervisor) -> None:
    process, config = supervisor
    pids = _child_pids(config)
    os.kill(pids["controller"], signal.SIGKILL)
    output, _ = process.communicate(timeout=30)
    assert process.returncode != 0
    assert b"controller exited unexpectedly" in output
    assert not any(_alive(pid) for pid in pids.values())


def test_children_exit_when_the_supervisor_is_killed(supervisor) -> None:
    process, config = supervisor
    pids = _child_pids(config)
    process.kill()
    process.wait(10)
    wait_until(lambda: not any(_alive(pid) for pid in pids.values()), 10, what="orphaned children to exit")


def test_the_summary_counts_every_pulse_delivered_when_the_run_ends_while_stimulating(write_config) -> None:
    """The stimulator is disarmed first at shutdown (output to zero at once, published as a state
    change), then its totals are read: no pulse after the disarm, and the summary's pulses per
    channel equal those published on the pulses stream (the totals used to be read while pulsing)."""
    from tests.conftest import long_contraction
    from tests.streams import Recorder, pulses_array

    path = write_config("demo.toml", long_contraction(start_s=0.0))
    config = load_config(path)
    recorder = Recorder({config.endpoints.pulses: [b"pulses", b"status"]})
    try:
        run = subprocess.run([sys.executable, "-m", "fesloop", "run", str(path), "--duration", "4"],
                             capture_output=True, text=True, timeout=60)
    finally:
        recorder.close()
    assert run.returncode == 0, run.stdout + run.stderr
    channels, times, amplitudes = pulses_array(recorder.get(b"pulses"))
    disarmed = [m.header.send_time_s for m in recorder.get(b"status")
                if m.body.fields.get("process") == "stimulator" and m.body.fields.get("state") == "DISARMED"]
    assert disarmed and times.max() <= disarmed[-1]  # the disarm came first, nothing after it
    rows = {line.split("|")[1].strip(): int(line.split("|")[4]) for line in run.stdout.splitlines()
            if line.startswith("| ") and not line.startswith("| channel") and line.count("|") == 9}
    published = {stim.name: int(((channels == stim.device_channel) & (amplitudes > 0)).sum()) for stim in config.stimulation}
    assert published[config.stimulation[0].name] > 20  # it was stimulating when the run ended
    assert rows == published


def test_a_stdout_nobody_reads_does_not_hold_up_the_stop(write_config) -> None:
    """A launcher that captures stdout and never reads it: once the pipe was full the supervisor blocked
    writing its status line, and SIGTERM, --duration or a dying child no longer stopped anything."""
    import fcntl

    path = write_config("demo.toml")
    config = load_config(path)
    read_end, write_end = os.pipe()
    fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, 4096)
    os.set_blocking(write_end, False)
    try:
        while True:
            os.write(write_end, b"x" * 4096)  # full before the supervisor writes a byte
    except BlockingIOError:
        pass
    os.set_blocking(write_end, True)
    process = subprocess.Popen([sys.executable, "-m", "fesloop", "run", str(path)], stdout=write_end,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        pids = _child_pids(config)
        process.send_signal(signal.SIGTERM)
        process.wait(20)
        wait_until(lambda: not any(_alive(pid) for pid in pids.values()), 10, what="the children to stop")
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)
        os.close(read_end)
        os.close(write_end)
