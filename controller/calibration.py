"""Calibration maths: rest level, its noise and the MVC level per muscle, from envelopes.

Pure: envelopes in, a :class:`Calibration` out (and to/from a plain dict for the
file that ``fesloop calibrate`` writes and the controller loads). The levels hold
only for the envelope they were measured through: the file keeps what that depends
on (:func:`envelope_settings`: the EMG source, its board, rows and uV scale, the
filters) and each muscle's EMG channel, and :func:`check_matches` refuses a config
that differs in any.
"""

from __future__ import annotations

import math
import json
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # fesloop.config checks muscle levels with this module
    from fesloop.config import Config

MVC_WINDOW_S = 0.5  # the MVC level is the highest mean envelope over this long
MVC_MIN_RATIO = 2.0  # an MVC must be at least this many times the rest level ...
MVC_MIN_SD = 10.0  # ... and this many rest SDs above it ...
# ... and this far above it, in uV of envelope as the controller computes it. A connected
# electrode always carries the amplifier's noise (~1 uV rms in band: an envelope of 0.7-0.8 uV,
# SD 0.04-0.07 uV through this estimator at 1-2 kHz); real MVCs sit 100-190 uV above rest
# (tests/data recordings, the simulated patient). Ten times the amplifier noise is the least a
# contraction must add for resting noise not to read as a large activation.
MVC_MIN_ABOVE_REST_UV = 10.0
# A rest envelope below these has no amplifier noise in it, so no electrode: a lead-off flat line
# (~1e-12 uV), a digital zero, a wrong uV scale. The quietest real rest in tests/data reads
# 1.2 uV, SD 0.18 uV (BioSPPy emg.txt, very weak activity).
REST_MIN_UV = 0.5  # below the envelope of 1 uV rms amplifier noise (0.7-0.8 uV)
REST_SD_MIN_UV = 0.02  # half the SD of that noise's envelope (0.04-0.07 uV): a flat line or a pure hum
# A phase (rest, one MVC trial) with more of its samples flagged by the controller's contamination
# detector (lead-off, saturation, motion) is refused: what is left is too little to trust.
MAX_FLAGGED_SHARE = 0.5
FORMAT = "fesloop-calibration/2"  # /1 kept neither the envelope settings nor the channels


class CalibrationError(ValueError):
    """The recorded trials cannot give a trustworthy calibration."""


class LevelError(CalibrationError):
    """A level normalization cannot rely on: names the muscle, the key, the value and what is allowed."""

    def __init__(self, muscle: str, key: str, value: object, allowed: str) -> None:
        self.key = key
        self.value = value
        self.allowed = allowed
        super().__init__(f"{muscle}: {key} = {value!r}: {allowed}")


@dataclass(frozen=True)
class MuscleCalibration:
    name: str
    rest_uv: float
    rest_sd_uv: float
    mvc_uv: float
    mvc_trials_uv: tuple[float, ...]
    onset_rest_3sd_uv: float  # suggested onset thresholds
    onset_10pct_mvc_uv: float
    emg_channel: int  # where the muscle's electrodes were


@dataclass(frozen=True)
class Calibration:
    config_name: str
    config_path: str
    created_utc: str
    sampling_rate_hz: float
    settings: dict[str, Any]  # what the envelope depended on, by config key (envelope_settings)
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
        if not isinstance(raw, dict):
            raise CalibrationError(f"not a {FORMAT} file (a JSON {type(raw).__name__}, not an object)")
        if raw.get("format") == "fesloop-calibration/1":
            raise CalibrationError(
                "made by an older fesloop (fesloop-calibration/1 keeps neither the source and filter settings nor "
                "the EMG channels the levels hold for): calibrate again"
            )
        if raw.get("format") != FORMAT:
            raise CalibrationError(f"not a {FORMAT} file (format = {raw.get('format')!r})")
        try:
            muscles = tuple(
                MuscleCalibration(**{**m, "mvc_trials_uv": tuple(m["mvc_trials_uv"])}) for m in raw["muscles"]
            )
            if not isinstance(raw["settings"], dict):
                raise TypeError(f"settings is a JSON {type(raw['settings']).__name__}, not an object")
            calibration = cls(
                str(raw["config_name"]), str(raw["config_path"]), str(raw["created_utc"]),
                float(raw["sampling_rate_hz"]), raw["settings"], muscles,
            )
        except (KeyError, TypeError) as exc:
            raise CalibrationError(f"calibration file is incomplete or malformed: {exc}") from None
        for m in muscles:
            check_levels(m.name, m.rest_uv, m.rest_sd_uv, m.mvc_uv)
        return calibration


def envelope_settings(config: Config) -> dict[str, Any]:
    """What an envelope level depends on besides the muscle, by config key: the EMG source, its
    board, board rows and uV scale (other gains, other electrodes), and the filters (JSON values)."""
    acquisition = config.acquisition
    settings: dict[str, Any] = {"acquisition.source": acquisition.source}
    if acquisition.source == "brainflow":
        for key in ("board", "master_board", "emg_channels", "scale_uv"):
            settings[f"acquisition.brainflow.{key}"] = getattr(acquisition.brainflow, key)
    elif acquisition.source == "lsl":
        settings["acquisition.lsl_inlet.scale_uv"] = acquisition.lsl_inlet.scale_uv
    settings.update({f"controller.filters.{key}": value for key, value in asdict(config.controller.filters).items()})
    return json.loads(json.dumps(settings))


def check_matches(calibration: Calibration, config: Config) -> None:
    """Refuse a config whose envelope differs from the one the levels were measured through: another
    source, board, board rows, scale or filters (other levels for the same contraction) or a muscle
    on another EMG channel (other electrodes); names the key and both values."""
    for key, value in envelope_settings(config).items():
        calibrated = calibration.settings.get(key, "(not set)")
        if calibrated != value:
            raise CalibrationError(
                f"{key} = {value!r}, the levels were measured with {calibrated!r}: calibrate again (or set it back)"
            )
    for muscle in config.muscles:
        calibrated = calibration.muscle(muscle.name).emg_channel
        if calibrated != muscle.emg_channel:
            raise CalibrationError(
                f"{muscle.name}: emg_channel = {muscle.emg_channel}, the levels were measured on channel {calibrated}: "
                "calibrate again (or set it back)"
            )


def rest_level(envelope_uv: np.ndarray, flagged: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Mean and SD per channel of an envelope recorded at rest, (n_samples, n_channels), over the
    samples not ``flagged`` contaminated (same shape; None: none is)."""
    clean = True if flagged is None else ~flagged
    return envelope_uv.mean(axis=0, where=clean), envelope_uv.std(axis=0, where=clean)


def mvc_level(envelope_uv: np.ndarray, fs_hz: float, flagged: np.ndarray | None = None) -> np.ndarray:
    """Per channel, the highest mean envelope over any MVC_WINDOW_S (robust to single spikes) that
    holds no ``flagged`` sample (same shape; None: none is); -inf where no window is clean."""
    n = min(max(int(MVC_WINDOW_S * fs_hz), 1), len(envelope_uv))
    means = _window_sums(envelope_uv, n) / n
    if flagged is not None:
        means[_window_sums(flagged, n) > 0] = -np.inf
    return means.max(axis=0)


def _window_sums(values: np.ndarray, n: int) -> np.ndarray:
    """Per channel, the sum of every ``n`` consecutive rows of ``values`` (n_samples, n_channels)."""
    cumulative = np.cumsum(np.vstack((np.zeros((1, values.shape[1])), values)), axis=0)
    return cumulative[n:] - cumulative[:-n]


def check_levels(name: str, rest_uv: float, rest_sd_uv: float | None, mvc_uv: float) -> None:
    """Refuse levels that normalization cannot rely on (:class:`LevelError`).

    Not finite or negative: a hand-edited or corrupt file (a negative rest level stimulates
    at rest). Rest below the floors: no amplifier noise, so no electrode (lead-off). An MVC
    not clearly above rest: a failed trial, a loose electrode, no effort; resting noise would
    then read as a large activation. ``rest_sd_uv`` None: not measured (a config's levels).
    """
    for key, value in (("rest_uv", rest_uv), ("rest_sd_uv", rest_sd_uv), ("mvc_uv", mvc_uv)):
        if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
            raise LevelError(name, key, value, "must be a finite number of uV, not negative")
    if rest_uv < REST_MIN_UV:
        raise LevelError(
            name, "rest_uv", rest_uv, f"must be at least {REST_MIN_UV:g} uV, the amplifier noise of a connected electrode (lead-off?)"
        )
    if rest_sd_uv is not None and rest_sd_uv < REST_SD_MIN_UV:
        raise LevelError(
            name, "rest_sd_uv", rest_sd_uv, f"must be at least {REST_SD_MIN_UV:g} uV: a resting envelope varies (lead-off?)"
        )
    needed = max(MVC_MIN_RATIO * rest_uv, rest_uv + MVC_MIN_ABOVE_REST_UV, rest_uv + MVC_MIN_SD * (rest_sd_uv or 0.0))
    if not mvc_uv > needed:
        rest = f"rest {rest_uv:.3g} uV" + ("" if rest_sd_uv is None else f", SD {rest_sd_uv:.3g} uV")
        rule = f"{MVC_MIN_RATIO:g} x rest, rest + {MVC_MIN_ABOVE_REST_UV:g} uV" + (
            "" if rest_sd_uv is None else f", rest + {MVC_MIN_SD:g} SD"
        )
        raise LevelError(
            name, "mvc_uv", mvc_uv,
            f"not clearly above rest ({rest}): must exceed {needed:.3g} uV ({rule}); a failed or weak trial, a loose electrode?",
        )


def check_flagged_share(name: str, phase: str, flagged: np.ndarray) -> None:
    """Refuse a phase whose samples the contamination detector flagged more than MAX_FLAGGED_SHARE of."""
    share = float(flagged.mean()) if len(flagged) else 0.0
    if share > MAX_FLAGGED_SHARE:
        raise CalibrationError(
            f"{name}: {share:.0%} of its {phase} phase is contaminated (lead-off, saturation or motion, as the "
            f"controller flags it; at most {MAX_FLAGGED_SHARE:.0%} may be): check the electrodes and repeat"
        )


def muscle_calibration(
    name: str,
    rest_envelope_uv: np.ndarray,
    trial_envelopes_uv: list[np.ndarray],
    fs_hz: float,
    rest_flagged: np.ndarray | None = None,
    trials_flagged: list[np.ndarray] | None = None,
    *,
    emg_channel: int,
) -> MuscleCalibration:
    """One muscle's calibration (its electrodes on ``emg_channel``) from its rest envelope and its MVC trial envelopes (1-D each),
    leaving out the samples the contamination detector flagged (``*_flagged``, one bool array
    per envelope; None: none flagged): a lead-off flat line must not become the rest level."""
    rest_flagged = np.zeros(len(rest_envelope_uv), dtype=bool) if rest_flagged is None else rest_flagged
    check_flagged_share(name, "rest", rest_flagged)
    rest, sd = (float(v[0]) for v in rest_level(rest_envelope_uv[:, np.newaxis], rest_flagged[:, np.newaxis]))
    if trials_flagged is None:
        trials_flagged = [np.zeros(len(t), dtype=bool) for t in trial_envelopes_uv]
    trials = tuple(
        _trial_level(name, f"MVC {k + 1}/{len(trial_envelopes_uv)}", envelope, flagged, fs_hz)
        for k, (envelope, flagged) in enumerate(zip(trial_envelopes_uv, trials_flagged, strict=True))
    )
    mvc = max(trials)
    check_levels(name, rest, sd, mvc)
    return MuscleCalibration(name, rest, sd, mvc, trials, rest + 3.0 * sd, rest + 0.1 * (mvc - rest), emg_channel)


def _trial_level(name: str, phase: str, envelope_uv: np.ndarray, flagged: np.ndarray, fs_hz: float) -> float:
    """One MVC trial's level over its clean samples; refused when too much of it, or every window, is flagged."""
    check_flagged_share(name, phase, flagged)
    level = float(mvc_level(envelope_uv[:, np.newaxis], fs_hz, flagged[:, np.newaxis])[0])
    if not math.isfinite(level):
        raise CalibrationError(f"{name}: no {MVC_WINDOW_S:g} s of its {phase} phase is free of contamination: repeat it")
    return level
