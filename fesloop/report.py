"""``fesloop report FILE.xdf``: figures (PNG) and a Markdown summary of a recorded session.

Reads the XDF (:mod:`fesloop.xdf_session`) and draws with matplotlib's Agg backend (headless): one page
per muscle (raw and filtered EMG with stimulation-artifact and contamination windows
shaded, envelope, activation with onsets), one page per stimulation channel
(commanded intensity vs delivered amplitude, pulse raster), and a latency histogram.
``summary.md`` lists the streams, the latency p50/p99/max, and a table of faults, gaps
and dropped samples.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from fesloop.xdf_session import Session, load_session  # noqa: E402

ARTIFACT_COLOR = "tab:orange"
CONTAMINATION_COLOR = "tab:red"


def _windows(session: Session, muscle: str) -> tuple[list[tuple[float, float]], list[tuple[float, float]]]:
    """Stimulation-artifact windows (from the delivered pulses) and contamination windows of a muscle."""
    blanking = session.config.get("controller", {}).get("blanking", {})
    pre_s, post_s = blanking.get("pre_ms", 1.0) * 1e-3, blanking.get("post_ms", 20.0) * 1e-3
    pulses = session.get("pulses")
    artifacts = [(t - pre_s, t + post_s) for t in pulses.times_s] if pulses is not None else []
    contamination, start = [], None
    for t, _process, text in session.markers():
        if text == f"contamination_start {muscle}":
            start = t
        elif text == f"contamination_end {muscle}" and start is not None:
            contamination.append((start, t))
            start = None
    if start is not None:
        contamination.append((start, float("inf")))
    return artifacts, contamination


def _shade(ax: plt.Axes, windows: list[tuple[float, float]], color: str, label: str) -> None:
    for i, (a, b) in enumerate(windows):
        ax.axvspan(a, b, color=color, alpha=0.25, lw=0, label=label if i == 0 else None)


def _muscle_page(session: Session, index: int, muscle: str, out: Path) -> Path:
    fig, axes = plt.subplots(4, 1, figsize=(11, 9), sharex=True)
    artifacts, contamination = _windows(session, muscle)
    for ax, key, title in ((axes[0], "emg", "raw EMG"), (axes[1], "filtered-emg", "filtered EMG")):
        stream = session.get(key)
        if stream is not None and len(stream.times_s):
            column = stream.labels.index(muscle) if muscle in stream.labels else index
            ax.plot(stream.times_s, np.asarray(stream.data)[:, column], lw=0.4, color="k")
        _shade(ax, artifacts, ARTIFACT_COLOR, "stimulation artifact window")
        _shade(ax, contamination, CONTAMINATION_COLOR, "contamination")
        ax.set_ylabel(f"{title} (uV)")
    envelope = session.get("envelope")
    if envelope is not None and len(envelope.times_s):
        axes[2].plot(envelope.times_s, np.asarray(envelope.data)[:, index], lw=0.8)
    axes[2].set_ylabel("envelope (uV)")
    activation = session.get("activation")
    if activation is not None and len(activation.times_s):
        axes[3].plot(activation.times_s, np.asarray(activation.data)[:, index], lw=0.8, label="activation")
    onsets = [t for t, _p, text in session.markers() if text == f"onset {muscle}"]
    for i, t in enumerate(onsets):
        axes[3].axvline(t, color="tab:green", ls="--", lw=0.8, label="onset" if i == 0 else None)
    axes[3].set_ylabel("activation")
    axes[3].set_xlabel("time (s)")
    for ax in (axes[0], axes[3]):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="upper right", fontsize=8)
    fig.suptitle(f"{session.config.get('name', '')}: muscle {muscle}")
    return _save(fig, out / f"muscle_{index}_{muscle}.png")


def _save(fig: plt.Figure, path: Path) -> Path:
    """Lay out, write the PNG page and free the figure."""
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _channel_page(session: Session, index: int, channel: dict[str, Any], out: Path) -> Path:
    fig, axes = plt.subplots(2, 1, figsize=(11, 6), sharex=True)
    name = channel["name"]
    stimulation = session.get("stimulation")
    if stimulation is not None and len(stimulation.times_s):
        data = np.asarray(stimulation.data)
        intensity = axes[0].twinx()
        intensity.plot(stimulation.times_s, data[:, stimulation.labels.index(f"{name}_intensity")],
                       color="tab:blue", lw=0.8)
        intensity.set_ylabel("commanded intensity (0-1)", color="tab:blue")
        intensity.set_ylim(-0.05, 1.05)
        axes[0].plot(stimulation.times_s, data[:, stimulation.labels.index(f"{name}_amplitude_ma")],
                     color="tab:orange", lw=0.8)
    axes[0].set_ylabel("delivered amplitude (mA)", color="tab:orange")
    pulses = session.get("pulses")
    if pulses is not None and len(pulses.times_s):
        data = np.asarray(pulses.data)
        mine = data[:, 0] == channel["device_channel"]
        axes[1].vlines(pulses.times_s[mine], 0, data[mine, 1], lw=0.6)
    axes[1].set_ylabel("pulse amplitude (mA)")
    axes[1].set_xlabel("time (s)")
    fig.suptitle(f"{session.config.get('name', '')}: stimulation channel {name} (device channel {channel['device_channel']})")
    return _save(fig, out / f"channel_{index}_{name}.png")


def latency_summary_ms(session: Session) -> dict[str, float] | None:
    stream = session.get("latency")
    if stream is None or not len(stream.times_s):
        return None
    values = np.asarray(stream.data, dtype=np.float64)[:, 0]
    p50, p99 = np.percentile(values, [50, 99])
    return {"p50": float(p50), "p99": float(p99), "max": float(values.max()), "n": len(values)}


def _latency_page(session: Session, out: Path) -> Path | None:
    summary = latency_summary_ms(session)
    if summary is None:
        return None
    values = np.asarray(session.get("latency").data, dtype=np.float64)[:, 0]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.hist(values, bins=60, color="tab:blue")
    for key, style in (("p50", "--"), ("p99", ":"), ("max", "-")):
        ax.axvline(summary[key], color="k", ls=style, lw=1, label=f"{key} {summary[key]:.1f} ms")
    ax.set_xlabel("end-to-end latency per command (ms): EMG reached acquisition -> update handed to the driver")
    ax.set_ylabel("commands")
    ax.legend()
    return _save(fig, out / "latency.png")


def summary_markdown(session: Session, figures: list[Path]) -> str:
    """Streams, latency, and every fault, gap, contamination window and dropped sample."""
    lines = [f"# Session {session.config.get('name', '?')}", "", "## Streams", "",
             "| stream | type | samples | pushed (final status) | dropped |", "|---|---|---|---|---|"]
    counts = {k: v for p in ("acquisition", "controller", "stimulator") for k, v in session.final_status(p).get("lsl", {}).items()}
    for key, stream in sorted(session.streams.items()):
        c = counts.get(key, {})
        lines.append(f"| {key} | {stream.type} | {len(stream.times_s)} | {c.get('pushed', '-')} | {c.get('dropped', '-')} |")
    latency = latency_summary_ms(session)
    lines += ["", "## End-to-end latency", ""]
    lines.append(
        f"p50 {latency['p50']:.2f} ms, p99 {latency['p99']:.2f} ms, max {latency['max']:.2f} ms over {latency['n']} commands"
        if latency else "no latency recorded"
    )
    acquisition = session.final_status("acquisition")
    lines += ["", "## Faults, gaps, dropped samples", "", "| time (s) | process | event |", "|---|---|---|"]
    notable = ("fault", "FAULT", "gap", "contamination", "STOP", "recovered", "->")
    events = [(t, p, text) for t, p, text in session.markers() if any(n in text for n in notable)]
    lines += [f"| {t:.3f} | {p} | {text} |" for t, p, text in events] or ["| - | - | none |"]
    dropped = sum(c.get("dropped", 0) for c in counts.values())
    failed = sum(c.get("failed", 0) for c in counts.values())
    lines += ["", f"- EMG samples lost at the source: {acquisition.get('lost_samples', '?')} in {acquisition.get('gaps', '?')} gaps",
              f"- samples dropped on the way to LSL (full queue): {dropped}",
              f"- items liblsl refused (not in the recording): {failed}", "", "## Figures", ""]
    lines += [f"![{f.stem}]({f.name})" for f in figures]
    return "\n".join(lines) + "\n"


def write_report(path: Path, out: Path) -> list[Path]:
    """Write the figures and summary.md into ``out``; returns every file written."""
    session = load_session(path)
    out.mkdir(parents=True, exist_ok=True)
    figures = [_muscle_page(session, i, m["name"], out) for i, m in enumerate(session.config.get("muscles", []))]
    figures += [_channel_page(session, i, c, out) for i, c in enumerate(session.config.get("stimulation", []))]
    latency = _latency_page(session, out)
    figures += [latency] if latency else []
    summary = out / "summary.md"
    summary.write_text(summary_markdown(session, figures), encoding="utf-8")
    return [*figures, summary]


def main(path: Path, out: Path | None) -> int:
    if not path.exists():
        sys.exit(f"fesloop report: {path}: no such file")
    try:
        written = write_report(path, out or path.with_suffix(""))
    except (OSError, ValueError) as exc:  # not an XDF file, a truncated one, an output folder that cannot be written
        sys.exit(f"fesloop report: {path}: {exc}")
    print("\n".join(str(p) for p in written))
    return 0
