"""The transport floor: a bare three-process ZeroMQ relay, no processing.

``source`` publishes EMG-sized messages on absolute deadlines (same size and rate as
acquisition), ``relay`` republishes each as a command-sized message at once (as a
controller would, minus the work), ``sink`` measures the time from the source's
send to its own receipt on the shared clock. Run by ``latency.py``, one role per
process: ``python benchmarks/relay.py ROLE IN_ENDPOINT OUT_ENDPOINT N_CHANNELS
SAMPLES_PER_CHUNK CHUNK_S DURATION_S``.
"""

from __future__ import annotations

import json
import struct
import sys
import time

import numpy as np
import pylsl
import zmq

STAMP = struct.Struct("<d")


def source(out_ep: str, n_channels: int, samples: int, chunk_s: float, duration_s: float) -> None:
    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    pub.bind(out_ep)
    payload = bytearray(STAMP.size + 64 + 4 * n_channels * samples)
    start = pylsl.local_clock() + 1.0  # let subscribers join
    next_s = start
    while next_s < start + duration_s:
        delay = next_s - pylsl.local_clock()
        if delay > 0:
            time.sleep(delay)
        STAMP.pack_into(payload, 0, pylsl.local_clock())
        pub.send(payload)
        next_s += chunk_s
    ctx.destroy(linger=0)


def relay(in_ep: str, out_ep: str, duration_s: float) -> None:
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(in_ep)
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    pub.bind(out_ep)
    command = bytearray(STAMP.size + 64)
    end = pylsl.local_clock() + duration_s + 3.0
    while pylsl.local_clock() < end:
        if sub.poll(100):
            message = sub.recv()
            command[: STAMP.size] = message[: STAMP.size]
            pub.send(command)
    ctx.destroy(linger=0)


def sink(in_ep: str, duration_s: float) -> None:
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(in_ep)
    latencies = []
    end = pylsl.local_clock() + duration_s + 3.0
    while pylsl.local_clock() < end:
        if sub.poll(100):
            message = sub.recv()
            latencies.append(pylsl.local_clock() - STAMP.unpack_from(message)[0])
    values = np.asarray(latencies) * 1e3
    print(json.dumps({"n": len(values), "latencies_ms": values.round(4).tolist()}))
    ctx.destroy(linger=0)


def main(argv: list[str]) -> None:
    role, in_ep, out_ep = argv[0], argv[1], argv[2]
    n_channels, samples = int(argv[3]), int(argv[4])
    chunk_s, duration_s = float(argv[5]), float(argv[6])
    if role == "source":
        source(out_ep, n_channels, samples, chunk_s, duration_s)
    elif role == "relay":
        relay(in_ep, out_ep, duration_s)
    else:
        sink(in_ep, duration_s)


if __name__ == "__main__":
    main(sys.argv[1:])
