"""Test helpers for published streams: a background recorder and pulse arrays."""

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
