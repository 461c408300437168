"""Reports: what early exit saved and cost on a stream, as JSON, Markdown and a PNG plot.

:func:`tradeoff_report` does a whole evaluation (record the stream once, simulate every policy,
train the SDN baseline if a labelled train split is given, time the wrapper against its base
model); :func:`build_report` assembles the JSON-ready dict from parts; :func:`write_report`
writes ``NAME.json``, ``NAME.md`` and ``NAME.png``; :func:`load_report` reads one back.

Required keys (see the design notes): ``mac_saving``, ``oracle_mac_saving``, ``agreement``,
``accuracy_full``, ``accuracy_early`` (``null`` without labels), ``latency_ratio_b1`` and
``throughput_ratio`` (wrapped / unwrapped; ``null`` when not timed), and ``exits``: per exit
``threshold``, ``exit_rate``, ``agreement``. Non-finite thresholds are written as ``"inf"`` /
``"-inf"`` so the file is strict JSON.

Example:
    >>> report = tradeoff_report(eem, eval_images, labels=eval_labels)  # doctest: +SKIP
    >>> write_report(report, "out", "digits")  # doctest: +SKIP
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .._json import json_float
from .baselines import (
    METHOD_FULL,
    METHOD_OPERATING,
    METHOD_ORACLE,
    best_at_agreement,
    calibrate_greedy,
    compare_methods,
    train_heads,
)
from .policies import PolicyPoint
from .stream import StreamRecord, iterate_batches, record_stream

__all__ = [
    "AGREEMENT_TARGETS",
    "REPORT_SCHEMA",
    "REQUIRED_KEYS",
    "build_report",
    "load_report",
    "model_meta",
    "render_markdown",
    "tradeoff_report",
    "write_report",
]

REPORT_SCHEMA = "earlyexit.report/1"
REQUIRED_KEYS = (
    "mac_saving",
    "oracle_mac_saving",
    "agreement",
    "accuracy_full",
    "accuracy_early",
    "latency_ratio_b1",
    "throughput_ratio",
    "exits",
)
_EXIT_KEYS = ("threshold", "exit_rate", "agreement")
#: Agreement levels at which every curve's best saving is tabulated.
AGREEMENT_TARGETS = (0.99, 0.95)


def model_meta(eem: Any, name: str | None = None) -> dict[str, Any]:
    """Describe a wrapper for a report (name, family, exits, MACs, head kind, gate).

    Example:
        >>> model_meta(eem, "resnet18")["exits"]  # doctest: +SKIP
        ['layer1.1', 'layer2.1', 'layer3.0', 'layer3.1']
    """
    return {
        "name": name or type(eem.base_model).__name__,
        "family": eem.family,
        "input_size": list(eem.input_size),
        "num_classes": eem.num_classes,
        "exits": [p.name for p in eem.exits],
        "exit_macs": [p.macs for p in eem.exits],
        "head_macs": list(eem.head_macs),
        "base_macs": eem.base_macs,
        "head_kind": eem.head_kind,  # "mixed" when the exits' kinds differ
        "head_kinds": list(eem.head_kinds),
        "gate": eem.gate.config() if hasattr(eem.gate, "config") else repr(eem.gate),
    }


def build_report(
    record: StreamRecord,
    operating_thresholds: Sequence[float],
    *,
    sdn_record: StreamRecord | None = None,
    sdn_thresholds: Sequence[float] | None = None,
    latency: Mapping[str, float] | None = None,
    model: Mapping[str, Any] | None = None,
    stream: Mapping[str, Any] | None = None,
    grid: Sequence[float] | None = None,
    progress: bool = False,
    notes: Sequence[str] = (),
) -> dict[str, Any]:
    """Assemble a JSON-ready report from a recorded stream and the wrapper's thresholds.

    The headline figures (``mac_saving``, ``agreement``, ``accuracy_early``, ``exits``) are those of
    the operating point ``operating_thresholds``, simulated exactly on ``record``.
    ``saving_of_oracle`` is ``mac_saving / oracle_mac_saving``.

    Example:
        >>> report = build_report(rec, eem.thresholds, model=model_meta(eem))  # doctest: +SKIP
        >>> report["mac_saving"], report["exits"][0]["exit_rate"]  # doctest: +SKIP
    """
    compared = compare_methods(
        record,
        operating_thresholds,
        sdn_record=sdn_record,
        sdn_thresholds=sdn_thresholds,
        grid=grid,
        progress=progress,
    )
    points: dict[str, PolicyPoint] = compared["points"]
    curves: dict[str, list[PolicyPoint]] = compared["curves"]
    op, oracle, full = points[METHOD_OPERATING], points[METHOD_ORACLE], points[METHOD_FULL]
    costs = record.path_macs(operating_thresholds)
    exits = []
    for i in range(record.num_exits):
        exits.append(
            {
                "name": record.exit_names[i] if record.exit_names else str(i),
                "threshold": json_float(operating_thresholds[i]),
                "exit_rate": op.exit_rates[i],
                "agreement": op.exit_agreement[i],
                "path_macs": costs[i],
                "path_mac_fraction": costs[i] / record.base_macs,
            }
        )
    summary = []
    for name, pts in curves.items():
        row: dict[str, Any] = {"method": name, "kind": "curve", "points": len(pts)}
        for target in AGREEMENT_TARGETS:
            best = best_at_agreement(pts, target)
            row[f"best_at_{target}"] = None if best is None else best.to_dict()
        summary.append(row)
    for name, p in points.items():
        summary.append({"method": name, "kind": "point", "point": p.to_dict()})
    labelled = record.labels is not None
    report: dict[str, Any] = {
        "schema": REPORT_SCHEMA,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": dict(model or {}),
        "stream": {"samples": record.num_samples, "labelled": labelled, **dict(stream or {})},
        "mac_saving": op.mac_saving,
        "oracle_mac_saving": oracle.mac_saving,
        "saving_of_oracle": (op.mac_saving / oracle.mac_saving) if oracle.mac_saving > 0 else None,
        "expected_macs": op.expected_macs,
        "base_macs": record.base_macs,
        "agreement": op.agreement,
        "accuracy_full": full.accuracy if labelled else None,
        "accuracy_early": op.accuracy if labelled else None,
        "latency_ratio_b1": None if latency is None else latency.get("latency_ratio_b1"),
        "throughput_ratio": None if latency is None else latency.get("throughput_ratio"),
        "latency": None if latency is None else dict(latency),
        "thresholds": [json_float(t) for t in operating_thresholds],
        "exits": exits,
        "final": {"exit_rate": op.exit_rates[-1], "path_macs": costs[-1]},
        "methods": summary,
        "curves": {name: [p.to_dict() for p in pts] for name, pts in curves.items()},
        "points": {name: p.to_dict() for name, p in points.items()},
        "notes": list(notes),
    }
    json.dumps(report, allow_nan=False)  # fail here, not in the writer, if anything is not JSON
    return report


def load_report(path: str | Path) -> dict[str, Any]:
    """Read a report JSON and check it has the required keys.

    Raises:
        FileNotFoundError: no such file.
        ValueError: a folder, not JSON, or a required key missing.

    Example:
        >>> load_report("benchmarks/results/demo_digits.json")["mac_saving"]  # doctest: +SKIP
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a folder, not a report file")
    if not path.is_file():
        raise FileNotFoundError(f"no report at {path}")
    try:
        report = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not JSON (not UTF-8 text: {err})") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not JSON: {err}") from None
    if not isinstance(report, dict):
        raise ValueError(f"{path} holds a {type(report).__name__}, not a report object")
    missing = [k for k in REQUIRED_KEYS if k not in report]
    if missing:
        raise ValueError(f"{path} is not an earlyexit report: missing {', '.join(missing)}")
    if not isinstance(report["exits"], list):
        raise ValueError(f"{path}: exits is not a list: {str(report['exits'])[:60]}")
    for i, e in enumerate(report["exits"]):
        if not isinstance(e, dict):
            raise ValueError(f"{path}: exit {i} is not an object: {str(e)[:60]}")
        absent = [k for k in _EXIT_KEYS if k not in e]
        if absent:
            raise ValueError(f"{path}: exit {i} lacks {', '.join(absent)}")
    return report


def _pct(v: Any, digits: int = 1) -> str:
    if v is None:
        return "n/a"
    # Round first, then + 0.0 turns -0.0 into 0.0: a rounding-level loss must not print "-0.0%".
    return f"{round(100 * float(v), digits) + 0.0:.{digits}f}%"


def _ratio(v: Any) -> str:
    return "n/a" if v is None else f"{float(v):.3f}"


def render_markdown(report: Mapping[str, Any], *, plot_name: str | None = None) -> str:
    """The report as Markdown: headline figures, per-exit table, methods side by side.

    Example:
        >>> print(render_markdown(report))  # doctest: +SKIP
    """
    model = report.get("model", {}) or {}
    stream = report.get("stream", {}) or {}
    title = f"{model.get('name', 'model')} on {stream.get('name', 'a stream')}"
    lines = [f"# earlyexit report: {title}", ""]
    if stream.get("description"):
        lines += [str(stream["description"]), ""]
    lines += [
        f"{stream.get('samples', '?')} samples; "
        f"{'labelled' if stream.get('labelled') else 'unlabelled (quality = agreement with the full model)'}.",
        "",
        "| figure | value |",
        "|---|---:|",
        f"| MAC saving (operating point) | {_pct(report.get('mac_saving'))} |",
        f"| oracle MAC saving | {_pct(report.get('oracle_mac_saving'))} |",
        f"| share of the oracle's saving | {_pct(report.get('saving_of_oracle'))} |",
        f"| agreement with the full model | {_pct(report.get('agreement'), 2)} |",
        f"| accuracy, full model | {_pct(report.get('accuracy_full'), 2)} |",
        f"| accuracy, early exit | {_pct(report.get('accuracy_early'), 2)} |",
        f"| latency ratio, batch 1 (wrapped / base, mean) | {_ratio(report.get('latency_ratio_b1'))} |",
        f"| throughput ratio (wrapped / base) | {_ratio(report.get('throughput_ratio'))} |",
        "",
        "## Exits at the operating point",
        "",
        "| exit | module | threshold | exit rate | agreement | path MACs (of base) |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for i, e in enumerate(report.get("exits", [])):
        t = e.get("threshold")
        t_s = t if isinstance(t, str) else f"{float(t):.4f}"
        frac = e.get("path_mac_fraction")
        lines.append(
            f"| {i} | `{e.get('name', i)}` | {t_s} | {_pct(e.get('exit_rate'))} | "
            f"{_pct(e.get('agreement'), 2)} | {_pct(frac)} |"
        )
    final = report.get("final") or {}
    if final:
        lines.append(f"| final | full model | | {_pct(final.get('exit_rate'))} | 100.00% | |")
    lines += [
        "",
        "## Methods on the same backbone and stream",
        "",
        "| method | MACs (of base) | MAC saving | agreement | accuracy |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in report.get("methods", []):
        if row.get("kind") == "point":
            p = row["point"]
            lines.append(
                f"| {row['method']} | {_pct(p['mac_fraction'])} | {_pct(p['mac_saving'])} | "
                f"{_pct(p['agreement'], 2)} | {_pct(p.get('accuracy'), 2)} |"
            )
        else:
            for target in AGREEMENT_TARGETS:
                p = row.get(f"best_at_{target}")
                label = f"{row['method']}: best at agreement >= {target:g}"
                if p is None:
                    lines.append(f"| {label} | none reaches it | | | |")
                    continue
                param = p.get("param")
                if param is not None:
                    label += f" (param {param if isinstance(param, str) else f'{param:.4g}'})"
                lines.append(
                    f"| {label} | {_pct(p['mac_fraction'])} | {_pct(p['mac_saving'])} | "
                    f"{_pct(p['agreement'], 2)} | {_pct(p.get('accuracy'), 2)} |"
                )
    lat = report.get("latency")
    if lat:
        lines += [
            "",
            "## Latency (same run, interleaved, ratios wrapped / base)",
            "",
            f"- batch 1: mean {_ratio(lat.get('latency_ratio_b1'))}, median "
            f"{_ratio(lat.get('latency_ratio_b1_median'))}, p90 {_ratio(lat.get('latency_ratio_b1_p90'))}",
            f"- batch {int(lat.get('batch', 0))}: throughput ratio {_ratio(lat.get('throughput_ratio'))}",
            f"- CPU threads: {int(lat.get('threads', 0))}",
        ]
    for note in report.get("notes", []) or []:
        lines += ["", f"> {note}"]
    if plot_name:
        lines += ["", f"![trade-off curves]({plot_name})"]
    return "\n".join(lines) + "\n"


def write_report(
    report: Mapping[str, Any], out_dir: str | Path, name: str = "report", *, plot: bool = True
) -> dict[str, Path]:
    """Write ``NAME.json``, ``NAME.md`` and (``plot=True``) ``NAME.png`` into ``out_dir``.

    Example:
        >>> paths = write_report(report, "benchmarks/results", "digits")  # doctest: +SKIP
        >>> sorted(paths)  # doctest: +SKIP
        ['json', 'md', 'png']
    """
    from .plot import plot_tradeoff

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / f"{name}.json", "md": out / f"{name}.md"}
    paths["json"].write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
    if plot:
        paths["png"] = plot_tradeoff(dict(report), out / f"{name}.png")
    paths["md"].write_text(render_markdown(report, plot_name=paths["png"].name if plot else None))
    return paths


def _take_samples(data: Any, labels: Tensor | None, n: int, batch_size: int) -> Tensor:
    got, count = [], 0
    for x, _ in iterate_batches(data, labels, batch_size):
        got.append(x)
        count += x.shape[0]
        if count >= n:
            break
    return torch.cat(got)[:n]


def tradeoff_report(
    eem: Any,
    eval_data: Any,
    *,
    labels: Tensor | None = None,
    train_data: Any = None,
    train_labels: Tensor | None = None,
    sdn_epochs: int = 30,
    sdn_target: float = 0.99,
    latency: bool = True,
    latency_samples: int = 64,
    latency_batch: int = 32,
    threads: int | None = None,
    batch_size: int = 64,
    grid: Sequence[float] | None = None,
    model_name: str | None = None,
    stream_meta: Mapping[str, Any] | None = None,
    progress: bool = True,
    notes: Sequence[str] = (),
) -> dict[str, Any]:
    """Evaluate a wrapper on a stream end to end and return the report dict.

    1. Record ``eval_data`` once with every head evaluated (:func:`record_stream`).
    2. If ``train_data`` carries labels, train SDN heads offline on it (frozen backbone,
       cross-entropy, copies of the wrapper's heads) and calibrate them with
       :func:`calibrate_greedy` at ``sdn_target`` on the train split.
    3. Simulate the operating point (``eem.thresholds``), the sweeps and baselines.
    4. If ``latency``, time the wrapper against its base model on ``latency_samples`` samples.

    The wrapper's heads, thresholds and base model are not changed.

    Example:
        >>> report = tradeoff_report(eem, eval_x, labels=eval_y, train_data=train_x, train_labels=train_y)  # doctest: +SKIP
    """
    from .latency import stream_latency

    sdn = train_data is not None
    record = record_stream(
        eem, eval_data, labels=labels, batch_size=batch_size, keep_features=sdn,
        progress=progress, desc="recording evaluation stream",
    )  # fmt: skip
    sdn_record = sdn_thresholds = None
    if sdn:
        train = record_stream(
            eem, train_data, labels=train_labels, batch_size=batch_size, keep_features=True,
            progress=progress, desc="recording train split",
        )  # fmt: skip
        if train.labels is None:
            raise ValueError("train_data has no labels: the SDN baseline trains heads with labels")
        heads = train_heads(list(eem.heads), train.features, train.labels, epochs=sdn_epochs)
        sdn_record = record.with_heads(heads, eem.gate)
        sdn_thresholds = calibrate_greedy(train.with_heads(heads, eem.gate), sdn_target)
    lat = None
    if latency:
        samples = _take_samples(eval_data, labels, latency_samples, batch_size)
        lat = stream_latency(
            eem, samples, batch=min(latency_batch, samples.shape[0]), threads=threads,
            reps_b1=samples.shape[0], progress=progress,
        )  # fmt: skip
    record.features = None  # not part of the report; free the memory early
    return build_report(
        record,
        eem.thresholds,
        sdn_record=sdn_record,
        sdn_thresholds=sdn_thresholds,
        latency=lat,
        model=model_meta(eem, model_name),
        stream=stream_meta,
        grid=grid,
        progress=progress,
        notes=notes,
    )
