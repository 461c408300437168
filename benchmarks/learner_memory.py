"""Memory of a background learner fed the way the servers feed it, in one process.

The learner of ``earlyexit serve --ray`` learns from rows its replicas send (``record()``); the
embedded server's learner from its own ``step()``. This script feeds one background learner of the
fine-tuned EfficientNet-Lite0 of the fashion workload (wrapped as the servers wrap it, learned
gate) with batches of ``--batch`` random images, either through a :class:`ServingReplica` whose
rows are pickled and unpickled as Ray sends them (``--feed record``, releases installed every 10
batches), through ``learner.step`` (``--feed step``), or through the ``EarlyExitLearner``
deployment of ``earlyexit serve --ray`` on a local Ray cluster, one call at a time (``--feed
ray``), and prints the learner process's private resident memory (``RssAnon``) next to the rows
its buffers hold, every ``--every`` batches. A learner whose memory keeps growing once its buffers
are full leaks; one that levels off is capped.

Usage:
    python benchmarks/learner_memory.py                       # 9,000 batches of 4 through record()
    python benchmarks/learner_memory.py --feed step --batches 3000
    python benchmarks/learner_memory.py --feed ray --batches 6000     # needs earlyexit[ray]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import pickle
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled
import earlyexit as ee
from earlyexit.distill import ServingReplica
from earlyexit.evaluation.pipeline import PipelineOptions
from earlyexit.evaluation.workloads._fashion import load_fashion_backbone


def rss_anon_mb(pid: int | None = None) -> float:
    """Private resident memory of a process (default: this one), MiB (Linux)."""
    for line in Path(f"/proc/{pid or os.getpid()}/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def learner_actor_pid() -> int:
    """The process Ray runs the learner deployment in (named ``ray::ServeReplica:APP:...``)."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                command = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if b"ServeReplica:learner_memory:EarlyExitLearner" in command:
                return int(entry.name)
    raise RuntimeError("the learner's process was not found")


class RayLearner:
    """The ``EarlyExitLearner`` deployment, called like an :class:`OnlineDistiller`."""

    def __init__(self, eem: ee.EarlyExitModel, config: ee.DistillConfig) -> None:
        import ray
        from ray import serve

        from earlyexit.server.scale_out import EarlyExitLearner, ServedModel

        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        app = EarlyExitLearner.bind(ServedModel.of(eem, config=config))
        self.handle = serve.run(app, name="learner_memory", route_prefix=None)
        self.pid = learner_actor_pid()
        self.version = -1

    def release(self) -> Any:
        _share, release = self.handle.poll.remote(self.version, "r0", 0, self.version).result()
        if release is not None:
            self.version = release.version
        return release

    def record(self, rows: Any, serve_seconds: float) -> None:
        self.handle.record.remote([(rows, serve_seconds, self.version)], "r0", 0).result()

    def record_many(self, batches: list[Any], replica: str) -> Any:
        """Several batches in one call, as a replica under load sends them (not waited for)."""
        return self.handle.record.remote(
            [(rows, 0.005, self.version) for rows in batches], replica, 0
        )

    def stats(self) -> dict:
        return self.handle.stats.remote().result()

    def close(self) -> None:
        import ray
        from ray import serve

        serve.shutdown()
        ray.shutdown()


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--feed", choices=("record", "step", "ray"), default="record")
    parser.add_argument("--batches", type=int, default=9000)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--every", type=int, default=1000)
    parser.add_argument(
        "--per-call",
        type=int,
        default=1,
        help="with --feed ray: batches per record() call, two replicas' calls in flight at once "
        "(as under load); 1: one batch per call, one call at a time",
    )
    parser.add_argument("--out", default=None, help="JSON path (default: print only)")
    args = parser.parse_args()
    torch.set_num_threads(1)

    eem = PipelineOptions().wrap(load_fashion_backbone(), (3, 64, 64))
    config = ee.DistillConfig(background=True, gate="learned")
    replica = ServingReplica(copy.deepcopy(eem), config) if args.feed != "step" else None
    learner: Any = (
        RayLearner(eem, config) if args.feed == "ray" else ee.OnlineDistiller(eem, config)
    )
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(4000, 3, 64, 64, generator=generator)
    timeline = []
    pending: list[Any] = []
    if args.per_call > 1 and args.feed != "ray":
        parser.error("--per-call needs --feed ray")
    began = time.perf_counter()
    for i in range(args.batches + 1):
        x = images[torch.randint(len(images), (args.batch,), generator=generator)]
        if replica is None:
            learner.step(x)
        else:
            if i % 10 == 0:
                release = learner.release()
                if release is not None:
                    replica.install(pickle.loads(pickle.dumps(release)))
            _, rows = replica.serve(x)
            if args.per_call > 1:  # two replicas' worth of calls in flight, per_call batches each
                pending.append(rows)
                if len(pending) == 2 * args.per_call:
                    calls = [learner.record_many(pending[k::2], f"r{k}") for k in range(2)]
                    for call in calls:
                        call.result()
                    pending = []
            else:
                learner.record(pickle.loads(pickle.dumps(rows)), serve_seconds=0.005)
        if i % args.every == 0:
            stats = learner.stats()
            point = {
                "batches": i,
                "rss_anon_mb": rss_anon_mb(getattr(learner, "pid", None)),
                "replay": stats["replay"],
                "evidence": stats["evidence"],
                "buffers_mb": stats["memory_bytes"] / 2**20,
                "calibrations": stats["calibrations"],
                "seconds": time.perf_counter() - began,
            }
            timeline.append(point)
            print(json.dumps(point), flush=True)
    learner.close()
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "timeline": timeline}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
