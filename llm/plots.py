"""Loss curves as files: CSV for `dvc plots show/diff`, and PNG, which needs no browser or network.

DVC draws the CSVs (one per metric, columns `step,<metric>`); its HTML loads vega from a CDN, so the PNG
is what shows offline, in MLflow, and in the evaluation report.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from pathlib import Path

from llm.files import atomic_path

History = Mapping[str, Sequence[tuple[int, float]]]  # metric name -> [(step, value), ...]


def write_curve_csv(path: str | Path, name: str, points: Sequence[tuple[int, float]]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["step", name])
        writer.writerows((step, f"{value:.6g}") for step, value in points)


def plot_losses(path: str | Path, curves: Mapping[str, History], title: str = "loss") -> None:
    """One PNG with train and val loss of each labelled history (e.g. {"pretrain": ..., "finetune": ...})."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(6 * len(curves), 4), squeeze=False)
    for ax, (label, history) in zip(axes[0], curves.items()):
        for metric, style in (("train_loss", "-"), ("val_loss", "o-")):
            points = history.get(metric) or []
            if points:
                ax.plot(*zip(*points), style, label=metric.replace("_", " "), markersize=3)
        ax.set(title=f"{label} {title}", xlabel="step", ylabel="cross-entropy")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def write_loss_plots(folder: str | Path, history: History, label: str) -> list[Path]:
    """`train_loss.csv`, `val_loss.csv` and `loss.png` in `folder`."""
    folder = Path(folder)
    written = []
    for metric in ("train_loss", "val_loss"):
        write_curve_csv(folder / f"{metric}.csv", metric, history.get(metric, []))
        written.append(folder / f"{metric}.csv")
    plot_losses(folder / "loss.png", {label: history})
    return [*written, folder / "loss.png"]
