"""A loopback TCP proxy in front of the broker, for the reconnect tests of the clients and the pool.

Point a client or a pool at :attr:`TcpProxy.url` instead of the broker; then
``stop()`` cuts the network path (the listener and every forwarded connection
close: connections drop, new ones are refused) and ``start()`` restores it, on
the same port. ``with TcpProxy() as proxy`` starts it and stops it afterwards;
the port of a stopped proxy is a broker that is unreachable.
"""

from __future__ import annotations

import socket
import threading

BROKER = ("127.0.0.1", 5672)


class TcpProxy:
    """Forward 127.0.0.1:<port> to ``target`` (the broker) until ``stop()``; ``start()`` listens again.

    ``port=0`` picks a free port on the first ``start()``; later starts reuse it.
    """

    def __init__(self, target: tuple[str, int] = BROKER, port: int = 0) -> None:
        self.target = target
        self.port = port
        self._listener: socket.socket | None = None
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self.accepted = 0  # connections accepted so far (so a test can count connection attempts)

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/%2F"

    def start(self) -> TcpProxy:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self.port = listener.getsockname()[1]
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()
        return self

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            self.accepted += 1
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._sockets += [client, upstream]
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def stop(self) -> None:
        """Close the listener and every forwarded connection (a no-op when stopped already)."""
        if self._listener is not None:
            try:  # wakes the accept() blocked in the other thread; close() alone does not
                self._listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._listener.close()
            self._listener = None
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for s in sockets:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
