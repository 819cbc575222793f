"""Console output that never holds up the supervisor: through a real pipe that nobody reads for a while."""

from __future__ import annotations

import fcntl
import os
import threading

import pytest

from fesloop.console import DetachedOutput

pytestmark = pytest.mark.timeout(30)


def full_pipe(blocking: bool) -> tuple[int, int]:
    """A 4 KiB pipe already full, its write end blocking or not."""
    read_end, write_end = os.pipe()
    fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, 4096)
    os.set_blocking(write_end, False)
    try:
        while True:
            os.write(write_end, b"x" * 4096)
    except BlockingIOError:
        pass
    os.set_blocking(write_end, blocking)
    return read_end, write_end


def read_all(read_end: int, into: bytearray) -> threading.Thread:
    def read() -> None:
        while chunk := os.read(read_end, 65536):
            into.extend(chunk)

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("blocking", [True, False], ids=["blocking", "non-blocking"])
def test_messages_all_go_out_in_order_and_only_the_newest_status_waits(blocking: bool) -> None:
    """Held up, the queue kept 1000 writes and then dropped the newest: the failures and the session
    summary were lost while old status lines went out. A non-blocking stdout's EAGAIN killed the writer."""
    read_end, write_end = full_pipe(blocking)
    with os.fdopen(write_end, "w", closefd=False) as stream:
        out = DetachedOutput(stream)
        out.write("first message\n")
        for i in range(5000):
            out.status(f"status {i}\n")
        out.write("fesloop: stimulator FAULT: device error\n")
        out.status("status last\n")
        out.write("fesloop: stopped with failures\n")
        received = bytearray()
        reader = read_all(read_end, received)
        assert out.close(10.0)
    os.close(write_end)
    reader.join(5)
    os.close(read_end)
    text = received.decode().replace("x", "")
    lines = text.splitlines()
    assert [line for line in lines if "status" not in line] == [
        "first message", "fesloop: stimulator FAULT: device error", "fesloop: stopped with failures"
    ]
    statuses = [line for line in lines if line.startswith("status")]
    assert statuses[-1] == "status last" and len(statuses) <= 3  # the newest before each message, at most
    assert out.replaced >= 4997 and out.lost == 0


def test_a_closed_stdout_loses_what_it_refuses_and_says_so() -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)  # nobody will ever read: EPIPE
    with os.fdopen(write_end, "w") as stream:
        out = DetachedOutput(stream)
        out.write("lost\n")
        out.write("lost too\n")
        assert not out.close(5.0) and out.lost == 2
