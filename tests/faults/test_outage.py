"""A network outage between two hosts, in real processes: amplifier PC and controller PC, or
controller PC and stimulator PC (the second test, fault matrix row 8 as row 1; the third, only
the stimulator's reports back to the controller lost).

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
from pathlib import Path

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


def relayed(write_config, tmp_path: Path, endpoint: str) -> tuple[Path, Path, OutageProxy]:
    """The demo loop on a long contraction, and a copy of its config that reaches ``endpoint``
    (an ``[endpoints]`` key) through an OutageProxy: the host on the other side of the network."""
    loop_path = write_config("demo.toml", long_contraction(start_s=0.0), name="loop.toml")
    upstream_port = int(getattr(load_config(loop_path).endpoints, endpoint).rsplit(":", 1)[1])
    proxy = OutageProxy(upstream_port)
    relayed_path = tmp_path / "relayed.toml"
    relayed_path.write_text(re.sub(rf"127\.0\.0\.1:{upstream_port}\b", f"127.0.0.1:{proxy.port}", loop_path.read_text()))
    return loop_path, relayed_path, proxy


def outage_and_recovery(processes, proxy: OutageProxy, loop_path: Path, paths: dict[str, Path]) -> tuple[float, float, Recorder]:
    """The loop started (each process on its config in ``paths``, the rest on ``loop_path``), the relay cut
    for OUTAGE_S once it stimulates, healed, and the gates open again: (cut_s, healed_s, what was recorded)."""
    loop = load_config(loop_path)
    recorder = Recorder({loop.endpoints.command: [b"status"], loop.endpoints.pulses: [b"status", b"pulses"]})
    try:
        for process in ("stimulator", "controller", "acquisition"):
            processes.start(process, str(paths.get(process, loop_path)), name=process)
        wait_until(lambda: stimulating(recorder), 30, what="stimulation on the contraction")
        cut_s = time.monotonic()
        proxy.cut()
        time.sleep(OUTAGE_S)
        healed_s = time.monotonic()
        proxy.heal()
        wait_until(lambda: any(s["time_s"] > healed_s and s["gate"][0] == "OPEN" for s in statuses_of(recorder, "controller")),
                   10, what="the gates open again after the outage")
    finally:
        recorder.close()
        proxy.close()
    return cut_s, healed_s, recorder


@pytest.mark.timeout(60)
def test_the_loop_stops_during_an_outage_and_the_link_comes_back_after_it(write_config, processes, tmp_path) -> None:
    # The controller and stimulator host: the same config, the acquisition reached through the relay.
    acq_path, loop_path, proxy = relayed(write_config, tmp_path, "emg")
    config = load_config(loop_path)
    cut_s, healed_s, recorder = outage_and_recovery(processes, proxy, loop_path, {"acquisition": acq_path})
    statuses, stim_statuses = statuses_of(recorder, "controller"), statuses_of(recorder, "stimulator")

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
    loop_path, stim_path, proxy = relayed(write_config, tmp_path, "command")
    loop = load_config(loop_path)
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


@pytest.mark.timeout(60)
def test_an_outage_of_the_stimulators_reports_to_the_controller_closes_the_gates(write_config, processes, tmp_path) -> None:
    """The link back from the stimulator to the controller alone: commands still reach the stimulator,
    but its pulse reports no longer reach the controller, which cannot blank their artifacts. The gates
    close (NO_PULSE_REPORTS) STIMULATOR_SILENCE_S after the stimulator was last heard, the stimulation
    stops, and after the network is back the link reconnects and the gates open again. Before, the
    loop stimulated on through the outage, its artifacts read as activation."""
    from controller.loop import STIMULATOR_SILENCE_S

    loop_path, controller_path, proxy = relayed(write_config, tmp_path, "pulses")
    loop = load_config(loop_path)
    cut_s, healed_s, recorder = outage_and_recovery(processes, proxy, loop_path, {"controller": controller_path})
    statuses, stim_statuses = statuses_of(recorder, "controller"), statuses_of(recorder, "stimulator")

    closed = [s for s in statuses if cut_s < s["time_s"] < healed_s and s["gate"][0] == "NO_PULSE_REPORTS"]
    assert closed and closed[0]["time_s"] - cut_s <= STIMULATOR_SILENCE_S + (5.0 + 200.0 + 50.0) * 1e-3
    assert all(s["gate"] == ["NO_PULSE_REPORTS"] * 2 for s in statuses if closed[0]["time_s"] <= s["time_s"] < healed_s)
    zeroed = [s for s in stim_statuses if closed[0]["time_s"] + 0.1 < s["time_s"] < healed_s]
    assert zeroed and all(s["state"] == "ARMED" and s["output_ma"] == [0.0, 0.0] for s in zeroed)
    _, pulse_s, amplitude_ma = pulses_array(recorder.get(b"pulses"))
    late = pulse_s[(amplitude_ma > 0) & (pulse_s > cut_s) & (pulse_s < healed_s)]
    assert len(late) and late.max() - cut_s <= STIMULATOR_SILENCE_S + 0.25  # then output 0 within 250 ms
    reopened = next(s for s in statuses if s["time_s"] > healed_s and s["gate"][0] == "OPEN")
    print(f"gates closed {(closed[0]['time_s'] - cut_s) * 1e3:.0f} ms, last pulse {(late.max() - cut_s) * 1e3:.0f} ms "
          f"after the cut; open again {reopened['time_s'] - healed_s:.2f} s after the network came back")
    assert reopened["time_s"] - healed_s <= loop.endpoints.link_timeout_ms * 1e-3 + 1.0
    assert reopened["links"]["stimulator"]["relinks"] >= 1
