"""A TCP proxy on loopback that can hold back what clients send, for tests of slow endpoints.

    with SlowProxy(("127.0.0.1", port), lifetime=60) as proxy:
        proxy.url            # "http://127.0.0.1:{its port}"
        proxy.delay = 30     # from now on each new request waits 30 s before it is forwarded

It forwards bytes both ways, one thread per direction. `delay` holds back each chunk a client
sends (a request) before passing it on; `requests` counts the chunks that opened a request
line (b"GET ", b"PUT ", ...). It stops by itself after `lifetime` seconds (listener and every
connection closed), and on leaving the `with` block, so a failed test leaves nothing behind.
"""

from __future__ import annotations

import socket
import threading
import time

METHODS = (b"GET ", b"PUT ", b"HEAD ", b"POST ", b"DELETE ")


class SlowProxy:
    def __init__(self, target: tuple[str, int], *, lifetime: float = 60.0):
        self.target = target
        self.delay = 0.0
        self.requests: list[str] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self._sockets: list[socket.socket] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._deadline = time.monotonic() + lifetime
        self._thread = threading.Thread(target=self._serve, name="slow-proxy", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        host, port = self._listener.getsockname()[:2]
        return f"http://{host}:{port}"

    def _serve(self) -> None:
        while not self._stop.is_set() and time.monotonic() < self._deadline:
            try:
                client, _ = self._listener.accept()
            except (socket.timeout, OSError):
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._sockets += [client, upstream]
            threading.Thread(target=self._pipe, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, False), daemon=True).start()
        self.close()

    def _pipe(self, src: socket.socket, dst: socket.socket, from_client: bool) -> None:
        src.settimeout(0.2)
        try:
            while not self._stop.is_set():
                try:
                    chunk = src.recv(65536)
                except socket.timeout:
                    continue
                if not chunk:
                    break
                if from_client:
                    if chunk.startswith(METHODS):
                        self.requests.append(chunk.split(b"\r\n", 1)[0].decode("latin-1"))
                    # Held back in small steps, so that close() ends the wait at once.
                    until = time.monotonic() + self.delay
                    while time.monotonic() < until and not self._stop.is_set():
                        time.sleep(0.05)
                    if self._stop.is_set():
                        break
                dst.sendall(chunk)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self._stop.set()
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for s in [self._listener, *sockets]:
            try:
                s.close()
            except OSError:
                pass

    def __enter__(self) -> "SlowProxy":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
        self._thread.join(timeout=2)
