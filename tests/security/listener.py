"""A socket that counts who connects to it: the security tests' proof that a refused request reached nothing."""

from __future__ import annotations

import socket
import threading


class Listener:
    """A listening socket on 127.0.0.1 that counts the connections made to it, and closes each unanswered."""

    def __init__(self) -> None:
        self.socket = socket.create_server(("127.0.0.1", 0))
        self.socket.settimeout(0.1)
        self.port = self.socket.getsockname()[1]
        self.connections = 0
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                connection, _ = self.socket.accept()
            except TimeoutError:
                continue
            self.connections += 1
            connection.close()

    def close(self) -> None:
        self._closed.set()
        self._thread.join()
        self.socket.close()
