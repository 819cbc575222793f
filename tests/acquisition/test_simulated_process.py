"""The acquisition process on the simulated patient: pulses in, artifacts out, faults on schedule.

The test publishes pulses on the pulses endpoint like the stimulator does and
compares the process's emg topic sample by sample with the same seeded patient
rendered here: equal to the last bit, artifacts exactly at the pulse samples, and
the configured faults exactly where the schedule puts them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pylsl
import pytest
import zmq

from acquisition.patient import SimulatedPatient
from fesloop import protocol
from fesloop.config import load_config
from fesloop.sockets import publisher
from tests.acquisition.conftest import ENDPOINTS, Tap, emg_series
from tests.conftest import clock_peer, config_with_fresh_ports, wait_until

FS_HZ = 2000.0
CONFIG = f"""
name = "simtest"
{ENDPOINTS}
[acquisition]
source = "simulated"
[acquisition.simulated]
sampling_rate_hz = {FS_HZ}
seed = 11
dc_offset_uv = 25.0
rail_uv = 5000.0
schedule_period_s = 60.0
contractions = [{{ muscle = "quad", start_s = 0.5, duration_s = 1.0, level = 0.5 }}]
faults = [
  {{ kind = "flat", muscle = "tib", start_s = 1.0, duration_s = 0.2 }},
  {{ kind = "railed", muscle = "quad", start_s = 1.3, duration_s = 0.1 }},
  {{ kind = "motion", muscle = "quad", start_s = 1.5, duration_s = 0.1, amplitude_uv = 3000.0 }},
  {{ kind = "drop", start_s = 1.8, duration_s = 0.05 }},
]
[[muscles]]
name = "quad"
emg_channel = 0
rest_uv = 3.0
mvc_uv = 240.0
[[muscles]]
name = "tib"
emg_channel = 1
rest_uv = 3.0
mvc_uv = 240.0
[[stimulation]]
name = "quad"
muscle = "quad"
device_channel = 0
electrode_area_cm2 = 25.0
threshold_ma = 12.0
max_ma = 40.0
pulse_width_us = 300.0
frequency_hz = 30.0
[[stimulation]]
name = "tib"
muscle = "tib"
device_channel = 1
electrode_area_cm2 = 16.0
threshold_ma = 10.0
max_ma = 30.0
pulse_width_us = 250.0
frequency_hz = 30.0
"""


@pytest.mark.timeout(90)
def test_pulses_and_faults_reach_the_emg_topic_exactly(processes, tmp_path: Path) -> None:
    path = tmp_path / "sim.toml"
    path.write_text(config_with_fresh_ports(CONFIG))
    config = load_config(path)
    ctx = zmq.Context()
    pulses_pub = publisher(ctx, config.endpoints.pulses)
    tap = Tap(config.endpoints.emg, [b"emg", b"status"])
    with clock_peer(config.endpoints.stimulator_control):  # the stimulator host's clock
        try:
            processes.start("acquisition", str(path), name="acquisition")
            first = wait_until(lambda: tap.get(b"emg"), 20, what="first emg chunk")[0].body
            start_s = first.first_sample_time_s - first.first_sample_index / FS_HZ
            wait_until(lambda: pylsl.local_clock() > start_s + 0.3, 5, what="subscriptions settled")
            wait_until(
                lambda: any(s.get("peer_clocks", {}).get("stimulator", {}).get("synchronized") for s in tap.statuses()),
                5,
                what="the stimulator's clock known",
            )
            # Five pulses in the future, a quarter sample past a sample, alternating channels.
            pulse_s = start_s + 0.45 + np.arange(5) * 0.05 + 0.25 / FS_HZ
            channel = np.array([0, 1, 0, 1, 0], dtype=np.uint16)
            amplitude_ma = np.array([20.0, 30.0, 35.0, 25.0, 40.0], dtype=np.float32)
            width_us = np.full(5, 300.0, dtype=np.float32)
            pulses = protocol.Pulses(channel, pulse_s, amplitude_ma, width_us)
            pulses_pub.send_multipart(protocol.encode(1, pylsl.local_clock(), pulses))
            wait_until(lambda: any(s.get("samples_sent", 0) > 2.1 * FS_HZ for s in tap.statuses()), 15,
                       what="2.1 s of samples")
            status = tap.statuses()[-1]
            index, emg_uv = emg_series(tap.get(b"emg"))
        finally:
            tap.close()
            ctx.destroy(linger=0)

    n = int(index[-1]) + 1
    sim = config.acquisition.simulated
    ch_map = {0: 0, 1: 1}

    def reference(with_pulses: bool) -> np.ndarray:
        patient = SimulatedPatient(sim, ["quad", "tib"], ch_map, start_s)
        if with_pulses:
            patient.add_pulses(channel, pulse_s, amplitude_ma, width_us)
        out = np.empty((n, 2), dtype=np.float32)
        patient.render(0, out)
        return out

    expected, quiet = reference(True), reference(False)
    assert status["pulses_received"] == 1
    # Dropped: 1.8-1.85 s never delivered, counted once, the index jumps over it.
    drop = np.arange(int(1.8 * FS_HZ), int(1.85 * FS_HZ))
    assert not np.isin(drop, index).any()
    assert status["lost_samples"] == drop.size and status["gaps"] == 1
    assert status["recent_gaps"][0]["first_missing_index"] == drop[0]
    # Everything else equals the same seeded patient, except where a fault acts.
    got = expected[index].copy()
    flat = (index >= 1.0 * FS_HZ) & (index < 1.2 * FS_HZ)
    railed = (index >= 1.3 * FS_HZ) & (index < 1.4 * FS_HZ)
    motion = (index >= 1.5 * FS_HZ) & (index < 1.6 * FS_HZ)
    got[flat, 1] = 25.0
    got[railed, 0] = 5000.0
    got[motion, 0] += (3000.0 * np.sin(np.pi * (index[motion] - 1.5 * FS_HZ) / (0.1 * FS_HZ))).astype(np.float32)
    assert np.array_equal(emg_uv, got)
    # The artifacts start exactly at the first sample after each pulse, nothing before it.
    for t_s, ch, ma in zip(pulse_s, channel, amplitude_ma):
        at = int(np.ceil((t_s - start_s) * FS_HZ))
        delta = expected[:, ch] - quiet[:, ch]
        assert delta[at] == pytest.approx(sim.artifact_uv_per_ma * ma, rel=1e-5)  # the artifact's peak sample
        assert np.all(delta[at - 10 : at] == 0.0)
