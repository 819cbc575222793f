"""CurveZMQ in real processes on loopback: who may connect, who may command, who may control.

Attackers here are real sockets: a NULL-security client, a CURVE client with an
unknown key, raw bytes on the port, a listed key asking for what it may not, and
publishers impersonating the controller. None may change the stimulator's output;
each denial is counted in status and logged.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zmq

from fesloop import protocol
from fesloop.cli import main as cli_main
from fesloop.clock import LslClock
from fesloop.config import Config, load_config
from fesloop.protocol import GateReason
from fesloop.security import Security, SecurityError
from fesloop.sockets import ControlClient, ControlTimeout, EndpointError, check_bind_endpoint
from tests.conftest import clock_peer, long_contraction, wait_until

LONG_CONTRACTION = long_contraction()


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_keys_generate_makes_private_secrets_and_never_overwrites(tmp_path: Path, capsys) -> None:
    umask = os.umask(0)  # the modes must not depend on the user's umask
    try:
        assert cli_main(["keys", "generate", str(tmp_path / "k")]) == 0
    finally:
        os.umask(umask)
    assert _mode(tmp_path / "k") == 0o700
    for role in ("acquisition", "controller", "stimulator", "operator", "monitor"):
        assert _mode(tmp_path / "k" / f"{role}.key_secret") == 0o600
        assert _mode(tmp_path / "k" / f"{role}.key") == 0o644
        assert "secret-key" not in (tmp_path / "k" / f"{role}.key").read_text()
    with pytest.raises(SystemExit, match="refusing to overwrite"):
        cli_main(["keys", "generate", str(tmp_path / "k")])


def test_keys_generate_refuses_a_directory_others_may_write(tmp_path: Path) -> None:
    directory = tmp_path / "k"
    directory.mkdir()
    directory.chmod(0o777)
    expected = f"key directory {directory} is writable by group or others (mode 0777): chmod go-w {directory}"
    with pytest.raises(SystemExit, match=re.escape(expected)):
        cli_main(["keys", "generate", str(directory)])
    assert list(directory.iterdir()) == []


def test_secret_key_readable_by_others_is_refused(secured_config, keys_dir: Path) -> None:
    config = load_config(secured_config())
    (keys_dir / "stimulator.key_secret").chmod(0o644)
    with pytest.raises(SecurityError, match="readable by others: chmod 600"):
        Security(config.security, "stimulator")


@pytest.mark.parametrize(
    ("name", "mode"),
    [("", 0o777), ("", 0o730), ("operator.key", 0o666), ("operator.key", 0o646), ("controller.key", 0o664)],
    ids=["dir-0777", "dir-0730", "operator-0666", "operator-0646", "controller-0664"],
)
def test_an_allow_list_others_may_write_is_refused(secured_config, keys_dir: Path, name: str, mode: int) -> None:
    """Another local user who may write the key directory or a public key file could swap
    operator.key for their own key and arm, reset and shut down: refused at start, naming it."""
    config = load_config(secured_config())
    path = keys_dir / name if name else keys_dir
    path.chmod(mode)
    if name == "operator.key":  # the swap itself
        attacker_public, _ = zmq.curve_keypair()
        path.write_text(f'metadata\ncurve\n    public-key = "{attacker_public.decode()}"\n')
    what = "key file" if name else "key directory"
    expected = f"{what} {path} is writable by group or others (mode {mode:04o}): chmod go-w {path}"
    with pytest.raises(SecurityError, match=re.escape(expected)):
        Security(config.security, "stimulator")


def _owned_by_another_account(path: Path, monkeypatch) -> int:
    """Make ``path`` another account's: chown it as root, else make this process look like another user."""
    if os.geteuid() == 0:
        os.chown(path, 65534, 65534)
        return 65534
    monkeypatch.setattr(os, "geteuid", lambda: path.stat().st_uid + 1)
    return path.stat().st_uid


@pytest.mark.parametrize("name", ["operator.key", ""], ids=["public-key", "directory"])
def test_an_allow_list_another_account_owns_is_refused(secured_config, keys_dir: Path, monkeypatch, name: str) -> None:
    """Mode bits do not stop an owner: a key file or directory of another account (modes 0644/0700 as
    asked) let that account write its own key into operator.key and arm, reset and shut down."""
    config = load_config(secured_config())
    path = keys_dir / name if name else keys_dir
    uid = _owned_by_another_account(path, monkeypatch)
    with pytest.raises(SecurityError, match=re.escape(f"{path} belongs to uid {uid}, not to this user")):
        Security(config.security, "stimulator")


def test_keys_in_a_folder_others_may_rename_are_refused(secured_config, keys_dir: Path, tmp_path: Path) -> None:
    """Whoever may write a folder above the keys may swap the whole key directory for their own."""
    config = load_config(secured_config())
    open_folder = tmp_path / "shared"
    open_folder.mkdir()
    moved = keys_dir.rename(open_folder / "keys")
    open_folder.chmod(0o777)
    security = dataclasses.replace(config.security, keys_dir=str(moved))
    with pytest.raises(SecurityError, match=re.escape(f"folder {open_folder} above the keys is writable by group or others")):
        Security(security, "stimulator")
    open_folder.chmod(0o1777)  # sticky, as /tmp: others cannot rename what is not theirs
    assert Security(security, "stimulator").role == "stimulator"


@pytest.mark.timeout(30)
def test_process_refuses_to_start_with_a_key_directory_others_may_write(secured_config, keys_dir, processes) -> None:
    path = secured_config("demo.toml")
    keys_dir.chmod(0o777)
    stimulator = processes.start("stimulator", str(path), name="stimulator")
    assert stimulator.wait(20) == 1
    assert f"key directory {keys_dir} is writable by group or others (mode 0777)" in processes.log("stimulator")


@pytest.mark.parametrize("endpoint", ["tcp://0.0.0.0:5602", "tcp://10.1.2.3:5602", "tcp://*:5602"])
def test_beyond_loopback_needs_keys(endpoint: str) -> None:
    with pytest.raises(EndpointError, match=r"beyond loopback only with CurveZMQ keys \(set \[security\] keys_dir"):
        check_bind_endpoint(endpoint)
    if "*" not in endpoint:
        check_bind_endpoint(endpoint, authenticated=True)


@pytest.mark.parametrize("endpoint", ["tcp://127.0.0.1:5602;10.1.2.3:5602", "tcp://10.1.2.3:5602;127.0.0.1:5602",
                                      "tcp://127.0.0.1;10.1.2.3:5602", "tcp://lo;10.1.2.3:5602"])
def test_libzmq_source_address_syntax_does_not_pass_as_loopback(endpoint: str) -> None:
    """libzmq reads 'tcp://SOURCE;DEST': a loopback source must not let a remote destination through."""
    with pytest.raises(EndpointError, match="expected tcp://HOST:PORT|beyond loopback only with CurveZMQ keys"):
        check_bind_endpoint(endpoint)


ZAP_ENDPOINT = "inproc://zeromq.zap.01"  # where libzmq looks for a context's ZAP handler (RFC 27)


def _unbound(ctx: zmq.Context, endpoint: str) -> bool:
    """Whether nothing is bound to inproc ``endpoint`` (a probe binds, and unbinds at once)."""
    probe = ctx.socket(zmq.REP)
    probe.linger = 0
    try:
        probe.bind(endpoint)
    except zmq.ZMQError:
        return False
    else:
        probe.unbind(endpoint)
        return True
    finally:
        probe.close()


@pytest.mark.timeout(30)
def test_a_curve_server_without_its_zap_handler_admits_no_one(secured_config) -> None:
    """With the ZAP handler gone (stopped, or dead), libzmq completed the CURVE handshake with any key that
    knew the server's public key: strangers' requests reached the stimulator's control socket."""
    config = load_config(secured_config("demo.toml"))
    ctx = zmq.Context()
    security = Security.for_role(config.security, "stimulator")
    assert security is not None
    try:
        security.start(ctx)
        server = ctx.socket(zmq.REP)
        server.linger = 0
        security.secure_server(server, "stimulator test")
        port = server.bind_to_random_port("tcp://127.0.0.1")
        security.stop()
        wait_until(lambda: _unbound(ctx, ZAP_ENDPOINT), 5, what="the ZAP handler's socket closed")
        listed = zmq.auth.load_certificate(Path(config.security.keys_dir) / "operator.key_secret")
        for public, secret in [zmq.curve_keypair() for _ in range(3)] + [listed]:
            client = ctx.socket(zmq.REQ)
            client.linger = 0
            client.curve_publickey, client.curve_secretkey, client.curve_serverkey = public, secret, security.public
            client.connect(f"tcp://127.0.0.1:{port}")
            client.send(b'{"cmd": "status"}')
        assert not server.poll(1000)  # fails closed: nobody is admitted (strangers came in within 1 ms)
    finally:
        ctx.destroy(linger=0)


@pytest.mark.timeout(30)
def test_process_refuses_to_bind_beyond_loopback_without_keys(write_config, processes) -> None:
    path = write_config("demo.toml")
    text = path.read_text()
    path.write_text(text.replace(load_config(path).endpoints.command, "tcp://0.0.0.0:5602"))
    controller = processes.start("controller", str(path), name="controller")
    assert controller.wait(20) == 1
    assert "tcp://0.0.0.0:5602" in processes.log("controller")
    assert "beyond loopback only with CurveZMQ keys" in processes.log("controller")


def _control(
    ctx: zmq.Context, endpoint: str, frames: list[bytes], curve: tuple[bytes, bytes, bytes] | None, timeout_ms: int = 500
) -> bytes | None:
    """One raw REQ attempt (NULL security, or CURVE with (public, secret, server key)); the reply or None."""
    sock = ctx.socket(zmq.REQ)
    sock.linger = 0
    if curve is not None:
        sock.curve_publickey, sock.curve_secretkey, sock.curve_serverkey = curve
    sock.connect(endpoint)
    sock.send_multipart(frames)
    reply = sock.recv() if sock.poll(timeout_ms) else None
    sock.close()
    return reply


def _garbage(endpoint: str) -> None:
    host, port = endpoint.removeprefix("tcp://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=2) as raw:
        raw.sendall(b'\xff\x00\x00\x00\x00\x00\x00\x00\x01\x7f{"cmd": "stop"}' + bytes(range(256)) * 8)
        time.sleep(0.1)


def _malformed_requests(ctx: zmq.Context, config: Config, keys_dir: Path) -> dict[str, bytes | None]:
    """Bad requests from listed keys: the monitor's to the stimulator (JSON nested too deeply to
    parse, and a stop with a second frame), and process keys' (allowed only ``clock``) to the
    controller and the acquisition."""
    nested = [b"[" * 60000]
    attempts = {
        "monitor nested -> stimulator": ("monitor", "stimulator", nested),
        "monitor 2-frame stop -> stimulator": ("monitor", "stimulator", [b'{"cmd": "stop"}', b"x"]),
        "acquisition nested -> controller": ("acquisition", "controller", nested),
        "controller nested -> acquisition": ("controller", "acquisition", nested),
    }
    replies = {}
    for what, (key, server, frames) in attempts.items():
        public, secret = zmq.auth.load_certificate(keys_dir / f"{key}.key_secret")
        server_key = zmq.auth.load_certificate(keys_dir / f"{server}.key")[0]
        endpoint = getattr(config.endpoints, f"{server}_control")
        replies[what] = _control(ctx, endpoint, frames, (public, secret, server_key), timeout_ms=5000)
    return replies


@pytest.mark.timeout(90)
def test_attackers_cannot_change_the_output_and_are_counted(secured_config, keys_dir, processes) -> None:
    path = secured_config("demo.toml", LONG_CONTRACTION)
    config = load_config(path)
    ctx = zmq.Context()
    operator = ControlClient(ctx, config.endpoints.stimulator_control, Security(config.security, "operator"), "stimulator")
    monitor = ControlClient(ctx, config.endpoints.stimulator_control, Security(config.security, "monitor"), "stimulator")
    stim_key = (keys_dir / "stimulator.key").read_text().split('public-key = "')[1][:40].encode()
    try:
        processes.start_loop(path)

        def stimulating() -> dict | None:
            try:
                status = operator.request("status", timeout_s=1.0)
            except ControlTimeout:
                return None
            return status if status["state"] == "ARMED" and max(status["output_ma"]) > 0 else None

        before = wait_until(stimulating, 40, what="secured loop stimulating")
        stim_control = config.endpoints.stimulator_control
        unknown_public, unknown_secret = zmq.curve_keypair()
        for cmd in ("stop", "disarm", "shutdown"):
            request = [b'{"cmd": "%s"}' % cmd.encode()]
            assert _control(ctx, stim_control, request, None) is None  # NULL security: no handshake
            assert _control(ctx, stim_control, request, (unknown_public, unknown_secret, stim_key)) is None
        _garbage(stim_control)
        _garbage(config.endpoints.pulses)
        malformed = _malformed_requests(ctx, config, keys_dir)
        refused = {cmd: monitor.request(cmd, timeout_s=2.0) for cmd in ("arm", "disarm", "reset", "shutdown")}
        after = wait_until(stimulating, 5, what="stimulation still going after the attacks")
        running = [process.poll() is None for process in processes.started]
        security = after["security"]

        stopped = monitor.request("stop", timeout_s=2.0)  # the monitor may stop...
        reset_by_monitor = monitor.request("reset", timeout_s=2.0)  # ...but never reset or arm
        reset_by_operator = operator.request("reset", timeout_s=2.0)
    finally:
        operator.close()
        monitor.close()
        ctx.destroy(linger=0)
    assert after["pulses_delivered"] > before["pulses_delivered"]
    assert all(r is not None and json.loads(r)["error"].startswith("bad request (") for r in malformed.values()), malformed
    assert after["control_rejected"] == 2  # the monitor's two
    assert all(running)
    for cmd, reply in refused.items():
        assert reply == {"ok": False, "error": f"key 'monitor' may not send {cmd!r}"}
    assert security["denied_keys"] >= 3  # one per unknown-key attempt
    assert security["failed_handshakes"] >= 3 + 3 + 1  # NULL, unknown key, garbage on control
    assert security["unauthorized_requests"] == 4
    assert stopped["ok"] and stopped["state"] == "STOPPED" and stopped["output_ma"] == [0.0, 0.0]
    assert not reset_by_monitor["ok"]
    assert reset_by_operator["ok"] and reset_by_operator["state"] == "DISARMED"
    log = processes.log("stimulator")
    assert "DENIED" in log and "unknown CURVE key" in log and "key 'monitor' may not send 'arm'" in log


def _commands(pub: zmq.Socket, seconds: float, clock: LslClock, seq0: int = 0) -> int:
    """Publish valid, open-gate commands at 200 Hz for ``seconds``; the last sequence number."""
    seq = seq0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        seq += 1
        now = clock.now()
        command = protocol.Command(now, np.full(2, 0.5, np.float32), np.ones(2, bool), np.full(2, GateReason.OPEN, np.uint8))
        pub.send_multipart(protocol.encode(seq, now, command))
        time.sleep(0.005)
    return seq


def _impostor(ctx: zmq.Context, endpoint: str, keys: tuple[bytes, bytes] | None) -> zmq.Socket:
    """A PUB bound where the controller should be: NULL security, or CURVE server with ``keys``."""
    pub = ctx.socket(zmq.PUB)
    pub.linger = 0
    if keys is not None:
        pub.curve_publickey, pub.curve_secretkey = keys
        pub.curve_server = True
    pub.bind(endpoint)
    return pub


@pytest.mark.timeout(60)
def test_only_the_controller_key_can_command_the_stimulator(secured_config, keys_dir, processes) -> None:
    """Publishers in the controller's place (another key, or NULL security) are never heard."""
    path = secured_config("demo.toml", {"arm_at_start = true": "arm_at_start = false"})
    config = load_config(path)
    ctx = zmq.Context()
    clock = LslClock()
    operator = ControlClient(ctx, config.endpoints.stimulator_control, Security(config.security, "operator"), "stimulator")
    acquisition = Security(config.security, "acquisition")
    with clock_peer(config.endpoints.acquisition_control, acquisition):  # its clock, for EMG ages
        try:
            processes.start("stimulator", str(path), name="stimulator")
            wait_until(lambda: _status_or_none(operator), 30, what="stimulator ready")
            refused = {}
            for who, keys in (
                ("unknown key", zmq.curve_keypair()),
                ("monitor key", zmq.auth.load_certificate(keys_dir / "monitor.key_secret")),
            ):
                pub = _impostor(ctx, config.endpoints.command, keys)
                _commands(pub, 0.6, clock)
                refused[who] = operator.request("arm", timeout_s=2.0)
                pub.close()
                time.sleep(0.1)
            refused_status = operator.request("status", timeout_s=2.0)

            real = _impostor(ctx, config.endpoints.command, zmq.auth.load_certificate(keys_dir / "controller.key_secret"))
            seq, armed = 0, {}
            for _ in range(25):  # reconnecting after the refused handshakes may take a few hundred ms
                seq = _commands(real, 0.2, clock, seq)
                armed = operator.request("arm", timeout_s=2.0)
                if armed["ok"]:
                    break
            real.close()
            time.sleep(0.3)
            heard_from_controller = operator.request("status", timeout_s=2.0)
            null = _impostor(ctx, config.endpoints.command, None)
            _commands(null, 0.6, clock)
            null.close()
            after_null = operator.request("status", timeout_s=2.0)
        finally:
            operator.close()
            ctx.destroy(linger=0)
    for who, reply in refused.items():
        assert not reply["ok"] and "no fresh command" in reply["error"], who
    assert refused_status["commands_received"] == 0 and refused_status["output_ma"] == [0.0, 0.0]
    assert refused_status["security"]["failed_handshakes"] >= 2
    assert armed["ok"] and armed["state"] == "ARMED", armed
    assert heard_from_controller["state"] == "FAULT"  # the controller went away: deadline
    assert after_null["commands_received"] == heard_from_controller["commands_received"]
    assert after_null["state"] == "FAULT" and after_null["output_ma"] == [0.0, 0.0]
    assert after_null["security"]["failed_handshakes"] > heard_from_controller["security"]["failed_handshakes"]


def _status_or_none(client: ControlClient) -> dict | None:
    try:
        return client.request("status", timeout_s=1.0)
    except ControlTimeout:
        return None


@pytest.mark.timeout(90)
def test_fesloop_run_with_keys_supervises_and_stimulates_using_the_operator_key(secured_config) -> None:
    path = secured_config("demo.toml", LONG_CONTRACTION)
    result = subprocess.run(
        [sys.executable, "-m", "fesloop", "run", str(path), "--duration", "6"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=80,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    row = next(line for line in result.stdout.splitlines() if line.startswith("| quadriceps_l |"))
    pulses = int(row.split("|")[4])
    assert pulses > 20, row  # the first muscle contracts from 0.5 s: stimulated under CurveZMQ
    assert "DENIED" not in result.stdout + result.stderr  # every party used its own listed key
    assert "Faults: none" in result.stdout


@pytest.mark.timeout(90)
def test_calibrate_listens_to_a_secured_acquisition_with_the_operator_key(write_config, keys_dir, processes,
                                                                           tmp_path: Path) -> None:
    """`fesloop calibrate` subscribed without keys: with [security] set it never received EMG (no
    calibration possible on a secured rig, across hosts or not)."""
    from tests.controller.test_calibrate import _calibrate, _write
    from tests.security.conftest import SECURITY_SECTION

    path = _write(write_config, contracting=True)
    path.write_text(path.read_text() + SECURITY_SECTION.format(keys=keys_dir))
    out = tmp_path / "calibration.json"
    result = _calibrate(path, out, processes)
    assert result.returncode == 0, result.stdout + result.stderr + processes.log("acquisition")
    assert json.loads(out.read_text())["muscles"][0]["mvc_uv"] > 100.0
