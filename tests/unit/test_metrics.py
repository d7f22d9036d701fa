"""Classification metrics on small examples worked out by hand, and the
scikit-learn / SciPy versions against the hand-written numpy ones they replaced."""

from __future__ import annotations

import numpy as np
import pytest

from tuneloop.model.metrics import (
    accuracy,
    classification_summary,
    confusion_matrix,
    interval_position,
    macro_f1,
    metric_function,
    paired_bootstrap,
    per_class_scores,
    reliability,
)

# Three classes; class 2 occurs twice but is never predicted.
#   true 0 -> predicted 0, 1      true 1 -> 1, 1      true 2 -> 0, 0
Y_TRUE = np.array([0, 0, 1, 1, 2, 2])
Y_PRED = np.array([0, 1, 1, 1, 0, 0])


def test_confusion_matrix_counts_true_labels_in_rows_and_predictions_in_columns() -> None:
    matrix = confusion_matrix(Y_TRUE, Y_PRED, 3)
    assert matrix.tolist() == [[1, 1, 0], [0, 2, 0], [2, 0, 0]]


def test_confusion_matrix_has_zero_rows_for_classes_absent_from_the_data() -> None:
    matrix = confusion_matrix(np.array([1, 1]), np.array([1, 0]), 3)
    assert matrix.tolist() == [[0, 0, 0], [1, 1, 0], [0, 0, 0]]


def test_per_class_scores_match_hand_computation_and_never_predicted_class_scores_zero() -> None:
    precision, recall, f1 = per_class_scores(Y_TRUE, Y_PRED, 3)
    # precision: tp / predicted = 1/3, 2/3, 0/0 -> 0
    np.testing.assert_allclose(precision, [1 / 3, 2 / 3, 0.0])
    # recall: tp / actual = 1/2, 2/2, 0/2
    np.testing.assert_allclose(recall, [0.5, 1.0, 0.0])
    # f1: 2pr/(p+r) = 0.4, 0.8, 0
    np.testing.assert_allclose(f1, [0.4, 0.8, 0.0])


def test_macro_f1_averages_every_class_present_including_the_never_predicted_one() -> None:
    assert macro_f1(Y_TRUE, Y_PRED, 3) == pytest.approx((0.4 + 0.8 + 0.0) / 3)


def test_macro_f1_ignores_classes_absent_from_both_truth_and_predictions() -> None:
    # a fourth, unused class must not drag the mean down with a 0
    assert macro_f1(Y_TRUE, Y_PRED, 4) == pytest.approx(0.4)


def test_macro_f1_is_one_for_perfect_predictions_and_zero_for_empty_input() -> None:
    assert macro_f1(Y_TRUE, Y_TRUE, 3) == 1.0
    assert macro_f1(np.array([], dtype=int), np.array([], dtype=int), 2) == 0.0


def test_accuracy_is_share_of_matching_rows_and_zero_when_empty() -> None:
    assert accuracy(Y_TRUE, Y_PRED) == pytest.approx(0.5)
    assert accuracy(np.array([]), np.array([])) == 0.0


def test_ece_is_gap_between_confidence_and_accuracy_in_a_single_bin() -> None:
    # every row predicts class 1 with confidence 0.9; 6 of 10 are right
    probs = np.tile([0.1, 0.9], (10, 1))
    y_true = np.array([1] * 6 + [0] * 4)
    result = reliability(probs, y_true)
    assert result["ece"] == pytest.approx(0.3)
    assert sum(result["bin_count"]) == 10
    (filled,) = [i for i, n in enumerate(result["bin_count"]) if n]
    assert result["bin_count"][filled] == 10
    assert result["bin_confidence"][filled] == pytest.approx(0.9)
    assert result["bin_accuracy"][filled] == pytest.approx(0.6)


def test_ece_weights_each_bin_by_its_share_of_rows_and_empty_bins_are_none() -> None:
    # 2 rows at 0.55 (1 right) and 2 rows at 0.95 (both right):
    # ECE = 0.5 * |0.5 - 0.55| + 0.5 * |1.0 - 0.95| = 0.05
    probs = np.array([[0.45, 0.55], [0.55, 0.45], [0.05, 0.95], [0.95, 0.05]])
    y_true = np.array([1, 1, 1, 0])
    result = reliability(probs, y_true, bins=10)
    assert result["ece"] == pytest.approx(0.05)
    assert result["bin_count"] == [0, 0, 0, 0, 0, 2, 0, 0, 0, 2]
    assert result["bin_accuracy"][5] == pytest.approx(0.5)
    assert result["bin_accuracy"][9] == pytest.approx(1.0)
    assert result["bin_confidence"][0] is None and result["bin_accuracy"][0] is None


def test_ece_is_zero_for_perfectly_calibrated_confident_predictions() -> None:
    probs = np.array([[0.0, 1.0], [1.0, 0.0]])
    assert reliability(probs, np.array([1, 0]))["ece"] == 0.0


def test_classification_summary_reports_per_class_scores_support_and_matrix() -> None:
    labels = ["negative", "neutral", "positive"]
    probs = np.eye(3)[Y_PRED] * 0.8 + 0.2 / 3  # argmax = Y_PRED, confidence 0.8667
    summary = classification_summary(probs, Y_TRUE, labels)
    assert summary["accuracy"] == pytest.approx(0.5)
    assert summary["macro_f1"] == pytest.approx(0.4)
    assert summary["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [2, 0, 0]]
    assert summary["per_class"]["positive"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 2}
    assert summary["per_class"]["neutral"]["f1"] == pytest.approx(0.8)
    # all rows share one confidence, half are right
    assert summary["ece"] == pytest.approx(0.8 + 0.2 / 3 - 0.5)
    assert set(summary["reliability"]) == {"bin_confidence", "bin_accuracy", "bin_count"}


# --- paired bootstrap ------------------------------------------------------------


def _pair(n: int = 200, wrong_b: int = 60) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Model a is always right; model b is wrong on `wrong_b` spread-out rows."""
    y_true = np.arange(n) % 2
    pred_b = y_true.copy()
    pred_b[:: n // wrong_b][:wrong_b] ^= 1
    return y_true, y_true.copy(), pred_b


def test_paired_bootstrap_interval_excludes_zero_for_a_clearly_better_model() -> None:
    y_true, pred_a, pred_b = _pair()
    ci = paired_bootstrap(y_true, pred_a, pred_b, accuracy, samples=500, seed=0)
    assert ci["diff"] == pytest.approx(1.0 - accuracy(y_true, pred_b))
    assert ci["diff"] == pytest.approx(0.3)
    assert 0 < ci["low"] < ci["diff"] < ci["high"]
    assert (ci["samples"], ci["confidence"]) == (500, 0.95)


def test_paired_bootstrap_of_identical_predictions_is_zero_and_includes_zero() -> None:
    y_true, _, pred_b = _pair()
    ci = paired_bootstrap(y_true, pred_b, pred_b.copy(), accuracy, samples=200, seed=3)
    assert ci["diff"] == 0.0
    assert (ci["low"], ci["high"]) == (0.0, 0.0)
    assert ci["low"] <= 0 <= ci["high"]


def test_paired_bootstrap_is_deterministic_for_a_seed_and_varies_across_seeds() -> None:
    y_true = np.arange(120) % 2
    rng = np.random.default_rng(7)
    pred_a = np.where(rng.random(120) < 0.8, y_true, 1 - y_true)
    pred_b = np.where(rng.random(120) < 0.7, y_true, 1 - y_true)
    score = metric_function("macro_f1", 2)
    first = paired_bootstrap(y_true, pred_a, pred_b, score, samples=300, seed=11)
    again = paired_bootstrap(y_true, pred_a, pred_b, score, samples=300, seed=11)
    other = paired_bootstrap(y_true, pred_a, pred_b, score, samples=300, seed=12)
    assert first == again
    assert (first["low"], first["high"]) != (other["low"], other["high"])
    assert first["diff"] == other["diff"]  # the point estimate does not depend on resampling


def test_paired_bootstrap_wider_confidence_gives_a_wider_interval() -> None:
    y_true, pred_a, pred_b = _pair(wrong_b=20)
    narrow = paired_bootstrap(y_true, pred_a, pred_b, accuracy, samples=400, confidence=0.8, seed=1)
    wide = paired_bootstrap(y_true, pred_a, pred_b, accuracy, samples=400, confidence=0.99, seed=1)
    assert wide["low"] <= narrow["low"] and wide["high"] >= narrow["high"]
    assert wide["high"] - wide["low"] > narrow["high"] - narrow["low"]


# --- metric names --------------------------------------------------------------


def test_metric_function_accuracy_scores_share_of_correct_rows() -> None:
    assert metric_function("accuracy", 3)(Y_TRUE, Y_PRED) == pytest.approx(0.5)


def test_metric_function_macro_f1_uses_the_given_number_of_classes() -> None:
    assert metric_function("macro_f1", 3)(Y_TRUE, Y_PRED) == pytest.approx(0.4)


def test_metric_function_rejects_an_unknown_name() -> None:
    with pytest.raises(ValueError, match="unknown metric 'auc'"):
        metric_function("auc", 2)


def test_interval_position_says_where_the_interval_lies_against_its_floor() -> None:
    assert interval_position(0.01, 0.05) == "lies above zero"
    assert interval_position(-0.05, -0.01) == "lies below zero"
    assert interval_position(-0.01, 0.05) == "includes zero"
    assert interval_position(-0.01, 0.05, floor=-0.02) == "lies above -0.0200"


# --- scikit-learn and SciPy against the numpy code they replaced ------------------


def numpy_scores(y_true: np.ndarray, y_pred: np.ndarray, n: int) -> dict:
    """The hand-written implementation tuneloop used before scikit-learn, kept as the reference."""
    matrix = np.zeros((n, n), dtype=np.int64)
    np.add.at(matrix, (y_true, y_pred), 1)
    tp, predicted, actual = np.diag(matrix).astype(float), matrix.sum(0).astype(float), matrix.sum(1).astype(float)
    precision = np.divide(tp, predicted, out=np.zeros(n), where=predicted > 0)
    recall = np.divide(tp, actual, out=np.zeros(n), where=actual > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros(n), where=precision + recall > 0)
    present = (predicted + actual) > 0
    return {"matrix": matrix, "precision": precision, "recall": recall, "f1": f1,
            "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
            "accuracy": float((y_true == y_pred).mean()) if len(y_true) else 0.0}


def numpy_percentile_bootstrap(y_true, pred_a, pred_b, score, samples: int, confidence: float, seed: int):
    """The percentile paired bootstrap the gate used before SciPy's BCa."""
    rng, n = np.random.default_rng(seed), len(y_true)
    diffs = np.empty(samples)
    for i in range(samples):
        rows = rng.integers(0, n, n)
        diffs[i] = score(y_true[rows], pred_a[rows]) - score(y_true[rows], pred_b[rows])
    tail = (1.0 - confidence) / 2
    return float(np.quantile(diffs, tail)), float(np.quantile(diffs, 1 - tail))


@pytest.mark.parametrize("case", [
    "random 4 classes", "class 3 never predicted", "class 0 absent from truth", "class 2 in neither", "empty"])
def test_sklearn_scores_equal_the_numpy_ones_including_absent_classes_and_zero_division(case: str) -> None:
    rng = np.random.default_rng(1)
    y_true, y_pred = rng.integers(0, 4, 300), rng.integers(0, 4, 300)
    if case == "class 3 never predicted":
        y_pred[y_pred == 3] = 1
    elif case == "class 0 absent from truth":
        y_true[y_true == 0] = 2
    elif case == "class 2 in neither":
        y_true[y_true == 2], y_pred[y_pred == 2] = 0, 1
    elif case == "empty":
        y_true, y_pred = y_true[:0], y_pred[:0]
    ref = numpy_scores(y_true, y_pred, 4)
    precision, recall, f1 = per_class_scores(y_true, y_pred, 4)
    assert confusion_matrix(y_true, y_pred, 4).tolist() == ref["matrix"].tolist()
    np.testing.assert_allclose(precision, ref["precision"], atol=1e-12)
    np.testing.assert_allclose(recall, ref["recall"], atol=1e-12)
    np.testing.assert_allclose(f1, ref["f1"], atol=1e-12)
    assert macro_f1(y_true, y_pred, 4) == pytest.approx(ref["macro_f1"], abs=1e-12)
    assert accuracy(y_true, y_pred) == pytest.approx(ref["accuracy"], abs=1e-12)


def test_bca_bootstrap_interval_agrees_with_the_old_percentile_interval_within_a_hundredth() -> None:
    rng = np.random.default_rng(7)
    y_true = rng.integers(0, 3, 1000)
    pred_a = np.where(rng.random(1000) < 0.85, y_true, rng.integers(0, 3, 1000))
    pred_b = np.where(rng.random(1000) < 0.80, y_true, rng.integers(0, 3, 1000))
    score = metric_function("macro_f1", 3)
    ci = paired_bootstrap(y_true, pred_a, pred_b, score, samples=1000, confidence=0.95, seed=0)
    old_low, old_high = numpy_percentile_bootstrap(y_true, pred_a, pred_b, score, 1000, 0.95, 0)
    assert ci["diff"] == pytest.approx(score(y_true, pred_a) - score(y_true, pred_b))
    assert ci["low"] == pytest.approx(old_low, abs=0.01)
    assert ci["high"] == pytest.approx(old_high, abs=0.01)
    assert ci["low"] < ci["diff"] < ci["high"]


def test_bootstrap_of_all_equal_scores_returns_a_point_interval_instead_of_nan() -> None:
    y_true = np.ones(50, dtype=int)  # one class only, both models always right: every draw scores 0
    ci = paired_bootstrap(y_true, y_true.copy(), y_true.copy(), accuracy, samples=100, seed=0)
    assert (ci["diff"], ci["low"], ci["high"]) == (0.0, 0.0, 0.0)


@pytest.mark.parametrize("name", ["macro_f1", "accuracy"])
def test_batched_scores_equal_the_scikit_learn_score_of_each_resample(name: str) -> None:
    rng = np.random.default_rng(3)
    y_true, y_pred = rng.integers(0, 3, (20, 40)), rng.integers(0, 3, (20, 40))
    y_true[0] = 1  # a resample holding one class only
    score = metric_function(name, 3)
    expected = [score(t, p) for t, p in zip(y_true, y_pred)]
    np.testing.assert_allclose(score.batched(y_true, y_pred), expected, atol=1e-12)


def test_bootstrap_with_a_plain_scorer_gives_the_same_interval_as_the_batched_one() -> None:
    y_true, pred_a, pred_b = _pair(120, 30)
    score = metric_function("macro_f1", 2)
    fast = paired_bootstrap(y_true, pred_a, pred_b, score, samples=200, seed=4)
    plain = paired_bootstrap(y_true, pred_a, pred_b, lambda t, p: score(t, p), samples=200, seed=4)
    assert fast["low"] == pytest.approx(plain["low"]) and fast["high"] == pytest.approx(plain["high"])
