"""The config schema: one TOML file per rig, loaded into frozen, validated objects.

Every process loads the same file and takes the parts it needs, so the three can run
on different hosts. Unknown keys, wrong types and out-of-range values are refused
with the key path, the value and what is allowed (:class:`ConfigError`).
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

from controller.calibration import LevelError, check_levels
from fesloop.schema import ConfigError, bounded, build
from stimulator.channel_list import plan_channel_list
from stimulator.limits import DEVICES, LimitError, check_channel

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.toml"


@dataclass(frozen=True)
class Endpoints:
    """Where each process binds. Streams are PUB sockets, control is REP."""

    emg: str = "tcp://127.0.0.1:5601"
    command: str = "tcp://127.0.0.1:5602"
    pulses: str = "tcp://127.0.0.1:5603"
    acquisition_control: str = "tcp://127.0.0.1:5611"
    controller_control: str = "tcp://127.0.0.1:5612"
    stimulator_control: str = "tcp://127.0.0.1:5613"
    # A subscriber that hears nothing (not even the 5 Hz status) for this long reconnects.
    link_timeout_ms: float = bounded(1000.0, 400.0, 60000.0, "ms (above two 200 ms status periods)")

    def check(self) -> None:
        """Each a well-formed tcp:// or ipc:// address, each its own (beyond loopback needs keys: checked at bind)."""
        from fesloop.sockets import EndpointError, check_bind_endpoint

        seen: dict[str, str] = {}
        for key in ENDPOINT_KEYS:
            value = getattr(self, key)
            try:
                check_bind_endpoint(value, authenticated=True)
            except EndpointError:
                raise ConfigError(key, value, "expected tcp://HOST:PORT (port 1-65535) or ipc://PATH") from None
            if value in seen:
                raise ConfigError(key, value, f"already the {seen[value]} endpoint: each process binds its own")
            seen[value] = key


ENDPOINT_KEYS = ("emg", "command", "pulses", "acquisition_control", "controller_control", "stimulator_control")


@dataclass(frozen=True)
class Contraction:
    """One scripted voluntary contraction of the simulated patient."""

    muscle: str
    start_s: float = bounded(lo=0.0, unit="s")
    duration_s: float = bounded(lo=0.01, unit="s")
    level: float = bounded(lo=0.0, hi=1.0)


@dataclass(frozen=True)
class SimulatedFault:
    """A fault of the simulated amplifier, once, from ``start_s`` after acquisition starts.

    ``flat``: electrode lift-off, the channel holds its DC offset; ``railed``: lift-off
    with the input at ``rail_uv``; ``motion``: a half-sine spike of ``amplitude_uv``
    lasting ``duration_s`` added on top; ``drop``: samples never delivered (the index
    jumps). ``muscle`` empty = every channel (``drop`` always takes every channel).
    """

    kind: Literal["flat", "railed", "motion", "drop"]
    start_s: float = bounded(lo=0.0, unit="s")
    duration_s: float = bounded(lo=0.0005, hi=3600.0, unit="s")
    muscle: str = ""
    amplitude_uv: float = bounded(2000.0, -1e7, 1e7, "uV (motion)")


@dataclass(frozen=True)
class SimulatedPatientConfig:
    """A virtual muscle per configured muscle, answering delivered pulses."""

    sampling_rate_hz: float = bounded(2000.0, 500.0, 20000.0, "Hz")
    seed: int = bounded(0, 0, 2**63 - 1, "")
    rest_noise_uv: float = bounded(3.0, 0.0, 1000.0, "uV")
    full_drive_uv: float = bounded(300.0, 1.0, 10000.0, "uV rms")
    mains_uv: float = bounded(5.0, 0.0, 10000.0, "uV")
    mains_hz: float = bounded(50.0, 40.0, 70.0, "Hz")
    dc_offset_uv: float = bounded(0.0, -1e6, 1e6, "uV")
    transport_delay_ms: float = bounded(5.0, 0.0, 100.0, "ms")
    artifact_uv_per_ma: float = bounded(60.0, 0.0, 1e4, "uV/mA")
    artifact_decay_ms: float = bounded(0.8, 0.05, 10.0, "ms")
    # Share of a pulse's artifact seen on the other muscles' channels (1 = as large as on its own).
    artifact_crosstalk: float = bounded(0.3, 0.0, 1.0)
    mwave_max_uv: float = bounded(1500.0, 0.0, 1e5, "uV")
    mwave_latency_ms: float = bounded(6.0, 4.0, 10.0, "ms")
    mwave_duration_ms: float = bounded(6.0, 1.0, 20.0, "ms (one biphasic cycle)")
    recruitment_mid_ma: float = bounded(30.0, 0.0, 130.0, "mA")
    recruitment_slope_ma: float = bounded(5.0, 0.1, 100.0, "mA")
    # Fatigue: the M-wave scales by exp(-Q / fatigue_charge_uc), Q = charge delivered to that
    # muscle so far (sum of amplitude x pulse width). 60 mC: 1/e after ~170 s at 40 mA, 300 us, 30 Hz.
    fatigue_charge_uc: float = bounded(60000.0, 1.0, 1e12, "uC")
    drive_ramp_ms: float = bounded(50.0, 0.0, 1000.0, "ms (raised-cosine onset/offset of a contraction)")
    schedule_period_s: float = bounded(10.0, 0.1, 86400.0, "s")
    contractions: tuple[Contraction, ...] = ()
    rail_uv: float = bounded(6000.0, 1.0, 1e7, "uV (the amplifier's rail, for railed faults)")
    faults: tuple[SimulatedFault, ...] = ()


@dataclass(frozen=True)
class BrainflowConfig:
    """A BrainFlow board and its BrainFlowInputParams."""

    board: str = "SYNTHETIC_BOARD"
    emg_channels: tuple[int, ...] = ()
    scale_uv: float = bounded(1.0, 1e-9, 1e9, "uV per board unit")
    serial_port: str = ""
    ip_address: str = ""
    ip_port: int = bounded(0, 0, 65535)
    mac_address: str = ""
    serial_number: str = ""
    other_info: str = ""
    file: str = ""
    master_board: str = ""
    timeout: int = bounded(0, 0, 3600, "s")
    # Wrap of the board's package counter (BrainFlow boards: 0..255 -> 256).
    package_counter_modulo: int = bounded(256, 2, 2**32)
    # How far the counter advances per sample; 0: the board's own (CYTON_DAISY_BOARD 2, the others 1).
    package_counter_step: int = bounded(0, 0, 2**16)
    # Count whole counter periods lost from when the rows arrived (by the sample clock; a delivery backlog under
    # 7/8 of a counter period is never taken for a loss).
    dealias_with_timestamps: bool = True
    # PLAYBACK_FILE_BOARD: start again at the end of the file (false: the stream stops, EMG goes stale).
    playback_loop: bool = True
    # Write every raw board row to this BrainFlow file (tab-separated, one sample per line) during the session.
    record_file: str = ""

    def check(self) -> None:
        """Board rows picked as EMG columns: each a row index, each once; a counter step dividing its wrap."""
        rows = list(self.emg_channels)
        for i, row in enumerate(rows):
            if row < 0 or rows.index(row) != i:
                raise ConfigError(f"emg_channels[{i}]", row, "a board row index (>= 0), each row once")
        if self.package_counter_step and self.package_counter_modulo % self.package_counter_step:
            raise ConfigError("package_counter_step", self.package_counter_step,
                              f"must divide package_counter_modulo ({self.package_counter_modulo})")


@dataclass(frozen=True)
class LslSourceConfig:
    """An LSL stream carrying EMG, chosen by any of name, type and source_id."""

    name: str = ""
    type: str = "EMG"
    source_id: str = ""
    resolve_timeout_s: float = bounded(2.0, 0.0, 60.0, "s")
    max_buflen_s: int = bounded(1, 1, 60, "s (older samples are dropped by liblsl, never delivered late)")
    # The least a sample stamped later than the stream's sample clock expects must be late to follow a gap (and half a
    # period); the stream's own jitter widens it (acquisition/stamp_gaps.py).
    gap_tolerance_ms: float = bounded(2.0, 0.0, 1000.0, "ms")
    scale_uv: float = bounded(1.0, 1e-9, 1e9, "uV per stream unit")


@dataclass(frozen=True)
class AcquisitionConfig:
    source: Literal["simulated", "brainflow", "lsl"] = "simulated"
    chunk_ms: float = bounded(2.0, 0.5, 50.0, "ms")
    stale_ms: float = bounded(100.0, 10.0, 5000.0, "ms")
    # Stale this long -> the source is closed and opened again, then at growing intervals up to the max.
    recover_after_ms: float = bounded(1000.0, 10.0, 600000.0, "ms")
    recover_backoff_max_s: float = bounded(10.0, 0.01, 3600.0, "s")
    lsl: bool = True
    simulated: SimulatedPatientConfig = field(default_factory=SimulatedPatientConfig)
    brainflow: BrainflowConfig = field(default_factory=BrainflowConfig)
    lsl_inlet: LslSourceConfig = field(default_factory=LslSourceConfig)


@dataclass(frozen=True)
class Muscle:
    """An EMG channel and its calibration (envelope at rest and at MVC, uV)."""

    name: str
    emg_channel: int = bounded(lo=0, hi=1023)
    rest_uv: float = bounded(lo=0.0, unit="uV")
    mvc_uv: float = bounded(lo=0.0, unit="uV")
    rest_sd_uv: float = bounded(0.0, 0.0, 1e6, "uV (envelope SD at rest, 0 = not measured; needed by onset mode rest_sd)")
    # The M-wave that normalizes to 1 (e.g. M-max measured beforehand); 0 = the fresh M-wave of the session.
    mwave_reference_uv: float = bounded(0.0, 0.0, 1e6, "uV (0 = the fresh M-wave)")
    placement: str = ""  # where the electrodes sit (e.g. "SENIAM vastus lateralis, left"); goes into the LSL stream

    def check_levels(self, key: str, placeholders: bool) -> None:
        """Levels that normalize the EMG follow a calibration file's rule (rest_sd_uv 0: not measured,
        no SD rule). ``placeholders``: a calibration file is named, so these are never used (a rig
        config before its first calibration): MVC above rest is all. ``key``: this muscle's place."""
        if placeholders:
            if self.mvc_uv <= self.rest_uv:
                raise ConfigError(f"{key}.mvc_uv", self.mvc_uv, f"must be above rest_uv ({self.rest_uv:g} uV)")
            return
        try:
            check_levels(self.name, self.rest_uv, self.rest_sd_uv or None, self.mvc_uv)
        except LevelError as exc:
            raise ConfigError(f"{key}.{exc.key}", exc.value, exc.allowed) from None


@dataclass(frozen=True)
class FilterConfig:
    """Causal filter chain; cutoffs above 0.45 * fs are clipped at design time."""

    highpass_hz: float = bounded(10.0, 0.1, 200.0, "Hz")
    notch_hz: float = bounded(50.0, 0.0, 70.0, "Hz (0 = off)")
    notch_harmonics: int = bounded(3, 1, 10)
    notch_q: float = bounded(30.0, 1.0, 200.0)
    bandpass_hz: tuple[float, float] = bounded((20.0, 450.0), 1.0, 5000.0, "Hz")
    order: int = bounded(4, 1, 8)
    envelope_lowpass_hz: float = bounded(6.0, 0.5, 50.0, "Hz")
    tkeo: bool = False  # envelope of sqrt|TKEO| instead of |x|: sharper onsets, same units (uV)

    def check(self) -> None:
        low, high = self.bandpass_hz
        if low >= high:
            raise ConfigError("bandpass_hz", list(self.bandpass_hz), "low edge must be below high edge")


@dataclass(frozen=True)
class BlankingConfig:
    """Samples in [pulse - pre, pulse + post] never reach the estimate."""

    pre_ms: float = bounded(1.0, 0.0, 20.0, "ms")
    post_ms: float = bounded(20.0, 0.0, 100.0, "ms")
    # Window sources, combinable: delivered pulses, a sync channel of the board, the signal itself.
    from_pulses: bool = True
    sync_channel: int = bounded(-1, -1, 1023, "EMG column of a sync/trigger channel (-1 = none)")
    sync_threshold: float = bounded(0.5, -1e9, 1e9, "board units; a rising crossing is a pulse")
    detect: bool = False
    detect_slope_uv_per_ms: float = bounded(2500.0, 1.0, 1e9, "uV/ms between consecutive samples")


@dataclass(frozen=True)
class ResidualConfig:
    """Removal of the stimulus-locked response (M-wave) that blanking leaves, per pulse window."""

    method: Literal["none", "comb", "adaptive"] = "none"
    window_ms: float = bounded(30.0, 1.0, 1000.0, "ms after each pulse")
    taps: int = bounded(4, 1, 32, "previous responses (adaptive)")
    step: float = bounded(0.2, 0.0, 1.0, "NLMS step size (adaptive)")


@dataclass(frozen=True)
class ContaminationConfig:
    """Untrustworthy EMG closes the gates of dependent channels; 0 switches a test off."""

    rail_uv: float = bounded(0.0, 0.0, 1e9, "uV (amplifier rail, 0 = off)")
    rail_fraction: float = bounded(0.98, 0.5, 1.0)
    flat_uv: float = bounded(0.0, 0.0, 1e6, "uV sample-to-sample change counted as flat (0 = off)")
    flat_ms: float = bounded(50.0, 1.0, 10000.0, "ms")
    motion_uv: float = bounded(0.0, 0.0, 1e9, "uV in the 1-20 Hz band (0 = off)")
    # Received samples after the last contaminated one; controller.stale_ms at least (the restarted filters settle).
    holdoff_ms: float = bounded(500.0, 0.0, 60000.0, "ms")


@dataclass(frozen=True)
class OnsetConfig:
    """Onset/offset of each muscle from its envelope, with hysteresis and minimum durations."""

    mode: Literal["rest_sd", "mvc_fraction"] = "mvc_fraction"
    k_sd: float = bounded(3.0, 0.0, 100.0, "SD of the envelope at rest above rest (rest_sd)")
    mvc_fraction: float = bounded(0.1, 0.0, 1.0, "of MVC above rest (mvc_fraction)")
    off_ratio: float = bounded(0.7, 0.0, 1.0, "offset threshold as a share of the onset threshold above rest")
    min_on_ms: float = bounded(50.0, 0.0, 10000.0, "ms")
    min_off_ms: float = bounded(100.0, 0.0, 10000.0, "ms")


@dataclass(frozen=True)
class MWaveConfig:
    """Evoked M-wave amplitude of each stimulated muscle, measured on the raw EMG before blanking.

    Per delivered pulse: the high-passed EMG of the stimulated muscle's channel in
    [pulse + window_start_ms, pulse + window_end_ms], as ``peak_to_peak`` or ``rms``;
    the amplitude is the mean over the last ``smoothing_pulses``. The fresh reference
    (muscles without ``mwave_reference_uv``) is the mean of the first
    ``reference_pulses`` M-waves evoked at one steady charge per pulse.
    """

    window_start_ms: float = bounded(3.0, 0.0, 100.0, "ms after the pulse")
    window_end_ms: float = bounded(20.0, 0.5, 200.0, "ms after the pulse")
    method: Literal["peak_to_peak", "rms"] = "peak_to_peak"
    highpass_hz: float = bounded(10.0, 0.1, 200.0, "Hz")
    smoothing_pulses: int = bounded(5, 1, 1000, "pulses")
    reference_pulses: int = bounded(10, 1, 1000, "pulses")

    def check(self) -> None:
        if self.window_end_ms <= self.window_start_ms:
            raise ConfigError("window_end_ms", self.window_end_ms, f"must be above window_start_ms ({self.window_start_ms:g} ms)")


@dataclass(frozen=True)
class ErgometerConfig:
    """The simulated ergometer cycling laws read crank angle and cadence from (inside the controller).

    Each stimulation channel pushes the crank with max_torque_nm x recruitment of its
    delivered pulses (simulated patient's curve, low-passed by ``force_tau_s``) x
    cos(crank angle - its window centre). A motor holds at least ``motor_cadence_rpm``.
    """

    inertia_kg_m2: float = bounded(2.0, 0.01, 100.0, "kg m^2")
    friction_nm_per_rpm: float = bounded(0.2, 0.0, 100.0, "N m per rpm")
    max_torque_nm: float = bounded(15.0, 0.0, 500.0, "N m per channel")
    force_tau_s: float = bounded(0.1, 0.001, 2.0, "s")
    motor_cadence_rpm: float = bounded(0.0, 0.0, 200.0, "rpm (0 = no motor)")
    motor_max_torque_nm: float = bounded(10.0, 0.0, 500.0, "N m")


@dataclass(frozen=True)
class CrankConfig:
    """Where the cycling laws read crank angle and cadence.

    ``simulated``: the ergometer of [controller.ergometer], inside the controller.
    ``lsl``: a stream (name/type/source_id) carrying the angle in degrees in
    ``angle_channel`` and the cadence in rpm in ``cadence_channel`` (-1: from the
    angle's rate of change). ``motomed``: the MOTOmed on the RehaStim2, whose
    ActualValues the stimulator relays. A crank reading older than ``stale_ms`` closes
    the gate of every cycling channel (NO_CRANK): the phase is no longer known.
    """

    source: Literal["simulated", "lsl", "motomed"] = "simulated"
    stale_ms: float = bounded(200.0, 20.0, 5000.0, "ms")
    name: str = ""
    type: str = "Crank"
    source_id: str = ""
    angle_channel: int = bounded(0, 0, 1023, "channel index")
    cadence_channel: int = bounded(-1, -1, 1023, "channel index (-1: cadence from the angle)")


@dataclass(frozen=True)
class ControllerConfig:
    control_rate_hz: float = bounded(200.0, 10.0, 2000.0, "Hz")
    stale_ms: float = bounded(100.0, 10.0, 5000.0, "ms")
    filters: FilterConfig = field(default_factory=FilterConfig)
    blanking: BlankingConfig = field(default_factory=BlankingConfig)
    residual: ResidualConfig = field(default_factory=ResidualConfig)
    contamination: ContaminationConfig = field(default_factory=ContaminationConfig)
    onset: OnsetConfig = field(default_factory=OnsetConfig)
    mwave: MWaveConfig = field(default_factory=MWaveConfig)
    # Written by `fesloop calibrate`; when set, its rest/MVC levels replace the muscles' own.
    # A relative path is taken from the config file's folder.
    calibration_file: str = ""
    ergometer: ErgometerConfig = field(default_factory=ErgometerConfig)
    crank: CrankConfig = field(default_factory=CrankConfig)


def check_not_above(key: str, value: float, limit_key: str, limit: float) -> None:
    """Refuse ``key`` when its value exceeds the value of ``limit_key`` in the same table."""
    if value > limit:
        raise ConfigError(key, value, f"must not exceed {limit_key} ({limit:g})")


@dataclass(frozen=True)
class ProportionalLaw:
    """intensity = clip(gain * (activation - offset), min_intensity, max_intensity); 0 below offset.

    ``deadband``: once off, the output stays 0 until activation exceeds offset + deadband
    (no chatter around the offset). ``smoothing_s`` (low-pass) and ``slew_per_s`` (rate
    limit, both directions) smooth the output; 0 switches each off.
    """

    kind: Literal["proportional"] = "proportional"
    gain: float = bounded(1.0, 0.0, 100.0)
    offset: float = bounded(0.1, 0.0, 1.0)
    max_intensity: float = bounded(1.0, 0.0, 1.0)
    min_intensity: float = bounded(0.0, 0.0, 1.0)
    deadband: float = bounded(0.0, 0.0, 1.0, "activation above offset")
    smoothing_s: float = bounded(0.0, 0.0, 10.0, "s (time constant)")
    slew_per_s: float = bounded(0.0, 0.0, 1000.0, "intensity per s (0 = off)")

    @property
    def reads_activation(self) -> bool:
        """Whether the intensity follows the muscle's EMG activation."""
        return True

    @property
    def reads_mwave(self) -> bool:
        """Whether the intensity follows the M-waves measured after the stimulator's reported pulses."""
        return False

    def check(self) -> None:
        check_not_above("min_intensity", self.min_intensity, "max_intensity", self.max_intensity)


@dataclass(frozen=True)
class TriggeredLaw:
    """EMG-triggered train: activation above ``on_threshold`` for ``min_duration_s`` starts a
    preset train (ramp up, plateau, ramp down), then ``rest_s`` of refractory; a new trigger
    needs activation below ``off_threshold`` first. EMG during train and rest is ignored.
    After ``reps_per_set`` trains a ``set_rest_s`` pause (0 = no sets); at most
    ``max_repetitions`` trains per session (0 = no limit).
    """

    kind: Literal["triggered"]
    on_threshold: float = bounded(0.2, 0.0, 1.0, "activation")
    off_threshold: float = bounded(0.1, 0.0, 1.0, "activation")
    min_duration_s: float = bounded(0.1, 0.0, 10.0, "s")
    intensity: float = bounded(0.8, 0.0, 1.0, "plateau")
    ramp_up_s: float = bounded(0.5, 0.0, 60.0, "s")
    plateau_s: float = bounded(2.0, 0.0, 600.0, "s")
    ramp_down_s: float = bounded(0.5, 0.0, 60.0, "s")
    rest_s: float = bounded(2.0, 0.0, 3600.0, "s")
    reps_per_set: int = bounded(0, 0, 10000, "(0 = no sets)")
    set_rest_s: float = bounded(0.0, 0.0, 3600.0, "s")
    max_repetitions: int = bounded(0, 0, 100000, "(0 = no limit)")

    @property
    def reads_activation(self) -> bool:
        return True

    @property
    def reads_mwave(self) -> bool:
        return False

    def check(self) -> None:
        check_not_above("off_threshold", self.off_threshold, "on_threshold", self.on_threshold)


MWAVE_TARGET_MAX = 2.0  # normalized M-wave: 1 is the reference, a target may ask for more


@dataclass(frozen=True)
class TrackingLaw:
    """PI control of a measured quantity of the channel's muscle toward a target trajectory.

    ``measure``: ``activation`` (0..1) or ``mwave``, the evoked M-wave amplitude
    normalized to the muscle's reference (0..2; holding it compensates fatigue). With
    ``mwave`` the law delivers ``probe_intensity`` open loop until an M-wave is measured
    (and the fresh reference is taken), for at least ``probe_s`` (so the M-waves of the
    stimulator's ramp are out of the smoothing), then the PI starts from that intensity.
    ``target``: [time_s, value] points, linear in between, from the first command;
    after the last point it holds, or repeats every ``period_s`` (0 = hold). The integral
    stops while the output is saturated (anti-windup).
    """

    kind: Literal["tracking"]
    target: tuple[tuple[float, float], ...]
    measure: Literal["activation", "mwave"] = "activation"
    probe_intensity: float = bounded(0.8, 0.0, 1.0, "(mwave: open-loop intensity until an M-wave is measured)")
    probe_s: float = bounded(1.0, 0.0, 60.0, "s (mwave: the shortest probe, so the stimulator's ramp is over)")
    period_s: float = bounded(0.0, 0.0, 86400.0, "s (0 = hold the last value)")
    kp: float = bounded(1.0, 0.0, 100.0, "intensity per unit error")
    ki: float = bounded(1.0, 0.0, 1000.0, "intensity per unit error per s")
    min_intensity: float = bounded(0.0, 0.0, 1.0)
    max_intensity: float = bounded(1.0, 0.0, 1.0)

    @property
    def reads_activation(self) -> bool:
        return self.measure == "activation"

    @property
    def reads_mwave(self) -> bool:
        return self.measure == "mwave"

    def check(self) -> None:
        if not self.target:
            raise ConfigError("target", [], "at least one [time_s, value] point")
        times = [t for t, _ in self.target]
        if times[0] != 0.0 or any(b <= a for a, b in zip(times, times[1:])):
            raise ConfigError("target", [list(p) for p in self.target], "times must start at 0 and increase")
        top = MWAVE_TARGET_MAX if self.measure == "mwave" else 1.0
        if any(not 0.0 <= v <= top for _, v in self.target):
            raise ConfigError(
                "target", [list(p) for p in self.target], f"{self.measure} targets must be within 0..{top:g}"
            )
        if self.period_s and self.period_s < times[-1]:
            raise ConfigError("period_s", self.period_s, f"must be 0 or at least the last target time ({times[-1]:g} s)")
        check_not_above("min_intensity", self.min_intensity, "max_intensity", self.max_intensity)
        if self.measure == "mwave":
            check_not_above("probe_intensity", self.probe_intensity, "max_intensity", self.max_intensity)
        if self.measure == "mwave" and self.probe_intensity <= 0.0:
            raise ConfigError("probe_intensity", self.probe_intensity, "must be above 0 with measure = 'mwave' (no pulse, no M-wave)")


@dataclass(frozen=True)
class CyclingLaw:
    """FES cycling: stimulate while the crank is in ``window_deg`` (this muscle's frame).

    The muscle's crank angle is the ergometer's minus ``offset_deg`` (180 for the right
    side). The window is advanced by cadence x ``emd_s`` (electromechanical delay) and
    ramped over ``ramp_deg`` at each edge; start > end wraps through 0. Intensity is
    ``max_intensity``, or a PI on cadence toward ``target_cadence_rpm`` (> 0); scaled by
    (1 - emg_weight) + emg_weight x activation.
    """

    kind: Literal["cycling"]
    window_deg: tuple[float, float] = bounded(lo=0.0, hi=360.0, unit="deg")
    offset_deg: float = bounded(0.0, 0.0, 360.0, "deg")
    emd_s: float = bounded(0.1, 0.0, 1.0, "s")
    ramp_deg: float = bounded(10.0, 0.0, 180.0, "deg")
    max_intensity: float = bounded(0.8, 0.0, 1.0)
    min_intensity: float = bounded(0.0, 0.0, 1.0)
    target_cadence_rpm: float = bounded(0.0, 0.0, 200.0, "rpm (0 = fixed intensity)")
    kp_per_rpm: float = bounded(0.02, 0.0, 10.0, "intensity per rpm")
    ki_per_rpm_s: float = bounded(0.01, 0.0, 10.0, "intensity per rpm per s")
    emg_weight: float = bounded(0.0, 0.0, 1.0)

    @property
    def reads_activation(self) -> bool:
        return self.emg_weight > 0

    @property
    def reads_mwave(self) -> bool:
        return False

    def check(self) -> None:
        start, end = self.window_deg
        width = (end - start) % 360.0
        if width == 0.0:
            raise ConfigError("window_deg", list(self.window_deg), "start and end must differ")
        if 2 * self.ramp_deg > width:
            raise ConfigError("ramp_deg", self.ramp_deg, f"two ramps must fit in the {width:g} deg window")
        check_not_above("min_intensity", self.min_intensity, "max_intensity", self.max_intensity)


Law = ProportionalLaw | TriggeredLaw | TrackingLaw | CyclingLaw


@dataclass(frozen=True)
class StimulationChannel:
    """One stimulator output: electrode, device settings and the law driving it."""

    name: str
    muscle: str
    device_channel: int = bounded(lo=0, hi=255)
    # Up to 300 cm^2 (the largest garment electrodes are ~10 x 20 cm): an area typed in mm^2 raises the
    # electrode limit a hundredfold; this catches it for electrodes larger than 3 cm^2.
    electrode_area_cm2: float = bounded(lo=0.0, hi=300.0, unit="cm^2")
    threshold_ma: float = bounded(lo=0.0, unit="mA")
    max_ma: float = bounded(lo=0.0, unit="mA")
    pulse_width_us: float = bounded(lo=0.0, unit="us")
    frequency_hz: float = bounded(lo=0.0, unit="Hz")
    # amplitude: intensity sets the current; pulse_width: the current stays at the ceiling and
    # intensity sets the pulse width (the same charge per pulse, never above pulse_width_us).
    modulation: Literal["amplitude", "pulse_width"] = "amplitude"
    law: Law = field(default_factory=ProportionalLaw)


@dataclass(frozen=True)
class DoseLimits:
    """Per-session dose limits the stimulator enforces (0 = no limit).

    Charge is per phase of the biphasic pulse: amplitude x pulse width (mA x us = nC).
    Reaching a limit ramps that channel down and keeps it down for the session.
    """

    max_session_s: float = bounded(3600.0, 0.0, 86400.0, "s")
    max_stimulation_s: float = bounded(1800.0, 0.0, 86400.0, "s per channel")
    max_charge_mc: float = bounded(0.0, 0.0, 1e6, "mC per channel")
    skin_check_after_s: float = bounded(300.0, 0.0, 86400.0, "s of stimulation (0 = no reminder)")


@dataclass(frozen=True)
class StimulatorConfig:
    driver: Literal["simulated", "rehastim2"] = "simulated"
    # The RehaStim2's serial port (/dev/ttyUSB0, COM3, or an emulator's pty); rehastim2 only.
    serial_port: str = ""
    deadline_ms: float = bounded(100.0, 10.0, 1000.0, "ms")
    ramp_s: float = bounded(0.5, 0.1, 60.0, "s (0 to max_ma)")
    max_emg_age_ms: float = bounded(250.0, 10.0, 5000.0, "ms")
    arm_at_start: bool = False
    dose: DoseLimits = field(default_factory=DoseLimits)

    def check(self) -> None:
        if self.driver == "rehastim2" and not self.serial_port:
            raise ConfigError("serial_port", "", "the rehastim2 driver needs its serial port")


ControlRequest = Literal["status", "arm", "disarm", "stop", "reset", "shutdown", "override_dose"]


@dataclass(frozen=True)
class ClientKey:
    """A key besides the three processes' (an operator console, a monitor) and what it may request."""

    key: str
    control: tuple[ControlRequest, ...] = ("status",)


@dataclass(frozen=True)
class SecurityConfig:
    """CurveZMQ: ``keys_dir`` from `fesloop keys generate` (empty: no keys, loopback only).

    Every socket admits only the three process keys and the ``clients`` keys; control
    requests are accepted only from a client key that lists them. A relative
    ``keys_dir`` is taken from the config file's folder.
    """

    keys_dir: str = ""
    operator_key: str = "operator"  # the client key `fesloop run` and `fesloop control` use
    clients: tuple[ClientKey, ...] = ()

    def check(self) -> None:
        names = [c.key for c in self.clients]
        for i, name in enumerate(names):
            if name in ("acquisition", "controller", "stimulator") or names.index(name) != i:
                raise ConfigError(f"clients[{i}].key", name, "client keys are unique and not a process's key")


@dataclass(frozen=True)
class RecordedStream:
    """Another LSL stream to record with the session, chosen by any of name, type and source_id."""

    name: str = ""
    type: str = ""
    source_id: str = ""

    def check(self) -> None:
        if not (self.name or self.type or self.source_id):
            raise ConfigError("name", "", "set at least one of name, type, source_id")


@dataclass(frozen=True)
class RecordingConfig:
    """`fesloop run --record` and `fesloop record`: every fesloop stream plus ``streams``."""

    streams: tuple[RecordedStream, ...] = ()
    wait_s: float = bounded(10.0, 0.5, 120.0, "s (for every stream to appear before recording)")


@dataclass(frozen=True)
class Config:
    name: str = "fesloop"
    endpoints: Endpoints = field(default_factory=Endpoints)
    acquisition: AcquisitionConfig = field(default_factory=AcquisitionConfig)
    controller: ControllerConfig = field(default_factory=ControllerConfig)
    stimulator: StimulatorConfig = field(default_factory=StimulatorConfig)
    muscles: tuple[Muscle, ...] = ()
    stimulation: tuple[StimulationChannel, ...] = ()
    security: SecurityConfig = field(default_factory=SecurityConfig)
    recording: RecordingConfig = field(default_factory=RecordingConfig)

    def check(self) -> None:
        if not self.muscles:
            raise ConfigError("muscles", [], "at least one [[muscles]] entry is required")
        names = [m.name for m in self.muscles]
        _unique_names("muscles", names)
        for i, muscle in enumerate(self.muscles):
            muscle.check_levels(f"muscles[{i}]", placeholders=bool(self.controller.calibration_file))
        _unique_names("stimulation", [s.name for s in self.stimulation])
        columns = [m.emg_channel for m in self.muscles]
        for i, column in enumerate(columns):
            if columns.index(column) != i:
                raise ConfigError(f"muscles[{i}].emg_channel", column, f"already muscles[{columns.index(column)}]'s column")
        sync_channel = self.controller.blanking.sync_channel
        if sync_channel in columns:
            raise ConfigError("controller.blanking.sync_channel", sync_channel, f"is muscles[{columns.index(sync_channel)}]'s EMG column")
        simulated = self.acquisition.simulated
        if self.acquisition.source == "simulated":  # it gives muscle i column i, and no sync column
            for i, column in enumerate(columns):
                if column != i:
                    raise ConfigError(f"muscles[{i}].emg_channel", column, f"the simulated patient's muscle {i} is column {i}")
            if sync_channel >= 0:
                raise ConfigError("controller.blanking.sync_channel", sync_channel, "the simulated patient has no sync column: -1")
        for kind, entries in (("contractions", simulated.contractions), ("faults", simulated.faults)):
            for i, entry in enumerate(entries):
                if entry.muscle not in names and not (kind == "faults" and entry.muscle == ""):
                    raise ConfigError(f"acquisition.simulated.{kind}[{i}].muscle", entry.muscle, f"must be one of {names}")
        device = DEVICES[self.stimulator.driver]
        seen: set[int] = set()
        for i, channel in enumerate(self.stimulation):
            key = f"stimulation[{i}]"
            if channel.muscle not in names:
                raise ConfigError(f"{key}.muscle", channel.muscle, f"must be one of {names}")
            law = channel.law
            period_ms = 1e3 / channel.frequency_hz if channel.frequency_hz > 0 else float("inf")
            window_end_ms = self.controller.mwave.window_end_ms
            if isinstance(law, TrackingLaw) and law.measure == "mwave" and window_end_ms >= period_ms:
                raise ConfigError(
                    "controller.mwave.window_end_ms", window_end_ms,
                    f"must end before the next pulse of {key} ({period_ms:g} ms at {channel.frequency_hz:g} Hz)",
                )
            if channel.device_channel in seen:
                raise ConfigError(f"{key}.device_channel", channel.device_channel, "each device channel once")
            seen.add(channel.device_channel)
            try:
                check_channel(
                    device,
                    channel.device_channel,
                    channel.max_ma,
                    channel.threshold_ma,
                    channel.pulse_width_us,
                    channel.frequency_hz,
                    channel.electrode_area_cm2,
                )
            except LimitError as exc:
                raise ConfigError(f"{key}.{exc.key}", exc.value, exc.limit) from None
        crank = self.controller.crank
        if crank.source == "motomed" and self.stimulator.driver != "rehastim2":
            raise ConfigError(
                "controller.crank.source", "motomed", f"needs stimulator.driver = 'rehastim2' (is {self.stimulator.driver!r})"
            )
        if crank.source == "lsl":
            from fesloop.lsl import stream_query

            try:
                stream_query(crank.name, crank.type, crank.source_id)
            except ValueError as exc:
                raise ConfigError("controller.crank", {"name": crank.name, "type": crank.type, "source_id": crank.source_id}, str(exc)) from None
        if self.stimulator.arm_at_start and self.stimulator.driver != "simulated":
            raise ConfigError("stimulator.arm_at_start", True, "only the simulated driver may arm at start")
        if self.stimulator.driver == "rehastim2" and self.stimulation:
            try:
                plan_channel_list(self.stimulation)
            except LimitError as exc:
                raise ConfigError(exc.key, exc.value, exc.limit) from None

    def muscle_index(self, name: str) -> int:
        return [m.name for m in self.muscles].index(name)


def _unique_names(section: str, names: list[str]) -> None:
    """Names are how operators and streams tell entries apart: each non-empty and used once."""
    for i, name in enumerate(names):
        if not name.strip() or names.index(name) != i:
            raise ConfigError(f"{section}[{i}].name", name, f"names in [[{section}]] must be unique and not empty")


def parse_config(text: str, source: str = "<string>") -> Config:
    """Parse TOML text into a validated Config."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(source, "<file>", f"is not valid TOML: {exc}") from None
    return build(Config, raw)


def load_config(path: str | Path | None = None) -> Config:
    """Load a config file (the demo config when ``path`` is None); a relative path in it (see
    :func:`_paths_from`) is taken from the config file's folder."""
    path = Path(path) if path is not None else DEFAULT_CONFIG
    return _paths_from(parse_config(path.read_text(encoding="utf-8"), str(path)), path.absolute().parent)


def _paths_from(config: Config, folder: Path) -> Config:
    """``config`` with its relative paths (``controller.calibration_file``, ``acquisition.brainflow.file``
    and ``record_file``, ``security.keys_dir``) made absolute from ``folder``: they belong with the
    rig's config, not with the folder a process happens to start in (the supervisor, a process
    started by hand and ``fesloop calibrate`` then agree on every file)."""

    def absolute(file: str) -> str:
        return str(folder / file) if file and not Path(file).is_absolute() else file

    brainflow = config.acquisition.brainflow
    return replace(
        config,
        acquisition=replace(
            config.acquisition,
            brainflow=replace(brainflow, file=absolute(brainflow.file), record_file=absolute(brainflow.record_file)),
        ),
        controller=replace(config.controller, calibration_file=absolute(config.controller.calibration_file)),
        security=replace(config.security, keys_dir=absolute(config.security.keys_dir)),
    )
