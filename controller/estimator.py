"""EMG chunk in, activation, gate reasons and events out: the one code path of live and replay.

Pure (no I/O): the live controller and ``fesloop replay`` both feed chunks to
:class:`EmgEstimator` and read what it leaves. Per chunk: artifact windows (delivered
pulses, a sync channel, detection in the signal), hold across them, band filters,
optional pulse-locked residual removal, envelope over valid samples, contamination,
onset/offset, normalization; in parallel, on the raw samples before blanking, the
evoked M-wave amplitude of each stimulated muscle (:class:`controller.mwave.MWaveEstimator`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from controller.artifacts import ArtifactFinder
from controller.blanking import Blanker
from controller.calibration import Calibration
from controller.contamination import ContaminationDetector
from controller.buffers import Columns, RepeatedRow, Rows, column_steps
from controller.dsp import EnvelopeEstimator, Normalization
from controller.mwave import MWaveEstimator
from controller.onset import OnsetDetector
from controller.residual import ResponseCanceller
from fesloop import protocol
from fesloop.config import Config, ControllerConfig
from fesloop.protocol import GateReason

ONSET_TICK_S = 1e-3  # onset/offset are examined (and dated) to the millisecond
ALL_CHANNELS = "all"


@dataclass(frozen=True, slots=True)
class Event:
    """Something found in the EMG: ``kind`` is onset, offset, contamination_start/_end or artifact."""

    time_s: float
    channel: str  # a muscle name, or ALL_CHANNELS for artifacts
    kind: str


class EmgEstimator:
    """Everything between an EMG chunk and an activation per muscle (no I/O).

    Allocates no array data per chunk: ``activation`` is updated in place, and
    ``envelope_uv`` / ``filtered_uv`` / ``contamination_flags`` are views of buffers the next
    chunk overwrites (copy what must be kept).
    """

    def __init__(
        self, config: Config, fs_hz: float, n_channels: int, calibration: Calibration | None = None
    ) -> None:
        cc = config.controller
        self.fs_hz = fs_hz
        self.n_channels = n_channels
        self.names = [m.name for m in config.muscles]
        self._channels = np.array([m.emg_channel for m in config.muscles])
        levels = [calibration.muscle(m.name) if calibration else m for m in config.muscles]
        self.rest_uv = np.array([m.rest_uv for m in levels])
        self.mvc_uv = np.array([m.mvc_uv for m in levels])
        rest_sd_uv = np.array([m.rest_sd_uv for m in levels])
        n_muscles = len(self.names)
        blanking = cc.blanking
        pre_s, post_s = blanking.pre_ms * 1e-3, blanking.post_ms * 1e-3
        self.blanker = Blanker(pre_s, post_s) if blanking.from_pulses else None
        self._sync_channel = blanking.sync_channel if blanking.sync_channel >= 0 else None
        self.finder = (
            ArtifactFinder(
                n_muscles, fs_hz, pre_s, post_s,
                blanking.detect_slope_uv_per_ms if blanking.detect else None,
                blanking.sync_threshold if self._sync_channel is not None else None,
            )
            if blanking.detect or self._sync_channel is not None
            else None
        )
        self.envelope = EnvelopeEstimator(fs_hz, n_muscles, cc.filters)
        residual = cc.residual
        self.canceller = (
            ResponseCanceller(
                n_muscles, int(round(residual.window_ms * 1e-3 * fs_hz)), residual.method, residual.taps, residual.step
            )
            if residual.method != "none"
            else None
        )
        self._muscle_of_device = {s.device_channel: config.muscle_index(s.muscle) for s in config.stimulation}
        self.mwave = MWaveEstimator(
            cc.mwave, fs_hz, self._muscle_of_device, np.array([m.mwave_reference_uv for m in config.muscles])
        )
        self.stim_muscle = np.array([config.muscle_index(s.muscle) for s in config.stimulation], dtype=int)
        self._reads_activation = np.array([s.law.reads_activation for s in config.stimulation], dtype=bool)
        # Laws that go wrong without the stimulator's pulse reports: reading the activation when artifacts
        # are blanked or cancelled from them, or the M-waves measured after them (held, the PI winds up).
        blanks_from_reports = self.blanker is not None or self.canceller is not None
        reads_mwave = np.array([s.law.reads_mwave for s in config.stimulation], dtype=bool)
        self._needs_reports = (self._reads_activation & blanks_from_reports) | reads_mwave
        # The filters start afresh where contamination ends: the hold-off lasts stale_ms at least, the
        # envelope's settling (as after blanking), or the gate reopens on an envelope rising from 0.
        holdoff_ms = max(cc.contamination.holdoff_ms, cc.stale_ms)
        self.contamination = ContaminationDetector(fs_hz, n_muscles, replace(cc.contamination, holdoff_ms=holdoff_ms))
        self.onset = OnsetDetector(*self._onset_thresholds(cc, rest_sd_uv), *self._onset_timing(cc, fs_hz))
        self._pending_pulses: list[tuple[np.ndarray, np.ndarray]] = []
        self._was_contaminated = np.zeros(n_muscles, dtype=bool)
        self._received = 0  # samples processed: the contamination hold-off counts these, not indices
        self._was_bad = np.zeros(n_muscles, dtype=bool)
        self._restart_rows = Columns(n_muscles, dtype=bool)  # where each muscle's filters start afresh
        self._restart_filtered = Columns(n_muscles)  # a block split where contamination ended
        self._restart_envelope = Columns(n_muscles)
        self._normalization = Normalization(self.rest_uv, self.mvc_uv)
        self.activation = np.zeros(n_muscles)  # updated in place by every chunk
        # The last block's envelope and band-filtered EMG, aligned with its samples (views of reused buffers).
        self.envelope_uv = np.zeros((0, n_muscles))
        self.filtered_uv = np.zeros((0, n_muscles))
        # Per sample of the last block: flagged contaminated (hold-off included), aligned with envelope_uv.
        self.contamination_flags = np.zeros((0, n_muscles), dtype=bool)
        self._never_flagged = RepeatedRow(np.zeros(n_muscles, dtype=bool))  # the flags when detection is off
        first_channel = int(self._channels[0]) if n_muscles else 0
        in_order = np.array_equal(self._channels, np.arange(first_channel, first_channel + n_muscles))
        self._channel_slice = slice(first_channel, first_channel + n_muscles) if in_order else None
        self._picked: dict[np.dtype, Rows] = {}  # muscles' columns in the chunk's own dtype (the other case)
        self._raw = Columns(n_muscles)
        self._all_valid = Rows(dtype=bool)
        self._changed = Columns(n_muscles, dtype=bool)
        self._stim_contaminated = np.zeros(len(self.stim_muscle), dtype=bool)
        self._time_base = (0, 0.0)  # (sample index, its time in s) of the chunk being processed
        self.delay = self.finder.delay if self.finder is not None else 0
        self.events: list[Event] = []
        self.artifacts_detected = 0
        self.next_index: int | None = None
        self.gap_samples = 0
        # Samples since the last one not blanked: beyond stale_ms the envelope is only held, not measured.
        self.blanked_run = 0
        self._blanked_limit = int(round(cc.stale_ms * 1e-3 * fs_hz))
        self._valid_since_unblanked = self._blanked_limit  # unblanked samples since the last such stretch ended
        self._unfinished_raw: tuple[int, float, np.ndarray] | None = None  # (first index, its time, muscles' raw EMG)
        self._unfinished_envelope_first = 0

    def _onset_thresholds(self, cc: ControllerConfig, rest_sd_uv: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        onset = cc.onset
        if onset.mode == "rest_sd":  # without a rest SD (not calibrated yet) no onset is declared
            on_uv = np.where(rest_sd_uv > 0, self.rest_uv + onset.k_sd * rest_sd_uv, np.inf)
        else:
            on_uv = self.rest_uv + onset.mvc_fraction * (self.mvc_uv - self.rest_uv)
        off_uv = np.where(np.isfinite(on_uv), self.rest_uv + onset.off_ratio * (on_uv - self.rest_uv), np.inf)
        return on_uv, off_uv

    @staticmethod
    def _onset_timing(cc: ControllerConfig, fs_hz: float) -> tuple[int, int, int]:
        tick = max(int(round(ONSET_TICK_S * fs_hz)), 1)
        return tick, int(round(cc.onset.min_on_ms * 1e-3 * fs_hz)), int(round(cc.onset.min_off_ms * 1e-3 * fs_hz))

    @property
    def contaminated(self) -> np.ndarray:
        """Per muscle: is its EMG contaminated now (hold-off included)?"""
        return self.contamination.contaminated

    def add_pulses(
        self,
        time_s: np.ndarray,
        device_channel: np.ndarray,
        amplitude_ma: np.ndarray | None = None,
        pulse_width_us: np.ndarray | None = None,
    ) -> None:
        """Delivered pulses: blank every channel around them; lock residual removal and M-wave windows to them.

        Amplitude and pulse width (when known) give each pulse's charge: zero-charge
        pulses evoke no M-wave, and the fresh M-wave reference needs a steady charge.
        """
        charge_nc = None if amplitude_ma is None else np.asarray(amplitude_ma, dtype=np.float64)
        if charge_nc is not None and pulse_width_us is not None:
            charge_nc = charge_nc * np.asarray(pulse_width_us, dtype=np.float64) * 1e-3
        self.mwave.add_pulses(time_s, device_channel, charge_nc)
        if self.blanker is not None:
            self.blanker.add_pulses(time_s)
        if self.canceller is not None:
            self._pending_pulses.append((np.asarray(time_s, dtype=np.float64), np.asarray(device_channel)))

    def gate_reasons(self, out: np.ndarray) -> None:
        """Per stimulation channel: CONTAMINATED where its muscle's EMG is; BLANKED where its law reads
        the activation and no sample of the last stale_ms was left unblanked (artifact windows cover
        the stimulation period: the held activation would keep stimulating whatever the muscle
        does), and until stale_ms of unblanked samples have passed since, while the envelope, started
        afresh, settles; else OPEN."""
        np.take(self.contaminated, self.stim_muscle, out=self._stim_contaminated)
        out[:] = GateReason.OPEN
        np.copyto(out, GateReason.CONTAMINATED, where=self._stim_contaminated, casting="unsafe")
        if self.blanked_run > self._blanked_limit or self._valid_since_unblanked < self._blanked_limit:
            np.copyto(out, GateReason.BLANKED, where=self._reads_activation, casting="unsafe")

    def close_without_pulse_reports(self, out: np.ndarray) -> None:
        """NO_PULSE_REPORTS where the law needs the stimulator's pulse reports: with them not coming,
        artifacts would read as activation (more stimulation, more artifacts), and the M-wave would be
        held while the tracking PI integrates its error up to the maximum."""
        np.copyto(out, GateReason.NO_PULSE_REPORTS, where=self._needs_reports, casting="unsafe")

    def process(self, chunk: protocol.EmgChunk) -> bool:
        """Everything for one chunk (:meth:`update`, then :meth:`finish`); False when it follows a gap."""
        contiguous = self.update(chunk)
        self.finish()
        return contiguous

    def update(self, chunk: protocol.EmgChunk) -> bool:
        """What a command needs: activation and contamination; False when the chunk follows a gap (samples lost).

        The rest (M-wave windows, onset/offset events) waits for :meth:`finish`, so the
        live controller can send its command first; the next chunk finishes it if no
        one did. Pulses added in between get their windows on this chunk's time base
        instead of the next one's: the same sample indices when chunk times follow
        the sample clock.
        """
        self.finish()
        contiguous = self.next_index is None or chunk.first_sample_index == self.next_index
        if not contiguous:
            self.gap_samples += max(chunk.first_sample_index - (self.next_index or 0), 0)
        n = chunk.data.shape[0]
        first = chunk.first_sample_index
        self.next_index = first + n
        self._time_base = (first, chunk.first_sample_time_s)
        raw_uv = self._muscle_columns(chunk.data)
        self._unfinished_raw = (first, chunk.first_sample_time_s, raw_uv)
        if self._pending_pulses:
            self._lock_pending_pulses(chunk)
        if self.finder is not None:
            sync = chunk.data[:, self._sync_channel] if self._sync_channel is not None else None
            raw_uv, valid, new_artifacts = self.finder.process(raw_uv, first, sync)
            first -= self.finder.delay
            self.artifacts_detected += len(new_artifacts)
            for index in new_artifacts:
                self.events.append(Event(self._time_of(index), ALL_CHANNELS, "artifact"))
                if self.canceller is not None:
                    self.canceller.add_pulse(index)
        else:
            valid = self._all_valid(n)
            valid[:] = True
        if self.blanker is not None:
            np.logical_and(valid, self.blanker.valid_mask(self._time_of(first), self.fs_hz, n), out=valid)
        runs = self.envelope.valid_runs(valid)
        unblanked_rows = self._note_blanking(runs, valid, n)
        held_uv = self.envelope.hold(raw_uv, runs)
        restarts = None
        if self.contamination.enabled:
            # The hold-off counts samples received: samples lost in a gap do not shorten it.
            self.contamination_flags = self.contamination.process(raw_uv, held_uv, self._received)
            self._contamination_events(self.contamination_flags, first)
            restarts = self._clean_again(self.contamination.bad)
        else:
            self.contamination_flags = self._never_flagged(n)
        if unblanked_rows:  # measured again from scratch, not from the activation held across the blanking
            restarts = self._restart_every_muscle(unblanked_rows, restarts, n)
        self._received += n
        if restarts is None:
            filtered_uv = self.envelope.band(held_uv)
            if self.canceller is not None:
                filtered_uv = self.canceller.process(filtered_uv, first)
            envelope_uv = self.envelope.envelope(filtered_uv, runs)
        else:
            filtered_uv, envelope_uv = self._filter_restarting(held_uv, valid, first, restarts)
        self.envelope_uv = envelope_uv
        self.filtered_uv = filtered_uv
        self._unfinished_envelope_first = first
        if n:
            self._normalization(envelope_uv[-1], out=self.activation)
        return contiguous

    def finish(self) -> None:
        """M-wave windows and onset/offset events of the last chunk :meth:`update` took (once)."""
        if self._unfinished_raw is None:
            return
        first, first_time_s, raw_uv = self._unfinished_raw
        self._unfinished_raw = None
        self.mwave.process(first, first_time_s, raw_uv)
        for index, muscle, is_onset in self.onset.process(self.envelope_uv, self._unfinished_envelope_first):
            self.events.append(Event(self._time_of(index), self.names[muscle], "onset" if is_onset else "offset"))

    def _muscle_columns(self, data: np.ndarray) -> np.ndarray:
        """The muscles' EMG columns of a chunk, as float64 in a reused buffer."""
        raw_uv = self._raw(data.shape[0])
        if self._channel_slice is not None:
            np.copyto(raw_uv, data[:, self._channel_slice])
        else:
            rows = self._picked.get(data.dtype)
            if rows is None:
                rows = self._picked[data.dtype] = Rows(len(self._channels), dtype=data.dtype)
            picked = rows(data.shape[0])
            np.take(data, self._channels, axis=1, out=picked, mode="clip")
            np.copyto(raw_uv, picked)
        return raw_uv

    def _time_of(self, index: int) -> float:
        """Time (s) of absolute sample ``index``, on the clock of the chunk being processed."""
        first, first_time_s = self._time_base
        return first_time_s + (index - first) / self.fs_hz

    def _lock_pending_pulses(self, chunk: protocol.EmgChunk) -> None:
        """Give the canceller the pulses of each muscle, as absolute sample indices."""
        for time_s, device_channel in self._pending_pulses:
            indices = chunk.first_sample_index + np.round((time_s - chunk.first_sample_time_s) * self.fs_hz)
            for index, channel in zip(indices.astype(int), device_channel):
                muscle = self._muscle_of_device.get(int(channel))
                if muscle is not None:
                    self.canceller.add_pulse(int(index), muscle)
        self._pending_pulses.clear()

    def _contamination_events(self, flags: np.ndarray, first: int) -> None:
        if not len(flags):
            return
        changed = self._changed(len(flags))
        column_steps(flags, self._was_contaminated, changed, np.not_equal)
        if changed.any():
            for local, muscle in zip(*np.nonzero(changed)):
                kind = "contamination_start" if flags[local, muscle] else "contamination_end"
                self.events.append(Event(self._time_of(first + int(local)), self.names[muscle], kind))
        self._was_contaminated[:] = flags[-1]

    def _note_blanking(self, runs: list[int] | None, valid: np.ndarray, n: int) -> list[int]:
        """Count the blanked run (BLANKED) and the unblanked samples since the envelope last started
        afresh (it settles on those only); the rows where it starts afresh in this block."""
        unblanked_rows = self._after_long_blanking(runs, n)
        if unblanked_rows:
            self._valid_since_unblanked = int(np.count_nonzero(valid[unblanked_rows[-1] :]))
        else:
            self._valid_since_unblanked += int(np.count_nonzero(valid))
        if n:  # (an empty block says nothing about blanking)
            self.blanked_run = 0 if runs is None else n - runs[-1] if runs else self.blanked_run + n
        return unblanked_rows

    def _restart_every_muscle(self, rows: list[int], restarts: np.ndarray | None, n: int) -> np.ndarray:
        """``restarts`` (per row and muscle, or None: nowhere) with every muscle restarting at ``rows``."""
        if restarts is None:
            restarts = self._restart_rows(n)
            restarts[:] = False
        for row in rows:
            restarts[row] = True
        return restarts

    def _after_long_blanking(self, runs: list[int] | None, n: int) -> list[int]:
        """Rows where samples are valid again after more than stale_ms blanked (``runs`` as
        :meth:`EnvelopeEstimator.valid_runs` gives them): the envelope was only held across them,
        so the filters start afresh there (BLANKED must not reopen on the held activation)."""
        if runs is None:
            return [0] if self.blanked_run > self._blanked_limit and n else []
        starts, stops = runs[::2], [-self.blanked_run, *runs[1::2]]  # blanked stretches end where runs start
        return [start for start, stop in zip(starts, stops) if start - stop > self._blanked_limit]

    def _clean_again(self, bad: np.ndarray) -> np.ndarray | None:
        """Per sample and muscle, where the signal turned clean after contaminated samples (None: nowhere).
        The filters start afresh there, so they settle during the hold-off on clean samples only."""
        if not len(bad):
            return None
        ended = self._restart_rows(len(bad))
        column_steps(bad, self._was_bad, ended, np.less)  # clean now, bad before
        self._was_bad[:] = bad[-1]
        return ended if ended.any() else None

    def _filter_restarting(
        self, held_uv: np.ndarray, valid: np.ndarray, first: int, ended: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Band filters and envelope of a block in which contamination ended (rare): split at each row
        where it ended for some muscle, whose filters start afresh there (the same rows whatever the
        chunking, so the estimate stays chunk-invariant)."""
        n = held_uv.shape[0]
        filtered_uv, envelope_uv = self._restart_filtered(n), self._restart_envelope(n)
        rows = np.flatnonzero(ended.any(axis=1)).tolist()
        starts = rows if rows[0] == 0 else [0, *rows]
        for lo, hi in zip(starts, [*starts[1:], n]):
            if ended[lo].any():
                self.envelope.restart(ended[lo], held_uv[lo])
            self._filter_rows(held_uv, valid, first, lo, hi, filtered_uv, envelope_uv)
        return filtered_uv, envelope_uv

    def _filter_rows(
        self, held_uv: np.ndarray, valid: np.ndarray, first: int, lo: int, hi: int,
        filtered_uv: np.ndarray, envelope_uv: np.ndarray,
    ) -> None:  # fmt: skip
        """Rows ``lo:hi`` of a block through band filters, canceller and envelope, into the outputs."""
        filtered = self.envelope.band(held_uv[lo:hi])
        if self.canceller is not None:
            filtered = self.canceller.process(filtered, first + lo)
        envelope_uv[lo:hi] = self.envelope.envelope(filtered, self.envelope.valid_runs(valid[lo:hi]))
        filtered_uv[lo:hi] = filtered
