"""Parity of fashion_msa.train.metrics with scikit-learn (zero_division=0)."""

import numpy as np
import pytest
from sklearn import metrics as skm

from fashion_msa.train import metrics

LABELS = [0, 1, 2]

# Both sides compute the same ratios of small integer counts in float64, so only
# rounding in the last place can differ.
ATOL = 1e-12


def _sklearn_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict:
    precision, recall, f1, support = skm.precision_recall_fscore_support(
        y_true, y_pred, labels=LABELS, average=None, zero_division=0
    )
    macro = skm.precision_recall_fscore_support(
        y_true, y_pred, labels=LABELS, average="macro", zero_division=0
    )
    return {
        "accuracy": skm.accuracy_score(y_true, y_pred),
        "macro": macro[:3],
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "support": support,
        "confusion": skm.confusion_matrix(y_true, y_pred, labels=LABELS),
    }


def _assert_parity(y_true: np.ndarray, y_pred: np.ndarray) -> None:
    ours = metrics.compute_metrics(y_true, y_pred)
    ref = _sklearn_metrics(y_true, y_pred)

    assert ours["accuracy"] == pytest.approx(ref["accuracy"], abs=ATOL)
    assert ours["macro_precision"] == pytest.approx(ref["macro"][0], abs=ATOL)
    assert ours["macro_recall"] == pytest.approx(ref["macro"][1], abs=ATOL)
    assert ours["macro_f1"] == pytest.approx(ref["macro"][2], abs=ATOL)
    np.testing.assert_array_equal(np.array(ours["confusion_matrix"]), ref["confusion"])
    for k, name in enumerate(metrics.CLASS_NAMES):
        scores = ours["per_class"][name]
        assert scores["precision"] == pytest.approx(ref["precision"][k], abs=ATOL)
        assert scores["recall"] == pytest.approx(ref["recall"][k], abs=ATOL)
        assert scores["f1"] == pytest.approx(ref["f1"][k], abs=ATOL)
        assert scores["support"] == ref["support"][k]
    assert ours["num_examples"] == len(y_true)


@pytest.mark.parametrize("seed", range(20))
def test_random_predictions_match_sklearn(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 200))
    y_true = rng.integers(0, 3, size=n)
    y_pred = rng.integers(0, 3, size=n)
    _assert_parity(y_true, y_pred)


@pytest.mark.parametrize(
    "y_true, y_pred",
    [
        # One class never predicted.
        ([0, 1, 2, 2, 1, 0], [0, 0, 2, 2, 0, 0]),
        # Everything predicted as one class.
        ([0, 1, 2, 2, 1, 0], [1, 1, 1, 1, 1, 1]),
        # A class that neither occurs nor is predicted.
        ([0, 0, 2, 2], [0, 2, 2, 0]),
        # A class predicted but never true.
        ([0, 0, 0], [1, 1, 0]),
        # All correct, all wrong, single example.
        ([2, 1, 0], [2, 1, 0]),
        ([2, 1, 0], [0, 2, 1]),
        ([1], [1]),
    ],
)
def test_degenerate_predictions_match_sklearn(y_true, y_pred):
    _assert_parity(np.array(y_true), np.array(y_pred))


def test_metrics_from_confusion_sums_batches():
    rng = np.random.default_rng(0)
    y_true = rng.integers(0, 3, size=50)
    y_pred = rng.integers(0, 3, size=50)
    summed = metrics.confusion_matrix(y_true[:20], y_pred[:20]) + (
        metrics.confusion_matrix(y_true[20:], y_pred[20:])
    )
    assert metrics.metrics_from_confusion(summed) == metrics.compute_metrics(
        y_true, y_pred
    )


def test_empty_input_gives_zero_scores():
    result = metrics.compute_metrics(np.array([], int), np.array([], int))
    assert result["accuracy"] == 0.0
    assert result["macro_f1"] == 0.0
    assert result["num_examples"] == 0


def test_out_of_range_class_id_rejected():
    with pytest.raises(ValueError, match="outside"):
        metrics.compute_metrics(np.array([0, 3]), np.array([0, 1]))


def test_length_mismatch_rejected():
    with pytest.raises(ValueError, match="differ in length"):
        metrics.compute_metrics(np.array([0, 1]), np.array([0]))
