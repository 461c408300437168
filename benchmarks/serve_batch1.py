"""What ``earlyexit serve`` adds at batch 1 over calling the model directly, paired per request.

Issue #16's target: the server adds <= 1 ms per request over calling ``eem`` directly at batch 1.
Timings on a shared machine drift by milliseconds between phases, so each request is paired with
a direct call on the same image right after it, in this process, and the overhead is the median
of the per-pair differences (``overhead_p50_ms``); the medians of each side are reported too.

Three servers, started one after the other on loopback with the fine-tuned EfficientNet-Lite0 of
the fashion workload (one torch thread each, as ``benchmarks/serve_load.py`` runs them), one client
sending one preprocessed Fashion-MNIST test image per request (``.npy``):

* ``plain`` (``--plain``) against the base model called directly;
* ``frozen`` (``--heads H --frozen``: the heads and thresholds as saved, nothing learning) against
  ``ee.load(model, H).predict``: the same policy on both sides, so every answer leaves at the
  same exit (``same_exit`` checks it). This is the server's overhead, the target's figure;
* ``learning`` (the default server, learning while it serves: ``--learner-state`` resuming the
  learner saved in ``H``, or ``--heads H`` where ``H`` holds heads only) against the same direct
  call. Its learner audits (runs some early-leaving samples to the end), recalibrates and trains
  on a second thread, so its exits drift from the saved policy's (a new learner on ``--heads``
  also closes the gates at its first calibration until it has evidence of its own): this row is
  the cost of learning at batch 1 on this machine, not of the serving layer.

Beside ``plain`` and ``frozen`` runs a yardstick, ``benchmarks/bare_server.py``: the same model
(or ``eem.predict`` with the same heads) called on the event loop of a one-endpoint FastAPI app on
the same uvicorn, with nothing else. Each image goes to both servers (the order alternating) and
then to the direct call, so ``bare_overhead_p50_ms`` is the floor of any FastAPI server on this
machine (loopback HTTP, and each side waking up for it) and ``over_bare_p50_ms`` (the median of
the per-image differences between the two servers) is what ``earlyexit serve``'s own layer costs:
decoding and checking the body, the hand-over to the serving thread and back, metrics.

``H``: ``--heads PATH`` (heads saved by ``eem.save``, e.g. by ``earlyexit serve --save-on-exit``,
or a whole learner), or by default a learner trained here on the fashion stream (``learn_online``,
seed 0, ~30 s) and saved whole.

Usage:
    python benchmarks/serve_batch1.py                      # ~3 min
    python benchmarks/serve_batch1.py --requests 2000 --heads heads.safetensors

Results: ``benchmarks/results/serve_batch1.json`` unless ``--out`` says otherwise.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled
sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_load import HOST, Server, fashion_test_images, npy_bytes

import earlyexit as ee
from earlyexit.evaluation.workloads._fashion import load_fashion_backbone


def learned_heads(path: Path) -> Path:
    """Heads learned on the fashion stream as ``earlyexit demo`` learns them (seed 0), saved with
    their whole learner (``OnlineDistiller.save``: ``ee.load`` reads the heads, ``earlyexit
    serve --learner-state`` resumes the learner)."""
    from earlyexit.evaluation.pipeline import PipelineOptions, learn_online
    from earlyexit.evaluation.workloads import load_workload

    workload = load_workload("fashion", seed=0)
    options = PipelineOptions(seed=0, progress=False)
    run = learn_online(workload.model, workload.traffic, options, workload.input_size)
    run.learner.close()
    run.learner.save(path)
    return path


def learning_flags(model: torch.nn.Module, heads: Path, folder: Path) -> tuple[str, ...]:
    """How the learning server starts: resuming a copy of the learner saved in ``heads`` (its
    gates open from the first request, as a restarted server's), or a new learner on those heads
    where the file holds heads only (``eem.save``): its first calibration then closes the gates
    until it has evidence of its own."""
    try:
        ee.OnlineDistiller.load(model, heads, background=False).eem.remove()
    except ee.CheckpointError:
        return ("--heads", str(heads))
    copy = folder / "learning_learner.safetensors"
    shutil.copyfile(heads, copy)
    return ("--learner-state", str(copy))


def paired(
    servers: dict[str, Server],
    payloads: list[bytes],
    inputs: list[torch.Tensor],
    direct: Callable,
    warmup: int,
) -> dict:
    """Per image: one request to each server (their order alternating image by image), then one
    direct call on the same image in this process.

    Returns, for ``earlyexit serve`` (``"server"``): its median time, the median of its
    per-image differences to the direct call (``overhead_p50_ms``) and whether its answers left
    at the direct call's exits; with a ``"bare"`` server beside it, the same for the bare one
    (``bare_*``) and the median of the per-image differences between the two (``over_bare_*``).
    """
    names = list(servers)
    conns = {
        name: http.client.HTTPConnection(HOST, s.port, timeout=60) for name, s in servers.items()
    }
    took: dict[str, list[float]] = {name: [] for name in names}
    same: dict[str, list[bool]] = {name: [] for name in names}
    called: list[float] = []
    with torch.no_grad():
        for i, (body, x) in enumerate(zip(payloads, inputs, strict=True)):
            spent, exits = {}, {}
            for name in names if i % 2 == 0 else names[::-1]:
                began = time.perf_counter()
                conns[name].request(
                    "POST", "/predict", body=body, headers={"Content-Type": "application/x-npy"}
                )
                reply = conns[name].getresponse()
                answer = json.loads(reply.read())
                spent[name] = time.perf_counter() - began
                if reply.status != 200:
                    raise RuntimeError(f"{name} answered {reply.status}: {answer}")
                exits[name] = answer["predictions"][0]["exit"]
            began = time.perf_counter()
            result = direct(x)
            direct_s = time.perf_counter() - began
            if i < warmup:
                continue
            called.append(direct_s)
            exit_direct = int(result.exit_index[0]) if hasattr(result, "exit_index") else 0
            for name in names:
                took[name].append(spent[name])
                same[name].append(exits[name] == exit_direct)
    for conn in conns.values():
        conn.close()

    def ms(values: list[float]) -> float:
        return 1e3 * statistics.median(values)

    def p90_ms(values: list[float]) -> float:
        return 1e3 * statistics.quantiles(values, n=10)[8]

    out: dict = {"requests": len(called), "direct_p50_ms": ms(called)}
    for name in names:
        prefix = "" if name == "server" else f"{name}_"
        gaps = [a - b for a, b in zip(took[name], called, strict=True)]
        out[f"{prefix}server_p50_ms"] = ms(took[name])
        out[f"{prefix}overhead_p50_ms"] = ms(gaps)
        out[f"{prefix}overhead_p90_ms"] = p90_ms(gaps)
        out[f"{prefix}same_exit"] = sum(same[name]) / len(same[name])
    if "bare" in servers:
        over = [a - b for a, b in zip(took["server"], took["bare"], strict=True)]
        out["over_bare_p50_ms"] = ms(over)
        out["over_bare_p90_ms"] = p90_ms(over)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=1000, help="paired requests per server")
    parser.add_argument("--warmup", type=int, default=50, help="pairs left out first")
    parser.add_argument("--threads", type=int, default=1, help="torch threads, server and here")
    parser.add_argument("--heads", help="heads saved with eem.save (default: learn them here)")
    parser.add_argument("--out", default=None, help="JSON path")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))

    tmp = Path(tempfile.mkdtemp(prefix="earlyexit-batch1-"))
    model = load_fashion_backbone().eval()
    weights = tmp / "fashion_lite0.pth"
    torch.save(model.state_dict(), weights)
    heads = Path(args.heads) if args.heads else learned_heads(tmp / "heads.safetensors")
    inputs = fashion_test_images(args.requests + args.warmup)
    payloads = [npy_bytes(x) for x in inputs]
    eem = ee.load(model, heads)

    arms = {  # the server's flags, whether the bare yardstick runs beside it, the direct call
        "plain": ((), (), model),
        "frozen": (("--heads", str(heads), "--frozen"), ("--heads", str(heads)), eem.predict),
        "learning": (learning_flags(model, heads, tmp), None, eem.predict),
    }
    bare_script = Path(__file__).resolve().parent / "bare_server.py"
    results = {}
    for i, (name, (extra, bare_extra, direct)) in enumerate(arms.items()):
        print(f"[{name}] starting the server ...", file=sys.stderr)
        servers = {
            "server": Server(
                weights,
                18651 + 2 * i,
                plain=name == "plain",
                threads=args.threads,
                save=tmp / f"{name}.safetensors",
                extra=extra,
            )
        }
        try:
            if bare_extra is not None:
                port = 18652 + 2 * i
                servers["bare"] = Server.from_command(
                    [sys.executable, str(bare_script), "--weights", str(weights), "--port",
                     str(port), "--threads", str(args.threads), *bare_extra],
                    port,
                )  # fmt: skip
            results[name] = paired(servers, payloads, inputs, direct, args.warmup)
        finally:
            for server in servers.values():
                server.stop()
        r = results[name]
        bare = (
            f"; bare server overhead p50 {r['bare_overhead_p50_ms']:.2f} ms, ours over it "
            f"{r['over_bare_p50_ms']:.2f} ms"
            if "bare_overhead_p50_ms" in r
            else ""
        )
        print(
            f"[{name}] server p50 {r['server_p50_ms']:.2f} ms, direct p50 {r['direct_p50_ms']:.2f}"
            f" ms, paired overhead p50 {r['overhead_p50_ms']:.2f} ms (p90 "
            f"{r['overhead_p90_ms']:.2f}), same exit {r['same_exit']:.1%}{bare}",
            file=sys.stderr,
        )
    eem.remove()
    report = {
        "command": " ".join(sys.argv),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "threads": args.threads,
        "heads": str(heads) if args.heads else "learned on the fashion stream, seed 0",
        **results,
        "server_overhead_batch1_ms": results["frozen"]["overhead_p50_ms"],
        "bare_server_overhead_batch1_ms": results["frozen"]["bare_overhead_p50_ms"],
        "server_over_bare_batch1_ms": results["frozen"]["over_bare_p50_ms"],
        "target": {"server_overhead_batch1_ms_at_most": 1.0},
    }
    out = Path(args.out or Path(__file__).parent / "results" / "serve_batch1.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: report[k] for k in ("plain", "frozen", "learning")}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
