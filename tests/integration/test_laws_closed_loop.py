"""Each control-law config in real processes on the simulated patient (and ergometer).

Behaviour is asserted from what the processes publish: pulses, the patient's ground
truth, and the controller's status (law events, crank angle and cadence).
"""

from __future__ import annotations

import numpy as np
import pylsl
import pytest

from acquisition.patient import recruitment
from controller.laws.cycling import DEG_PER_S_PER_RPM, window_profile
from fesloop.config import load_config
from fesloop.lsl import configure_machine_scope
from stimulator.limits import DEVICES
from stimulator.mapping import intensity_to_ma
from tests.conftest import wait_until
from tests.integration.test_loop import truth_series
from tests.streams import Recorder, pulses_array

pytestmark = pytest.mark.timeout(90)

# These tests are about the laws, not the deadline (tested in test_loop/faults): a longer one keeps
# a process descheduled on a loaded CI machine from latching FAULT mid-run.
TOLERANT_DEADLINE = {"deadline_ms = 100.0": "deadline_ms = 300.0"}


def statuses(recorder: Recorder, process: str = "controller") -> list[dict]:
    return [m.body.fields for m in recorder.get(b"status") if m.body.fields.get("process") == process]


def armed_until_s(recorder: Recorder) -> float:
    """When the stimulator left ARMED (a FAULT from an overloaded machine), inf while it has not."""
    armed = False
    for status in statuses(recorder, "stimulator"):
        armed = armed or status["state"] == "ARMED"
        if armed and status["state"] != "ARMED":
            return status["time_s"]
    return np.inf


def law_events(recorder: Recorder, kind: str) -> np.ndarray:
    """Times of every distinct law event of ``kind`` in the controller's status messages."""
    seen = {(e["time_s"], e["channel"], e["kind"]) for s in statuses(recorder) for e in s.get("law_events", [])}
    return np.array(sorted(t for t, _, k in seen if k == kind))


def test_triggered_trains_follow_the_scripted_attempts(write_config, processes) -> None:
    path = write_config("triggered.toml", TOLERANT_DEADLINE)
    config = load_config(path)
    recorder = Recorder({config.endpoints.pulses: [b"pulses", b"status"], config.endpoints.emg: [b"truth"],
                         config.endpoints.command: [b"status"]})
    configure_machine_scope()
    markers: list[tuple[str, float]] = []
    try:
        processes.start_loop(path)
        name = f"{config.name}-controller-markers"
        found = pylsl.resolve_bypred(f"type='Markers' and name='{name}'", 1, 20)
        assert found, f"no stream {name}"
        inlet = pylsl.StreamInlet(found[0])
        inlet.open_stream(timeout=5)

        def trains_marked() -> bool:
            samples, stamps = inlet.pull_chunk(timeout=0.0)
            markers.extend((sample[0], stamp) for sample, stamp in zip(samples, stamps))
            return sum(text.startswith("train_end") for text, _ in markers) >= 2

        wait_until(trains_marked, 40, what="two complete trains marked on LSL")
        wait_until(lambda: len(law_events(recorder, "train_end")) >= 2, 5, what="two trains in the status")
        inlet.close_stream()
    finally:
        recorder.close()
    # Law events reach the LSL markers stream once each, named with their channel, at their own time
    # (the inlet may have joined after the first ones).
    channel = config.stimulation[0].name
    for kind in ("trigger", "train_start", "train_end"):
        marked = np.array([t for text, t in markers if text == f"{kind} {channel}"])
        in_status = law_events(recorder, kind)
        assert len(marked) >= 1 and len(np.unique(marked)) == len(marked), (kind, marked)
        assert all(np.isclose(in_status, t, atol=1e-6).any() for t in marked), (kind, marked, in_status)
    assert armed_until_s(recorder) > law_events(recorder, "train_end")[1], statuses(recorder, "stimulator")[-1]
    truth_t, drive = truth_series(recorder.get(b"truth"))
    onsets = truth_t[1:][(drive[1:, 0] > 0) & (drive[:-1, 0] == 0)]
    triggers, starts, ends = (law_events(recorder, k) for k in ("trigger", "train_start", "train_end"))
    first_status_s = statuses(recorder)[0]["time_s"]
    attempts = onsets[(onsets > first_status_s) & (onsets < triggers[-1])]
    # One train per attempt, triggered by it: activation crosses 0.2 within the envelope's lag of the onset.
    assert len(attempts) == len(triggers) >= 2, (onsets, triggers)
    assert np.all((triggers - attempts > 0.0) & (triggers - attempts < 0.3)), triggers - attempts
    assert np.allclose(starts - triggers, 0.1, atol=0.02)  # min_duration_s
    law = config.stimulation[0].law
    train_s = law.ramp_up_s + law.plateau_s + law.ramp_down_s
    assert np.allclose(ends[: len(starts)] - starts[: len(ends)], train_s, atol=0.02)
    # Pulses only during trains, a plateau at intensity 0.8 (10 + 0.8 * 20 mA), none during rest.
    channels, times, amplitudes = pulses_array(recorder.get(b"pulses"))
    in_train = np.zeros(len(times), dtype=bool)
    for start, end in zip(starts, ends):
        mine = (times >= start) & (times <= end + 0.05)
        in_train |= mine
        plateau = mine & (times > start + law.ramp_up_s + 0.1) & (times < start + law.ramp_up_s + law.plateau_s)
        # (a command delayed on a loaded machine can zero a few pulses, then the stimulator ramps back)
        assert plateau.sum() >= 50 and np.mean(np.abs(amplitudes[plateau] - 26.0) <= 0.5) >= 0.8
    assert np.all(amplitudes[~in_train] == 0), times[~in_train & (amplitudes > 0)]


def test_tracking_holds_the_evoked_activation_on_target_as_the_muscle_fatigues(write_config, processes) -> None:
    path = write_config("tracking.toml", TOLERANT_DEADLINE)
    config = load_config(path)
    recorder = Recorder({config.endpoints.pulses: [b"status"], config.endpoints.command: [b"status"]})
    try:
        processes.start_loop(path)

        def tracked_for_s() -> float:
            end_s = armed_until_s(recorder)
            times = [s["time_s"] for s in statuses(recorder) if s["intensity"][0] > 0 and s["time_s"] < end_s]
            return times[-1] - times[0] if times else 0.0

        wait_until(lambda: tracked_for_s() > 10.0, 40, what="10 s of tracking")
    finally:
        recorder.close()
    end_s = armed_until_s(recorder)
    rows = [(s["time_s"], s["activation"]["quadriceps_l"], s["intensity"][0]) for s in statuses(recorder) if s["time_s"] < end_s]
    t, activation, intensity = np.array(rows).T
    t -= t[intensity > 0][0]
    late, early = (t > 5.0), (t > 3.0) & (t < 5.0)
    print(f"activation late {activation[late].mean():.3f} +- {activation[late].std():.3f}; "
          f"intensity early {intensity[early].mean():.3f} late {intensity[t > t[-1] - 2].mean():.3f}")
    assert activation[late].mean() == pytest.approx(0.3, abs=0.05)
    assert np.percentile(np.abs(activation[late] - 0.3), 90) < 0.1
    assert intensity[t > t[-1] - 2].mean() > intensity[early].mean() + 0.03  # fatigue: more stimulation for the same response


def test_tracking_mwave_raises_the_amplitude_to_hold_the_fatiguing_m_wave_on_target(write_config, processes) -> None:
    path = write_config("tracking_mwave.toml", TOLERANT_DEADLINE)
    config = load_config(path)
    muscle, stim, patient = config.muscles[0].name, config.stimulation[0], config.acquisition.simulated
    recorder = Recorder({config.endpoints.pulses: [b"pulses", b"status"], config.endpoints.command: [b"status"]})

    def mwave_rows() -> list[tuple[float, float, float]]:
        """(time, normalized M-wave, reference uV) from the controller's status while armed."""
        end_s = armed_until_s(recorder)
        return [
            (s["time_s"], m["normalized"], m["reference_uv"])
            for s in statuses(recorder)
            if (m := s.get("mwave", {}).get(muscle)) and m["normalized"] is not None and s["time_s"] < end_s
        ]

    configure_machine_scope()
    lsl_mwaves: list[tuple[float, float]] = []
    try:
        processes.start_loop(path)
        found = pylsl.resolve_bypred(f"type='MWave' and name='{config.name}-mwave'", 1, 20)
        assert found, "no MWave stream"
        inlet = pylsl.StreamInlet(found[0])
        inlet.open_stream(timeout=5)

        def tracked_for_15_s() -> bool:
            samples, stamps = inlet.pull_chunk(timeout=0.0)
            lsl_mwaves.extend((stamp, sample[0]) for sample, stamp in zip(samples, stamps))
            return bool((r := mwave_rows()) and r[-1][0] - r[0][0] > 15.0)

        wait_until(tracked_for_15_s, 50, what="15 s of M-wave tracking")
        inlet.close_stream()
    finally:
        recorder.close()
    # Each pulse's M-wave on LSL, stamped with its pulse's time (one host: one clock).
    channels, pulse_s, pulse_ma = pulses_array(recorder.get(b"pulses"))
    mwave_s, mwave_uv = np.array(lsl_mwaves).T
    assert len(mwave_s) > 300 and np.all(mwave_uv > 0)
    delivered_s = pulse_s[(channels == stim.device_channel) & (pulse_ma > 0)]
    assert all(np.isclose(delivered_s, t, rtol=0, atol=1e-6).any() for t in mwave_s)
    t, normalized, reference_uv = np.array(mwave_rows()).T
    start_s = t[0]
    t -= start_s
    # The fresh reference: 10 M-waves at the probe intensity, as the patient makes them (2 x its peak).
    probe_ma = float(intensity_to_ma(stim.law.probe_intensity, stim.threshold_ma, stim.max_ma,
                                     DEVICES[config.stimulator.driver].amplitude_step_ma))
    assert np.all(reference_uv == reference_uv[0])
    assert reference_uv[0] == pytest.approx(2 * patient.mwave_max_uv * recruitment(probe_ma, patient), rel=0.06)
    settled = t > 3.0
    print(f"normalized M-wave after 3 s: {normalized[settled].mean():.3f} +- {normalized[settled].std():.3f}")
    assert normalized[settled].mean() == pytest.approx(0.6, abs=0.03)
    assert np.percentile(np.abs(normalized[settled] - 0.6), 90) < 0.08
    # Fatigue: the amplitude that holds the M-wave rises; without fatigue it would evoke well above target.
    channels, times, amplitudes = pulses_array(recorder.get(b"pulses"))
    times -= start_s
    early_ma = amplitudes[(channels == stim.device_channel) & (times > 3.0) & (times < 4.0)].mean()
    late_ma = amplitudes[(channels == stim.device_channel) & (times > t[-1] - 1.0) & (times < t[-1])].mean()
    fresh_at_late = 2 * patient.mwave_max_uv * recruitment(late_ma, patient) / reference_uv[0]
    print(f"amplitude {early_ma:.1f} -> {late_ma:.1f} mA; a fresh muscle would give {fresh_at_late:.2f} at {late_ma:.1f} mA")
    assert late_ma > early_ma + 3.0
    assert fresh_at_late > 0.6 + 0.1


def crank_series(recorder: Recorder, end_s: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Time (s), unwrapped crank angle (deg) and cadence (rpm) from the controller's status before ``end_s``."""
    rows = [
        (s["time_s"], s["crank"]["angle_deg"], s["crank"]["cadence_rpm"])
        for s in statuses(recorder)
        if s["crank"] and s["time_s"] < end_s
    ]
    t, angle_deg, cadence_rpm = np.array(rows).T
    return t, np.degrees(np.unwrap(np.radians(angle_deg))), cadence_rpm


@pytest.mark.parametrize("config_name", ["cycling_leg.toml", "cycling_arm.toml"])
def test_cycling_windows_follow_the_crank_and_cadence_reaches_target(write_config, processes, config_name: str) -> None:
    path = write_config(config_name, TOLERANT_DEADLINE)
    config = load_config(path)
    recorder = Recorder({config.endpoints.pulses: [b"pulses", b"status"], config.endpoints.command: [b"status"]})
    try:
        processes.start_loop(path)

        def cycled_for_s() -> float:
            end_s = armed_until_s(recorder)
            times = [s["time_s"] for s in statuses(recorder) if s["crank"] and s["time_s"] < end_s]
            return times[-1] - times[0] if times else 0.0

        wait_until(lambda: cycled_for_s() > 10.0, 40, what="10 s of cycling with the stimulator armed")
    finally:
        recorder.close()
    channels, times, amplitudes = pulses_array(recorder.get(b"pulses"))
    crank_t, crank_deg, crank_rpm = crank_series(recorder, armed_until_s(recorder))
    keep = times < crank_t[-1]
    channels, times, amplitudes = channels[keep], times[keep], amplitudes[keep]
    stimulated = amplitudes > 0
    angle_deg, cadence_rpm = np.interp(times, crank_t, crank_deg), np.interp(times, crank_t, crank_rpm)
    for stim in config.stimulation:
        law = stim.law
        mine = stimulated & (channels == stim.device_channel)
        assert mine.sum() >= 20, f"{stim.name}: {mine.sum()} pulses"
        advanced_deg = angle_deg[mine] - law.offset_deg + cadence_rpm[mine] * DEG_PER_S_PER_RPM * law.emd_s
        # A 10 deg margin widens the window for status interpolation and command-to-pulse latency.
        start_deg, end_deg = law.window_deg
        inside = np.array([window_profile(a, start_deg - 10.0, end_deg + 10.0, 0.0) for a in advanced_deg]) > 0
        assert inside.mean() >= 0.97, f"{stim.name}: {np.sort(advanced_deg[~inside] % 360)}"
    target_rpm = config.stimulation[0].law.target_cadence_rpm
    if target_rpm:  # the cadence PI takes the rider from the motor's cadence to the target
        last = crank_rpm[crank_t > crank_t[-1] - 3]
        print(f"cadence over the last 3 s: {last.round(1)} rpm")
        assert last.mean() == pytest.approx(target_rpm, abs=4.0)
        assert last.min() > config.controller.ergometer.motor_cadence_rpm + 8.0
