"""The least a FastAPI server adds at batch 1: the yardstick of ``benchmarks/serve_batch1.py``.

One endpoint, ``POST /predict``, on uvicorn with the same settings ``earlyexit serve`` uses: it
reads the ``.npy`` body, turns it into a tensor and calls the model *on the event loop* (no
queue, no serving thread, no batching, no metrics, no checks beyond ``np.load``), then answers
with the same JSON as ``earlyexit serve``. Nothing a real server needs could cost less, so what
``earlyexit serve`` adds over this server, paired per request, is the cost of its own layer; what
this server adds over a direct call is the floor of HTTP on this machine (request and answer on
loopback, and each side waking up for them).

Serves the fine-tuned EfficientNet-Lite0 of the fashion workload from ``--weights`` (a state dict),
as the base model, or wrapped with ``--heads`` (``ee.load``) and called through ``eem.predict``.
Prints ``serving on http://HOST:PORT`` to stderr once it listens.

Usage (``serve_batch1.py`` starts it):
    python benchmarks/bare_server.py --weights lite0.pth --port 18660 [--heads heads.safetensors]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled
import fastapi
import uvicorn
from fastapi.responses import JSONResponse

import earlyexit as ee
from earlyexit.evaluation.workloads._fashion import load_fashion_backbone
from earlyexit.server.backends import answers


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--weights", required=True, help="state dict of the fashion backbone")
    parser.add_argument("--heads", help="serve eem.predict with these heads (default: the model)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model = load_fashion_backbone().eval()
    model.load_state_dict(torch.load(args.weights, map_location="cpu", weights_only=True))
    if args.heads:
        eem = ee.load(model, args.heads)
        num_exits = eem.num_exits

        def serve(x: torch.Tensor) -> Any:
            result = eem.predict(x)
            return answers(result.logits, result.exit_index, result.accepted)

    else:
        num_exits = 0

        def serve(x: torch.Tensor) -> Any:
            logits = model(x)
            rows = x.shape[0]
            return answers(
                logits, torch.zeros(rows, dtype=torch.long), torch.ones(rows, dtype=bool)
            )

    @contextlib.asynccontextmanager
    async def lifespan(_app: Any) -> AsyncIterator[None]:
        print(f"serving on http://{args.host}:{args.port}", file=sys.stderr, flush=True)
        yield

    app = fastapi.FastAPI(lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    @app.post("/predict")
    async def predict(request: fastapi.Request) -> JSONResponse:
        x = torch.from_numpy(np.load(io.BytesIO(await request.body()), allow_pickle=False))
        with torch.no_grad():  # on the event loop: nothing else is served meanwhile
            predictions = serve(x)
        return JSONResponse(
            {"predictions": predictions, "heads_version": 0, "num_exits": num_exits}
        )

    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        log_level="warning",
        access_log=False,
        server_header=False,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
