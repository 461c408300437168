"""PNG of the trade-off curves in a report: MAC fraction on x, agreement / accuracy on y.

Example:
    >>> plot_tradeoff(report, "report.png")  # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .._optional import import_demo_package

__all__ = ["plot_tradeoff"]

# matplotlib is in the ``demo`` extra: imported when a plot is drawn, never with the package.
_FEATURE = "the trade-off plot"

# How each point method is drawn: (marker, size, colour); curves get the default colour cycle.
_POINT_STYLE = {
    "oracle": ("*", 220, "gold"),
    "full model": ("s", 80, "black"),
    "online heads, operating point": ("D", 110, "crimson"),
    "online heads, max-softmax 0.5": ("X", 110, "tab:purple"),
    "SDN heads, calibrated point": ("^", 110, "tab:green"),
}


def plot_tradeoff(report: dict[str, Any], path: str | Path, *, dpi: int = 120) -> Path:
    """Draw the report's curves and points and save a PNG (matplotlib, Agg backend).

    One panel per quality measure: agreement with the full model (full range), the same zoomed on
    agreement >= 0.9 (where operating points live), and accuracy when the stream has labels. Every
    curve is a line (sorted by MAC fraction), every point a marker; the oracle is a gold star, the
    operating point a red diamond, the full model a black square at (1, 1).

    matplotlib comes with ``pip install 'earlyexit[demo]'``; without it this raises
    :class:`~earlyexit.MissingDemoPackageError` (an ``ImportError``) saying so.

    Example:
        >>> plot_tradeoff(load_report("run.json"), "run.png")  # doctest: +SKIP
        PosixPath('run.png')
    """
    matplotlib = import_demo_package("matplotlib", _FEATURE)
    matplotlib.use("Agg", force=False)
    plt = import_demo_package("matplotlib.pyplot", _FEATURE)

    curves: dict[str, list[dict]] = report.get("curves", {})
    points: dict[str, dict] = report.get("points", {})
    labelled = report.get("accuracy_full") is not None
    panels = [("agreement", "agreement with the full model", None), ("agreement", "zoom", 0.9)]
    if labelled:
        panels.append(("accuracy", "accuracy (labels)", None))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.4), squeeze=False)
    for ax, (key, title, floor) in zip(axes[0], panels, strict=True):
        ys: list[float] = []
        for name, pts in curves.items():
            pairs = sorted((p["mac_fraction"], p[key]) for p in pts if p.get(key) is not None)
            if not pairs:
                continue
            xs, vals = zip(*pairs, strict=True)
            style = "o-" if len(pairs) < 8 else "-"
            ax.plot(xs, vals, style, lw=1.6, ms=4, label=name)
            ys.extend(vals)
        for name, p in points.items():
            if p.get(key) is None:
                continue
            marker, size, colour = _POINT_STYLE.get(name, ("o", 70, None))
            ax.scatter(
                [p["mac_fraction"]], [p[key]], marker=marker, s=size, c=colour,
                edgecolors="black", linewidths=0.6, zorder=5, label=name,
            )  # fmt: skip
            ys.append(p[key])
        if key == "agreement":
            ax.axhline(0.99, color="grey", lw=0.8, ls="--")
        if floor is not None:
            ax.set_ylim(floor, 1.002)
        elif ys:
            ax.set_ylim(max(0.0, min(ys) - 0.03), min(1.02, max(ys) + 0.02))
        ax.set_xlim(
            0, max(1.05, max((p["mac_fraction"] for p in points.values()), default=1) + 0.02)
        )
        ax.set_xlabel("MACs per sample (fraction of the full model)")
        ax.set_ylabel("accuracy" if key == "accuracy" else "agreement with the full model")
        ax.set_title(title if title != "zoom" else "agreement (zoom: >= 0.9)", fontsize=10)
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(
        handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=8, frameon=False
    )
    model = report.get("model", {}).get("name", "model")
    stream = report.get("stream", {}).get("name", "stream")
    saving = report.get("mac_saving")
    agreement = report.get("agreement")
    headline = ""
    if saving is not None and agreement is not None:
        headline = (
            f": operating point saves {100 * saving:.1f}% MACs at {100 * agreement:.2f}% agreement"
        )
    fig.suptitle(f"{model} on {stream}{headline}", fontsize=11)
    fig.tight_layout(rect=(0, 0.1, 1, 0.95))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path
