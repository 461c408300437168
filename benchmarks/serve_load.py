"""Load on the embedded server: early exit under concurrent traffic, against the same model unwrapped.

``earlyexit serve`` is started twice on loopback with the fine-tuned EfficientNet-Lite0 of the
fashion workload: once serving the base model as is (``--plain``: same decoding, batching and
JSON, no exits, no learner) and once wrapped, learning online. Each run sends real Fashion-MNIST
test images (``.npy``, preprocessed like the workload) from N concurrent clients for a fixed
time, then one client alone, and reports:

* throughput, p50/p95/p99 latency, errors and lost requests (sent without an answer: must be 0);
* the MAC saving under load (the learner's own count of MACs spent, audits included) and the
  heads versions published during the run;
* the server's resident memory (RSS) sampled through the run: it must stay flat (the learner's
  buffers are capped);
* the server's overhead at batch 1: one client's median latency against the server, minus the
  median of calling the same wrapped model (the heads the server saved at the end) in this process.

Targets (issue #16): the server adds <= 1 ms per request over calling ``eem`` directly at batch 1;
under load, early exit raises throughput over the unwrapped server by >= 0.7 x what the MAC saving
allows (``1 / (1 - saving) - 1``). Both runs happen in one invocation, one after the other, on the
same machine, so their ratio is what to read.

Usage:
    python benchmarks/serve_load.py                    # 10 minutes per server (the issue's run)
    python benchmarks/serve_load.py --quick            # 60 s per server, to try it
    python benchmarks/serve_load.py --clients 8 --duration 300 --threads 1
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

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


def rss_bytes(pid: int) -> int:
    """Resident memory of a process (Linux /proc), 0 where unreadable."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class Server:
    """``earlyexit serve`` in a subprocess on a free loopback port."""

    def __init__(self, weights: Path, port: int, *, plain: bool, threads: int, save: Path) -> None:
        command = [
            sys.executable, "-m", "earlyexit", "serve",
            "--model", MODEL, "--num-classes", "10", "--weights", str(weights),
            "--input-size", "3,64,64", "--host", HOST, "--port", str(port),
            "--threads", str(threads), "--save-on-exit", str(save),
        ]  # fmt: skip
        if plain:
            command.append("--plain")
        self.port = port
        self.process = subprocess.Popen(
            command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True
        )
        self.log: list[str] = []
        started = time.monotonic()
        while time.monotonic() - started < 180:
            line = self.process.stderr.readline() if self.process.stderr else ""
            if not line and self.process.poll() is not None:
                raise RuntimeError("the server exited before it was ready:\n" + "".join(self.log))
            self.log.append(line)
            if "serving on" in line:
                break
        else:
            raise RuntimeError("the server was not ready within 180 s")
        # Keep draining stderr so the server never blocks on a full pipe.
        threading.Thread(target=self._drain, daemon=True).start()

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


def load_phase(server: Server, payloads: list[bytes], clients: int, seconds: float) -> dict:
    """N clients for ``seconds``; RSS sampled every 5 s."""
    outs = [
        {"sent": 0, "lost": 0, "errors": 0, "latencies": [], "exits": [], "versions": set()}
        for _ in range(clients)
    ]
    stop_at = time.monotonic() + seconds
    threads = [
        threading.Thread(target=client_loop, args=(server.port, payloads, stop_at, c, clients, o))
        for c, o in enumerate(outs)
    ]
    rss = [rss_bytes(server.process.pid)]
    began = time.perf_counter()
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        time.sleep(5.0)
        rss.append(rss_bytes(server.process.pid))
    for t in threads:
        t.join()
    wall = time.perf_counter() - began
    latencies = sorted(x for o in outs for x in o["latencies"])

    def pct(q: float) -> float | None:
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] if latencies else None

    answered = len(latencies)
    return {
        "clients": clients,
        "seconds": wall,
        "sent": sum(o["sent"] for o in outs),
        "answered": answered,
        "errors": sum(o["errors"] for o in outs),
        "lost": sum(o["lost"] for o in outs),
        "last_error": next((o["last_error"] for o in outs if "last_error" in o), None),
        "throughput_per_s": answered / wall,
        "latency_p50_ms": 1e3 * pct(0.50) if latencies else None,
        "latency_p95_ms": 1e3 * pct(0.95) if latencies else None,
        "latency_p99_ms": 1e3 * pct(0.99) if latencies else None,
        "heads_versions_seen": sorted(set().union(*(o["versions"] for o in outs))),
        "rss_bytes": {"start": rss[0], "end": rss[-1], "max": max(rss), "samples": rss},
    }


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


def direct_latency(model: torch.nn.Module, heads: Path, inputs: list[torch.Tensor]) -> list[float]:
    """The same wrapped model (heads the server saved) called in this process, batch 1."""
    eem = ee.load(model, heads)
    times = []
    with torch.no_grad():
        for x in inputs[:20]:
            eem.predict(x)  # warm-up
        for x in inputs:
            began = time.perf_counter()
            eem.predict(x)
            times.append(time.perf_counter() - began)
    eem.remove()
    return times


def run_server(
    args: argparse.Namespace, weights: Path, payloads: list[bytes], *, plain: bool, port: int
) -> tuple[dict, Path]:
    save = Path(tempfile.mkdtemp(prefix="earlyexit-serve-")) / "heads.safetensors"
    kind = "plain" if plain else "early_exit"
    print(f"[{kind}] starting the server ...", file=sys.stderr)
    server = Server(weights, port, plain=plain, threads=args.threads, save=save)
    try:
        # Warm-up: a few sequential requests (first calls allocate).
        sequential_latency(server, payloads, 20)
        print(f"[{kind}] {args.clients} clients for {args.duration:.0f} s ...", file=sys.stderr)
        load = load_phase(server, payloads, args.clients, args.duration)
        single = sequential_latency(server, payloads[::-1], args.sequential)
        stats = server.get("/stats")
        metrics = server.get("/metrics")
    finally:
        code = server.stop()
    result = {
        "server": kind,
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
            )
        },
        "metrics_lines": sum(1 for line in metrics.splitlines() if line.startswith("earlyexit_")),
    }
    return result, save


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of load per server")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients")
    parser.add_argument("--sequential", type=int, default=300, help="batch-1 requests, one client")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each server")
    parser.add_argument("--quick", action="store_true", help="60 s of load per server")
    parser.add_argument("--out", default=None, help="JSON path")
    args = parser.parse_args()
    if args.quick:
        args.duration = min(args.duration, 60.0)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))

    model = load_fashion_backbone()
    tmp = Path(tempfile.mkdtemp(prefix="earlyexit-serve-load-"))
    weights = tmp / "fashion_lite0.pth"
    torch.save(model.state_dict(), weights)
    images, _labels = read_fashion_split("test")
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    inputs = [fashion_preprocess(images[int(i)][None]) for i in order[:4000]]
    payloads = [npy_bytes(x) for x in inputs]

    plain, _ = run_server(args, weights, payloads, plain=True, port=18601)
    wrapped, heads = run_server(args, weights, payloads, plain=False, port=18602)
    direct = direct_latency(model, heads, inputs[: args.sequential])

    saving = wrapped["stats"].get("mac_saving_total") or 0.0
    speedup = wrapped["load"]["throughput_per_s"] / plain["load"]["throughput_per_s"]
    allowed = 1.0 / (1.0 - saving) - 1.0 if saving < 1 else float("inf")
    report = {
        "command": " ".join(sys.argv),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "threads": args.threads,
        "clients": args.clients,
        "duration_s": args.duration,
        "plain": plain,
        "early_exit": wrapped,
        "direct_batch1_p50_ms": 1e3 * statistics.median(direct),
        "server_overhead_batch1_ms": wrapped["batch1_server_p50_ms"]
        - 1e3 * statistics.median(direct),
        "throughput_ratio": speedup,
        "mac_saving_under_load": saving,
        "throughput_gain_vs_allowed": (speedup - 1.0) / allowed if allowed > 0 else None,
        "targets": {
            "server_overhead_batch1_ms_at_most": 1.0,
            "throughput_gain_vs_allowed_at_least": 0.7,
            "lost_requests": 0,
        },
    }
    out = (
        Path(args.out)
        if args.out
        else Path(__file__).parent
        / "results"
        / ("serve_load_quick.json" if args.quick else "serve_load.json")
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    rows = [
        ("throughput (req/s)", plain["load"]["throughput_per_s"], wrapped["load"]["throughput_per_s"]),
        ("latency p50 (ms)", plain["load"]["latency_p50_ms"], wrapped["load"]["latency_p50_ms"]),
        ("latency p95 (ms)", plain["load"]["latency_p95_ms"], wrapped["load"]["latency_p95_ms"]),
        ("latency p99 (ms)", plain["load"]["latency_p99_ms"], wrapped["load"]["latency_p99_ms"]),
        ("errors / lost", f"{plain['load']['errors']} / {plain['load']['lost']}",
         f"{wrapped['load']['errors']} / {wrapped['load']['lost']}"),
        ("RSS start -> end (MB)",
         f"{plain['load']['rss_bytes']['start'] / 2**20:.0f} -> {plain['load']['rss_bytes']['end'] / 2**20:.0f}",
         f"{wrapped['load']['rss_bytes']['start'] / 2**20:.0f} -> {wrapped['load']['rss_bytes']['end'] / 2**20:.0f}"),
        ("batch-1 p50 via server (ms)", plain["batch1_server_p50_ms"], wrapped["batch1_server_p50_ms"]),
    ]  # fmt: skip
    print(f"{'':32} {'plain':>14} {'early exit':>14}")
    for name, a, b in rows:
        fa = f"{a:.2f}" if isinstance(a, float) else str(a)
        fb = f"{b:.2f}" if isinstance(b, float) else str(b)
        print(f"{name:32} {fa:>14} {fb:>14}")
    gain = report["throughput_gain_vs_allowed"]
    print(
        f"MAC saving under load {saving:.1%}; throughput x{speedup:.2f} ("
        + ("no saving to compare with" if gain is None else f"{gain:.2f} of what the saving allows")
        + "; target >= 0.7); server overhead at batch 1 "
        f"{report['server_overhead_batch1_ms']:.2f} ms (target <= 1 ms); heads versions seen "
        f"{wrapped['load']['heads_versions_seen']}"
    )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
