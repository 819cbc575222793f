"""Calibration maths: rest level, its noise and the MVC level per muscle, from envelopes.

Pure: envelopes in, a :class:`Calibration` out (and to/from a plain dict for the
file that ``fesloop calibrate`` writes and the controller loads).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

MVC_WINDOW_S = 0.5  # the MVC level is the highest mean envelope over this long
MVC_MIN_RATIO = 2.0  # an MVC must be at least this many times the rest level ...
MVC_MIN_SD = 10.0  # ... and this many rest SDs above it
FORMAT = "fesloop-calibration/1"


class CalibrationError(ValueError):
    """The recorded trials cannot give a trustworthy calibration."""


@dataclass(frozen=True)
class MuscleCalibration:
    name: str
    rest_uv: float
    rest_sd_uv: float
    mvc_uv: float
    mvc_trials_uv: tuple[float, ...]
    onset_rest_3sd_uv: float  # suggested onset thresholds
    onset_10pct_mvc_uv: float


@dataclass(frozen=True)
class Calibration:
    config_name: str
    config_path: str
    created_utc: str
    sampling_rate_hz: float
    muscles: tuple[MuscleCalibration, ...]

    def muscle(self, name: str) -> MuscleCalibration:
        for muscle in self.muscles:
            if muscle.name == name:
                return muscle
        raise CalibrationError(f"the calibration has no muscle {name!r} (it has {[m.name for m in self.muscles]})")

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, **asdict(self)}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Calibration:
        if raw.get("format") != FORMAT:
            raise CalibrationError(f"not a {FORMAT} file (format = {raw.get('format')!r})")
        try:
            muscles = tuple(
                MuscleCalibration(**{**m, "mvc_trials_uv": tuple(m["mvc_trials_uv"])}) for m in raw["muscles"]
            )
            calibration = cls(
                str(raw["config_name"]), str(raw["config_path"]), str(raw["created_utc"]),
                float(raw["sampling_rate_hz"]), muscles,
            )
        except (KeyError, TypeError) as exc:
            raise CalibrationError(f"calibration file is incomplete or malformed: {exc}") from None
        for m in muscles:
            check_levels(m.name, m.rest_uv, m.rest_sd_uv, m.mvc_uv)
        return calibration


def rest_level(envelope_uv: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and SD per channel of an envelope recorded at rest, (n_samples, n_channels)."""
    return envelope_uv.mean(axis=0), envelope_uv.std(axis=0)


def mvc_level(envelope_uv: np.ndarray, fs_hz: float) -> np.ndarray:
    """Per channel, the highest mean envelope over any MVC_WINDOW_S (robust to single spikes)."""
    n = min(max(int(MVC_WINDOW_S * fs_hz), 1), len(envelope_uv))
    cumulative = np.cumsum(np.vstack((np.zeros((1, envelope_uv.shape[1])), envelope_uv)), axis=0)
    return ((cumulative[n:] - cumulative[:-n]) / n).max(axis=0)


def check_levels(name: str, rest_uv: float, rest_sd_uv: float, mvc_uv: float) -> None:
    """Refuse levels that are not finite and non-negative (a hand-edited or corrupt file: a
    negative rest level stimulates at rest), and an MVC not clearly above rest (a failed
    trial, a loose electrode, no effort)."""
    for key, value in (("rest_uv", rest_uv), ("rest_sd_uv", rest_sd_uv), ("mvc_uv", mvc_uv)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
            raise CalibrationError(f"{name}: {key} = {value!r}: must be a finite number of uV, not negative")
    needed = max(MVC_MIN_RATIO * rest_uv, rest_uv + MVC_MIN_SD * rest_sd_uv)
    if not mvc_uv > needed:
        raise CalibrationError(
            f"{name}: MVC level {mvc_uv:.3g} uV is not clearly above rest ({rest_uv:.3g} uV, SD {rest_sd_uv:.3g} uV); "
            f"it must exceed {needed:.3g} uV ({MVC_MIN_RATIO:g} x rest and rest + {MVC_MIN_SD:g} SD). "
            "Check the electrodes and repeat with a maximal contraction."
        )


def muscle_calibration(
    name: str, rest_envelope_uv: np.ndarray, trial_envelopes_uv: list[np.ndarray], fs_hz: float
) -> MuscleCalibration:
    """One muscle's calibration from its rest envelope and its MVC trial envelopes (1-D each)."""
    rest, sd = (float(v[0]) for v in rest_level(rest_envelope_uv[:, np.newaxis]))
    trials = tuple(float(mvc_level(t[:, np.newaxis], fs_hz)[0]) for t in trial_envelopes_uv)
    mvc = max(trials)
    check_levels(name, rest, sd, mvc)
    return MuscleCalibration(name, rest, sd, mvc, trials, rest + 3.0 * sd, rest + 0.1 * (mvc - rest))
