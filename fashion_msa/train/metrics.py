"""Classification metrics for the three sentiment classes, from a confusion matrix.

The numbers equal scikit-learn's `accuracy_score` and
`precision_recall_fscore_support(labels=[0, 1, 2], zero_division=0)`: every class
counts in the macro average, including a class that is never predicted or never
occurs, and a score whose denominator is zero is 0.
"""

from collections.abc import Sequence
from typing import Any

import numpy as np

CLASS_NAMES: tuple[str, ...] = ("negative", "neutral", "positive")


def confusion_matrix(
    labels: np.ndarray, predictions: np.ndarray, num_classes: int = 3
) -> np.ndarray:
    """Count (true class, predicted class) pairs.

    Args:
      labels: true class ids, shape (n,).
      predictions: predicted class ids, shape (n,).
      num_classes: number of classes.

    Returns:
      int64 matrix (num_classes, num_classes); rows are true classes, columns are
      predicted classes, as in `sklearn.metrics.confusion_matrix`.
    """
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    predictions = np.asarray(predictions, dtype=np.int64).reshape(-1)
    if labels.shape != predictions.shape:
        raise ValueError(
            f"labels and predictions differ in length: {labels.shape[0]} vs "
            f"{predictions.shape[0]}"
        )
    for name, values in (("labels", labels), ("predictions", predictions)):
        if values.size and (values.min() < 0 or values.max() >= num_classes):
            raise ValueError(
                f"{name} contain class ids outside [0, {num_classes}): "
                f"min {values.min()}, max {values.max()}"
            )
    flat = labels * num_classes + predictions
    counts = np.bincount(flat, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def _safe_divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """Divide element-wise, giving 0 where the denominator is 0 (zero_division=0)."""
    numerator = numerator.astype(np.float64)
    denominator = denominator.astype(np.float64)
    out = np.zeros_like(numerator)
    np.divide(numerator, denominator, out=out, where=denominator != 0)
    return out


def metrics_from_confusion(
    matrix: np.ndarray, class_names: Sequence[str] = CLASS_NAMES
) -> dict[str, Any]:
    """Compute accuracy and macro and per-class precision/recall/F1 from a matrix.

    Args:
      matrix: counts (num_classes, num_classes), rows true, columns predicted.
      class_names: one name per class, in class-id order.

    Returns:
      A JSON-ready dict: `accuracy`, `macro_precision`, `macro_recall`, `macro_f1`,
      `per_class` ({name: {precision, recall, f1, support}}), `confusion_matrix`
      (nested lists) and `num_examples`.
    """
    matrix = np.asarray(matrix, dtype=np.int64)
    num_classes = matrix.shape[0]
    if matrix.shape != (num_classes, num_classes) or len(class_names) != num_classes:
        raise ValueError(
            f"confusion matrix of shape {matrix.shape} does not match "
            f"{len(class_names)} class names"
        )

    true_positives = np.diag(matrix)
    predicted = matrix.sum(axis=0)
    support = matrix.sum(axis=1)
    total = int(matrix.sum())

    precision = _safe_divide(true_positives, predicted)
    recall = _safe_divide(true_positives, support)
    # F1 as 2TP / (2TP + FP + FN), which is how scikit-learn (>= 1.3) defines it,
    # so an undefined F1 is 0 rather than 2PR/(P+R) of two zeros.
    f1 = _safe_divide(2 * true_positives, predicted + support)

    per_class = {
        name: {
            "precision": float(precision[k]),
            "recall": float(recall[k]),
            "f1": float(f1[k]),
            "support": int(support[k]),
        }
        for k, name in enumerate(class_names)
    }
    return {
        "accuracy": float(true_positives.sum() / total) if total else 0.0,
        "macro_precision": float(precision.mean()),
        "macro_recall": float(recall.mean()),
        "macro_f1": float(f1.mean()),
        "per_class": per_class,
        "confusion_matrix": matrix.tolist(),
        "num_examples": total,
    }


def compute_metrics(
    labels: np.ndarray,
    predictions: np.ndarray,
    class_names: Sequence[str] = CLASS_NAMES,
) -> dict[str, Any]:
    """Compute the metrics dict of `metrics_from_confusion` from label arrays (n,)."""
    matrix = confusion_matrix(labels, predictions, num_classes=len(class_names))
    return metrics_from_confusion(matrix, class_names)


def format_metrics_table(results: dict[str, dict[str, Any]]) -> str:
    """Render {split: metrics} as a fixed-width text table of the headline metrics."""
    columns = ("accuracy", "macro_precision", "macro_recall", "macro_f1")
    header = f"{'split':<8}" + "".join(f"{c:>17}" for c in columns) + f"{'posts':>8}"
    lines = [header, "-" * len(header)]
    for split, metrics in results.items():
        row = f"{split:<8}" + "".join(f"{100 * metrics[c]:>16.2f}%" for c in columns)
        lines.append(row + f"{metrics['num_examples']:>8d}")
    return "\n".join(lines)
