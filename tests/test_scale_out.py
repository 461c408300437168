"""Scale-out on Ray Serve: two replicas and one learner behind Ray's HTTP proxy.

One local Ray cluster for the whole module (``ray.init(num_cpus=2)``, tens of seconds on two
cores), so these tests are marked slow; they still run in CI. The model is the distill tests'
``Toy``, whose heads learn to agree within a few hundred samples, so releases really happen.
"""

from __future__ import annotations

import functools
import io
import json
import os
import socket
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("ray.serve")

import earlyexit as ee
from earlyexit.errors import ConfigError

pytestmark = [pytest.mark.slow, pytest.mark.ray]

TESTS = Path(__file__).resolve().parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _npy(x: torch.Tensor) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, x.numpy().astype(np.float32))
    return buffer.getvalue()


def _call(url: str, body: bytes | None = None, headers: dict | None = None, timeout: float = 60):
    """(status, JSON or text) of one request; HTTP errors are answers too."""
    request = urllib.request.Request(url, data=body, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            status, raw = answer.status, answer.read()
    except urllib.error.HTTPError as err:
        status, raw = err.code, err.read()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode(errors="replace")


@pytest.fixture(scope="module")
def cluster():
    """(base URL, settings) of a running app: 2 replicas + 1 learner on a 2-CPU local cluster."""
    import ray
    from ray import serve

    from earlyexit.server.scale_out import APP_NAME, ScaleOutSettings, ServedModel, build_app

    # The workers import the Toy model's module from the tests folder.
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(TESTS), os.environ.get("PYTHONPATH", "")) if p
    )
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    from test_distill import quick

    served = ServedModel(wrap=functools.partial(_toy), config=quick(background=True), threads=1)
    settings = ScaleOutSettings(replicas=2, replica_cpus=0.5, poll_s=0.05)
    serve.run(build_app(served, settings), name=APP_NAME, route_prefix="/")
    try:
        yield f"http://127.0.0.1:{port}", settings
    finally:
        serve.shutdown()
        ray.shutdown()


def _toy() -> ee.EarlyExitModel:
    from test_distill import toy_wrap

    return toy_wrap()


def _stream(n: int, seed: int) -> torch.Tensor:
    from test_distill import stream

    return stream(n, torch.Generator().manual_seed(seed))


NPY = {"Content-Type": "application/x-npy"}


def test_predict_answers_every_row_through_the_proxy(cluster):
    url, _ = cluster
    status, answer = _call(f"{url}/predict", _npy(_stream(5, 0)), NPY)
    assert status == 200, answer
    assert len(answer["predictions"]) == 5 and answer["num_exits"] == 2
    assert set(answer["predictions"][0]) == {"label", "probability", "exit", "accepted"}
    assert isinstance(answer["replica"], str) and answer["heads_version"] >= 0
    status, health = _call(f"{url}/healthz")
    assert status == 200 and health["status"] == "ok"
    # The router counts what passes through it: samples by exit, batches by replica numbers.
    status, text = _call(f"{url}/metrics")
    assert status == 200
    values = {}
    for line in text.splitlines():
        if line.startswith(("earlyexit_samples_total", "earlyexit_batches_total")):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    samples = sum(v for k, v in values.items() if k.startswith("earlyexit_samples_total"))
    assert samples >= 5 and values["earlyexit_batches_total"] >= 1, values


def test_one_learner_releases_heads_that_every_replica_serves(cluster):
    url, _ = cluster
    bodies = [_npy(_stream(32, seed)) for seed in range(1, 61)]
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda b: _call(f"{url}/predict", b, NPY), bodies))
    assert all(status == 200 for status, _ in answers), answers[:3]
    assert len({a["replica"] for _, a in answers}) == 2, "both replicas should have served"
    deadline = time.monotonic() + 60
    while True:
        status, stats = _call(f"{url}/stats")
        versions = {r["heads_version"] for r in stats["replicas"].values()}
        if len(stats["replicas"]) == 2 and versions == {stats["heads_version"]}:
            break
        assert time.monotonic() < deadline, stats["replicas"]
        time.sleep(0.2)
    assert stats["heads_version"] >= 1 and stats["samples"] >= 60 * 32 - 64
    assert stats["signals"] >= 1 and any(t != "inf" for t in stats["thresholds"]), stats
    # Every replica now answers with the learner's heads: early exits happen.
    status, answer = _call(f"{url}/predict", _npy(_stream(64, 999)), NPY)
    assert status == 200, answer
    # The learner may still publish from signals it had queued: the answer's version is one
    # every replica had reached or a later one the learner has published since, never older.
    published_since = _call(f"{url}/stats")[1]["heads_version"]
    assert stats["heads_version"] <= answer["heads_version"] <= published_since
    assert any(p["exit"] < 2 for p in answer["predictions"])


def test_bad_input_is_refused_by_the_replica_and_never_reaches_the_learner(cluster):
    url, _ = cluster
    # The learner records earlier tests' rows in the background: wait until it has them all.
    before, deadline = _call(f"{url}/stats")[1]["samples"], time.monotonic() + 60
    while True:
        time.sleep(1.0)
        now = _call(f"{url}/stats")[1]["samples"]
        if now == before:
            break
        assert time.monotonic() < deadline, "the learner kept recording for a minute"
        before = now
    cases = [
        (b"", NPY, 400),
        (b"not an image", {"Content-Type": "image/png"}, 400),
        (_npy(torch.full((2, 3, 8, 8), float("nan"))), NPY, 400),
        (_npy(torch.zeros(2, 1, 8, 8)), NPY, 400),
        (b"{}", {"Content-Type": "application/json"}, 415),
    ]
    for body, headers, want in cases:
        status, answer = _call(f"{url}/predict", body, headers)
        assert status == want and "expected" in answer["error"], (status, answer)
    assert _call(f"{url}/stats")[1]["samples"] == before


def test_save_writes_the_learners_heads_and_they_load(cluster, tmp_path):
    url, _ = cluster
    path = tmp_path / "heads.safetensors"
    status, answer = _call(
        f"{url}/save",
        json.dumps({"path": str(path)}).encode(),
        {"Content-Type": "application/json"},
    )
    assert status == 200, answer
    eem = ee.load(_toy().base_model, path)
    assert eem.num_exits == 2
    status, answer = _call(f"{url}/save", b'{"path": "x.pt"}', {"Content-Type": "application/json"})
    assert status == 400 and ".safetensors" in answer["error"]


def test_a_killed_replica_s_requests_are_retried_and_it_comes_back_with_the_latest_heads(cluster):
    import ray

    url, _ = cluster
    replicas = [
        a
        for a in ray.util.list_named_actors(all_namespaces=True)
        if "EarlyExitReplica" in a["name"]
    ]
    assert len(replicas) == 2, replicas
    victim = ray.get_actor(replicas[0]["name"], namespace=replicas[0]["namespace"])
    bodies = [_npy(_stream(16, seed)) for seed in range(100, 140)]
    _, before = _call(f"{url}/stats")
    started = time.monotonic()
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(_call, f"{url}/predict", b, NPY, 30) for b in bodies]
        time.sleep(0.2)  # let requests reach both replicas before the kill
        ray.kill(victim, no_restart=True)
        outcomes = [f.result() for f in futures]
    assert time.monotonic() - started < 60, "requests hung"
    # Each request is answered, or refused with a JSON error that says its replica stopped:
    # never Ray's bare 500.
    for status, answer in outcomes:
        assert status in (200, 503), outcomes
        if status == 503:
            assert "replica" in answer["error"] and "retry" in answer["error"], answer
        else:
            assert len(answer["predictions"]) == 16
    assert sum(status == 200 for status, _ in outcomes) >= len(outcomes) // 2
    _, after = _call(f"{url}/stats")
    router = after["router"]
    assert router["requests"] - before["router"]["requests"] == len(bodies)
    deadline = time.monotonic() + 120
    while True:  # Ray Serve restarts the replica; it serves the learner's latest release
        status, stats = _call(f"{url}/stats")
        names = set(stats["replicas"])
        versions = {r["heads_version"] for r in stats["replicas"].values()}
        fresh = [a for a in ray.util.list_named_actors(all_namespaces=True)]
        fresh = [a for a in fresh if "EarlyExitReplica" in a["name"]]
        if len(fresh) == 2 and len(names) >= 2 and versions == {stats["heads_version"]}:
            live = {a["name"] for a in fresh}
            if replicas[0]["name"] not in live:
                break
        assert time.monotonic() < deadline, stats["replicas"]
        time.sleep(0.5)
    status, answer = _call(f"{url}/predict", _npy(_stream(8, 7)), NPY)
    published_since = _call(f"{url}/stats")[1]["heads_version"]
    assert status == 200 and stats["heads_version"] <= answer["heads_version"] <= published_since


def test_settings_are_checked():
    from earlyexit.server.scale_out import ScaleOutSettings, ServedModel, build_app

    for bad in ({"replicas": 0}, {"max_batch": 0}, {"poll_s": 0}, {"token": ""}):
        with pytest.raises(ConfigError):
            ScaleOutSettings(**bad)
    with pytest.raises(ConfigError, match="ServedModel"):
        build_app(_toy)  # type: ignore[arg-type]
    assert ServedModel(wrap=_toy).config.target_agreement == 0.99


def test_served_model_of_ships_copies_of_the_wrapped_model():
    import pickle

    from earlyexit.server.scale_out import ServedModel

    eem = _toy()
    eem.set_thresholds([1.5, 2.5])
    served = pickle.loads(pickle.dumps(ServedModel.of(eem, threads=1)))
    copy = served.wrap()
    assert copy is not eem and copy.thresholds == (1.5, 2.5)
    x = _stream(16, 3)
    assert torch.equal(copy.predict(x).logits, eem.predict(x).logits)
    with pytest.raises(ConfigError, match="EarlyExitModel"):
        ServedModel.of(eem.base_model)
