"""A recorded fesloop session read from XDF: its streams, their fesloop descriptions, the config.

Shared by ``fesloop report`` (figures), ``fesloop replay`` and ``fesloop convert`` (EMG and
pulses from a recording); reading needs pyxdf only, no plotting library.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyxdf


@dataclass
class Stream:
    """One recorded stream: samples, timestamps (s from the session start), its fesloop description."""

    name: str
    type: str
    labels: list[str]
    times_s: np.ndarray
    data: Any
    description: dict[str, str] = field(default_factory=dict)
    rate_hz: float = 0.0  # nominal sampling rate (0: irregular)


@dataclass
class Session:
    streams: dict[str, Stream]  # by key: the name without the "<config name>-" prefix
    config: dict[str, Any]
    t0_s: float

    def get(self, key: str) -> Stream | None:
        return self.streams.get(key)

    def markers(self) -> list[tuple[float, str, str]]:
        """(time s from the session start, process, text) of every fesloop marker, in time order."""
        out = []
        for key, stream in self.streams.items():
            if stream.type == "Markers" and key.endswith("-markers"):
                out += [(float(t), key.removesuffix("-markers"), row[0]) for t, row in zip(stream.times_s, stream.data)]
        return sorted(out)

    def final_status(self, process: str) -> dict[str, Any]:
        stream = self.get(f"{process}-status")
        return json.loads(stream.data[-1][0]) if stream is not None and len(stream.data) else {}


def _text(info: dict[str, Any], key: str) -> str:
    return (info.get(key) or [""])[0] or ""


def load_session(path: Path) -> Session:
    """The fesloop streams of a recording (others kept under their own names), times from the first sample."""
    raw, _header = pyxdf.load_xdf(str(path), dejitter_timestamps=False)
    streams: dict[str, Stream] = {}
    config: dict[str, Any] = {}
    for s in raw:
        info = s["info"]
        desc = (info.get("desc") or [None])[0] or {}
        fesloop = {k: v[0] for k, v in ((desc.get("fesloop") or [{}])[0] or {}).items() if v}
        if fesloop.get("config") and not config:
            config = json.loads(fesloop["config"])
        channels = ((desc.get("channels") or [{}])[0] or {}).get("channel") or []
        name = _text(info, "name")
        streams[name] = Stream(
            name, _text(info, "type"), [_text(c, "label") for c in channels],
            np.asarray(s["time_stamps"], dtype=np.float64), s["time_series"], fesloop,
            float(_text(info, "nominal_srate") or 0.0),
        )
    prefix = f"{config.get('name', '')}-"
    by_key = {n.removeprefix(prefix) if s.description else n: s for n, s in streams.items()}
    starts = [s.times_s[0] for s in by_key.values() if len(s.times_s)]
    t0_s = min(starts) if starts else 0.0
    for stream in by_key.values():
        stream.times_s = stream.times_s - t0_s
    return Session(by_key, config, t0_s)
