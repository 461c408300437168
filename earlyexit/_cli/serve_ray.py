"""``earlyexit serve --ray``: the same server as N Ray Serve replicas and one learner.

Joins (``--ray-address``) or starts a local Ray cluster, deploys
:func:`earlyexit.server.scale_out.build_app` behind Ray's HTTP proxy on ``--host:--port``, prints
``serving on URL``, and waits for SIGTERM or Ctrl-C. Then it saves the learner's heads and
thresholds to ``--save-on-exit`` (atomically), shuts Serve down (the replicas finish the requests
in flight first; on a cluster it joined, it deletes only its own application) and prints a
summary.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import sys
import threading
from typing import Any

from .common import EXIT_BAD_INPUT, EXIT_ERROR, EXIT_OK, CliError, emit_json


def _free_port(host: str) -> int:
    """A port free on ``host`` now (Ray's proxy needs a number; ``--port 0`` asks for any)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.bind((host.strip("[]"), 0))
        return int(sock.getsockname()[1])


def _wait_for_stop() -> None:
    """Block until SIGTERM or SIGINT."""
    stop = threading.Event()
    previous = {
        sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)
    }
    try:
        while not stop.wait(0.5):
            pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def serve_on_ray(
    args: argparse.Namespace, eem: Any, transform: Any, config: Any, label: str
) -> int:
    """Serve ``eem`` on Ray Serve until stopped (see the module docstring); returns the exit code."""
    from ..errors import ConfigError
    from ..server.scale_out import ScaleOutSettings, ServedModel

    try:
        settings = ScaleOutSettings(
            replicas=args.replicas,
            max_batch=args.max_batch,
            max_wait_ms=args.max_wait_ms,
            max_queued_requests=args.max_queued_requests,
            max_body_bytes=args.max_body_bytes,
            token=args.token,
        )
    except ConfigError as err:
        raise CliError(str(err), EXIT_BAD_INPUT) from None
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.replicas)
    served = ServedModel.of(eem, transform, config, threads=threads)
    port = args.port or _free_port(args.host)
    summary: dict[str, Any] = {"model": label}
    # Ray prints notices of its own on stdout; stdout stays for the summary (--json).
    with contextlib.redirect_stdout(sys.stderr):
        saved = _serve_until_stopped(args, served, settings, port, summary)
    if args.json:
        emit_json(summary)
    else:
        print(
            f"learned from {summary.get('samples', 0)} samples served by {args.replicas} replicas; "
            f"heads version {summary.get('heads_version')}"
            + (
                f"; saved heads and thresholds to {summary['saved']}"
                if summary.get("saved")
                else ""
            )
        )
    return EXIT_OK if saved else EXIT_ERROR


def _serve_until_stopped(
    args: argparse.Namespace, served: Any, settings: Any, port: int, summary: dict[str, Any]
) -> bool:
    """Run the app until SIGTERM/Ctrl-C, save, shut down; fills ``summary``; returns whether the
    save (if asked for) succeeded."""
    import ray
    from ray import serve

    from ..server.scale_out import APP_NAME, build_app, learner_handle

    ray.init(address=args.ray_address, include_dashboard=False, log_to_driver=False)
    ok = True
    try:
        serve.start(http_options={"host": args.host, "port": port})
        serve.run(build_app(served, settings), name=APP_NAME, route_prefix="/")
        shown = f"[{args.host}]" if ":" in args.host else args.host
        print(
            f"serving on http://{shown}:{port} (Ray Serve, {args.replicas} replicas)",
            file=sys.stderr,
            flush=True,
        )
        _wait_for_stop()
        learner = learner_handle()
        if args.save_on_exit:
            try:
                summary["saved"] = learner.save.remote(args.save_on_exit).result()["saved"]
            except Exception as err:
                ok = False
                print(
                    f"earlyexit serve: error: could not save the heads to {args.save_on_exit}: "
                    f"{type(err).__name__}: {err}",
                    file=sys.stderr,
                    flush=True,
                )
        summary.update(learner.stats.remote().result())
    finally:
        if args.ray_address:  # a cluster we joined: remove our app only, leave the rest serving
            serve.delete(APP_NAME)
        else:
            serve.shutdown()
        ray.shutdown()
    return ok
