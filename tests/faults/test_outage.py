"""A network outage between two hosts, in real processes: amplifier PC and controller PC, or
controller PC and stimulator PC (the second test, fault matrix row 8 as row 1).

The controller reaches the acquisition's ``emg`` endpoint through a relay that, for 2.5 s,
turns every open connection into a black hole and refuses new ones, then lets new
connections through: the old connection stays half-open, as after a real outage.
Pass criterion: the gates close on stale EMG within stale_ms (plus a control period and
the status interval), the stimulator's output goes to zero, and after the network is back
the controller's link reconnects within link_timeout_ms and EMG flows again; the
reconnection is logged and counted. Without the link timeout the EMG never comes back
(checked by hand with link_timeout_ms = 60000, and in tests/fesloop/test_sockets.py).
"""

from __future__ import annotations

import re
import time

import pytest

from fesloop.config import load_config
from tests.conftest import long_contraction, wait_until
from tests.netfaults import OutageProxy
from tests.streams import Recorder, pulses_array

OUTAGE_S = 2.5


def statuses_of(recorder: Recorder, process: str) -> list[dict]:
    return [m.body.fields for m in recorder.get(b"status") if m.body.fields.get("process") == process]


def stimulating(recorder: Recorder) -> bool:
    """The stimulator's latest status: ARMED with output above 0 mA."""
    stim = statuses_of(recorder, "stimulator")
    return bool(stim) and stim[-1]["state"] == "ARMED" and max(stim[-1]["output_ma"]) > 0


@pytest.mark.timeout(60)
def test_the_loop_stops_during_an_outage_and_the_link_comes_back_after_it(write_config, processes, tmp_path) -> None:
    acq_path = write_config("demo.toml", long_contraction(start_s=0.0), name="acquisition.toml")
    acq = load_config(acq_path)
    upstream_port = int(acq.endpoints.emg.rsplit(":", 1)[1])
    proxy = OutageProxy(upstream_port)
    # The controller and stimulator host: the same config, the acquisition reached through the relay.
    loop_path = tmp_path / "loop.toml"
    loop_path.write_text(re.sub(rf"127\.0\.0\.1:{upstream_port}\b", f"127.0.0.1:{proxy.port}", acq_path.read_text()))
    config = load_config(loop_path)
    recorder = Recorder({config.endpoints.command: [b"status"], config.endpoints.pulses: [b"status", b"pulses"]})
    try:
        processes.start("stimulator", str(loop_path), name="stimulator")
        processes.start("controller", str(loop_path), name="controller")
        processes.start("acquisition", str(acq_path), name="acquisition")
        wait_until(lambda: stimulating(recorder), 30, what="stimulation on the contraction")
        cut_s = time.monotonic()
        proxy.cut()
        time.sleep(OUTAGE_S)
        healed_s = time.monotonic()
        proxy.heal()
        wait_until(lambda: any(s["time_s"] > healed_s and s["gate"][0] == "OPEN"
                               for s in statuses_of(recorder, "controller")),
                   10, what="the gates open again after the outage")
        statuses = statuses_of(recorder, "controller")
        stim_statuses = statuses_of(recorder, "stimulator")
    finally:
        recorder.close()
        proxy.close()

    stale_ms = config.controller.stale_ms
    closed = [s for s in statuses if cut_s < s["time_s"] < healed_s and s["gate"][0] == "STALE_EMG"]
    assert closed and closed[0]["time_s"] - cut_s <= (stale_ms + 5.0 + 200.0 + 50.0) * 1e-3  # + tick + 5 Hz status
    assert all(s["gate"][0] != "OPEN" for s in statuses if closed[0]["time_s"] <= s["time_s"] < healed_s)
    zeroed = [s for s in stim_statuses if cut_s + 0.5 < s["time_s"] < healed_s]
    assert zeroed and all(s["output_ma"] == [0.0, 0.0] for s in zeroed)
    _, pulse_s, amplitude_ma = pulses_array(recorder.get(b"pulses"))
    last_s = pulse_s[(amplitude_ma > 0) & (pulse_s > cut_s) & (pulse_s < healed_s)]
    stopped_ms = (last_s.max() - cut_s) * 1e3 if len(last_s) else 0.0
    assert stopped_ms <= 250.0  # fault matrix: output 0 within 250 ms
    reopened = next(s for s in statuses if s["time_s"] > healed_s and s["gate"][0] == "OPEN")
    print(f"last pulse {stopped_ms:.0f} ms and gates closed (5 Hz status) {(closed[0]['time_s'] - cut_s) * 1e3:.0f} ms "
          "after the cut; "
          f"open again {reopened['time_s'] - healed_s:.2f} s after the network came back")
    assert reopened["time_s"] - healed_s <= config.endpoints.link_timeout_ms * 1e-3 + 1.0
    assert reopened["links"]["acquisition"]["relinks"] >= 1
    assert "nothing from acquisition" in processes.log("controller")


@pytest.mark.timeout(60)
def test_an_outage_between_controller_and_stimulator_latches_fault_and_nothing_restarts(
    write_config, processes, tmp_path
) -> None:
    """Row 8, the command link: the stimulator's host loses the controller's host. Same as a
    killed controller (row 1): output 0 within 250 ms, FAULT; after the network is back the
    command link reconnects (commands arrive again) and the stimulator stays in FAULT at 0 mA."""
    loop_path = write_config("demo.toml", long_contraction(start_s=0.0), name="loop.toml")
    loop = load_config(loop_path)
    upstream_port = int(loop.endpoints.command.rsplit(":", 1)[1])
    proxy = OutageProxy(upstream_port)
    stim_path = tmp_path / "stimulator.toml"
    stim_path.write_text(re.sub(rf"127\.0\.0\.1:{upstream_port}\b", f"127.0.0.1:{proxy.port}", loop_path.read_text()))
    recorder = Recorder({loop.endpoints.pulses: [b"status", b"pulses"]})

    try:
        processes.start("stimulator", str(stim_path), name="stimulator")
        processes.start("controller", str(loop_path), name="controller")
        processes.start("acquisition", str(loop_path), name="acquisition")
        wait_until(lambda: stimulating(recorder), 30, what="stimulation on the contraction")
        cut_s = time.monotonic()
        proxy.cut()
        time.sleep(OUTAGE_S)
        healed_s = time.monotonic()
        received = statuses_of(recorder, "stimulator")[-1]["commands_received"]
        proxy.heal()
        wait_until(lambda: statuses_of(recorder, "stimulator")[-1]["commands_received"] > received + 100, 10,
                   what="commands again after the outage")
        time.sleep(0.5)
        statuses = statuses_of(recorder, "stimulator")
    finally:
        recorder.close()
        proxy.close()

    _, pulse_s, amplitude_ma = pulses_array(recorder.get(b"pulses"))
    late = pulse_s[(amplitude_ma > 0) & (pulse_s > cut_s)]
    stopped_ms = (late.max() - cut_s) * 1e3 if len(late) else 0.0
    faulted = next(s for s in statuses if s["time_s"] > cut_s and s["state"] == "FAULT")
    back = next(s for s in statuses if s["time_s"] > healed_s and s["commands_received"] > received)
    print(f"last pulse {stopped_ms:.0f} ms after the cut; commands again {back['time_s'] - healed_s:.2f} s after healing")
    assert stopped_ms <= 250.0  # fault matrix: output 0 within 250 ms
    assert "no fresh command" in faulted["fault_reason"]
    assert back["time_s"] - healed_s <= loop.endpoints.link_timeout_ms * 1e-3 + 1.0
    assert statuses[-1]["links"]["controller"]["relinks"] >= 1
    after = [s for s in statuses if s["time_s"] > faulted["time_s"]]
    assert after and all(s["state"] == "FAULT" and s["output_ma"] == [0.0, 0.0] for s in after)
