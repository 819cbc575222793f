"""The ``fesloop`` command: run the loop, run one process, talk to a running one."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fesloop.arguments import require_number
from fesloop.config import DEFAULT_CONFIG, Config, load_config
from fesloop.lsl import configure_machine_scope
from fesloop.session import CONFIRMATION_ITEMS, ConfirmationMissing, confirm
from fesloop.schema import ConfigError

PROCESSES = ("acquisition", "controller", "stimulator")
CONTROL_COMMANDS = ("status", "arm", "disarm", "stop", "reset", "shutdown", "override_dose")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fesloop", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="start all three processes with a live status line")
    run.add_argument("config", nargs="?", type=Path, default=DEFAULT_CONFIG, help="TOML config (default: the demo)")
    run.add_argument("--duration", type=float, default=None, metavar="S", help="stop after S seconds")
    run.add_argument("--record", type=Path, default=None, metavar="FILE.xdf", help="record every stream to XDF")
    run.add_argument("--operator", default=None, help="operator's name or initials (real stimulator)")
    run.add_argument(
        "--confirm", action="append", default=[], metavar="ITEM",
        help="confirm one pre-session item for a real stimulator, once per item: " + ", ".join(CONFIRMATION_ITEMS),
    )  # fmt: skip
    record = sub.add_parser("record", help="record a running session's LSL streams to XDF (Ctrl+C to stop)")
    record.add_argument("file", type=Path, metavar="FILE.xdf")
    record.add_argument("config", nargs="?", type=Path, default=DEFAULT_CONFIG, help="TOML config (default: the demo)")
    record.add_argument("--duration", type=float, default=None, metavar="S", help="stop after S seconds")
    report = sub.add_parser("report", help="figures (PNG) and a Markdown summary of an XDF recording")
    report.add_argument("file", type=Path, metavar="FILE.xdf")
    report.add_argument("--out", type=Path, default=None, metavar="DIR", help="default: FILE without .xdf")
    for name in PROCESSES:
        one = sub.add_parser(name, help=f"run the {name} process alone")
        one.add_argument("config", type=Path)
    control = sub.add_parser("control", help="send a control request to a running process")
    control.add_argument("config", type=Path)
    control.add_argument("process", choices=PROCESSES)
    control.add_argument("request", choices=CONTROL_COMMANDS)
    override = control.add_argument_group("override_dose (stimulator): all three are required and logged")
    override.add_argument("--channel", help="stimulation channel whose reached dose limit to lift")
    override.add_argument("--operator", help="who decides (name or initials); also who confirms an arm")
    override.add_argument("--reason", help="why, in words that will be on record")
    control.add_argument(
        "--confirm", action="append", default=[], metavar="ITEM",
        help="arm (a real stimulator): confirm one pre-session item, once per item: " + ", ".join(CONFIRMATION_ITEMS),
    )  # fmt: skip
    from fesloop import calibrate_cli, replay_cli

    replay = sub.add_parser("replay", help="run a recording through the controller's estimator offline")
    replay.add_argument("config", type=Path)
    replay_cli.add_arguments(replay)
    calibrate = sub.add_parser("calibrate", help="guided rest and MVC trials; writes the calibration file")
    calibrate.add_argument("config", type=Path)
    calibrate_cli.add_arguments(calibrate)
    from acquisition import convert

    convert.add_arguments(sub.add_parser("convert", help="a recording (CSV/TXT/.npy/.mat) to a BrainFlow playback file"))
    from stimulator import rehastim2_emulator

    rehastim2_emulator.add_arguments(sub.add_parser("emulate", help="a stimulator emulator on a pseudo-terminal"))
    keys = sub.add_parser("keys", help="CurveZMQ key pairs for [security]")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    generate = keys_sub.add_parser("generate", help="a key pair per process and per client (secret files mode 0600)")
    generate.add_argument("directory", type=Path)
    generate.add_argument(
        "--names", nargs="+", default=None, help="key names (default: the three processes, operator, monitor)"
    )
    control.add_argument("--key", default=None, help="client key to send with (default: [security] operator_key)")
    return parser


def _load(path: Path) -> Config:
    try:
        return load_config(path)
    except FileNotFoundError:
        sys.exit(f"fesloop: config file not found: {path}")
    except ConfigError as exc:
        sys.exit(f"fesloop: {path}: {exc}")


def main(argv: list[str] | None = None) -> int:
    configure_machine_scope()
    args = _parser().parse_args(argv)
    if args.command == "convert":
        from acquisition.convert import main as run_convert

        return run_convert(args)
    if args.command == "emulate":
        from stimulator.rehastim2_emulator import main as run_emulator

        return run_emulator(args)
    if args.command == "keys":
        return _generate_keys(args.directory, args.names)
    if args.command == "report":
        from fesloop.report import main as run_report

        return run_report(args.file, args.out)
    config = _load(args.config)
    if args.command == "run":
        from fesloop.supervisor import Supervisor

        if args.duration is not None:
            require_number("run", "--duration", args.duration, 0.0)
        from fesloop.security import SecurityError

        confirmation = None
        if config.stimulator.driver != "simulated":
            try:
                confirmation = confirm(args.operator, args.confirm, interactive=sys.stdin.isatty())
            except ConfirmationMissing as exc:
                sys.exit(f"fesloop run: {exc}")
        try:
            return Supervisor(config, args.config, record=args.record, confirmation=confirmation).run(args.duration)
        except SecurityError as exc:
            sys.exit(f"fesloop run: {exc}")
    if args.command == "control":
        import zmq

        from fesloop.sockets import ControlClient, ControlTimeout

        from fesloop.security import Security, SecurityError

        try:
            security = Security.for_role(config.security, args.key or config.security.operator_key)
        except SecurityError as exc:
            sys.exit(f"fesloop: {exc}")
        endpoint = getattr(config.endpoints, f"{args.process}_control")
        client = ControlClient(zmq.Context.instance(), endpoint, security, server=args.process)
        try:
            extra = {k: v for k in ("channel", "operator", "reason") if (v := getattr(args, k)) is not None}
            if args.request == "arm" and args.process == "stimulator" and config.stimulator.driver != "simulated":
                try:  # as `fesloop run` does: from the flags, or asked at a terminal
                    extra = {"confirmation": confirm(args.operator, args.confirm, sys.stdin.isatty()).as_dict()}
                except ConfirmationMissing as exc:
                    sys.exit(f"fesloop control: {exc}")
            reply = client.request(args.request, timeout_s=2.0, **extra)
        except ControlTimeout as exc:
            sys.exit(f"fesloop: {exc}")
        finally:
            client.close()
        print(json.dumps(reply, indent=2))
        return 0 if reply.get("ok") else 1
    if args.command == "record":
        from fesloop.record import main as run_record

        if args.duration is not None:
            require_number("record", "--duration", args.duration, 0.0)
        return run_record(args.file, config, args.duration)
    if args.command == "replay":
        from fesloop.replay_cli import main as run_replay

        return run_replay(config, args)
    if args.command == "calibrate":
        from fesloop.calibrate_cli import main as run_calibrate

        return run_calibrate(config, args)
    if args.command == "acquisition":
        from acquisition.loop import main as run_process
    elif args.command == "controller":
        from controller.loop import main as run_process
    else:
        from stimulator.loop import main as run_process
    import zmq

    from fesloop.security import SecurityError
    from fesloop.sockets import EndpointError

    try:
        return run_process(config)
    except (EndpointError, SecurityError, zmq.ZMQError) as exc:
        sys.exit(f"fesloop {args.command}: {exc}")


def _generate_keys(directory: Path, names: list[str] | None) -> int:
    from fesloop.security import SecurityError, generate_keys

    try:
        paths = generate_keys(directory, tuple(names)) if names else generate_keys(directory)
    except (SecurityError, OSError) as exc:
        sys.exit(f"fesloop keys: {exc}")
    print("\n".join(str(p) for p in paths))
    return 0
