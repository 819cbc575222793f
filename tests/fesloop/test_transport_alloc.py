"""EMG samples cross the transport without being copied by our code.

Acquisition encodes each chunk into one reused buffer; receivers decode views of
libzmq's frames. tracemalloc (which sees Python objects and numpy's data) checks that
neither allocates anything the size of the chunk: with a 1 MB chunk, any copy of the
samples would show as a megabyte. Not timed: the bounds are in bytes.
"""

from __future__ import annotations

import time
import tracemalloc

import numpy as np
import pytest
import zmq

from fesloop import protocol
from fesloop.sockets import StreamCounters, drain, publisher, subscriber
from tests.conftest import free_ports

pytestmark = pytest.mark.timeout(30)

CHUNK = (4096, 64)  # float32 samples: 1 MB, under the 4 MB message limit
FIXED_BYTES = 16 * 1024  # views, message objects, numpy's and pyzmq's bookkeeping (2-6 kB measured)


def _chunk(index: int, data: np.ndarray) -> protocol.EmgChunk:
    return protocol.EmgChunk(index, index / 4000.0, index / 4000.0, 4000.0, data)


def _peak_bytes(run) -> int:
    """The most traced memory rose above its level at the start of ``run()``."""
    tracemalloc.start()
    try:
        start = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        run()
        return tracemalloc.get_traced_memory()[1] - start
    finally:
        tracemalloc.stop()


def test_a_reused_encoder_does_not_copy_the_samples() -> None:
    data = np.random.default_rng(0).normal(size=CHUNK).astype(np.float32)
    encoder = protocol.EmgEncoder()
    encoder.encode(1, 0.0, _chunk(0, data))  # the buffer is sized here, once

    def encode_more() -> None:
        for seq in range(2, 6):
            encoder.encode(seq, 0.0, _chunk(seq * CHUNK[0], data))

    assert _peak_bytes(encode_more) < FIXED_BYTES
    assert _peak_bytes(lambda: protocol.encode(9, 0.0, _chunk(0, data))) > data.nbytes  # the one-off path copies


def test_received_chunks_are_views_of_the_frames() -> None:
    ctx = zmq.Context()
    endpoint = f"tcp://127.0.0.1:{free_ports(1)[0]}"
    pub = publisher(ctx, endpoint)
    sub = subscriber(ctx, endpoint, [protocol.TOPICS[protocol.Kind.EMG]])
    try:
        data = np.random.default_rng(1).normal(size=CHUNK).astype(np.float32)
        encoder = protocol.EmgEncoder()
        counters = StreamCounters()
        deadline = time.monotonic() + 10
        while not sub.poll(10):  # PUB drops what it sends before the subscription arrives
            pub.send_multipart(encoder.encode(0, 0.0, _chunk(0, data)))
            assert time.monotonic() < deadline, "no subscription in 10 s"
        time.sleep(0.2)  # the rest of those in flight arrive
        drain(sub, counters)
        pub.send_multipart(encoder.encode(1, 0.0, _chunk(CHUNK[0], data)))
        assert sub.poll(5000)
        received: list[protocol.Message] = []

        peak = _peak_bytes(lambda: received.extend(drain(sub, counters)))

        assert len(received) == 1 and np.array_equal(received[0].body.data, data)
        assert peak < FIXED_BYTES
    finally:
        ctx.destroy(linger=0)
