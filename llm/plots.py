"""Training curves as files: CSV for `dvc plots show/diff`, and PNG, which needs no browser or network.

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


# A plot per kind of curve: its file stem, the y axis, and the train and val metrics drawn on it.
CURVES = {"loss": ("loss", ("train_loss", "val_loss")),  # cross-entropy, or preference tuning's DPO loss
          "accuracy": ("accuracy", ("train_accuracy", "val_accuracy")),
          "reward_margin": ("reward margin", ("train_reward_margin", "val_reward_margin")),
          "preference_accuracy": ("preference accuracy", ("train_preference_accuracy", "val_preference_accuracy"))}


def plot_curves(path: str | Path, curves: Mapping[str, History], kind: str = "loss", title: str | None = None) -> None:
    """One PNG with the train and val curves of `kind` (a key of CURVES) of each labelled history
    (e.g. {"pretrain": ..., "finetune": ...})."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    ylabel, metrics = CURVES[kind]
    fig, axes = plt.subplots(1, len(curves), figsize=(6 * len(curves), 4), squeeze=False)
    for ax, (label, history) in zip(axes[0], curves.items()):
        for metric, style in zip(metrics, ("-", "o-")):
            points = history.get(metric) or []
            if points:
                ax.plot(*zip(*points), style, label=metric.replace("_", " "), markersize=3)
        ax.set(title=f"{label} {title or ylabel}", xlabel="step", ylabel=ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
    _save(fig, path)


def plot_confusion(path: str | Path, matrix: Sequence[Sequence[int]], labels: Sequence[str], title: str) -> None:
    """A confusion matrix as a PNG: rows the true class, columns the predicted one, each cell its count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.2 * len(labels) + 2.5, 1.2 * len(labels) + 2))
    ax.imshow(matrix, cmap="Blues")
    ax.set(xticks=range(len(labels)), yticks=range(len(labels)), xticklabels=labels, yticklabels=labels,
           xlabel="predicted", ylabel="true", title=title)
    top = max((max(row) for row in matrix), default=0)
    for i, row in enumerate(matrix):
        for j, count in enumerate(row):
            ax.text(j, i, str(count), ha="center", va="center", color="white" if count > top / 2 else "black")
    _save(fig, path)


def _save(fig, path: str | Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def write_loss_plots(folder: str | Path, history: History, label: str) -> list[Path]:
    """`<metric>.csv` per curve and `<kind>.png` per kind of CURVES in `folder`: `train_loss.csv`,
    `val_loss.csv` and `loss.png` always, the other kinds' files where the history has their metrics
    (a classifier's accuracies, preference tuning's margins)."""
    folder = Path(folder)
    written = []
    for kind, (_, metrics) in CURVES.items():
        if kind != "loss" and not any(history.get(m) for m in metrics):
            continue
        for metric in metrics:
            write_curve_csv(folder / f"{metric}.csv", metric, history.get(metric, []))
            written.append(folder / f"{metric}.csv")
        plot_curves(folder / f"{kind}.png", {label: history}, kind)
        written.append(folder / f"{kind}.png")
    return written
