"""Playback files with known content, and configs that replay them."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from acquisition.convert import convert
from fesloop.config import Config, parse_config

FS_HZ = 1000.0
ENDPOINTS = """
[endpoints]
emg = "tcp://127.0.0.1:5701"
command = "tcp://127.0.0.1:5702"
pulses = "tcp://127.0.0.1:5703"
acquisition_control = "tcp://127.0.0.1:5711"
controller_control = "tcp://127.0.0.1:5712"
stimulator_control = "tcp://127.0.0.1:5713"
"""
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
{ENDPOINTS}
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


class Tap:
    """Subscribes to an endpoint and keeps every message, pumped from the test's own wait loops."""

    def __init__(self, endpoint: str, topics: list[bytes]) -> None:
        import zmq

        from fesloop.sockets import StreamCounters, subscriber

        self._ctx = zmq.Context()
        self._sock = subscriber(self._ctx, endpoint, topics, hwm=100000)
        self._counters = StreamCounters()
        self.messages: dict[bytes, list] = {}

    def pump(self) -> Tap:
        from fesloop import protocol
        from fesloop.sockets import drain

        for message in drain(self._sock, self._counters):
            self.messages.setdefault(protocol.TOPICS[message.header.kind], []).append(message)
        return self

    def get(self, topic: bytes) -> list:
        return self.pump().messages.get(topic, [])

    def statuses(self) -> list[dict]:
        return [m.body.fields for m in self.get(b"status")]

    def close(self) -> None:
        self._ctx.destroy(linger=0)


def emg_series(messages: list) -> tuple[np.ndarray, np.ndarray]:
    """Sample indices and samples of every emg (or truth) chunk received, in order."""
    index = np.concatenate([m.body.first_sample_index + np.arange(len(m.body.data)) for m in messages])
    return index, np.vstack([m.body.data for m in messages])
