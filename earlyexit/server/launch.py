"""Run an app on uvicorn: loopback unless a token guards it, a ready line, a graceful SIGTERM.

The socket is bound here, before uvicorn starts, so a port in use is a clear error and port 0
(any free port) reports the port it got. When uvicorn has started, ``on_ready`` is called (the CLI
prints ``serving on http://HOST:PORT``). On SIGTERM or SIGINT uvicorn stops accepting connections,
finishes the requests in flight, then ends the app's lifespan (which serves what is queued and
saves the heads, see :mod:`.app`); then :func:`run_server` returns, so the process can exit 0.

Example:
    >>> check_host(host="0.0.0.0", token=None)  # doctest: +SKIP
    Traceback (most recent call last):
    earlyexit.errors.ConfigError: ...
    >>> sock = bind_socket("127.0.0.1", 0, token=None)  # doctest: +SKIP
    >>> run_server(app, sock, on_ready=lambda url: print("serving on", url))  # doctest: +SKIP
"""

from __future__ import annotations

import ipaddress
import signal
import socket
import threading
from collections.abc import Callable
from typing import Any

from .._optional import import_extra_package
from ..errors import ConfigError

uvicorn = import_extra_package("uvicorn", "earlyexit serve", "serve")

__all__ = ["bind_socket", "check_host", "is_loopback", "run_server", "url_of"]


def is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine only (``127.0.0.0/8``, ``::1``, ``localhost``).

    Example:
        >>> is_loopback("127.0.0.1"), is_loopback("localhost"), is_loopback("0.0.0.0")
        (True, True, False)
    """
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def check_host(host: str, token: str | None) -> None:
    """Refuse to serve beyond this machine without a token.

    Raises:
        ConfigError: ``host`` is not a loopback address and ``token`` is not set.
    """
    if token is None and not is_loopback(host):
        raise ConfigError(
            f"refusing to listen on {host} without a token: anyone who reaches it could save or "
            "recalibrate the heads. Pass --token TOKEN (clients then send Authorization: Bearer "
            "TOKEN to /save and /calibrate), or listen on 127.0.0.1"
        )


def bind_socket(host: str, port: int, *, token: str | None) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0: any free port), under the rule of
    :func:`check_host` (``token``: the server's token, ``None`` for none).

    Raises:
        ConfigError: a host other than loopback without a token.
        OSError: the address is in use or cannot be bound.
    """
    check_host(host, token)
    bare = host.strip().strip("[]")
    family = socket.AF_INET6 if ":" in bare else socket.AF_INET
    # proto=IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets that say they are TCP,
    # and without it Nagle's algorithm and delayed ACKs add ~40 ms to every answer.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((bare, port))
        sock.listen(2048)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def url_of(sock: socket.socket) -> str:
    """``http://HOST:PORT`` of a bound socket (IPv6 hosts in brackets)."""
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}"


def run_server(
    app: Any,
    sock: socket.socket,
    *,
    on_ready: Callable[[str], None] | None = None,
    graceful_timeout_s: float | None = 60.0,
) -> bool:
    """Serve ``app`` on ``sock`` until SIGTERM or SIGINT (Ctrl-C); returns whether it started.

    Either signal is the normal end of a server: it returns (no ``KeyboardInterrupt``) once the
    requests in flight are answered and the app's lifespan has ended. ``graceful_timeout_s``
    bounds how long those requests may take (``None``: no bound); a second Ctrl-C stops at once.
    """
    config = uvicorn.Config(
        app,
        log_level="warning",
        access_log=False,
        lifespan="on",
        server_header=False,
        timeout_graceful_shutdown=graceful_timeout_s,
    )
    server = _Server(config, lambda: on_ready(url_of(sock)) if on_ready else None)
    in_main = threading.current_thread() is threading.main_thread()
    # uvicorn raises the signal that stopped it again once it has stopped, to the handler that
    # was there before it: here a no-op, so a stop by signal ends the process normally.
    previous = {sig: signal.signal(sig, _ignore) for sig in _STOP_SIGNALS} if in_main else {}
    try:
        server.run(sockets=[sock])
    finally:
        for sig, handler in previous.items():
            if handler is not None:
                signal.signal(sig, handler)
        sock.close()
    return bool(server.started)


#: The signals that stop the server normally (its lifespan ends, the heads are saved).
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _ignore(_signum: int, _frame: Any) -> None:
    return None


class _Server(uvicorn.Server):  # type: ignore[misc,name-defined]
    """uvicorn's server, calling ``ready`` once it has started listening."""

    def __init__(self, config: Any, ready: Callable[[], None]) -> None:
        super().__init__(config)
        self._ready = ready

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started:
            self._ready()
