"""Calibrated confidences and "none of these" (tuneloop/model/calibration.py), on rows whose truth is known.

The rows are drawn from a known model: each row's true class has logit `margin`,
the others 0, plus Gaussian noise, so the calibrated probability is computable
and an over-confident model is the same logits times a factor.
"""

from __future__ import annotations

import numpy as np
import pytest

from tuneloop.model.calibration import (
    Abstention,
    abstains,
    choose_abstention,
    decided_labels,
    fit_temperature,
    in_scope_accuracy,
    risk_coverage,
    selective_summary,
    softmax,
    uncalibrated,
)
from tuneloop.model.metrics import reliability

LABELS = ["a", "b", "c", "d", "oos"]


def rows(n: int, classes: int, margin: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(logits, y): noisy logits where the true class leads by `margin` on average."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    logits = rng.normal(0.0, 1.0, (n, classes))
    logits[np.arange(n), y] += margin
    return logits, y


def test_temperature_scaling_undoes_over_confidence_and_changes_no_answer() -> None:
    logits, y = rows(4000, 4, 1.5, seed=0)
    overconfident = logits * 6.0
    temperature = fit_temperature(overconfident, y)

    before = reliability(softmax(overconfident), y)["ece"]
    after = reliability(softmax(overconfident, temperature), y)["ece"]
    assert 3.0 < temperature < 12.0
    assert before > 0.15 and after < 0.03
    assert (softmax(overconfident, temperature).argmax(1) == overconfident.argmax(1)).all()
    # the stored probabilities give back the uncalibrated ones
    assert uncalibrated(softmax(overconfident, temperature), temperature) == pytest.approx(
        softmax(overconfident), abs=1e-4)


def test_too_few_rows_or_one_class_keep_temperature_one() -> None:
    assert fit_temperature(np.array([[3.0, 0.0]]), np.array([0])) == 1.0
    assert fit_temperature(np.array([[3.0, 0.0], [2.0, 0.0]]), np.array([0, 0])) == 1.0


def open_set(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities over LABELS: in-scope rows are clear, out-of-scope rows (truth 'oos') look
    like a weak in-scope answer unless their oos logit wins (a quarter lean to it; ~44% win it)."""
    rng = np.random.default_rng(seed)
    inside_logits, inside_y = rows(800, 4, 4.0, seed)
    inside = np.hstack([inside_logits, rng.normal(-2.0, 1.0, (800, 1))])
    outside = rng.normal(0.0, 1.0, (200, 5))
    outside[:50, 4] += 5.0  # a quarter look like the oos class the model learned
    probs = softmax(np.vstack([inside, outside]))
    return probs, np.concatenate([inside_y, np.full(200, 4)])


def test_with_an_out_of_scope_label_the_threshold_catches_more_of_it_within_the_accuracy_budget() -> None:
    probs, y = open_set(seed=1)
    chosen = choose_abstention(probs, y, LABELS, "oos", max_accuracy_drop=0.02)
    oos = LABELS.index("oos")

    recall_label_only = abstains(probs, 0.0, oos)[y == oos].mean()
    recall = abstains(probs, chosen.threshold, oos)[y == oos].mean()
    assert chosen.out_of_scope == "oos" and chosen.threshold > 0.3
    assert 0.35 < recall_label_only < 0.55 and recall > 0.8
    assert in_scope_accuracy(probs, y, 0.0, oos) - in_scope_accuracy(probs, y, chosen.threshold, oos) <= 0.02 + 1e-9
    assert "the most abstentions" in chosen.rule and "out-of-scope label wins" in chosen.rule
    # and on fresh rows of the same kind the threshold holds up
    fresh, fresh_y = open_set(seed=2)
    summary = selective_summary(fresh, fresh_y, chosen, LABELS)
    assert summary["oos_recall"] > 0.75 and summary["in_scope_accuracy"] > summary[
        "in_scope_accuracy_without_threshold"] - 0.03


def test_without_an_out_of_scope_label_it_abstains_on_an_unseen_class_learned_only_from_in_scope_rows() -> None:
    """Validation has in-scope rows only; the threshold still sends most rows of a class the
    model never saw to "abstained", because they are its least confident answers."""
    probs, y = open_set(seed=3)
    validation = y != 4
    in_scope = softmax(np.log(probs[validation][:, :4]))  # a 4-label model: no oos label at all
    chosen = choose_abstention(in_scope, y[validation], LABELS[:4], None, max_accuracy_drop=0.02)

    test, test_y = open_set(seed=4)
    unseen = softmax(np.log(test[test_y == 4][:, :4]))
    assert chosen.out_of_scope is None and chosen.threshold > 0.4
    assert abstains(unseen, chosen.threshold, None).mean() > 0.6
    assert chosen.validation_abstain_rate <= 0.03


def test_no_accuracy_budget_never_abstains_on_confidence_but_the_oos_label_still_abstains() -> None:
    probs, y = open_set(seed=5)
    assert choose_abstention(probs, y, LABELS[:4] + ["x"], None, 0.0) == Abstention(
        0.0, None, "never abstains on confidence", 0.0)
    with_label = choose_abstention(probs, y, LABELS, "oos", 0.0)
    assert with_label.threshold == 0.0
    assert with_label.validation_abstain_rate == pytest.approx(float((probs.argmax(1) == 4).mean()))


def test_a_user_acting_on_abstained_gets_the_out_of_scope_label() -> None:
    probs = np.array([[0.9, 0.05, 0.05], [0.4, 0.35, 0.25], [0.1, 0.1, 0.8]], dtype=np.float32)
    stop = Abstention(threshold=0.5, out_of_scope="none")
    assert decided_labels(probs, stop, ["x", "y", "none"]).tolist() == [0, 2, 2]
    assert decided_labels(probs, Abstention(threshold=0.5), ["x", "y", "z"]).tolist() == [0, 0, 2]


def test_risk_falls_as_coverage_narrows_to_the_most_confident_answers() -> None:
    logits, y = rows(2000, 4, 1.5, seed=6)
    curve = risk_coverage(softmax(logits), y, points=10)
    assert [round(p["coverage"], 2) for p in curve] == [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
    assert curve[0]["risk"] < curve[-1]["risk"] / 2
    assert curve[-1]["risk"] == pytest.approx(float((logits.argmax(1) != y).mean()))
