"""Playback files with known content, and configs that replay them."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from acquisition.convert import convert
from fesloop.config import Config, parse_config

FS_HZ = 1000.0
SHIPPED_PLAYBACK = Path(__file__).resolve().parents[2] / "acquisition" / "data" / "biosppy_emg_1_callibri.tsv"


def ramp_playback(path: Path, n: int, delete: list[tuple[int, int]] = (), duplicate: list[int] = ()) -> np.ndarray:
    """A CALLIBRI_EMG playback file whose EMG value is the sample index (uV), with the
    lines [start, stop) of ``delete`` taken out and the lines in ``duplicate`` written
    twice: a transport that lost and repeated samples. Returns the lines' sample values."""
    convert(np.arange(n, dtype=np.float64)[:, None], FS_HZ, "CALLIBRI_EMG_BOARD", path)
    lines = path.read_text().splitlines(keepends=True)
    gone = set()
    for start, stop in delete:
        gone.update(range(start, stop))
    kept = []
    for i, line in enumerate(lines):
        if i in gone:
            continue
        kept.append(line)
        if i in duplicate:
            kept.append(line)
    path.write_text("".join(kept))
    return np.array([float(line.split("\t")[1]) for line in kept])


def playback_config_text(path: Path, loop: bool = False, extra: str = "", acquisition: str = "") -> str:
    return f"""
name = "playbacktest"
[acquisition]
source = "brainflow"
{acquisition}
[acquisition.brainflow]
board = "PLAYBACK_FILE_BOARD"
master_board = "CALLIBRI_EMG_BOARD"
file = "{path}"
playback_loop = {str(loop).lower()}
{extra}
[[muscles]]
name = "forearm"
emg_channel = 0
rest_uv = 4.0
mvc_uv = 120.0
"""


def playback_config(path: Path, loop: bool = False, extra: str = "") -> Config:
    return parse_config(playback_config_text(path, loop, extra))
