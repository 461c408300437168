"""``earlyexit serve``: the HTTP server, in-process with FastAPI's TestClient on a tiny timm model.

Every endpoint, dynamic batching (concurrent requests served in fewer batches, each answer the
right rows), every kind of bad input (a 4xx with a JSON error, the learner's state unchanged, the
server still serving), the token rules, ``--plain``, the save on shutdown; and one run of the real
command in a subprocess (ready line, a request, SIGTERM, the saved heads load).
"""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient  # needs httpx (the test extra)
from hidden_packages import hiding_prelude

import earlyexit as ee
from earlyexit.data import model_transform, read_image
from earlyexit.errors import ConfigError
from earlyexit.server import (
    DynamicBatcher,
    LearnerBackend,
    NotAvailable,
    PlainBackend,
    ServedBatch,
    ServerClosing,
    ServerSettings,
    bind_socket,
    check_host,
    create_app,
)
from earlyexit.server.launch import is_loopback

ROOT = Path(__file__).resolve().parents[1]
SIZE = (3, 64, 64)
NUM_CLASSES = 10
NPY = {"Content-Type": "application/x-npy"}
PNG = {"Content-Type": "image/png"}
JPEG = {"Content-Type": "image/jpeg"}


def tiny_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    import timm

    return timm.create_model("resnet18", pretrained=False, num_classes=NUM_CLASSES).eval()


def small_config() -> ee.DistillConfig:
    """Background learning (as the server runs it) with small buffers: quick to snapshot."""
    return ee.DistillConfig(
        background=True,
        replay_samples=256,
        evidence_samples=256,
        gate_samples=256,
        max_memory_bytes=None,
    )


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return tiny_model()


@pytest.fixture(scope="module")
def transform(model):
    return model_transform(model, "timm", "resnet18", input_size=SIZE)


def learner_app(model, transform, **settings):
    learner = ee.OnlineDistiller(ee.wrap(model, input_size=SIZE), small_config())
    return create_app(LearnerBackend(learner), transform, ServerSettings(**settings)), learner


@pytest.fixture
def served(model, transform):
    """(client, learner) of a fresh learning server (1 MiB body limit)."""
    app, learner = learner_app(model, transform, max_body_bytes=1024 * 1024)
    with TestClient(app) as client:
        yield client, learner


def png_bytes(seed: int = 0, size: tuple[int, int] = (80, 60), fmt: str = "PNG") -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt)
    return buffer.getvalue()


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def batch(n: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, *SIZE)).astype(np.float32)


def direct(model, x: torch.Tensor) -> tuple[list[int], list[float]]:
    """Labels and probabilities of the base model itself (gates closed: the same answers)."""
    with torch.no_grad():
        p = torch.softmax(model(x), dim=-1)
    prob, label = p.max(dim=-1)
    return label.tolist(), prob.tolist()


def snapshot(learner) -> tuple[dict[str, torch.Tensor], str]:
    learner.sync(timeout=30)
    tensors, state = learner.state_dict()
    return {k: v.clone() for k, v in tensors.items()}, json.dumps(
        state, sort_keys=True, default=str
    )


def same_state(a, b) -> bool:
    (ta, sa), (tb, sb) = a, b
    return sa == sb and ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


# ------------------------------------------------------------------------------ endpoints


def test_predict_one_png_is_read_like_earlyexit_run(served, model, transform):
    client, _ = served
    body = png_bytes()
    response = client.post("/predict", content=body, headers=PNG)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["num_exits"] == 4 and answer["heads_version"] == 0
    [prediction] = answer["predictions"]
    assert set(prediction) == {"label", "probability", "exit", "accepted"}
    # Gates closed: the full model answered, on the image as `earlyexit run` reads it.
    labels, probs = direct(model, read_image(io.BytesIO(body), transform).unsqueeze(0))
    assert prediction["exit"] == 4 and prediction["accepted"] is True
    assert prediction["label"] == labels[0]
    assert prediction["probability"] == pytest.approx(probs[0], rel=1e-5)


def test_predict_jpeg_and_content_type_parameters(served):
    client, _ = served
    response = client.post(
        "/predict", content=png_bytes(fmt="JPEG"), headers={"Content-Type": "Image/JPEG; q=1"}
    )
    assert response.status_code == 200, response.text
    assert len(response.json()["predictions"]) == 1


def test_predict_npy_batch_answers_every_row(served, model):
    client, learner = served
    x = batch(3)
    response = client.post("/predict", content=npy_bytes(x), headers=NPY)
    assert response.status_code == 200, response.text
    predictions = response.json()["predictions"]
    labels, probs = direct(model, torch.from_numpy(x))
    assert [p["label"] for p in predictions] == labels
    assert [p["probability"] for p in predictions] == pytest.approx(probs, rel=1e-5)
    assert learner.stats()["samples"] == 3  # the learner served (and learns from) them


def test_healthz(served):
    client, _ = served
    response = client.get("/healthz")
    assert response.status_code == 200 and response.json() == {"status": "ok"}


def test_a_failed_learner_fails_requests_with_500_and_health_with_503(model, transform):
    app, learner = learner_app(model, transform)
    with TestClient(app) as client:
        learner.worker.error = RuntimeError("out of memory")  # as if its thread had died
        response = client.post("/predict", content=npy_bytes(batch(1)), headers=NPY)
        assert response.status_code == 500
        assert "background trainer failed" in response.json()["error"]
        health = client.get("/healthz")
        assert health.status_code == 503 and health.json()["status"] == "failing"
        assert 'earlyexit_requests_total{outcome="error"} 1.0' in client.get("/metrics").text
        learner.worker.error = None


def test_stats_are_the_learners_plus_server_counters(served):
    client, learner = served
    client.post("/predict", content=npy_bytes(batch(2)), headers=NPY)
    client.post("/predict", content=b"", headers=NPY)  # refused, still a request
    stats = client.get("/stats").json()
    for key in learner.stats():
        assert key in stats, key
    assert stats["samples"] == 2
    assert stats["thresholds"] == ["inf"] * 4  # strict JSON: closed gates as strings
    assert stats["heads_version"] == 0 and stats["requests"] == 2 and stats["batches"] == 1


def test_metrics_are_prometheus_text_prefixed_earlyexit(served):
    client, _ = served
    client.post("/predict", content=npy_bytes(batch(3)), headers=NPY)
    client.post("/predict", content=b"x", headers={"Content-Type": "text/plain"})
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    names = {
        line.split("{")[0].split(" ")[0]
        for line in text.splitlines()
        if line and not line.startswith("#")
    }
    assert names and all(name.startswith("earlyexit_") for name in names), names
    assert 'earlyexit_requests_total{outcome="ok"} 1.0' in text
    assert 'earlyexit_requests_total{outcome="unsupported_media_type"} 1.0' in text
    assert 'earlyexit_samples_total{exit="4"} 3.0' in text  # the full model answered all 3
    assert 'earlyexit_samples_total{exit="0"} 0.0' in text
    assert 'earlyexit_audited_agreement{exit="0"} NaN' in text  # nothing audited yet
    assert "earlyexit_mac_saving 0.0" in text
    assert "earlyexit_heads_version 0.0" in text
    assert "earlyexit_request_latency_seconds_count 1.0" in text
    assert "earlyexit_batch_size_count 1.0" in text and "earlyexit_batch_size_sum 3.0" in text
    assert "earlyexit_batches_total 1.0" in text


def test_unknown_paths_and_methods_answer_json_errors(served):
    client, _ = served
    assert client.get("/nope").json() == {"error": "Not Found"}
    response = client.get("/predict")
    assert response.status_code == 405 and "error" in response.json()


# ------------------------------------------------------------------------------ batching


def concurrently(client, bodies: list[tuple[bytes, dict]]) -> list:
    """POST every body to /predict at once, from one thread each; responses in order."""
    start = threading.Barrier(len(bodies))

    def send(item):
        body, headers = item
        start.wait()
        return client.post("/predict", content=body, headers=headers)

    with ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(send, bodies))


def test_concurrent_requests_are_served_in_fewer_batches(model, transform):
    app, _ = learner_app(model, transform, max_batch=64, max_wait_ms=300)
    n = 8
    arrays = [batch(2, seed=10 + i) for i in range(n)]
    with TestClient(app) as client:
        responses = concurrently(client, [(npy_bytes(a), NPY) for a in arrays])
        stats = client.get("/stats").json()
        metrics = client.get("/metrics").text
    assert all(r.status_code == 200 for r in responses)
    assert stats["requests"] == n and stats["samples"] == 2 * n
    assert stats["batches"] < n  # served together
    assert f"earlyexit_batch_size_count {float(stats['batches'])}" in metrics
    # Each request got its own rows back.
    for array, response in zip(arrays, responses, strict=True):
        labels, probs = direct(model, torch.from_numpy(array))
        got = response.json()["predictions"]
        assert [p["label"] for p in got] == labels
        assert [p["probability"] for p in got] == pytest.approx(probs, rel=1e-4)


def test_a_bad_request_does_not_fail_the_batch_it_arrives_with(model, transform):
    app, _ = learner_app(model, transform, max_batch=64, max_wait_ms=300)
    good = [(npy_bytes(batch(1, seed=i)), NPY) for i in range(4)]
    bad = [(npy_bytes(batch(1)[:, :1]), NPY), (b"not an image", PNG)]
    with TestClient(app) as client:
        responses = concurrently(client, good + bad)
        stats = client.get("/stats").json()
    assert [r.status_code for r in responses] == [200] * 4 + [400, 400]
    assert stats["samples"] == 4


def test_a_request_larger_than_max_batch_is_served_alone(model, transform):
    app, _ = learner_app(model, transform, max_batch=2)
    with TestClient(app) as client:
        response = client.post("/predict", content=npy_bytes(batch(5)), headers=NPY)
        assert response.status_code == 200 and len(response.json()["predictions"]) == 5
        assert client.get("/stats").json()["batches"] == 1


def test_batcher_runs_calls_between_batches_and_drains_on_close():
    order: list[str] = []

    def serve(x: torch.Tensor) -> ServedBatch:
        order.append(f"batch of {x.shape[0]}")
        time.sleep(0.05)
        return ServedBatch([{"exit": 0}] * x.shape[0], 0)

    batcher = DynamicBatcher(serve, max_batch=8, max_wait_s=0.0)
    batcher.start()
    first = batcher.submit(torch.zeros(1, 1))
    time.sleep(0.01)  # the first batch is being served: the next ones queue up
    queued = [batcher.submit(torch.zeros(2, 1)) for _ in range(2)]
    call = batcher.call(lambda: order.append("call") or "done")
    late = batcher.submit(torch.zeros(1, 1))
    batcher.close()
    assert call.result() == "done"
    assert first.result().predictions == [{"exit": 0}]
    assert [len(f.result().predictions) for f in queued] == [2, 2]
    assert len(late.result().predictions) == 1
    assert order == ["batch of 1", "batch of 4", "call", "batch of 1"]
    assert batcher.batches == 3 and batcher.samples == 6
    with pytest.raises(ServerClosing):
        batcher.submit(torch.zeros(1, 1))


def test_a_failed_batch_fails_only_its_requests():
    calls = []

    def serve(x: torch.Tensor) -> ServedBatch:
        calls.append(x.shape[0])
        if len(calls) == 1:
            raise RuntimeError("boom")
        return ServedBatch([{"exit": 0}] * x.shape[0], 0)

    batcher = DynamicBatcher(serve)
    batcher.start()
    failed = batcher.submit(torch.zeros(1, 1))
    with pytest.raises(RuntimeError, match="boom"):
        failed.result(timeout=10)
    assert len(batcher.submit(torch.zeros(1, 1)).result(timeout=10).predictions) == 1
    batcher.close()


# ------------------------------------------------------------------------------ bad input


def _truncated_jpeg() -> bytes:
    whole = png_bytes(fmt="JPEG", size=(120, 90))
    return whole[: len(whole) // 2]


def _npz() -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, x=batch(1))
    return buffer.getvalue()


def _lying_header() -> bytes:
    """An .npy header announcing a billion samples over a body of a few bytes."""
    buffer = io.BytesIO()
    header = {"descr": "<f4", "fortran_order": False, "shape": (10**9, *SIZE)}
    np.lib.format.write_array_header_1_0(buffer, header)
    return buffer.getvalue() + b"\0" * 64


BAD_INPUTS = {
    "not an image": (b"hello, not an image", PNG, 400, "PNG or JPEG"),
    "truncated jpeg": (_truncated_jpeg(), JPEG, 400, "complete JPEG"),
    "empty body": (b"", PNG, 400, "empty"),
    "empty npy body": (b"", NPY, 400, "empty"),
    "not an npy": (b"\x93NUMPX garbage", NPY, 400, ".npy"),
    "npz archive": (_npz(), NPY, 400, ".npy"),
    "wrong channels": (npy_bytes(batch(2)[:, :1]), NPY, 400, "channels"),
    "wrong size": (npy_bytes(np.zeros((2, 3, 32, 32), np.float32)), NPY, 400, "32x32"),
    "wrong dtype float64": (npy_bytes(batch(2).astype(np.float64)), NPY, 400, "float64"),
    "wrong dtype int": (npy_bytes(np.zeros((1, *SIZE), np.int32)), NPY, 400, "int32"),
    "wrong rank": (npy_bytes(batch(1)[0]), NPY, 400, "shape"),
    "no samples": (npy_bytes(np.zeros((0, *SIZE), np.float32)), NPY, 400, "no samples"),
    "nan": (
        npy_bytes(
            np.where(np.arange(3)[None, :, None, None] == 1, np.nan, batch(1)).astype(np.float32)
        ),
        NPY,
        400,
        "NaN",
    ),
    "inf": (npy_bytes(np.full((1, *SIZE), np.inf, np.float32)), NPY, 400, "Inf"),
    "truncated npy": (npy_bytes(batch(2))[:-100], NPY, 400, "truncated"),
    "lying npy header": (_lying_header(), NPY, 400, "announces"),
    "over-size body": (npy_bytes(batch(30)), NPY, 413, "exceeds"),
    "wrong content type": (
        npy_bytes(batch(1)),
        {"Content-Type": "text/plain"},
        415,
        "'text/plain'",
    ),
    "missing content type": (npy_bytes(batch(1)), {}, 415, "no Content-Type"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_gets_a_4xx_and_changes_nothing(served, case):
    client, learner = served
    # The learner has served and learnt a little before: its state is not trivially empty.
    assert client.post("/predict", content=npy_bytes(batch(2)), headers=NPY).status_code == 200
    before = snapshot(learner)
    body, headers, status, expected = BAD_INPUTS[case]
    if case == "missing content type":
        # httpx adds no Content-Type to raw content: the request really has none.
        response = client.post("/predict", content=body)
    else:
        response = client.post("/predict", content=body, headers=headers)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert expected in error, error
    assert "expected" in error or status == 413
    assert same_state(before, snapshot(learner))
    # Still serving.
    assert client.post("/predict", content=png_bytes(), headers=PNG).status_code == 200


def test_an_over_size_body_without_content_length_is_cut_off(served):
    client, learner = served
    before = snapshot(learner)
    chunk = b"\0" * (64 * 1024)

    def stream():  # chunked transfer: the server only learns the size by reading
        for _ in range(40):
            yield chunk

    response = client.post("/predict", content=stream(), headers=NPY)
    assert response.status_code == 413 and "exceeds" in response.json()["error"]
    assert same_state(before, snapshot(learner))


def test_an_image_with_too_many_pixels_is_refused_before_decoding(model, transform):
    app, _ = learner_app(model, transform, max_pixels=1000)
    with TestClient(app) as client:
        response = client.post("/predict", content=png_bytes(size=(100, 100)), headers=PNG)
    assert response.status_code == 400 and "pixels" in response.json()["error"]


# ------------------------------------------------------------------------------ state changes


def test_save_writes_heads_that_load(served, model, tmp_path):
    client, learner = served
    client.post("/predict", content=npy_bytes(batch(2)), headers=NPY)
    path = tmp_path / "heads.safetensors"
    response = client.post("/save", json={"path": str(path)})
    assert response.status_code == 200, response.text
    assert response.json() == {"saved": str(path), "heads_version": 0}
    loaded = ee.load(model, path)
    assert loaded.thresholds == learner.eem.thresholds


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (None, "no path"),
        ({"path": "heads.txt"}, ".safetensors"),
        ({"path": 3}, ".safetensors"),
        ({"where": "x.safetensors"}, "expected"),
    ],
)
def test_save_refuses_a_missing_or_odd_path(served, payload, expected):
    client, _ = served
    response = client.post("/save", json=payload) if payload else client.post("/save")
    assert response.status_code == 400 and expected in response.json()["error"]


def test_calibrate_publishes_and_the_heads_version_follows(served):
    client, _ = served
    client.post("/predict", content=npy_bytes(batch(4)), headers=NPY)
    response = client.post("/calibrate")
    assert response.status_code == 200, response.text
    assert response.json()["heads_version"] == 1  # one publication (gates still closed)
    answer = client.post("/predict", content=npy_bytes(batch(1)), headers=NPY).json()
    assert answer["heads_version"] == 1
    assert "earlyexit_heads_version 1.0" in client.get("/metrics").text


def test_heads_are_saved_when_the_server_stops(model, transform, tmp_path):
    path = tmp_path / "on-exit.safetensors"
    app, learner = learner_app(model, transform, save_on_exit=str(path))
    with TestClient(app) as client:
        client.post("/predict", content=npy_bytes(batch(2)), headers=NPY)
        assert not path.exists()
    assert app.state.server.saved_to == str(path)
    loaded = ee.load(model, path)
    served_heads = learner.eem.heads.state_dict().values()
    for a, b in zip(loaded.heads.state_dict().values(), served_heads, strict=True):
        assert torch.equal(a, b)
    assert not learner.worker.running  # the learner's thread was stopped


# ------------------------------------------------------------------------------ token


@pytest.fixture
def guarded(model, transform, tmp_path):
    app, _ = learner_app(
        model, transform, token="s3cret", save_on_exit=str(tmp_path / "h.safetensors")
    )
    with TestClient(app) as client:
        yield client


@pytest.mark.parametrize("endpoint", ["/save", "/calibrate"])
def test_state_changing_endpoints_need_the_token(guarded, endpoint):
    missing = guarded.post(endpoint)
    assert missing.status_code == 401 and "Bearer" in missing.json()["error"]
    assert missing.headers["www-authenticate"] == "Bearer"
    wrong = guarded.post(endpoint, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 403
    right = guarded.post(endpoint, headers={"Authorization": "Bearer s3cret"})
    assert right.status_code == 200, right.text


def test_serving_and_reading_need_no_token(guarded):
    assert guarded.post("/predict", content=png_bytes(), headers=PNG).status_code == 200
    for path in ("/healthz", "/stats", "/metrics"):
        assert guarded.get(path).status_code == 200


def test_without_a_token_state_changes_are_open_on_loopback(served, tmp_path):
    client, _ = served
    response = client.post("/save", json={"path": str(tmp_path / "x.safetensors")})
    assert response.status_code == 200


def test_a_non_loopback_host_needs_a_token():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.2")
    check_host("127.0.0.1", None)
    check_host("0.0.0.0", "token")
    with pytest.raises(ConfigError, match="--token"):
        check_host("0.0.0.0", None)
    with pytest.raises(ConfigError, match="--token"):
        bind_socket("0.0.0.0", 0, token=None)  # refused before anything is bound
    sock = bind_socket("127.0.0.1", 0, token=None)
    # Marked TCP, so that asyncio sets TCP_NODELAY on every connection (else ~40 ms an answer).
    assert sock.proto == socket.IPPROTO_TCP
    sock.close()
    with pytest.raises(ConfigError, match="empty"):
        ServerSettings(token="")


def test_the_command_refuses_a_public_host_without_a_token(capsys, monkeypatch):
    from earlyexit.cli import build_parser, main

    monkeypatch.delenv("EARLYEXIT_SERVE_TOKEN", raising=False)
    code = main(["serve", "--model", "timm:resnet18", "--host", "0.0.0.0"])
    assert code == 2
    assert "refusing to listen on 0.0.0.0 without a token" in capsys.readouterr().err
    # The token may come from the environment (out of the process list).
    monkeypatch.setenv("EARLYEXIT_SERVE_TOKEN", "from-env")
    args = build_parser().parse_args(["serve", "--model", "timm:resnet18"])
    assert args.token == "from-env"


def test_the_server_caps_learning_time_unless_told_not_to(capsys):
    from earlyexit._cli.serve import SERVER_LEARN_BUDGET, _distill_config
    from earlyexit.cli import build_parser

    parse = build_parser().parse_args
    config = _distill_config(parse(["serve", "--model", "timm:resnet18"]))
    assert config.background and config.train_time_budget == SERVER_LEARN_BUDGET
    assert (
        _distill_config(
            parse(["serve", "--model", "timm:resnet18", "--learn-budget", "none"])
        ).train_time_budget
        is None
    )
    assert (
        _distill_config(
            parse(["serve", "--model", "timm:resnet18", "--learn-budget", "0.3"])
        ).train_time_budget
        == 0.3
    )
    for bad in ("0", "-1", "nan", "lots"):
        with pytest.raises(SystemExit):
            parse(["serve", "--model", "timm:resnet18", "--learn-budget", bad])
        assert "expected a share of serving time > 0" in capsys.readouterr().err


def test_the_command_says_when_the_heads_file_is_missing(capsys, tmp_path):
    from earlyexit.cli import main

    code = main(["serve", "--model", "timm:resnet18", "--heads", str(tmp_path / "no.safetensors")])
    assert code == 3 and "heads file not found" in capsys.readouterr().err


# ------------------------------------------------------------------------------ --plain


def test_plain_serves_the_base_model_through_the_same_server(model, transform):
    app = create_app(PlainBackend(model, SIZE), transform, ServerSettings())
    x = batch(3)
    with TestClient(app) as client:
        answer = client.post("/predict", content=npy_bytes(x), headers=NPY).json()
        bad = client.post("/predict", content=npy_bytes(x[:, :1]), headers=NPY)
        save = client.post("/save", json={"path": "x.safetensors"})
        stats = client.get("/stats").json()
        metrics = client.get("/metrics").text
    labels, probs = direct(model, torch.from_numpy(x))
    assert answer["num_exits"] == 0 and answer["heads_version"] == 0
    assert [p["exit"] for p in answer["predictions"]] == [0, 0, 0]  # the full model
    assert [p["label"] for p in answer["predictions"]] == labels
    assert [p["probability"] for p in answer["predictions"]] == pytest.approx(probs, rel=1e-5)
    assert bad.status_code == 400
    assert save.status_code == 409 and "no heads" in save.json()["error"]
    assert stats["plain"] is True and stats["samples"] == 3 and stats["batches"] == 1
    assert 'earlyexit_samples_total{exit="0"} 3.0' in metrics


# ------------------------------------------------------------------------------ the command


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def start_serve(arguments: list[str], cwd) -> tuple[subprocess.Popen, str]:
    """``earlyexit serve ARGUMENTS`` in a subprocess, once it prints its ready line: (process,
    URL). Fails the test with what it printed if it stops before."""
    command = [sys.executable, "-m", "earlyexit", "serve", *arguments]
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(), cwd=cwd
    )
    seen = []
    while not (seen and (seen[-1].startswith("serving on") or not seen[-1])):
        seen.append(process.stderr.readline())  # warnings may come first; '' at the end
    ready = seen[-1]
    if not ready.startswith("serving on http://127.0.0.1:"):
        process.kill()
        process.wait()
        pytest.fail("the server did not start:\n" + "".join(seen))
    return process, ready.split()[2]


@pytest.mark.slow
def test_earlyexit_serve_starts_answers_and_saves_on_sigterm(tmp_path):
    import httpx

    # Fixed weights, so that heads saved here fit the model the command builds.
    model = tiny_model(seed=3)
    weights = tmp_path / "model.pth"
    torch.save(model.state_dict(), weights)
    eem = ee.wrap(model, input_size=SIZE)
    eem.set_thresholds([5.0, 6.0, 7.0, 8.0])
    heads = tmp_path / "start.safetensors"
    eem.save(heads)
    saved = tmp_path / "saved.safetensors"
    arguments = [
        "--model", "timm:resnet18", "--num-classes", "10", "--input-size", "3,64,64",
        "--weights", str(weights), "--heads", str(heads), "--port", "0",
        "--save-on-exit", str(saved), "--threads", "1", "--max-wait-ms", "1000", "--json",
    ]  # fmt: skip
    process, url = start_serve(arguments, tmp_path)
    try:
        answer = httpx.post(f"{url}/predict", content=png_bytes(), headers=PNG, timeout=60).json()
        assert len(answer["predictions"]) == 1 and answer["num_exits"] == 4
        stats = httpx.get(f"{url}/stats", timeout=60).json()
        assert stats["thresholds"] == [5.0, 6.0, 7.0, 8.0]  # started from --heads
        # A request in flight when SIGTERM arrives (it waits up to 1 s for company) is answered.
        with ThreadPoolExecutor(1) as pool:
            in_flight = pool.submit(
                httpx.post, f"{url}/predict", content=npy_bytes(batch(2)), headers=NPY, timeout=60
            )
            time.sleep(0.3)
            process.send_signal(signal.SIGTERM)
            late = in_flight.result()
        assert late.status_code == 200 and len(late.json()["predictions"]) == 2
        out, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, err
    summary = json.loads(out)
    assert summary["saved"] == str(saved) and summary["requests"] == 2
    loaded = ee.load(tiny_model(seed=3), saved)
    assert loaded.thresholds == (5.0, 6.0, 7.0, 8.0)


HIDE_SERVE_PACKAGES = hiding_prelude(
    ("fastapi", "uvicorn", "prometheus_client", "starlette")
) + textwrap.dedent(
    """
    import contextlib, io, json

    import earlyexit.server  # the package itself imports without the extra
    from earlyexit.cli import main
    from earlyexit.errors import MissingPackageError

    try:
        earlyexit.server.create_app
        error = None
    except MissingPackageError as err:
        error = str(err)
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        code = main(["serve", "--model", "timm:resnet18"])
    print(json.dumps({"error": error, "code": code, "stderr": stderr.getvalue(),
                      "loaded": sorted(m for m in sys.modules if m.partition(".")[0] in HIDDEN)}))
    """
)


@pytest.mark.slow
def test_without_the_serve_extra_the_command_says_what_to_install():
    done = subprocess.run(
        [sys.executable, "-c", HIDE_SERVE_PACKAGES],
        capture_output=True,
        text=True,
        env=_env(),
        cwd=ROOT,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    hint = "pip install 'earlyexit[serve]'"
    assert got["error"].startswith("earlyexit serve") and got["error"].endswith(hint)
    assert got["code"] == 6
    assert got["stderr"] == (
        f"earlyexit serve: error: earlyexit serve needs fastapi, uvicorn, prometheus-client: {hint}\n"
    )
    assert got["loaded"] == []


# ------------------------------------------------------------------------------ back-pressure


class _HeldBackend:
    """A backend whose batches wait until released (to fill the queue on purpose)."""

    num_exits = 0
    input_size = SIZE
    dtype = torch.float32

    def __init__(self) -> None:
        self.release = threading.Event()
        self.started = threading.Event()
        self.served = 0

    def serve(self, x: torch.Tensor) -> ServedBatch:
        self.started.set()
        assert self.release.wait(60)
        self.served += x.shape[0]
        return ServedBatch([{"exit": 0}] * x.shape[0], 0)

    def heads_version(self) -> int:
        return 0

    def failure(self) -> None:
        return None

    def stats(self) -> dict:
        return {"samples": self.served}

    def save(self, path) -> None:
        raise NotAvailable("no heads")

    def calibrate(self) -> None:
        raise NotAvailable("no heads")

    def close(self) -> None:
        self.release.set()


def test_an_overloaded_server_answers_503_at_once_and_serves_the_queue(transform):
    backend = _HeldBackend()
    app = create_app(backend, transform, ServerSettings(max_queued_requests=2, max_batch=1))
    with TestClient(app) as client, ThreadPoolExecutor(3) as pool:
        body = npy_bytes(batch(1))
        first = pool.submit(client.post, "/predict", content=body, headers=NPY)
        assert backend.started.wait(30)  # being served: the queue is empty
        queued = [pool.submit(client.post, "/predict", content=body, headers=NPY) for _ in range(2)]
        deadline = time.monotonic() + 30
        while app.state.server.batcher.queued < 2:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        refused = client.post("/predict", content=body, headers=NPY)
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
        assert "overloaded (2 requests waiting)" in refused.json()["error"]
        backend.release.set()
        assert [f.result().status_code for f in [first, *queued]] == [200, 200, 200]
        metrics = client.get("/metrics").text
    assert backend.served == 3
    assert 'earlyexit_requests_total{outcome="unavailable"} 1.0' in metrics


def test_max_queued_requests_must_be_positive():
    with pytest.raises(ConfigError, match="max_queued_requests"):
        ServerSettings(max_queued_requests=0)


# ------------------------------------------------------------------------------ --frozen


def frozen_model(model, x: np.ndarray) -> ee.EarlyExitModel:
    """A wrapped model whose first gate is open at a threshold where some rows of ``x`` leave
    there and the others run on."""
    torch.manual_seed(3)
    eem = ee.wrap(model, input_size=SIZE, head="linear", gate="max_softmax")
    with torch.no_grad():
        for head in eem.heads:
            for p in head.parameters():
                p.normal_(0, 0.5)
        closed = [float("inf")] * (eem.num_exits - 1)
        for threshold in np.linspace(0.05, 0.99, 95):
            eem.set_thresholds([float(threshold), *closed])
            exits = eem.predict(torch.from_numpy(x)).exit_index
            if 0 < int((exits == 0).sum()) < len(exits):
                return eem
    raise AssertionError("no threshold splits the batch")


def test_frozen_serves_the_heads_as_eem_predict_does(model, transform, tmp_path):
    from earlyexit.server import FrozenBackend

    x = batch(24)  # 1.2 MB: decoded in the thread pool; the 3-row request below on the loop
    eem = frozen_model(model, x)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    thresholds = eem.thresholds
    app = create_app(FrozenBackend(eem), transform, ServerSettings())
    with TestClient(app) as client:
        big = client.post("/predict", content=npy_bytes(x), headers=NPY).json()
        small = client.post("/predict", content=npy_bytes(x[:3]), headers=NPY).json()
        calibrate = client.post("/calibrate")
        saved = client.post("/save", json={"path": str(tmp_path / "h.safetensors")})
        stats = client.get("/stats").json()
        metrics = client.get("/metrics").text
    with torch.no_grad():
        want = eem.predict(torch.from_numpy(x))
    exits = want.exit_index.tolist()
    assert 0 < sum(e < eem.num_exits for e in exits) < len(exits)  # a real mix of paths
    assert [p["exit"] for p in big["predictions"]] == exits
    assert [p["label"] for p in big["predictions"]] == want.logits.argmax(-1).tolist()
    assert [p["exit"] for p in small["predictions"]] == exits[:3]
    assert big["heads_version"] == 0 and big["num_exits"] == eem.num_exits
    # Nothing learns: /calibrate is refused and the thresholds served stay as loaded.
    assert calibrate.status_code == 409 and "--frozen" in calibrate.json()["error"]
    assert eem.thresholds == thresholds
    assert saved.status_code == 200
    assert ee.load(tiny_model(), tmp_path / "h.safetensors").thresholds == thresholds
    assert stats["frozen"] is True and stats["samples"] == 27 and stats["batches"] == 2
    counts = [0] * (eem.num_exits + 1)
    for e in exits + exits[:3]:
        counts[e] += 1
    assert stats["exit_counts"] == counts
    path = eem.path_macs()
    spent = sum(path[e] for e in exits + exits[:3])
    assert stats["mac_saving"] == pytest.approx(1 - spent / (27 * eem.base_macs))
    assert f'earlyexit_samples_total{{exit="{eem.num_exits}"}} {float(counts[-1])}' in metrics
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    eem.remove()


@pytest.mark.parametrize(
    "extra, says",
    [
        ([], "needs --heads"),
        (["--heads", "h.safetensors", "--plain"], "neither --plain"),
        (["--heads", "h.safetensors", "--ray"], "neither --plain nor --ray"),
    ],
)
def test_frozen_refuses_what_it_cannot_serve(extra, says, capsys):
    from earlyexit.cli import main

    code = main(["serve", "--model", "timm:resnet18", "--frozen", *extra])
    assert code == 2 and says in capsys.readouterr().err


# ------------------------------------------------------------------------------ --head auto


def choosing_app(model, transform, samples: int, kinds=None):
    """A server whose heads are chosen on its first ``samples`` requests; ``kinds`` (one kind
    or None per candidate place) replaces what the chooser would choose, once it has seen one
    batch, so the exits it keeps are known."""
    import dataclasses

    from earlyexit.server import ChoosingBackend

    config = small_config()
    chooser = ee.HeadChooser(model, samples=samples, config=config, input_size=SIZE)
    backend = ChoosingBackend(chooser, config)
    if kinds is not None:
        step = chooser.step

        def forced(x):
            out = step(x)
            chooser.choice = dataclasses.replace(chooser.finish(), kinds=tuple(kinds))
            return out

        chooser.step = forced
    return create_app(backend, transform, ServerSettings()), backend, chooser


def test_head_auto_serves_the_full_model_until_the_choice(model, transform):
    app, _backend, chooser = choosing_app(model, transform, samples=64)
    x = batch(16)
    with TestClient(app) as client:
        answer = client.post("/predict", content=npy_bytes(x), headers=NPY).json()
        save = client.post("/save", json={"path": "x.safetensors"})
        calibrate = client.post("/calibrate")
        stats = client.get("/stats").json()
    places = len(chooser.places)
    labels, _ = direct(model, torch.from_numpy(x))
    assert answer["num_exits"] == places and answer["heads_version"] == 0
    assert [p["exit"] for p in answer["predictions"]] == [places] * 16  # the full model
    assert [p["label"] for p in answer["predictions"]] == labels
    assert save.status_code == 409 and "being chosen (16 of 64 samples" in save.json()["error"]
    assert calibrate.status_code == 409
    assert stats["choosing"] is True and stats["samples"] == 16 and stats["choice_samples"] == 64


def test_head_auto_hands_over_to_the_chosen_heads_numbered_by_place(model, transform, tmp_path):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    probe = ee.HeadChooser(model, samples=8, input_size=SIZE)
    places = len(probe.places)
    probe.probe.remove()
    kinds = [None] * places
    kinds[1], kinds[-1] = "linear", "conv"  # two places kept, the others switched off
    app, backend, _chooser = choosing_app(model, transform, samples=32, kinds=kinds)
    with TestClient(app) as client:
        first = client.post("/predict", content=npy_bytes(batch(16, seed=1)), headers=NPY).json()
        later = [
            client.post("/predict", content=npy_bytes(batch(16, seed=s)), headers=NPY).json()
            for s in range(2, 6)
        ]
        calibrate = client.post("/calibrate")
        saved = client.post("/save", json={"path": str(tmp_path / "h.safetensors")})
        stats = client.get("/stats").json()
        metrics = client.get("/metrics").text
    assert first["heads_version"] == 0  # served by the full model, then the choice was made
    assert all(a["heads_version"] >= 1 and a["num_exits"] == places for a in later)
    # Answers name candidate places: only kept places (1 and the last) or the full model.
    exits = {p["exit"] for a in later for p in a["predictions"]}
    assert exits <= {1, places - 1, places}
    assert calibrate.status_code == 200 and saved.status_code == 200
    loaded = ee.load(tiny_model(), tmp_path / "h.safetensors")
    assert list(loaded.head_kinds) == ["linear", "conv"]
    assert [e.name for e in loaded.exits] == [_chooser_places(model)[1], _chooser_places(model)[-1]]
    assert stats["head_choice"]["kinds"] == kinds
    assert stats["samples"] == 80 and stats["learner_samples"] == 64
    assert stats["heads_version"] >= 1 and "choosing" not in stats
    assert len(stats["audited_agreement"]) == places
    assert f'earlyexit_samples_total{{exit="{places}"}}' in metrics
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    backend.close()


def _chooser_places(model) -> tuple[str, ...]:
    chooser = ee.HeadChooser(model, samples=8, input_size=SIZE)
    chooser.probe.remove()
    return chooser.places


@pytest.mark.parametrize(
    "extra, says",
    [
        (["--head", "auto", "--ray"], "not available with --ray"),
        (["--head", "linear", "--heads", "h.safetensors"], "--heads takes none"),
        (["--head", "linear", "--plain"], "--plain takes none"),
        (["--head", "bogus"], "unknown --head 'bogus'"),
    ],
)
def test_head_refuses_what_it_cannot_serve(extra, says, capsys):
    from earlyexit.cli import main

    code = main(["serve", "--model", "timm:resnet18", *extra])
    assert code == 2 and says in capsys.readouterr().err
