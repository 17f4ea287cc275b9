"""PNG plots of a run: learning curves from metrics.jsonl and a confusion matrix.

matplotlib runs with the non-interactive Agg backend, so plotting needs no
display.
"""

import pathlib
from collections.abc import Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import numpy as np  # noqa: E402

from fashion_msa.train.metrics import CLASS_NAMES  # noqa: E402


def _series(
    records: Sequence[dict[str, Any]], stage: str, split: str, key: str
) -> tuple[list[int], list[float]]:
    points = [
        (r["step"], r[key])
        for r in records
        if r["stage"] == stage and r["split"] == split and r.get(key) is not None
    ]
    return [p[0] for p in points], [p[1] for p in points]


def plot_learning_curves(
    records: Sequence[dict[str, Any]], path: str | pathlib.Path
) -> None:
    """Plot training loss per stage and validation macro-F1 / accuracy against step."""
    fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(11, 4))
    for stage, label in (
        ("pretrain", "pre-training (BCE)"),
        ("finetune", "fine-tuning (CE)"),
    ):
        steps, values = _series(records, stage, "train", "loss")
        if steps:
            ax_loss.plot(steps, values, label=label)
    ax_loss.set_xlabel("global step")
    ax_loss.set_ylabel("training loss")
    ax_loss.set_title("Training loss")
    ax_loss.legend(loc="best")

    for key, label in (("macro_f1", "macro-F1"), ("accuracy", "accuracy")):
        steps, values = _series(records, "finetune", "val", key)
        if steps:
            ax_val.plot(steps, values, marker="o", label=label)
    ax_val.set_xlabel("global step")
    ax_val.set_ylabel("validation score")
    ax_val.set_ylim(0.0, 1.0)
    ax_val.set_title("Validation")
    ax_val.legend(loc="best")

    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_confusion_matrix(
    matrix: Sequence[Sequence[int]],
    path: str | pathlib.Path,
    title: str = "Confusion matrix",
    class_names: Sequence[str] = CLASS_NAMES,
) -> None:
    """Plot a confusion matrix (rows true, columns predicted) with cell counts."""
    matrix = np.asarray(matrix)
    fig, ax = plt.subplots(figsize=(4.5, 4))
    image = ax.imshow(matrix, cmap="Blues")
    fig.colorbar(image, ax=ax)
    ticks = np.arange(len(class_names))
    ax.set_xticks(ticks, labels=class_names)
    ax.set_yticks(ticks, labels=class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    threshold = matrix.max() / 2 if matrix.size else 0
    for i in range(matrix.shape[0]):
        for j in range(matrix.shape[1]):
            color = "white" if matrix[i, j] > threshold else "black"
            ax.text(j, i, str(matrix[i, j]), ha="center", va="center", color=color)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
