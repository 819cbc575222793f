"""A TCP relay on loopback that can turn into a network outage, for link tests."""

from __future__ import annotations

import select
import socket
import threading


class OutageProxy:
    """Relays TCP connections from ``port`` to ``upstream_port`` on 127.0.0.1.

    ``cut()`` is a network outage as both hosts see it: every open connection stays
    established but nothing gets through (bytes are read and dropped both ways, so no
    RST, no FIN, no backpressure), and new connections are refused. ``heal()`` lets new
    connections through; the ones cut stay dead, as half-open TCP connections do.
    """

    def __init__(self, upstream_port: int) -> None:
        self._upstream_port = upstream_port
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(16)
        self.port = self._listener.getsockname()[1]
        self._cut = False
        self._pairs: list[tuple[socket.socket, socket.socket, dict[str, bool]]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def cut(self) -> None:
        with self._lock:
            self._cut = True
            for _, _, state in self._pairs:
                state["alive"] = False

    def heal(self) -> None:
        with self._lock:
            self._cut = False

    def _accept(self) -> None:
        while not self._stop.is_set():
            if not select.select([self._listener], [], [], 0.05)[0]:
                continue
            client, _ = self._listener.accept()
            with self._lock:
                refuse = self._cut
            if refuse:
                client.close()
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self._upstream_port))
            except OSError:  # the server is not up (yet): refused, as it would be without the relay
                client.close()
                continue
            state = {"alive": True}
            with self._lock:
                self._pairs.append((client, upstream, state))
            thread = threading.Thread(target=self._relay, args=(client, upstream, state), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _relay(self, a: socket.socket, b: socket.socket, state: dict[str, bool]) -> None:
        """Forward both ways; a close crosses only while the connection is not cut."""
        peer = {a: b, b: a}
        try:
            while not self._stop.is_set():
                for sock in select.select([a, b], [], [], 0.05)[0]:
                    data = sock.recv(65536)
                    if not data:
                        sock.close()
                        if state["alive"]:
                            peer[sock].close()
                        return
                    if state["alive"]:
                        peer[sock].sendall(data)
        except OSError:
            return

    def close(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(2)
        with self._lock:
            for a, b, _ in self._pairs:
                a.close()
                b.close()
        self._listener.close()
