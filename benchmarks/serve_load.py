"""Load on the embedded server: early exit under concurrent traffic, against the same model unwrapped.

``earlyexit serve`` is started once per arm on loopback with the fine-tuned EfficientNet-Lite0 of
the fashion workload: serving the base model as is (``plain``: ``--plain``, same decoding,
batching and JSON, no exits, no learner), wrapped and learning online (``early_exit``), and wrapped
on Ray Serve (``ray``: ``--ray --replicas 2``, one learner; one replica process is killed with
SIGKILL half-way through the run, and the run checks that it comes back serving the latest heads).
An optional fourth arm, ``frozen`` (``--heads SAVED --frozen``), serves the heads and thresholds
the ``early_exit`` arm saved without learning: the server's cost apart from the learner's; and
``resumed`` (``--learner-state SAVED``) restarts the learning server from the whole learner the
``early_exit`` arm saved on stop (its evidence too, so its gates stay open): a learning server in
steady state, its saving counted over its own run only. Each run sends real Fashion-MNIST test
images (``.npy``, preprocessed like the workload) from N concurrent clients for a fixed time, then
one client alone, and reports:

* throughput, p50/p95/p99 latency, errors and lost requests (sent without an answer: must be 0);
* the MAC saving under load (the learner's own count of MACs spent, audits included) and the
  heads versions published during the run;
* the server's resident memory (RSS) sampled through the run: it must stay flat (the learner's
  buffers are capped); with Ray, the sum over the replica and learner processes (each process's
  own series too, ``rss_by_process``, printed as start / 1 min / end);
* what early exit buys the wrapped model alone (``model_only``): the heads the server saved,
  called in this process at the server's mean batch size against the base model: the ceiling of
  the server's throughput gain;
* one client's median latency at batch 1 against each server after its load (the server's own
  overhead over calling the model directly is measured paired, same heads and thresholds, by
  ``benchmarks/serve_batch1.py``).

Targets (issue #16): the server adds <= 1 ms per request over calling ``eem`` directly at batch 1;
under load, early exit raises throughput over the unwrapped server by >= 0.7 x what the MAC saving
allows (``1 / (1 - saving) - 1``). By default the arms run one after the other; on a shared
machine whose speed drifts between them, ``--paired`` runs plain and early_exit (then plain and
frozen, plain and resumed) side by side with the load alternating between them in slices, and their ratio is the
one to read. Each arm also reports the cores its server process used and how busy the machine
was: a server that uses under one core while the machine idles is bound by one thread.

Usage:
    python benchmarks/serve_load.py                    # 10 minutes per server (the issue's run)
    python benchmarks/serve_load.py --quick            # 60 s per server, to try it
    python benchmarks/serve_load.py --paired --servers plain,early_exit,frozen --duration 300
    python benchmarks/serve_load.py --paired --servers plain,early_exit,resumed --duration 300
    python benchmarks/serve_load.py --servers ray --quick   # one arm
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled
import earlyexit as ee
from earlyexit.evaluation.workloads._fashion import (
    fashion_preprocess,
    load_fashion_backbone,
    read_fashion_split,
)

HOST = "127.0.0.1"
MODEL = "timm:tf_efficientnet_lite0"


def npy_bytes(batch: torch.Tensor) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, batch.numpy().astype(np.float32), allow_pickle=False)
    return buffer.getvalue()


def fashion_test_images(count: int, size: int = 64) -> list[torch.Tensor]:
    """The first ``count`` Fashion-MNIST test images in a seeded order (seed 0), each
    preprocessed as the fashion workload does, ``[1, C, H, W]``: what every serving benchmark
    sends. ``size`` other than the workload's 64 resizes them further (bilinear), for serving
    the same model at another resolution (more compute per operator: at 128 the exits cost more
    time than their MACs, see ``serve_load_paired_128.json``).
    """
    images, _labels = read_fashion_split("test")
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    batch = fashion_preprocess(images[order[:count]])
    if size != batch.shape[-1]:
        batch = F.interpolate(batch, size=(size, size), mode="bilinear", align_corners=False)
    return list(batch.split(1))


def rss_bytes(pid: int) -> int:
    """Resident memory of a process (Linux /proc), 0 where unreadable."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def ray_actor_pids(title: str) -> list[int]:
    """Processes whose command line contains ``title`` (Ray names actor processes
    ``ray::ServeReplica:APP:DEPLOYMENT``)."""
    return list(ray_actor_titles(title))


def ray_actor_titles(title: str) -> dict[int, str]:
    """Like :func:`ray_actor_pids`, with each process's title (its command line's first word)."""
    pids = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if title in command:
            pids[int(entry.name)] = command.split(" ", 1)[0]
    return pids


class Server:
    """``earlyexit serve`` in a subprocess on a free loopback port."""

    def __init__(
        self,
        weights: Path,
        port: int,
        *,
        plain: bool,
        threads: int,
        save: Path,
        replicas: int = 0,
        extra: tuple[str, ...] = (),
        image_size: int = 64,
    ) -> None:
        command = [
            sys.executable, "-m", "earlyexit", "serve",
            "--model", MODEL, "--num-classes", "10", "--weights", str(weights),
            "--input-size", f"3,{image_size},{image_size}", "--host", HOST, "--port", str(port),
            "--threads", str(threads), "--save-on-exit", str(save),
        ]  # fmt: skip
        if plain:
            command.append("--plain")
        if replicas:
            command += ["--ray", "--replicas", str(replicas)]
        command += list(extra)
        self._start(command, port, ray=bool(replicas))

    @classmethod
    def from_command(cls, command: list[str], port: int) -> Server:
        """Another server on ``port`` (a yardstick), started by ``command``, which prints the
        same ``serving on`` line once it listens."""
        server = cls.__new__(cls)
        server._start(command, port, ray=False)
        return server

    def _start(self, command: list[str], port: int, *, ray: bool) -> None:
        self.port = port
        self.ray = ray
        #: ``/stats`` once warm, for a server whose learner's counts go on from a saved run.
        self.stats_at_start: dict | None = None
        self.process = subprocess.Popen(
            command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True
        )
        self.log: list[str] = []
        started = time.monotonic()
        while time.monotonic() - started < 300:
            line = self.process.stderr.readline() if self.process.stderr else ""
            if not line and self.process.poll() is not None:
                raise RuntimeError("the server exited before it was ready:\n" + "".join(self.log))
            self.log.append(line)
            if "serving on" in line:
                break
        else:
            raise RuntimeError("the server was not ready within 300 s")
        # Keep draining stderr so the server never blocks on a full pipe.
        threading.Thread(target=self._drain, daemon=True).start()

    def rss(self) -> int:
        """Resident memory of the server: its process, or with Ray every replica and the
        learner (the actors doing the work; Ray's own daemons are left out)."""
        if not self.ray:
            return rss_bytes(self.process.pid)
        return sum(self.rss_by_process().values())

    def rss_by_process(self) -> dict[str, int]:
        """Resident memory of each process :meth:`rss` sums, by ``"TITLE PID"`` (with Ray: which
        replica or the learner grows), or ``{"server PID": ...}`` without Ray."""
        if not self.ray:
            return {f"server {self.process.pid}": rss_bytes(self.process.pid)}
        titles = ray_actor_titles("ServeReplica:earlyexit:")
        # A title reads ray::ServeReplica:APP:DEPLOYMENT[.METHOD] (the method now running).
        return {
            f"{title.split(':')[-1].split('.')[0]} {pid}": rss_bytes(pid)
            for pid, title in titles.items()
        }

    def _drain(self) -> None:
        for line in self.process.stderr or []:
            self.log.append(line)

    def get(self, path: str) -> Any:
        conn = http.client.HTTPConnection(HOST, self.port, timeout=60)
        conn.request("GET", path)
        reply = conn.getresponse()
        body = reply.read()
        conn.close()
        return json.loads(body) if path != "/metrics" else body.decode()

    def post(self, path: str, body: bytes = b"", kind: str = "application/json") -> Any:
        conn = http.client.HTTPConnection(HOST, self.port, timeout=60)
        conn.request("POST", path, body=body, headers={"Content-Type": kind})
        reply = conn.getresponse()
        data = reply.read()
        conn.close()
        return reply.status, data

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return -9


def client_loop(
    port: int, payloads: list[bytes], stop_at: float, start: int, step: int, out: dict
) -> None:
    """One client on one keep-alive connection: send, wait for the answer, repeat."""
    conn = http.client.HTTPConnection(HOST, port, timeout=60)
    i = start
    while time.monotonic() < stop_at:
        body = payloads[i % len(payloads)]
        i += step
        out["sent"] += 1
        began = time.perf_counter()
        try:
            conn.request(
                "POST", "/predict", body=body, headers={"Content-Type": "application/x-npy"}
            )
            reply = conn.getresponse()
            data = reply.read()
        except (OSError, http.client.HTTPException) as err:
            out["lost"] += 1
            out["last_error"] = f"{type(err).__name__}: {err}"
            conn.close()
            conn = http.client.HTTPConnection(HOST, port, timeout=60)
            continue
        took = time.perf_counter() - began
        if reply.status != 200:
            out["errors"] += 1
            out["last_error"] = data[:200].decode("utf-8", "replace")
            continue
        answer = json.loads(data)
        out["latencies"].append(took)
        out["exits"].extend(p["exit"] for p in answer["predictions"])
        out["versions"].add(answer["heads_version"])
    conn.close()


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used (Linux /proc), 0 where unreadable."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_ticks() -> tuple[int, int]:
    """(all, idle) CPU ticks of the machine so far (Linux /proc/stat), (0, 0) where unreadable."""
    try:
        values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except OSError:
        return 0, 0
    return sum(values), values[3] + values[4]  # idle + iowait


class LoadRecord:
    """What N clients saw against one server, over one slice of load or several (``--paired``
    alternates slices between servers): answers, latencies, exits, heads versions, the server's
    RSS, and where the CPU went (the server's process, the clients, the whole machine)."""

    def __init__(self, clients: int) -> None:
        self.clients = clients
        self.outs = [
            {"sent": 0, "lost": 0, "errors": 0, "latencies": [], "exits": [], "versions": set()}
            for _ in range(clients)
        ]
        self.seconds = 0.0
        self.slices = 0
        self.slice_throughputs: list[float] = []  # answered per second, slice by slice
        self.rss: list[int] = []
        # Per process: [seconds under load so far, bytes] (a killed replica's series stops).
        self.by_process: dict[str, list[tuple[float, int]]] = {}
        self.killed: dict[str, Any] | None = None
        self.server_cpu_s = self.client_cpu_s = 0.0
        self.machine_ticks = self.machine_idle_ticks = 0

    def summary(self) -> dict:
        outs = self.outs
        latencies = sorted(x for o in outs for x in o["latencies"])

        def pct(q: float) -> float | None:
            if not latencies:
                return None
            return 1e3 * latencies[min(len(latencies) - 1, int(q * len(latencies)))]

        busy = 1.0 - self.machine_idle_ticks / self.machine_ticks if self.machine_ticks else None
        return {
            "clients": self.clients,
            "seconds": self.seconds,
            "slices": self.slices,
            "slice_throughputs_per_s": self.slice_throughputs,
            "sent": sum(o["sent"] for o in outs),
            "answered": len(latencies),
            "errors": sum(o["errors"] for o in outs),
            "lost": sum(o["lost"] for o in outs),
            "last_error": next((o["last_error"] for o in outs if "last_error" in o), None),
            "throughput_per_s": len(latencies) / self.seconds if self.seconds else 0.0,
            "latency_p50_ms": pct(0.50),
            "latency_p95_ms": pct(0.95),
            "latency_p99_ms": pct(0.99),
            "latency_max_ms": 1e3 * latencies[-1] if latencies else None,
            "heads_versions_seen": sorted(set().union(*(o["versions"] for o in outs))),
            "killed_replica": self.killed,
            # Cores in use while under load (CPU seconds / wall seconds): the server's main
            # process (with Ray: the driver only, None), the load's clients, the whole machine.
            "cpu": {
                "server_cores": (
                    self.server_cpu_s / self.seconds
                    if self.seconds and not math.isnan(self.server_cpu_s)
                    else None
                ),
                "client_cores": self.client_cpu_s / self.seconds if self.seconds else None,
                "machine_busy_share": busy,
                "machine_cores": os.cpu_count(),
            },
            "rss_bytes": {
                "start": self.rss[0],
                "end": self.rss[-1],
                "max": max(self.rss),
                "samples": self.rss,
            },
            "rss_by_process": self.by_process,
        }


def load_phase(
    server: Server,
    payloads: list[bytes],
    clients: int,
    seconds: float,
    kill_at: float | None = None,
    record: LoadRecord | None = None,
) -> LoadRecord:
    """N clients for ``seconds``; RSS sampled every 5 s. With ``kill_at``, one Ray replica is
    killed (SIGKILL, like a crash) that many seconds into the run. With ``record``, this slice
    of load is added to it (same clients count), else to a new record; returns the record."""
    record = record or LoadRecord(clients)
    outs = record.outs
    stop_at = time.monotonic() + seconds
    threads = [
        threading.Thread(target=client_loop, args=(server.port, payloads, stop_at, c, clients, o))
        for c, o in enumerate(outs)
    ]
    began = time.perf_counter()
    offset = record.seconds  # this slice's samples are timed from the record's start

    def sample() -> int:
        """Sample every process's RSS (kept by process, with the time) and return the total."""
        now = offset + time.perf_counter() - began
        sizes = server.rss_by_process()
        for name, size in sizes.items():
            record.by_process.setdefault(name, []).append((round(now, 1), size))
        return sum(sizes.values())

    record.rss.append(sample())
    answered_before = sum(len(o["latencies"]) for o in outs)
    server_cpu = process_cpu_seconds(server.process.pid)
    client_cpu = time.process_time()
    ticks, idle = machine_ticks()
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        time.sleep(1.0 if kill_at is not None and record.killed is None else 5.0)
        if kill_at is not None and record.killed is None and time.perf_counter() - began >= kill_at:
            victims = ray_actor_pids("ServeReplica:earlyexit:EarlyExitReplica")
            os.kill(victims[0], signal.SIGKILL)
            record.killed = {"pid": victims[0], "at_s": time.perf_counter() - began}
            print(f"killed replica process {victims[0]}", file=sys.stderr)
        record.rss.append(sample())
    for t in threads:
        t.join()
    took = time.perf_counter() - began
    record.seconds += took
    record.slices += 1
    record.slice_throughputs.append(
        (sum(len(o["latencies"]) for o in outs) - answered_before) / took
    )
    if server.ray:  # the work runs in Ray's actor processes, not in the driver
        record.server_cpu_s = math.nan
    else:
        record.server_cpu_s += process_cpu_seconds(server.process.pid) - server_cpu
    record.client_cpu_s += time.process_time() - client_cpu
    ticks_after, idle_after = machine_ticks()
    record.machine_ticks += ticks_after - ticks
    record.machine_idle_ticks += idle_after - idle
    return record


def sequential_latency(server: Server, payloads: list[bytes], count: int) -> list[float]:
    """One client alone, batch 1: the wall-clock of each answered request."""
    times = []
    conn = http.client.HTTPConnection(HOST, server.port, timeout=60)
    for body in payloads[:count]:
        began = time.perf_counter()
        conn.request("POST", "/predict", body=body, headers={"Content-Type": "application/x-npy"})
        reply = conn.getresponse()
        reply.read()
        if reply.status == 200:
            times.append(time.perf_counter() - began)
    conn.close()
    return times


def gain_vs_allowed(speedup: float, saving: float) -> float | None:
    """How much of the throughput gain a MAC saving allows a speedup delivers: ``(speedup - 1)
    / (1 / (1 - saving) - 1)`` (1.0: time fell exactly as MACs did; None where the saving
    allows no gain)."""
    allowed = 1.0 / (1.0 - saving) - 1.0 if saving < 1 else math.inf
    return (speedup - 1.0) / allowed if allowed > 0 else None


def model_only(
    model: torch.nn.Module, heads: Path, inputs: list[torch.Tensor], batch: int, rounds: int = 3
) -> dict:
    """What early exit buys the wrapped model alone, without a server or a learner: the heads the
    server saved, called in this process on the load's images in batches of ``batch`` (the mean
    batch the server served), against the base model on the same batches, alternated.

    This is the ceiling of the server's throughput gain: serving and learning only add to it."""
    eem = ee.load(model, heads)
    batches = [torch.cat(inputs[i : i + batch]) for i in range(0, len(inputs) - batch + 1, batch)]
    spent = 0
    plain_s = exit_s = 0.0
    with torch.no_grad():
        for x in batches[:10]:  # warm-up
            eem.predict(x)
            model(x)
        for round_index in range(rounds):
            for x in batches:
                began = time.perf_counter()
                model(x)
                plain_s += time.perf_counter() - began
                began = time.perf_counter()
                result = eem.predict(x)
                exit_s += time.perf_counter() - began
                if round_index == 0:  # the answers are the same every round
                    spent += sum(eem.path_macs()[int(e)] for e in result.exit_index)
    eem.remove()
    samples = sum(int(x.shape[0]) for x in batches)
    saving = 1.0 - spent / (samples * eem.base_macs)
    speedup = plain_s / exit_s
    return {
        "batch": batch,
        "samples": samples,
        "mac_saving": saving,
        "throughput_ratio": speedup,
        "throughput_gain_vs_allowed": gain_vs_allowed(speedup, saving),
    }


def start_server(
    args: argparse.Namespace,
    weights: Path,
    payloads: list[bytes],
    *,
    kind: str,
    port: int,
    learned: Path | None = None,
) -> tuple[Server, Path]:
    """Start one arm's server and warm it; returns it and where it saves its heads on SIGTERM.

    Arms: ``plain`` (the base model), ``early_exit`` (the embedded server, learning; with
    ``args.save_learner`` it also saves its whole learner, :func:`learner_file`), ``frozen``
    (the embedded server with ``--frozen``, serving ``learned``: the heads and thresholds the
    ``early_exit`` arm saved), ``resumed`` (the learning server resuming a copy of the learner
    the ``early_exit`` arm saved beside ``learned``) or ``ray`` (Ray Serve, ``args.replicas``
    replicas)."""
    save = Path(tempfile.mkdtemp(prefix="earlyexit-serve-")) / "heads.safetensors"
    replicas = args.replicas if kind == "ray" else 0
    extra: tuple[str, ...] = ()
    if kind in ("frozen", "resumed") and learned is None:
        raise ValueError(f"the {kind} arm starts from what the early_exit arm saved: run both")
    # Saving the whole learner writes up to its memory cap: only when a resumed arm needs it.
    if kind == "early_exit" and args.save_learner:
        extra = ("--learner-state", str(learner_file(save)))
    elif kind == "frozen":
        extra = ("--heads", str(learned), "--frozen")
    elif kind == "resumed":
        assert learned is not None
        shutil.copyfile(learner_file(learned), learner_file(save))  # the original stays as saved
        extra = ("--learner-state", str(learner_file(save)))
    print(f"[{kind}] starting the server ...", file=sys.stderr)
    server = Server(
        weights,
        port,
        plain=kind == "plain",
        threads=args.threads,
        save=save,
        replicas=replicas,
        extra=extra,
        image_size=args.image_size,
    )
    try:
        sequential_latency(server, payloads, 20)  # warm-up: first calls allocate
        # A resumed learner's counts go on from the saved ones: its own run is counted from here.
        server.stats_at_start = server.get("/stats") if kind == "resumed" else None
    except BaseException:
        server.stop()
        raise
    return server, save


def learner_file(heads: Path) -> Path:
    """Where an arm that saves its heads to ``heads`` saves (or resumes) its whole learner."""
    return heads.with_name("learner.safetensors")


def saving_since(start: dict, end: dict) -> float | None:
    """The MAC saving over the samples served between two ``/stats`` of one learner, from its
    samples and whole-stream savings (every sample costs the same base MACs)."""
    n0, n1 = start.get("samples") or 0, end.get("samples") or 0
    s0, s1 = start.get("mac_saving_total"), end.get("mac_saving_total")
    if n1 <= n0 or s0 is None or s1 is None:
        return None
    return 1.0 - (n1 * (1.0 - s1) - n0 * (1.0 - s0)) / (n1 - n0)


def finish_server(
    args: argparse.Namespace,
    server: Server,
    payloads: list[bytes],
    *,
    kind: str,
    load: dict,
    recovered: dict | None = None,
) -> dict:
    """After an arm's load: one client alone at batch 1, ``/stats`` and ``/metrics``, then
    SIGTERM (the server saves its heads); returns the arm's report."""
    try:
        single = sequential_latency(server, payloads[::-1], args.sequential)
        stats = server.get("/stats")
        metrics = server.get("/metrics")
    finally:
        code = server.stop()
    start = server.stats_at_start
    return {
        "server": kind,
        "mac_saving_this_run": None if start is None else saving_since(start, stats),
        "replicas": args.replicas if server.ray else None,
        "replicas_after_kill": recovered,
        "load": load,
        "batch1_server_p50_ms": 1e3 * statistics.median(single) if single else None,
        "exit_code_after_sigterm": code,
        "stats": {
            k: stats.get(k)
            for k in (
                "samples",
                "mac_saving",
                "mac_saving_total",
                "thresholds",
                "heads_version",
                "requests",
                "batches",
                "exit_rates",
                "audited_agreement",
                "calibrations",
                "replicas",
            )
        },
        "metrics_lines": sum(1 for line in metrics.splitlines() if line.startswith("earlyexit_")),
    }


def run_server(
    args: argparse.Namespace,
    weights: Path,
    payloads: list[bytes],
    *,
    kind: str,
    port: int,
    learned: Path | None = None,
) -> tuple[dict, Path]:
    """One arm alone for ``args.duration`` seconds (with Ray, one replica is killed half-way
    and the run waits for the replicas to serve the latest heads again)."""
    server, save = start_server(args, weights, payloads, kind=kind, port=port, learned=learned)
    recovered = None
    try:
        print(f"[{kind}] {args.clients} clients for {args.duration:.0f} s ...", file=sys.stderr)
        kill_at = args.duration / 2 if server.ray else None
        load = load_phase(server, payloads, args.clients, args.duration, kill_at=kill_at).summary()
        if server.ray:
            recovered = replicas_recovered(server, args.replicas)
    except BaseException:
        server.stop()
        raise
    return finish_server(args, server, payloads, kind=kind, load=load, recovered=recovered), save


def alternate(
    args: argparse.Namespace, payloads: list[bytes], servers: dict[str, Server]
) -> dict[str, LoadRecord]:
    """Load two running servers in turn: ``args.slices`` rounds of ``args.duration /
    args.slices`` seconds each (A then B, then B then A, ...), so a change in the shared
    machine's speed falls on both and their ratio is paired. The idle server waits; a learning
    server learns only from what it serves."""
    kinds = list(servers)
    records = {kind: LoadRecord(args.clients) for kind in kinds}
    each = args.duration / args.slices
    print(
        f"[{' / '.join(kinds)}] {args.clients} clients, {args.slices} alternating slices of "
        f"{each:.0f} s each ...",
        file=sys.stderr,
    )
    for round_index in range(args.slices):
        for kind in kinds if round_index % 2 == 0 else kinds[::-1]:
            load_phase(servers[kind], payloads, args.clients, each, record=records[kind])
    return records


def run_paired(
    args: argparse.Namespace, weights: Path, payloads: list[bytes], *, followers: list[str]
) -> tuple[dict[str, dict], dict[str, Path]]:
    """``--paired``: ``plain`` and ``early_exit`` up together, loaded in alternating slices;
    then the early_exit server stops (saving its heads and learner) and each of ``followers``
    (``frozen``, ``resumed``) starts from what it saved and alternates with the same plain
    server. Each arm's ``vs_plain`` is taken against the plain server's slices of its own
    pairing (``paired_plain_load``)."""
    results: dict[str, dict] = {}
    heads: dict[str, Path] = {}
    running: dict[str, Server] = {}
    try:
        running["plain"], heads["plain"] = start_server(
            args, weights, payloads, kind="plain", port=18601
        )
        running["early_exit"], heads["early_exit"] = start_server(
            args, weights, payloads, kind="early_exit", port=18602
        )
        records = alternate(args, payloads, running)
        plain_loads = {"early_exit": records["plain"].summary()}
        results["early_exit"] = finish_server(
            args, running.pop("early_exit"), payloads, kind="early_exit",
            load=records["early_exit"].summary(),
        )  # fmt: skip
        for port, kind in enumerate(followers, start=18603):
            running[kind], heads[kind] = start_server(
                args, weights, payloads, kind=kind, port=port, learned=heads["early_exit"]
            )
            records = alternate(args, payloads, running)
            plain_loads[kind] = records["plain"].summary()
            results[kind] = finish_server(
                args, running.pop(kind), payloads, kind=kind, load=records[kind].summary()
            )
        results["plain"] = finish_server(
            args, running.pop("plain"), payloads, kind="plain", load=plain_loads["early_exit"]
        )
        for kind, load in plain_loads.items():
            results[kind]["paired_plain_load"] = load
        return {k: results[k] for k in ("plain", "early_exit", *followers)}, heads
    finally:
        for server in running.values():
            server.stop()


def replicas_recovered(server: Server, replicas: int, timeout: float = 120.0) -> dict:
    """Wait until ``replicas`` replicas serve the learner's latest heads again (after the kill);
    returns what ``/stats`` said and how long it took."""
    began = time.monotonic()
    while True:
        stats = server.get("/stats")
        live = stats.get("replicas", {})
        versions = {entry["heads_version"] for entry in live.values()}
        done = len(live) >= replicas and versions == {stats["heads_version"]}
        if done or time.monotonic() - began > timeout:
            return {
                "recovered": done,
                "waited_s": time.monotonic() - began,
                "heads_version": stats["heads_version"],
                "replicas": live,
            }
        time.sleep(1.0)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of load per server")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients")
    parser.add_argument("--sequential", type=int, default=300, help="batch-1 requests, one client")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each server")
    parser.add_argument("--quick", action="store_true", help="60 s of load per server")
    parser.add_argument(
        "--servers",
        default="plain,early_exit,ray",
        help="arms to run, comma-separated: plain, early_exit, frozen, resumed, ray (default "
        "plain, early_exit, ray); frozen and resumed start from what early_exit saved, so they "
        "run after it",
    )
    parser.add_argument("--replicas", type=int, default=2, help="Ray Serve replicas (ray arm)")
    parser.add_argument("--out", default=None, help="JSON path")
    parser.add_argument(
        "--model-only",
        metavar="HEADS",
        help="only measure the wrapped model alone with these heads (saved by an early_exit arm) "
        "at --batch, and add it to the report at --out",
    )
    parser.add_argument("--batch", type=int, default=4, help="batch size for --model-only")
    parser.add_argument(
        "--paired",
        action="store_true",
        help="run plain and early_exit (then plain and frozen) side by side, alternating the "
        "load between them in --slices slices: their ratio is then paired, whatever the shared "
        "machine does meanwhile (ray, if listed, still runs alone after them)",
    )
    parser.add_argument(
        "--slices", type=int, default=10, help="alternating slices of load with --paired"
    )
    parser.add_argument(
        "--image-size",
        type=int,
        default=64,
        help="side of the images served (the workload's model takes 64; larger sizes serve the "
        "same model with more compute per operator)",
    )
    args = parser.parse_args()
    if args.quick:
        args.duration = min(args.duration, 60.0)
    arms = [a.strip() for a in args.servers.split(",") if a.strip()]
    unknown = set(arms) - {"plain", "early_exit", "frozen", "resumed", "ray"}
    if unknown or not arms:
        parser.error(
            f"--servers takes plain, early_exit, frozen, resumed, ray; got {args.servers!r}"
        )
    for follower in ("frozen", "resumed"):
        if follower in arms and "early_exit" not in arms[: arms.index(follower)]:
            parser.error(
                f"the {follower} arm starts from what the early_exit arm saved: list early_exit "
                "first"
            )
    args.save_learner = "resumed" in arms  # the resumed arm restarts early_exit's learner
    if args.paired and arms[:2] != ["plain", "early_exit"]:
        parser.error(
            "--paired compares with plain: list plain,early_exit first (then frozen, resumed, ray)"
        )
    if args.slices < 1:
        parser.error(f"--slices must be at least 1, got {args.slices}")
    torch.set_num_threads(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

    model = load_fashion_backbone()
    tmp = Path(tempfile.mkdtemp(prefix="earlyexit-serve-load-"))
    weights = tmp / "fashion_lite0.pth"
    torch.save(model.state_dict(), weights)
    inputs = fashion_test_images(4000, args.image_size)
    payloads = [npy_bytes(x) for x in inputs]
    if args.model_only:
        out = Path(args.out or Path(__file__).parent / "results" / "serve_load.json")
        report = json.loads(out.read_text()) if out.exists() else {}
        report["model_only"] = model_only(model, Path(args.model_only), inputs, args.batch)
        out.write_text(json.dumps(report, indent=2) + "\n")
        print(json.dumps(report["model_only"], indent=2))
        return 0

    results: dict[str, dict] = {}
    heads: dict[str, Path] = {}
    alone = arms
    if args.paired:
        followers = [kind for kind in arms if kind in ("frozen", "resumed")]
        results, heads = run_paired(args, weights, payloads, followers=followers)
        alone = [kind for kind in arms if kind not in results]
    for i, kind in enumerate(alone):
        results[kind], heads[kind] = run_server(
            args, weights, payloads, kind=kind, port=18611 + i, learned=heads.get("early_exit")
        )
    report: dict[str, Any] = {
        "command": " ".join(sys.argv),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "threads": args.threads,
        "clients": args.clients,
        "duration_s": args.duration,
        "image_size": args.image_size,
        "paired_slices": args.slices if args.paired else None,
        **results,
        "targets": {
            "throughput_gain_vs_allowed_at_least": 0.7,
            "lost_requests": 0,
        },
    }
    if "early_exit" in results:
        served = results["early_exit"]["stats"]
        mean_batch = max(1, round((served["samples"] or 0) / max(served["batches"] or 1, 1)))
        report["model_only"] = model_only(model, heads["early_exit"], inputs, mean_batch)
    if "plain" in results:
        for kind in ("early_exit", "frozen", "resumed", "ray"):
            if kind not in results:
                continue
            # Paired: against the plain server's slices of the same pairing.
            base_load = results[kind].get("paired_plain_load") or results["plain"]["load"]
            base = base_load["throughput_per_s"]
            stats = results[kind]["stats"]
            # A resumed learner's saving over its own run; a frozen server's whole-run saving
            # is its mac_saving (nothing is spent learning).
            saving = (
                results[kind].get("mac_saving_this_run")
                or stats.get("mac_saving_total")
                or stats.get("mac_saving")
                or 0.0
            )
            speedup = results[kind]["load"]["throughput_per_s"] / base
            results[kind]["vs_plain"] = {
                "throughput_ratio": speedup,
                "mac_saving_under_load": saving,
                "throughput_gain_vs_allowed": gain_vs_allowed(speedup, saving),
            }
            if "paired_plain_load" in results[kind]:
                results[kind]["vs_plain"].update(
                    after_first_slice_ratio(
                        results[kind]["load"], base_load, stats.get("mac_saving")
                    )
                )
    out = (
        Path(args.out)
        if args.out
        else Path(__file__).parent
        / "results"
        / ("serve_load_quick.json" if args.quick else "serve_load.json")
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=sorted) + "\n")
    print_table(results)
    print_rss_by_process(results)
    print(f"wrote {out}")
    return 0


def after_first_slice_ratio(load: dict, plain_load: dict, recent_saving: float | None) -> dict:
    """The paired throughput ratio without the first slice of each arm (a learning server
    opens its gates there), next to the learner's saving over its latest samples: the steady
    state, as far as one run shows it."""
    ours = load["slice_throughputs_per_s"][1:]
    base = plain_load["slice_throughputs_per_s"][1:]
    if not ours or not base or recent_saving is None or recent_saving >= 1:
        return {}
    ratio = statistics.fmean(ours) / statistics.fmean(base)
    return {
        "after_first_slice_ratio": ratio,
        "recent_mac_saving": recent_saving,
        "after_first_slice_gain_vs_allowed": gain_vs_allowed(ratio, recent_saving),
    }


def _fmt(value: Any) -> str:
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def print_table(results: dict[str, dict]) -> None:
    """One column per arm."""
    kinds = list(results)

    def row(name: str, get: Callable[[dict], Any]) -> None:
        cells = []
        for kind in kinds:
            try:
                cells.append(_fmt(get(results[kind])))
            except (KeyError, TypeError):
                cells.append("-")
        print(f"{name:32} " + " ".join(f"{c:>16}" for c in cells))

    print(f"{'':32} " + " ".join(f"{k:>16}" for k in kinds))
    row("throughput (req/s)", lambda r: r["load"]["throughput_per_s"])
    row("latency p50 (ms)", lambda r: r["load"]["latency_p50_ms"])
    row("latency p95 (ms)", lambda r: r["load"]["latency_p95_ms"])
    row("latency p99 (ms)", lambda r: r["load"]["latency_p99_ms"])
    row("latency max (ms)", lambda r: r["load"]["latency_max_ms"])
    row("errors / lost", lambda r: f"{r['load']['errors']} / {r['load']['lost']}")
    row(
        "RSS start -> end (MB)",
        lambda r: (
            f"{r['load']['rss_bytes']['start'] / 2**20:.0f} -> "
            f"{r['load']['rss_bytes']['end'] / 2**20:.0f}"
        ),
    )
    row("server process (cores)", lambda r: r["load"]["cpu"]["server_cores"])
    row("clients (cores)", lambda r: r["load"]["cpu"]["client_cores"])
    row("machine busy (share)", lambda r: r["load"]["cpu"]["machine_busy_share"])
    row("batch-1 p50 via server (ms)", lambda r: r["batch1_server_p50_ms"])
    row("MAC saving (whole run)", lambda r: r["vs_plain"]["mac_saving_under_load"])
    row("heads versions seen", lambda r: len(r["load"]["heads_versions_seen"]))
    row("plain alongside (req/s)", lambda r: r["paired_plain_load"]["throughput_per_s"])
    row("throughput x plain", lambda r: r["vs_plain"]["throughput_ratio"])
    row("gain / what saving allows", lambda r: r["vs_plain"]["throughput_gain_vs_allowed"])
    row("x plain after 1st slice", lambda r: r["vs_plain"]["after_first_slice_ratio"])
    row(
        "  / what recent saving allows",
        lambda r: r["vs_plain"]["after_first_slice_gain_vs_allowed"],
    )
    row("replicas back after kill", lambda r: r["replicas_after_kill"]["recovered"])


def print_rss_by_process(results: dict[str, dict]) -> None:
    """Each process's RSS at the start, after one minute and at the end of its arm's load."""
    for kind, result in results.items():
        for name, series in result["load"].get("rss_by_process", {}).items():
            minute = next((size for t, size in series if t >= 60), series[-1][1])
            print(
                f"RSS {kind} {name:28} start {series[0][1] / 2**20:6.0f}  "
                f"1 min {minute / 2**20:6.0f}  end {series[-1][1] / 2**20:6.0f} MB "
                f"({series[0][0]:.0f}-{series[-1][0]:.0f} s)"
            )


if __name__ == "__main__":
    raise SystemExit(main())
