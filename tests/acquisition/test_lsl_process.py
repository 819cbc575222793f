"""The acquisition process with an LSL inlet source, fed by a real outlet on loopback."""

from __future__ import annotations

import time
import uuid

import numpy as np
import pylsl
import pytest

from fesloop.config import load_config
from fesloop.lsl import configure_machine_scope
from tests.conftest import wait_until
from tests.streams import Recorder

FS_HZ = 1000.0


@pytest.mark.timeout(60)
def test_lsl_amplifier_samples_reach_the_emg_topic_in_order_and_scaled(write_config, processes) -> None:
    source_id = f"test-amp-{uuid.uuid4().hex[:8]}"
    path = write_config(
        "demo.toml",
        {
            'source = "simulated"': 'source = "lsl"',
            "[acquisition.simulated]": f'[acquisition.lsl_inlet]\nsource_id = "{source_id}"\nscale_uv = 2.0\n\n'
            "[acquisition.simulated]",
        },
    )
    config = load_config(path)
    configure_machine_scope()
    outlet = pylsl.StreamOutlet(pylsl.StreamInfo("test-amp", "EMG", 2, FS_HZ, pylsl.cf_float32, source_id))
    recorder = Recorder({config.endpoints.emg: [b"emg"]})
    try:
        processes.start("acquisition", str(path), name="acquisition")
        wait_until(lambda: outlet.have_consumers(), 20, what="the acquisition inlet")
        t0_s = pylsl.local_clock()
        n = 1500
        values = np.repeat(np.arange(n, dtype=np.float32)[:, None], 2, axis=1)
        for start in range(0, n, 50):  # 50 ms chunks at 1 kHz, in real time
            stop = start + 50
            outlet.push_chunk(values[start:stop], (t0_s + np.arange(start, stop) / FS_HZ).tolist())
            time.sleep(0.05)

        def received() -> int:
            return sum(len(m.body.data) for m in recorder.get(b"emg"))

        wait_until(lambda: received() >= n, 20, what="every sample on the emg topic")
        chunks = recorder.get(b"emg")
    finally:
        recorder.close()
    data = np.vstack([m.body.data for m in chunks])
    first = [m.body.first_sample_index for m in chunks]
    assert np.array_equal(data[:, 0], 2.0 * np.arange(n))  # every sample, in order, in uV (scale 2)
    assert np.array_equal(np.diff(first), [len(m.body.data) for m in chunks[:-1]])  # no gap claimed
    assert all(m.body.sampling_rate_hz == FS_HZ for m in chunks)
