"""Test helpers for published streams: a background recorder, pulse arrays, a stand-in acquisition."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import numpy as np
import zmq

from fesloop import protocol
from fesloop.sockets import StreamCounters, drain, subscriber


@dataclass
class Recorder:
    """Subscribes to published topics in a background thread and keeps every message."""

    endpoints: dict[str, list[bytes]]
    messages: dict[bytes, list[protocol.Message]] = field(default_factory=dict)
    counters: StreamCounters = field(default_factory=StreamCounters)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._ctx = zmq.Context()
        self._socks = [subscriber(self._ctx, ep, topics, hwm=100000) for ep, topics in self.endpoints.items()]
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        poller = zmq.Poller()
        for sock in self._socks:
            poller.register(sock, zmq.POLLIN)
        while not self._stop.is_set():
            for sock, _ in poller.poll(50):
                for message in drain(sock, self.counters):
                    self.messages.setdefault(protocol.TOPICS[message.header.kind], []).append(message)

    def get(self, topic: bytes) -> list[protocol.Message]:
        return list(self.messages.get(topic, []))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._ctx.destroy(linger=0)


def pulses_array(messages: list[protocol.Message]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(channel, time_s, amplitude_ma) of every pulse published."""
    if not messages:
        return np.zeros(0, int), np.zeros(0), np.zeros(0)
    bodies = [m.body for m in messages]
    return (
        np.concatenate([b.channel for b in bodies]).astype(int),
        np.concatenate([b.time_s for b in bodies]),
        np.concatenate([b.amplitude_ma for b in bodies]),
    )


class EmgFeed:
    """A stand-in acquisition: publishes recorded EMG as ``emg`` chunks, each right after the last.

    An XPUB socket, so :meth:`wait_for_subscriber` can hold the first chunk until someone
    listens (a PUB drops what it sends before the subscription arrives); it never drops a
    chunk after that, however fast the test sends.
    """

    def __init__(self, endpoint: str, fs_hz: float, chunk: int) -> None:
        self.fs_hz = fs_hz
        self.chunk = chunk
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.XPUB)
        self._sock.setsockopt(zmq.SNDHWM, 0)
        self._sock.bind(endpoint)
        self._seq = 0
        self._next_index = 0

    def wait_for_subscriber(self, timeout_s: float) -> None:
        assert self._sock.poll(int(timeout_s * 1000)), f"no subscriber within {timeout_s} s"
        self._sock.recv()

    def send(self, emg_uv: np.ndarray) -> None:
        """``emg_uv`` (n_samples, n_channels) in chunks, on the sample clock (time = index / fs)."""
        for start in range(0, len(emg_uv), self.chunk):
            data = np.ascontiguousarray(emg_uv[start : start + self.chunk], dtype=np.float32)
            time_s = self._next_index / self.fs_hz
            chunk = protocol.EmgChunk(self._next_index, time_s, time_s, self.fs_hz, data)
            self._sock.send_multipart(protocol.encode(self._seq, 0.0, chunk))
            self._seq += 1
            self._next_index += len(data)

    def close(self) -> None:
        self._ctx.destroy(linger=0)
