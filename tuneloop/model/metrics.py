"""Classification metrics shared by finetune, evaluate, gate and drift
monitoring, so every stage computes a number the same way: scikit-learn's
scores, SciPy's bootstrap, our own expected calibration error, and accuracy
and macro-F1 estimated without labels from calibrated probabilities (CBPE)."""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from typing import Callable, Sequence, cast

import numpy as np
from sklearn import metrics as sk


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """(n_classes, n_classes) counts; rows are true labels, columns predictions."""
    if len(y_true) == 0:  # sklearn refuses empty input; no rows is a matrix of zeros
        return np.zeros((n_classes, n_classes), dtype=np.int64)
    return sk.confusion_matrix(y_true, y_pred, labels=np.arange(n_classes)).astype(np.int64)


def per_class_scores(y_true: np.ndarray, y_pred: np.ndarray,
                     n_classes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision, recall and F1 per class 0..n_classes-1; 0 where a class has no predictions or rows."""
    if len(y_true) == 0:
        return np.zeros(n_classes), np.zeros(n_classes), np.zeros(n_classes)
    precision, recall, f1, _ = sk.precision_recall_fscore_support(
        y_true, y_pred, labels=np.arange(n_classes), zero_division=0)  # pyright: ignore[reportArgumentType]
    # sklearn's annotations (read from its defaults) type zero_division as str and the result as floats;
    # with labels given it returns one array per class
    return cast(np.ndarray, precision), cast(np.ndarray, recall), cast(np.ndarray, f1)


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> float:
    """Unweighted mean of per-class F1 over the classes present in y_true or y_pred."""
    if len(y_true) == 0:
        return 0.0
    # labels=None: sklearn averages over the classes present in y_true or y_pred, as intended
    return float(sk.f1_score(y_true, y_pred, average="macro", zero_division=0))  # pyright: ignore[reportArgumentType]


def accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    return float(sk.accuracy_score(y_true, y_pred)) if len(y_true) else 0.0


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


def classification_summary(probs: np.ndarray, y_true: np.ndarray, labels: Sequence[str],
                           answers: np.ndarray | None = None) -> dict:
    """Accuracy, macro-F1, per-class precision/recall/F1/support, confusion
    matrix and calibration of one model's probabilities.

    Args:
        answers: the predicted class per row when it is not the top probability
            (an abstention answered with the out-of-scope label); None: argmax.
    """
    y_true = np.asarray(y_true, dtype=int)
    y_pred = probs.argmax(1) if answers is None else np.asarray(answers, dtype=int)
    matrix = confusion_matrix(y_true, y_pred, len(labels))
    precision, recall, f1 = per_class_scores(y_true, y_pred, len(labels))
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
    """The scorer behind a metric name used in params (`macro_f1`, `accuracy`).

    The scorer carries `.batched`, the same score over the last axis of many
    resamples at once, which paired_bootstrap uses (scikit-learn's per-call
    checks would make 2,000 bootstrap and jackknife calls take seconds).
    """
    if name == "macro_f1":
        scorer = lambda y_true, y_pred: macro_f1(y_true, y_pred, n_classes)  # noqa: E731
        scorer.batched = lambda y_true, y_pred: batched_macro_f1(y_true, y_pred, n_classes)
        return scorer
    if name == "accuracy":
        scorer = lambda y_true, y_pred: accuracy(y_true, y_pred)  # noqa: E731
        scorer.batched = lambda y_true, y_pred: (y_true == y_pred).mean(axis=-1)
        return scorer
    raise ValueError(f"unknown metric {name!r}: use 'macro_f1' or 'accuracy'")


def batched_macro_f1(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """macro_f1 of each row of (..., n) label arrays: F1 averaged over the classes present in the row."""
    total, present = np.zeros(y_true.shape[:-1]), np.zeros(y_true.shape[:-1])
    for label in range(n_classes):
        truth, guess = y_true == label, y_pred == label
        hits, actual, predicted = (truth & guess).sum(-1), truth.sum(-1), guess.sum(-1)
        # F1 = 2 tp / (actual + predicted): the same value as 2pr/(p+r), 0 when the class has no hits
        total += np.divide(2 * hits, actual + predicted, out=np.zeros(hits.shape), where=actual + predicted > 0)
        present += (actual + predicted) > 0
    return np.divide(total, present, out=np.zeros(total.shape), where=present > 0)


def paired_bootstrap(
    y_true: np.ndarray, pred_a: np.ndarray, pred_b: np.ndarray,
    score: Callable[[np.ndarray, np.ndarray], float],
    samples: int = 1000, confidence: float = 0.95, seed: int = 0,
) -> dict:
    """BCa confidence interval of score(a) - score(b) over resampled test rows.

    Both models are scored on the same resampled rows in every draw (SciPy's
    `paired=True`), so the interval reflects the difference between the models,
    not the noise of the test set each would see alone. The same seed gives the
    same interval.

    Returns:
        {"diff", "low", "high", "samples", "confidence", "p_not_below_zero"}; when
        every draw gives the same difference (identical predictions), low == high
        == that value. `p_not_below_zero` is the share of draws whose difference is
        >= 0 (add-one smoothed): a one-sided p-value for "a is worse than b".
    """
    from scipy import stats

    y_true, pred_a, pred_b = (np.asarray(x, dtype=int) for x in (y_true, pred_a, pred_b))

    batched = getattr(score, "batched", None)

    def difference(rows_true: np.ndarray, rows_a: np.ndarray, rows_b: np.ndarray, axis: int = -1) -> float:
        if batched is not None:  # rows along the last axis, one resample per leading index
            return batched(rows_true, rows_a) - batched(rows_true, rows_b)
        return score(rows_true, rows_a) - score(rows_true, rows_b)

    diff = score(y_true, pred_a) - score(y_true, pred_b)
    with warnings.catch_warnings():  # a degenerate distribution warns and gives NaN: handled below
        warnings.simplefilter("ignore")
        result = stats.bootstrap((y_true, pred_a, pred_b), difference, n_resamples=samples, paired=True,
                                 vectorized=batched is not None, batch=100, confidence_level=confidence,
                                 method="BCa", rng=np.random.default_rng(seed))
    low, high = result.confidence_interval
    draws = result.bootstrap_distribution
    if np.ptp(draws) == 0:
        low = high = float(draws[0])
    elif not (np.isfinite(low) and np.isfinite(high)):  # BCa undefined (flat jackknife): percentile
        tail = (1.0 - confidence) / 2
        low, high = np.quantile(draws, tail), np.quantile(draws, 1 - tail)
    p_value = (int((draws >= 0).sum()) + 1) / (draws.size + 1)
    return {"diff": diff, "low": float(low), "high": float(high), "samples": samples, "confidence": confidence,
            "p_not_below_zero": float(p_value)}


def interval_position(low: float, high: float, floor: float = 0.0) -> str:
    """Where a confidence interval [low, high] lies against `floor`, as reasons say it:
    "lies above zero", "lies below zero" or "includes zero" (the floor written out when not 0)."""
    where = "lies above" if low > floor else "lies below" if high < floor else "includes"
    return f"{where} {'zero' if floor == 0 else f'{floor:+.4f}'}"


# --- performance without labels (confidence-based performance estimation, as NannyML's CBPE) -------


@dataclass(frozen=True)
class EstimatedPerformance:
    """Accuracy and macro-F1 expected from calibrated probabilities alone, and the
    range (`confidence` level) the rows' true scores fall in if the probabilities
    are calibrated on these rows."""

    rows: int
    accuracy: float
    accuracy_low: float
    accuracy_high: float
    macro_f1: float
    macro_f1_low: float
    macro_f1_high: float
    confidence: float

    def to_dict(self) -> dict:
        return asdict(self)


def expected_confusion(probs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Expected true positives, false positives and false negatives per class, (classes,)
    each, when row i's true class is drawn from probs[i] and its prediction is argmax.

    TP_k sums p_k over rows predicted k, FP_k sums 1 - p_k over them, FN_k sums p_k
    over the rows not predicted k.
    """
    probs = np.asarray(probs, dtype=np.float64)  # (rows, classes)
    predicted = np.eye(probs.shape[1], dtype=bool)[probs.argmax(1)]  # (rows, classes) one-hot
    tp = np.where(predicted, probs, 0.0).sum(0)
    fp = predicted.sum(0) - tp
    fn = probs.sum(0) - tp
    return tp, fp, fn


def expected_macro_f1(probs: np.ndarray) -> float:
    """Macro-F1 of the expected confusion (CBPE). A class counts when it is predicted
    at least once or its expected support is half a row or more (so a class that is
    neither predicted nor likely present is not averaged in as an F1 of 0)."""
    tp, fp, fn = expected_confusion(probs)
    present = (tp + fp > 0) | (tp + fn >= 0.5)
    f1 = np.divide(2 * tp, 2 * tp + fp + fn, out=np.zeros_like(tp), where=2 * tp + fp + fn > 0)
    return float(f1[present].mean()) if present.any() else 0.0


SIMULATION_BUDGET = 200_000_000  # drawn labels x classes per estimate: a 1M-row binary window took 3 s (2 busy cores)


def simulated_scores(probs: np.ndarray, samples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(draws,) accuracy and (draws,) macro-F1 of the argmax predictions against
    labels drawn row by row from `probs`: what the true scores would be, were the
    probabilities calibrated (for accuracy, the Poisson-binomial distribution).
    `samples` draws, fewer (at least 100) when rows x classes x samples passes
    SIMULATION_BUDGET: a window that large has a narrow range anyway."""
    rng = np.random.default_rng(seed)
    rows, classes = probs.shape
    samples = min(samples, max(100, SIMULATION_BUDGET // max(1, rows * classes)))
    predicted = probs.argmax(1)  # (rows,)
    cumulative = np.cumsum(probs, axis=1)[None]  # (1, rows, classes)
    per_draw = max(1, 4_000_000 // max(1, rows * classes))  # bounds memory at ~4M booleans per batch
    accuracy_out, f1_out = [], []
    for start in range(0, samples, per_draw):
        u = rng.random((min(per_draw, samples - start), rows, 1)) * cumulative[..., -1:]  # (draws, rows, 1)
        drawn = np.minimum((u >= cumulative).sum(-1), classes - 1)  # (draws, rows) inverse-CDF labels
        accuracy_out.append((drawn == predicted).mean(-1))
        f1_out.append(batched_macro_f1(drawn, np.broadcast_to(predicted, drawn.shape), classes))
    return np.concatenate(accuracy_out), np.concatenate(f1_out)


def estimate_performance(probs: np.ndarray, samples: int = 1000, confidence: float = 0.95,
                         seed: int = 0) -> EstimatedPerformance:
    """Accuracy (mean top probability) and macro-F1 (of the expected confusion)
    from calibrated probabilities, without labels; the interval is the percentile
    range of the scores against `samples` label sets drawn from the probabilities.

    Only as good as the calibration: probabilities fitted on the training domain
    and overconfident on a shifted one overestimate both.

    Args:
        probs: (rows, classes) calibrated probabilities, each row summing to 1.
    Raises:
        ValueError: no rows.
    """
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or not len(probs):
        raise ValueError(f"performance estimation needs (rows, classes) probabilities, got shape {probs.shape}")
    accuracy_draws, f1_draws = simulated_scores(probs, samples, seed)
    tail = (1.0 - confidence) / 2
    (acc_low, acc_high), (f1_low, f1_high) = (np.quantile(d, [tail, 1 - tail]) for d in (accuracy_draws, f1_draws))
    return EstimatedPerformance(
        rows=len(probs), accuracy=float(probs.max(1).mean()), accuracy_low=float(acc_low),
        accuracy_high=float(acc_high), macro_f1=expected_macro_f1(probs), macro_f1_low=float(f1_low),
        macro_f1_high=float(f1_high), confidence=confidence)
