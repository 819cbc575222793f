"""EMG of the simulated patient stimulated by a scripted pulse train, for estimator tests."""

from __future__ import annotations

import numpy as np

from acquisition.patient import SimulatedPatient
from fesloop.config import SimulatedPatientConfig


def stimulated_emg(
    patient_cfg: SimulatedPatientConfig, muscles: list[str], pulse_s: np.ndarray, amplitude_ma: float, n_samples: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(emg_uv, amplitude_ma, pulse_width_us per pulse): device channel 0 stimulates the first muscle
    with 300 us pulses at ``pulse_s``; each muscle's EMG in its own column, from time 0."""
    patient = SimulatedPatient(patient_cfg, muscles, {i: i for i in range(len(muscles))}, 0.0)
    amplitudes_ma, width_us = np.full(len(pulse_s), amplitude_ma), np.full(len(pulse_s), 300.0)
    patient.add_pulses(np.zeros(len(pulse_s), dtype=int), pulse_s, amplitudes_ma, width_us)
    emg_uv = np.zeros((n_samples, len(muscles)), dtype=np.float32)
    patient.render(0, emg_uv)
    return emg_uv, amplitudes_ma, width_us
