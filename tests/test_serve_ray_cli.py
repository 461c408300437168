"""``earlyexit serve --ray``: the command end to end (its own local Ray cluster), and its refusals.

Kept apart from ``test_scale_out.py`` so that the two never run a Ray cluster each at once.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from hidden_packages import hiding_prelude
from test_server import (
    NPY,
    PNG,
    ROOT,
    SIZE,
    _env,
    batch,
    npy_bytes,
    png_bytes,
    start_serve,
    tiny_model,
)

import earlyexit as ee

pytest.importorskip("ray.serve")


@pytest.mark.slow
@pytest.mark.ray
def test_earlyexit_serve_ray_answers_on_two_replicas_and_saves_on_sigterm(tmp_path):
    import httpx

    model = tiny_model(seed=4)
    weights = tmp_path / "model.pth"
    torch.save(model.state_dict(), weights)
    saved = tmp_path / "saved.safetensors"
    arguments = [
        "--model", "timm:resnet18", "--num-classes", "10", "--input-size", "3,64,64",
        "--weights", str(weights), "--ray", "--replicas", "2", "--port", "0",
        "--save-on-exit", str(saved), "--threads", "1", "--json",
    ]  # fmt: skip
    process, url = start_serve(arguments, tmp_path)
    try:
        answers = [
            httpx.post(f"{url}/predict", content=npy_bytes(batch(3, seed)), headers=NPY, timeout=60)
            for seed in range(8)
        ]
        image = httpx.post(f"{url}/predict", content=png_bytes(), headers=PNG, timeout=60)
        stats = httpx.get(f"{url}/stats", timeout=60).json()
        metrics = httpx.get(f"{url}/metrics", timeout=60).text
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=180)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert all(a.status_code == 200 and len(a.json()["predictions"]) == 3 for a in answers)
    assert image.status_code == 200 and image.json()["num_exits"] == 4
    assert len({a.json()["replica"] for a in answers}) >= 1
    assert len(stats["replicas"]) == 2, stats["replicas"]
    assert "earlyexit_requests_total" in metrics
    assert process.returncode == 0, err[-3000:]
    summary = json.loads(out)
    assert summary["saved"] == str(saved) and len(summary["replicas"]) == 2
    assert summary["samples"] >= 8 * 3 - 3  # every replica's signals reached the learner
    loaded = ee.load(tiny_model(seed=4), saved)
    assert loaded.num_exits == 4 and tuple(loaded.input_size) == SIZE


def test_serve_ray_refuses_plain():
    from earlyexit.cli import main

    assert main(["serve", "--model", "timm:resnet18", "--ray", "--plain"]) == 2


HIDE_RAY = hiding_prelude(("ray",)) + textwrap.dedent(
    """
    import contextlib, io, json
    from earlyexit.cli import main

    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        code = main(["serve", "--model", "timm:resnet18", "--ray"])
    print(json.dumps({"code": code, "stderr": stderr.getvalue()}))
    """
)


@pytest.mark.slow
def test_without_the_ray_extra_serve_ray_says_what_to_install():
    done = subprocess.run(
        [sys.executable, "-c", HIDE_RAY], capture_output=True, text=True, env=_env(), cwd=ROOT,
        timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["code"] == 6
    assert got["stderr"] == (
        "earlyexit serve: error: earlyexit serve --ray needs ray[serve]: "
        "pip install 'earlyexit[ray]'\n"
    )
