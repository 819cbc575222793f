"""Telemetry: queued pushes reach a real LSL inlet; counts match what a consumer receives."""

from __future__ import annotations

import dataclasses
import json
import threading
import time

import numpy as np
import pylsl
import pytest

from fesloop.config import load_config
from fesloop.telemetry import Telemetry, stream_name
from tests.conftest import CONFIGS, wait_until

pytestmark = pytest.mark.timeout(60)


class Puller:
    """Pulls one stream continuously in a thread, like a recorder, until the outlet is gone."""

    def __init__(self, name: str) -> None:
        streams = pylsl.resolve_bypred(f"name='{name}'", minimum=1, timeout=10)
        assert streams, f"no stream {name}"
        self.inlet = pylsl.StreamInlet(streams[0], max_buflen=10, recover=False)
        self.inlet.open_stream(timeout=5)
        self.samples: list = []
        self.stamps: list = []
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while True:
                chunk, times = self.inlet.pull_chunk(timeout=0.05)
                self.samples += chunk
                self.stamps += times
        except pylsl.util.LostError:
            pass

    def join(self) -> Puller:
        self._thread.join(10)
        assert not self._thread.is_alive()
        return self


def test_pushes_reach_a_consumer_and_counts_match(tmp_path) -> None:
    config = load_config(CONFIGS / "demo.toml")
    name = f"telemetry{time.monotonic_ns()}"
    config = dataclasses.replace(config, name=name)
    telemetry = Telemetry(config, "controller", {"calibration": "{}"})
    telemetry.add_stream("envelope", "EMGEnvelope", ["a", "b"], 1000.0, unit="microvolts")
    # Pushed before anyone listens: liblsl would discard it, so it is not counted.
    telemetry.push("envelope", np.ones((5, 2)), pylsl.local_clock())
    envelope = Puller(stream_name(name, "envelope"))
    markers = Puller(stream_name(name, "controller-markers"))
    status = Puller(stream_name(name, "controller-status"))
    info = envelope.inlet.info(timeout=5)
    assert json.loads(info.desc().child("fesloop").child_value("config"))["name"] == name
    assert info.desc().child("fesloop").child_value("calibration") == "{}"
    wait_until(lambda: telemetry.has_consumer("envelope"), 5, what="consumer")
    wait_until(lambda: telemetry._outlets["controller-status"].have_consumers(), 5, what="consumer")
    now = pylsl.local_clock()
    for i in range(50):
        telemetry.push("envelope", np.full((10, 2), i, dtype=np.float32), now + i * 0.01)
    telemetry.marker("onset a", now)
    telemetry.close({"time_s": now + 1})
    envelope.join(), markers.join(), status.join()
    assert len(envelope.samples) == 500
    stamps = np.array(envelope.stamps).reshape(50, 10)
    assert np.allclose(np.diff(stamps, axis=1), 1e-3, atol=1e-6)  # each chunk dated back at the nominal rate
    assert np.allclose(stamps[:, -1], now + np.arange(50) * 0.01)
    assert markers.samples == [["onset a"]]
    final = json.loads(status.samples[-1][0])
    assert final["lsl"]["envelope"] == {"pushed": 500, "dropped": 0, "failed": 0}
    assert final["lsl"]["controller-markers"]["pushed"] == 1


def test_an_item_liblsl_refuses_is_counted_and_publishing_goes_on() -> None:
    """A stop reason with a lone surrogate ('x\\ud800', sent by any client allowed to stop) made
    push_sample raise UnicodeEncodeError on the publishing thread: it died, and every later marker,
    status and pulse was missing from the recording."""
    config = load_config(CONFIGS / "demo.toml")
    name = f"telemetry{time.monotonic_ns()}"
    telemetry = Telemetry(dataclasses.replace(config, name=name), "stimulator")
    markers = Puller(stream_name(name, "stimulator-markers"))
    wait_until(lambda: telemetry._outlets["stimulator-markers"].have_consumers(), 5, what="consumer")
    now = pylsl.local_clock()
    telemetry.marker("ARMED -> STOPPED: x\ud800", now)
    telemetry.marker("STOPPED -> DISARMED: reset", now + 0.01)
    telemetry.close({"time_s": now + 1})
    markers.join()
    assert markers.samples == [["STOPPED -> DISARMED: reset"]]
    assert telemetry.counts["stimulator-markers"].failed == 1 and telemetry.counts["stimulator-markers"].pushed == 1


def test_unknown_stream_is_refused() -> None:
    config = load_config(CONFIGS / "demo.toml")
    config = dataclasses.replace(config, acquisition=dataclasses.replace(config.acquisition, lsl=False))
    with pytest.raises(ValueError, match="not one of the acquisition streams"):
        Telemetry(config, "acquisition").add_stream("pulses", "x", ["a"], 0.0)


def test_more_outlets_than_liblsls_default_port_range_are_all_found() -> None:
    """Two sessions' outlets (19 each) on one machine, plus the tests' own: beyond liblsl's default
    32 ports an outlet got a port no machine-scope resolve asks, and a recording refused to start."""
    from fesloop.lsl import make_outlet

    prefix = f"ports{time.monotonic_ns()}"
    outlets = [make_outlet(f"{prefix}-{i}", "Test", ["x"], 10.0, f"{prefix}-{i}") for i in range(40)]
    found = pylsl.resolve_bypred(f"starts-with(name, '{prefix}-')", minimum=len(outlets), timeout=10)
    assert len({info.name() for info in found}) == len(outlets)
    del outlets


def test_summary_is_safe_while_the_loop_adds_streams() -> None:
    """The publishing thread puts summary() into every status sample while the loop may add a stream
    (the controller opens its EMG outlets on the first chunk): iterating the live dict raised
    "dictionary changed size during iteration" and ended the thread, so LSL publishing stopped."""
    import sys

    from fesloop.telemetry import Counts

    config = dataclasses.replace(load_config(CONFIGS / "demo.toml"), name=f"summary{time.monotonic_ns()}")
    telemetry = Telemetry(config, "controller", {"calibration": "{}"})
    errors: list[Exception] = []
    done = threading.Event()

    def read() -> None:
        while not done.is_set():
            try:
                telemetry.summary()
            except RuntimeError as exc:
                errors.append(exc)
                return

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible
    reader = threading.Thread(target=read)
    reader.start()
    try:
        for i in range(20000):
            telemetry.counts[f"added{i}"] = Counts()
            if errors:
                break
    finally:
        done.set()
        reader.join()
        sys.setswitchinterval(interval)
        telemetry.close({"time_s": pylsl.local_clock()})
    assert not errors
