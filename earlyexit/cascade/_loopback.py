"""A bounded HTTP server on the loopback interface that speaks the remote tier's protocol.

Private: a fixture for tests and local benchmarks of :class:`~earlyexit.cascade.RemoteTier`, not a
production server.
"""

from __future__ import annotations

import http.server
import threading
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from .remote import decode_npy, encode_npy


class ModelServer:
    """Serve ``model`` over HTTP on the loopback interface with the :class:`RemoteTier` protocol.

    Bounded: it rejects bodies over ``max_body_bytes``, stops by itself after ``max_requests``
    requests or ``lifetime`` seconds, and always on leaving the ``with`` block. Loopback only: a
    fixture for tests and benchmarks, not a production server.

    Example:
        >>> with ModelServer(torch.nn.Linear(4, 2), max_requests=1) as server:  # doctest: +SKIP
        ...     RemoteTier(server.url).run(torch.randn(3, 4)).logits.shape
        torch.Size([3, 2])
    """

    LOOPBACK = ("127.0.0.1", "::1", "localhost")

    def __init__(
        self,
        model: nn.Module | Callable[[Tensor], Tensor],
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        max_requests: int | None = 1000,
        max_body_bytes: int = 64 * 2**20,
        lifetime: float | None = 600.0,
        delay: float = 0.0,
    ) -> None:
        if host not in self.LOOPBACK:
            raise ConfigError(f"ModelServer only binds to loopback ({self.LOOPBACK}), got {host!r}")
        self.model = model
        self.max_requests = max_requests
        self.max_body_bytes = max_body_bytes
        self.lifetime = lifetime
        self.delay = delay  # seconds to sleep per request (tests of client timeouts)
        self.requests = 0
        self._lock = threading.Lock()
        self._server = http.server.ThreadingHTTPServer((host, port), self._handler())
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None
        self._timer: threading.Timer | None = None
        self._stopped = threading.Event()

    @property
    def url(self) -> str:
        """The endpoint, e.g. ``http://127.0.0.1:40123/predict``."""
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/predict"

    def _handler(self) -> type[http.server.BaseHTTPRequestHandler]:
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:  # keep test output quiet
                pass

            def _reply(self, code: int, body: bytes, kind: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self) -> None:
                if not owner._admit():  # the bound holds even before the socket is closed
                    self._reply(503, b"server has served its max_requests", "text/plain")
                    return
                length = int(self.headers.get("Content-Length", 0))
                if length <= 0 or length > owner.max_body_bytes:
                    self._reply(413, b"body missing or too large", "text/plain")
                    return
                body = self.rfile.read(length)
                if owner.delay:
                    time.sleep(owner.delay)
                try:
                    x = torch.from_numpy(decode_npy(body).copy())
                    with torch.no_grad():
                        logits = owner.model(x)
                    reply = encode_npy(logits.float())
                except Exception as err:  # the client gets the reason, the server lives on
                    self._reply(500, f"{type(err).__name__}: {err}".encode(), "text/plain")
                else:
                    self._reply(200, reply, "application/x-npy")
                finally:
                    owner._finished()

        return Handler

    def _admit(self) -> bool:
        """Count a request before serving it (so ``requests`` is exact once the reply is read)."""
        with self._lock:
            if self.max_requests is not None and self.requests >= self.max_requests:
                return False
            self.requests += 1
            return True

    def _finished(self) -> None:
        if self.max_requests is not None and self.requests >= self.max_requests:
            # shutdown() waits for serve_forever to return: call it from another thread.
            threading.Thread(target=self.stop, daemon=True).start()

    def start(self) -> ModelServer:
        """Start serving in a daemon thread."""
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        if self.lifetime is not None:
            self._timer = threading.Timer(self.lifetime, self.stop)
            self._timer.daemon = True
            self._timer.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket (idempotent)."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        if self._timer is not None:
            self._timer.cancel()
        if self._thread is not None:
            self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> ModelServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
