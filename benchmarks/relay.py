"""The transport floor: a bare three-process ZeroMQ relay, no processing.

``source`` publishes EMG-sized messages on absolute deadlines (same size and rate as
acquisition), ``relay`` republishes each as a command-sized message at once (as a
controller would, minus the work), ``sink`` measures the time from the source's
send to its own receipt on the shared clock. Run by ``latency.py``, one role per
process: ``python benchmarks/relay.py ROLE IN_ENDPOINT OUT_ENDPOINT N_CHANNELS
SAMPLES_PER_CHUNK CHUNK_S DURATION_S [MODE]``.

MODE ``bytes`` (the default) moves opaque bytes. MODE ``wire`` speaks fesloop's
protocol as the processes do, and nothing more: the source encodes real ``emg``
messages (reused buffer), the relay receives them as views, decodes them (every check)
and encodes a ``command`` carrying the chunk's arrival time, the sink decodes that.
The gap from ``bytes`` to ``wire`` is the wire format's cost in Python; the gap from
``wire`` to the pipeline is the processing.
"""

from __future__ import annotations

import json
import struct
import sys
import time

import numpy as np
import pylsl
import zmq

from fesloop import protocol
from fesloop.sockets import receive_message

STAMP = struct.Struct("<d")


def source(out_ep: str, n_channels: int, samples: int, chunk_s: float, duration_s: float, wire: bool) -> None:
    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    pub.bind(out_ep)
    payload = bytearray(STAMP.size + 64 + 4 * n_channels * samples)
    encoder, data = protocol.EmgEncoder(), np.zeros((samples, n_channels), dtype=np.float32)
    start = pylsl.local_clock() + 1.0  # let subscribers join
    next_s, seq = start, 0
    while next_s < start + duration_s:
        delay = next_s - pylsl.local_clock()
        if delay > 0:
            time.sleep(delay)
        now_s = pylsl.local_clock()
        if wire:
            seq += 1
            chunk = protocol.EmgChunk(seq * samples, now_s, now_s, samples / chunk_s, data)
            pub.send_multipart(encoder.encode(seq, now_s, chunk))
        else:
            STAMP.pack_into(payload, 0, now_s)
            pub.send(payload)
        next_s += chunk_s
    ctx.destroy(linger=0)


def relay(in_ep: str, out_ep: str, duration_s: float, wire: bool) -> None:
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(in_ep)
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    pub.bind(out_ep)
    command = bytearray(STAMP.size + 64)
    n_stim, seq = 2, 0
    intensity, gate_open = np.zeros(n_stim, dtype=np.float32), np.ones(n_stim, dtype=bool)
    gate_reason = np.full(n_stim, protocol.GateReason.OPEN, dtype=np.uint8)
    end = pylsl.local_clock() + duration_s + 3.0
    while pylsl.local_clock() < end:
        if sub.poll(100):
            if wire:
                chunk = protocol.decode(receive_message(sub)).body
                seq += 1
                body = protocol.Command(chunk.arrival_time_s, intensity, gate_open, gate_reason)
                pub.send_multipart(protocol.encode(seq, pylsl.local_clock(), body))
            else:
                message = sub.recv()
                command[: STAMP.size] = message[: STAMP.size]
                pub.send(command)
    ctx.destroy(linger=0)


def sink(in_ep: str, duration_s: float, wire: bool) -> None:
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(in_ep)
    latencies = []
    end = pylsl.local_clock() + duration_s + 3.0
    while pylsl.local_clock() < end:
        if sub.poll(100):
            if wire:
                sent_s = protocol.decode(receive_message(sub)).body.newest_emg_time_s
            else:
                sent_s = STAMP.unpack_from(sub.recv())[0]
            latencies.append(pylsl.local_clock() - sent_s)
    values = np.asarray(latencies) * 1e3
    print(json.dumps({"n": len(values), "latencies_ms": values.round(4).tolist()}))
    ctx.destroy(linger=0)


def main(argv: list[str]) -> None:
    role, in_ep, out_ep = argv[0], argv[1], argv[2]
    n_channels, samples = int(argv[3]), int(argv[4])
    chunk_s, duration_s = float(argv[5]), float(argv[6])
    wire = len(argv) > 7 and argv[7] == "wire"
    if role == "source":
        source(out_ep, n_channels, samples, chunk_s, duration_s, wire)
    elif role == "relay":
        relay(in_ep, out_ep, duration_s, wire)
    else:
        sink(in_ep, duration_s, wire)


if __name__ == "__main__":
    main(sys.argv[1:])
