"""Classification metrics in plain numpy, shared by finetune, evaluate, gate
and drift monitoring, so every stage computes a number the same way."""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """(n_classes, n_classes) counts; rows are true labels, columns predictions."""
    matrix = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(matrix, (np.asarray(y_true, dtype=int), np.asarray(y_pred, dtype=int)), 1)
    return matrix


def per_class_scores(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision, recall and F1 per class; 0 where a class has no predictions or rows."""
    true_pos = np.diag(matrix).astype(float)
    predicted = matrix.sum(0).astype(float)
    actual = matrix.sum(1).astype(float)
    precision = np.divide(true_pos, predicted, out=np.zeros_like(true_pos), where=predicted > 0)
    recall = np.divide(true_pos, actual, out=np.zeros_like(true_pos), where=actual > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(true_pos), where=denom > 0)
    return precision, recall, f1


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> float:
    """Unweighted mean of per-class F1 over the classes present in y_true or y_pred."""
    matrix = confusion_matrix(y_true, y_pred, n_classes)
    present = (matrix.sum(0) + matrix.sum(1)) > 0
    if not present.any():
        return 0.0
    return float(per_class_scores(matrix)[2][present].mean())


def accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    y_true = np.asarray(y_true)
    return float((y_true == np.asarray(y_pred)).mean()) if len(y_true) else 0.0


def reliability(probs: np.ndarray, y_true: np.ndarray, bins: int = 10) -> dict:
    """Expected calibration error with equal-width confidence bins.

    Returns:
        {"ece", "bin_confidence", "bin_accuracy", "bin_count"}; a bin with no
        rows has None for its confidence and accuracy.
    """
    confidence = probs.max(1)
    correct = probs.argmax(1) == np.asarray(y_true)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    ece, conf_out, acc_out, counts = 0.0, [], [], []
    for b in range(bins):
        members = which == b
        count = int(members.sum())
        counts.append(count)
        if count == 0:
            conf_out.append(None)
            acc_out.append(None)
            continue
        conf, acc = float(confidence[members].mean()), float(correct[members].mean())
        conf_out.append(conf)
        acc_out.append(acc)
        ece += count / len(confidence) * abs(acc - conf)
    return {"ece": float(ece), "bin_confidence": conf_out, "bin_accuracy": acc_out, "bin_count": counts}


def classification_summary(probs: np.ndarray, y_true: np.ndarray, labels: Sequence[str]) -> dict:
    """Accuracy, macro-F1, per-class precision/recall/F1/support, confusion
    matrix and calibration of one model's probabilities."""
    y_true = np.asarray(y_true, dtype=int)
    y_pred = probs.argmax(1)
    matrix = confusion_matrix(y_true, y_pred, len(labels))
    precision, recall, f1 = per_class_scores(matrix)
    calibration = reliability(probs, y_true)
    return {
        "accuracy": accuracy(y_true, y_pred),
        "macro_f1": macro_f1(y_true, y_pred, len(labels)),
        "per_class": {
            name: {"precision": float(precision[i]), "recall": float(recall[i]),
                   "f1": float(f1[i]), "support": int(matrix[i].sum())}
            for i, name in enumerate(labels)
        },
        "confusion_matrix": matrix.tolist(),
        "ece": calibration.pop("ece"),
        "reliability": calibration,
    }


def metric_function(name: str, n_classes: int) -> Callable[[np.ndarray, np.ndarray], float]:
    """The scorer behind a metric name used in params (`macro_f1`, `accuracy`)."""
    if name == "macro_f1":
        return lambda y_true, y_pred: macro_f1(y_true, y_pred, n_classes)
    if name == "accuracy":
        return accuracy
    raise ValueError(f"unknown metric {name!r}: use 'macro_f1' or 'accuracy'")


def paired_bootstrap(
    y_true: np.ndarray, pred_a: np.ndarray, pred_b: np.ndarray,
    score: Callable[[np.ndarray, np.ndarray], float],
    samples: int = 1000, confidence: float = 0.95, seed: int = 0,
) -> dict:
    """Confidence interval of score(a) - score(b) over resampled test rows.

    Both models are scored on the same resampled rows in every draw (paired), so
    the interval reflects the difference between the models, not the noise of
    the test set each would see alone.

    Returns:
        {"diff", "low", "high", "samples", "confidence"}.
    """
    y_true, pred_a, pred_b = (np.asarray(x, dtype=int) for x in (y_true, pred_a, pred_b))
    rng = np.random.default_rng(seed)
    n = len(y_true)
    diffs = np.empty(samples)
    for i in range(samples):
        rows = rng.integers(0, n, n)
        diffs[i] = score(y_true[rows], pred_a[rows]) - score(y_true[rows], pred_b[rows])
    tail = (1.0 - confidence) / 2
    return {
        "diff": score(y_true, pred_a) - score(y_true, pred_b),
        "low": float(np.quantile(diffs, tail)), "high": float(np.quantile(diffs, 1 - tail)),
        "samples": samples, "confidence": confidence,
    }


def interval_position(low: float, high: float, floor: float = 0.0) -> str:
    """Where a confidence interval [low, high] lies against `floor`, as reasons say it:
    "lies above zero", "lies below zero" or "includes zero" (the floor written out when not 0)."""
    where = "lies above" if low > floor else "lies below" if high < floor else "includes"
    return f"{where} {'zero' if floor == 0 else f'{floor:+.4f}'}"
