"""``earlyexit serve --learner-state``: the whole learner saved on stop and resumed on start.

A restarted server must carry on with what its learner knew (evidence, replay, counters,
thresholds), not prove its gates again from nothing; a file it cannot resume, or one proving
another target, is refused before the server starts.
"""

from __future__ import annotations

import json
import signal

import pytest
import torch
from fastapi.testclient import TestClient  # needs httpx (the test extra)
from test_server import (
    NPY,
    SIZE,
    batch,
    learner_app,
    npy_bytes,
    small_config,
    start_serve,
    tiny_model,
)

import earlyexit as ee
from earlyexit.server import LearnerBackend, PlainBackend, ServerSettings, create_app


def same_learner(a: ee.OnlineDistiller, b: ee.OnlineDistiller) -> None:
    """Both learners hold the same state, tensor for tensor and field for field (whether each
    learns on a thread of its own aside)."""
    (ta, sa), (tb, sb) = a.state_dict(), b.state_dict()
    for state in (sa, sb):
        state["config"].pop("background")
    assert json.dumps(sa, sort_keys=True, default=str) == json.dumps(
        sb, sort_keys=True, default=str
    )
    assert ta.keys() == tb.keys()
    for key in ta:
        assert torch.equal(ta[key], tb[key]), key


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return tiny_model()


@pytest.fixture(scope="module")
def transform(model):
    from earlyexit.data import model_transform

    return model_transform(model, "timm", "resnet18", input_size=SIZE)


def test_the_learner_is_saved_when_the_server_stops_and_resumes_as_it_was(
    model, transform, tmp_path
):
    path = tmp_path / "learner.safetensors"
    app, learner = learner_app(model, transform, learner_state=str(path))
    with TestClient(app) as client:
        for seed in range(3):
            answer = client.post("/predict", content=npy_bytes(batch(4, seed)), headers=NPY)
            assert answer.status_code == 200
        assert not path.exists()  # written on stop, not before
    state = app.state.server
    assert state.learner_saved_to == str(path) and state.shutdown_error is None
    assert not learner.worker.running
    resumed = ee.OnlineDistiller.load(model, path, background=False)
    assert resumed.stats()["samples"] == 12
    same_learner(learner, resumed)
    # ee.load reads the same file as heads and thresholds.
    assert ee.load(model, path).thresholds == learner.eem.thresholds
    # Resuming changes the pace only where asked; the rest is the saved config.
    capped = ee.OnlineDistiller.load(model, path, background=False, train_time_budget=0.3)
    assert capped.config.train_time_budget == 0.3
    assert capped.config.evidence_samples == small_config().evidence_samples
    for learner_ in (resumed, capped):
        learner_.eem.remove()


def test_a_failed_learner_save_is_reported_and_the_heads_are_still_saved(
    model, transform, tmp_path
):
    heads = tmp_path / "heads.safetensors"
    folder = tmp_path / "a-folder.safetensors"
    folder.mkdir()  # a folder where the file should go: the save fails
    app, _ = learner_app(model, transform, save_on_exit=str(heads), learner_state=str(folder))
    with TestClient(app) as client:
        client.post("/predict", content=npy_bytes(batch(2)), headers=NPY)
    state = app.state.server
    assert state.saved_to == str(heads) and heads.is_file()
    assert state.learner_saved_to is None
    assert "could not save the learner" in state.shutdown_error


def test_plain_has_no_learner_to_save(model, transform, tmp_path):
    path = tmp_path / "learner.safetensors"
    settings = ServerSettings(learner_state=str(path))
    app = create_app(PlainBackend(model, SIZE), transform, settings)
    with TestClient(app) as client:
        client.post("/predict", content=npy_bytes(batch(2)), headers=NPY)
    assert app.state.server.learner_saved_to is None and not path.exists()
    assert app.state.server.shutdown_error is None


@pytest.mark.parametrize(
    "extra, says, code",
    [
        (["--heads", "h.safetensors", "--frozen"], "--frozen takes none", 2),
        (["--plain"], "--plain takes none", 2),
        (["--ray"], "--ray takes none", 2),
        (["--head", "auto"], "--head auto takes none", 2),
    ],
)
def test_learner_state_refuses_what_has_no_learner(extra, says, code, capsys, tmp_path):
    from earlyexit.cli import main

    state = str(tmp_path / "learner.safetensors")
    got = main(["serve", "--model", "timm:resnet18", "--learner-state", state, *extra])
    assert got == code and says in capsys.readouterr().err


def test_learner_state_needs_a_folder_that_exists(capsys, tmp_path):
    from earlyexit.cli import main

    missing = tmp_path / "no-such-folder" / "learner.safetensors"
    got = main(["serve", "--model", "timm:resnet18", "--learner-state", str(missing)])
    assert got == 3 and "a folder that exists" in capsys.readouterr().err


def _serve_arguments(weights, state, *extra: str) -> list[str]:
    return [
        "--model", "timm:resnet18", "--num-classes", "10", "--input-size", "3,64,64",
        "--weights", str(weights), "--learner-state", str(state), "--port", "0",
        "--threads", "1", "--json", *extra,
    ]  # fmt: skip


def test_a_learner_proving_another_target_or_model_is_refused(capsys, tmp_path):
    from earlyexit.cli import main

    model = tiny_model(seed=3)
    weights = tmp_path / "model.pth"
    torch.save(model.state_dict(), weights)
    state = tmp_path / "learner.safetensors"
    learner = ee.OnlineDistiller(ee.wrap(model, input_size=SIZE), small_config())
    learner.step(torch.from_numpy(batch(4)))
    learner.save(state)
    learner.close()
    got = main(["serve", *_serve_arguments(weights, state, "--target-agreement", "0.95")])
    err = capsys.readouterr().err
    assert got == 5 and "proves agreement 0.99" in err and "--target-agreement 0.99" in err
    other = tmp_path / "other.pth"
    torch.save(tiny_model(seed=4).state_dict(), other)
    got = main(["serve", *_serve_arguments(other, state)])
    assert got == 5 and "cannot resume the learner" in capsys.readouterr().err


@pytest.mark.slow
def test_a_restarted_server_carries_on_from_its_saved_learner(tmp_path):
    import httpx

    model = tiny_model(seed=3)
    weights = tmp_path / "model.pth"
    torch.save(model.state_dict(), weights)
    state = tmp_path / "learner.safetensors"
    summaries = []
    for run in range(2):
        process, url = start_serve(_serve_arguments(weights, state), tmp_path)
        try:
            before = httpx.get(f"{url}/stats", timeout=60).json()
            for seed in range(3):
                answer = httpx.post(
                    f"{url}/predict", content=npy_bytes(batch(4, 10 * run + seed)), headers=NPY,
                    timeout=60,
                )  # fmt: skip
                assert answer.status_code == 200, answer.text
            process.send_signal(signal.SIGTERM)
            out, err = process.communicate(timeout=120)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
        assert process.returncode == 0, err
        summaries.append((before, json.loads(out)))
    (first_before, first), (second_before, second) = summaries
    assert first_before["samples"] == 0
    assert first["learner_saved"] == str(state) and first["samples"] == 12
    # The second server starts where the first stopped: same counts, thresholds and version.
    assert second_before["samples"] == 12
    assert second_before["thresholds"] == first["thresholds"]
    assert second_before["heads_version"] == first["heads_version"]
    assert second["samples"] == 24 and second["learner_saved"] == str(state)
    assert ee.OnlineDistiller.load(tiny_model(seed=3), state).stats()["samples"] == 24


def test_the_server_backend_saves_the_learner_it_serves(model, tmp_path):
    learner = ee.OnlineDistiller(ee.wrap(model, input_size=SIZE), small_config())
    backend = LearnerBackend(learner)
    backend.serve(torch.from_numpy(batch(3)))
    backend.close()
    path = tmp_path / "l.safetensors"
    backend.save_learner(path)
    resumed = ee.OnlineDistiller.load(model, path, background=False)
    same_learner(learner, resumed)
    resumed.eem.remove()
    learner.eem.remove()
