"""The operator's status line: closed gates named with their reason, the crank when cycling."""

from __future__ import annotations

from fesloop.supervisor import format_status_line

STIM = {"channels": ["quad_l", "quad_r"], "output_ma": [21.0, 0.0], "state": "ARMED",
        "latency_ms": {"p50": 1.1, "p99": 2.2}, "rejected": 1}


def test_closed_gates_are_named_with_their_reason_and_the_crank_is_shown() -> None:
    ctl = {"activation": {"quad_l": 0.5, "quad_r": 0.0}, "gate": ["OPEN", "NO_CRANK"], "rejected": 2,
           "crank": {"angle_deg": 271.6, "cadence_rpm": 35.04}}
    line = format_status_line(12.34, {**ctl, "dropped": 1}, {**STIM, "dropped": 3}, {"lost_samples": 3})
    assert line == (
        "  12.3s | activation quad_l 0.50 quad_r 0.00 | mA quad_l 21.0 quad_r 0.0 | gates closed: quad_r NO_CRANK"
        " | crank 272 deg 35.0 rpm | stim ARMED | e2e p50/p99 1.1/2.2 ms | lost 3 dropped 4 rejected 3"
    )


def test_open_gates_without_a_crank_and_a_fault_reason() -> None:
    ctl = {"activation": {"quad_l": 0.1, "quad_r": 0.2}, "gate": ["OPEN", "OPEN"], "crank": None}
    stim = {**STIM, "state": "FAULT", "fault_reason": "no fresh command within 100 ms", "latency_ms": {}}
    line = format_status_line(1.0, ctl, stim, {})
    assert "| gates open | stim FAULT (no fresh command within 100 ms) | e2e p50/p99 - |" in line
    assert "crank" not in line


def test_each_process_share_of_the_latency_follows_the_end_to_end_figure() -> None:
    ctl = {"activation": {"quad_l": 0.1}, "gate": ["OPEN", "OPEN"], "latency_share_ms": {"p50": 0.123, "p99": 0.4}}
    stim = {**STIM, "latency_share_ms": {"p50": 0.05, "p99": 0.1}}
    acq = {"latency_share_ms": {"p50": None}}  # no chunk yet: left out
    line = format_status_line(1.0, ctl, stim, acq)
    assert "| e2e p50/p99 1.1/2.2 ms (p50 shares ms: ctl 0.123 stim 0.050) |" in line
