"""Performance without labels (CBPE): the estimator on synthetic probabilities whose
calibration is known, the estimated-drop decision as a table, and the monitor
turning a window whose estimate dropped into a retraining request (seconds)."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import yaml

from tuneloop.flows import monitor as monitor_flow_module
from tuneloop.model.calibration import softmax
from tuneloop.model.metrics import (
    EstimatedPerformance,
    accuracy,
    estimate_performance,
    expected_confusion,
    expected_macro_f1,
    macro_f1,
)
from tuneloop.pipeline import monitoring
from tuneloop.pipeline.params import parse_params
from tuneloop.service.store import Prediction, PredictionStore, utcnow
from tuneloop.tasks.drift import decide_drift, decide_estimated_drop, probability_matrix
from tuneloop.tasks.registry import VersionInfo
from tuneloop.tasks.triggers import decide_retraining
from tuneloop.values.config import MonitorConfig
from tuneloop.values.workspace import Workspace


def calibrated_rows(rows: int, classes: int, seed: int, scale: float = 2.0, bias: float = 0.0):
    """Probabilities and labels drawn from them (so perfectly calibrated), and the logits.
    `bias` raises class 0's logit: imbalanced classes."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, scale, (rows, classes))
    logits[:, 0] += bias
    probs = softmax(logits).astype(np.float64)
    cumulative = probs.cumsum(1)
    y = np.minimum((rng.random((rows, 1)) * cumulative[:, -1:] >= cumulative).sum(1), classes - 1)
    return probs, y, logits


# --- the estimator ----------------------------------------------------------------------------------

CALIBRATED_CASES = {
    # name: (classes, logit scale, class-0 bias)
    "binary, balanced": (2, 2.0, 0.0),
    "binary, confident": (2, 4.0, 0.0),
    "binary, 80/20 classes": (2, 2.0, 1.5),
    "three classes": (3, 2.0, 0.0),
    "ten classes, imbalanced": (10, 2.5, 1.0),
}


@pytest.mark.parametrize("case", CALIBRATED_CASES)
def test_calibrated_probabilities_estimate_the_true_scores_over_many_rows(case: str) -> None:
    classes, scale, bias = CALIBRATED_CASES[case]
    probs, y, _ = calibrated_rows(20_000, classes, seed=classes, scale=scale, bias=bias)
    estimate = estimate_performance(probs, samples=200)
    predicted = probs.argmax(1)
    true_accuracy, true_f1 = accuracy(y, predicted), macro_f1(y, predicted, classes)
    assert estimate.rows == 20_000
    assert estimate.accuracy == pytest.approx(true_accuracy, abs=0.01)
    assert estimate.macro_f1 == pytest.approx(true_f1, abs=0.015)
    assert estimate.accuracy_low <= true_accuracy <= estimate.accuracy_high
    assert estimate.macro_f1_low <= true_f1 <= estimate.macro_f1_high


@pytest.mark.parametrize("temperature, direction", [(0.5, 1), (0.25, 1), (2.0, -1)])
def test_overconfident_probabilities_overestimate_and_underconfident_underestimate(temperature: float,
                                                                                  direction: int) -> None:
    """Labels drawn from softmax(logits); the estimator sees softmax(logits / T):
    T < 1 is overconfident (as a model is on a domain it was not calibrated on)."""
    probs, y, logits = calibrated_rows(20_000, 2, seed=7)
    estimate = estimate_performance(softmax(logits, temperature), samples=200)
    predicted = probs.argmax(1)  # temperature changes no prediction
    gap_accuracy = estimate.accuracy - accuracy(y, predicted)
    gap_f1 = estimate.macro_f1 - macro_f1(y, predicted, 2)
    assert direction * gap_accuracy > 0.05 and direction * gap_f1 > 0.05
    assert not estimate.accuracy_low <= accuracy(y, predicted) <= estimate.accuracy_high


def test_the_interval_holds_the_true_accuracy_of_most_small_calibrated_windows() -> None:
    covered = []
    for seed in range(40):
        probs, y, _ = calibrated_rows(300, 2, seed=100 + seed)
        estimate = estimate_performance(probs, samples=300, confidence=0.9, seed=seed)
        covered.append(estimate.accuracy_low <= accuracy(y, probs.argmax(1)) <= estimate.accuracy_high)
    assert 0.75 <= np.mean(covered) <= 1.0  # nominal 90%: 36 of 40 expected


def test_expected_confusion_sums_probabilities_by_prediction() -> None:
    probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8]])
    tp, fp, fn = expected_confusion(probs)
    assert tp == pytest.approx([1.5, 0.8])  # rows predicted 0: 0.9 + 0.6; row predicted 1: 0.8
    assert fp == pytest.approx([0.5, 0.2])
    assert fn == pytest.approx([0.2, 0.5])  # class 0's mass on the row predicted 1; class 1's on rows predicted 0
    assert expected_macro_f1(probs) == pytest.approx((3.0 / 3.7 + 1.6 / 2.3) / 2)


def test_certain_probabilities_estimate_perfect_scores_with_no_spread() -> None:
    estimate = estimate_performance(np.eye(3)[[0, 1, 2, 2, 1]], samples=100)
    assert (estimate.accuracy, estimate.accuracy_low, estimate.accuracy_high) == (1.0, 1.0, 1.0)
    assert (estimate.macro_f1, estimate.macro_f1_low, estimate.macro_f1_high) == (1.0, 1.0, 1.0)


def test_a_class_neither_predicted_nor_likely_is_not_averaged_in() -> None:
    probs = np.array([[0.9, 0.1, 0.0], [0.2, 0.8, 0.0]] * 50)
    assert expected_macro_f1(probs) == pytest.approx(expected_macro_f1(probs[:, :2]))


def test_the_same_seed_gives_the_same_interval_and_no_rows_is_refused() -> None:
    probs, _, _ = calibrated_rows(500, 3, seed=1)
    assert estimate_performance(probs, samples=100, seed=3) == estimate_performance(probs, samples=100, seed=3)
    with pytest.raises(ValueError, match="rows, classes"):
        estimate_performance(np.zeros((0, 2)))


def test_logged_probabilities_with_only_the_top_label_are_completed() -> None:
    logged = [{"neg": 0.3, "pos": 0.7}, {"pos": 0.9}, None]
    probs = probability_matrix(logged, ["pos", "pos", "neg"], [0.7, 0.9, 0.6], ["neg", "pos"])
    assert probs == pytest.approx(np.array([[0.3, 0.7], [0.1, 0.9], [0.6, 0.4]]))


# --- the decision -----------------------------------------------------------------------------------

CONFIG = MonitorConfig(min_rows=100, max_estimated_accuracy_drop=0.05)  # not the default: round numbers


def estimated(accuracy_value: float, rows: int = 500) -> EstimatedPerformance:
    return EstimatedPerformance(rows, accuracy_value, accuracy_value - 0.03, accuracy_value + 0.03, accuracy_value,
                                accuracy_value - 0.03, accuracy_value + 0.03, 0.95)


DROP_CASES = {
    # name: (estimated accuracy, window rows, champion's test accuracy, config, drop?, note expected?)
    "as on test": (0.85, 500, 0.86, CONFIG, False, False),
    "above test": (0.90, 500, 0.86, CONFIG, False, False),
    "exactly the threshold below": (0.81, 500, 0.86, CONFIG, False, False),
    "just past the threshold": (0.80, 500, 0.86, CONFIG, True, False),
    "far below": (0.70, 500, 0.86, CONFIG, True, False),
    "too few rows": (0.50, 99, 0.86, CONFIG, False, True),
    "no test accuracy recorded": (0.50, 500, None, CONFIG, False, True),
    "switched off": (0.50, 500, 0.86, replace(CONFIG, max_estimated_accuracy_drop=None), False, True),
}


@pytest.mark.parametrize("case", DROP_CASES)
def test_decide_estimated_drop(case: str) -> None:
    value, rows, reference, config, drop, noted = DROP_CASES[case]
    decision = decide_estimated_drop(estimated(value, rows), reference, rows, config)
    assert decision.yes is drop
    assert bool(decision.note) is noted
    assert (decision.check("estimated_accuracy") is None) is noted


def test_an_estimated_drop_reason_names_estimate_interval_reference_and_threshold() -> None:
    (reason,) = decide_estimated_drop(estimated(0.70), 0.86, 500, CONFIG).reasons
    assert reason.startswith("DROP  ")
    for part in ("estimated accuracy 0.700", "0.670-0.730", "500 predictions", "0.160 below", "0.860",
                 "more than 0.05"):
        assert part in reason


def test_an_estimated_drop_is_a_retraining_reason_as_drift_is() -> None:
    triggers = parse_params({}).triggers
    assert decide_retraining(500, drift_significant=False, config=triggers, estimated_drop=True).yes
    assert not decide_retraining(500, drift_significant=False, config=replace(triggers, retrain_on_new_data=False)).yes
    assert not decide_retraining(10, drift_significant=False, config=triggers, estimated_drop=True).yes


# --- the monitor --------------------------------------------------------------------------------------


def monitor_project(tmp_path, confidence: float, rows: int = 400, labelled: int = 250):
    """A store holding `rows` served predictions of version 1, all at `confidence`
    (half logged with both labels, half with the top label only), `labelled` of
    them with feedback; the monitor's params and the champion at test accuracy 0.86."""
    params = parse_params({"serve": {"store_url": f"sqlite:///{tmp_path}/p.db"},
                           "monitor": {"window_hours": None, "min_rows": 200, "bootstrap_samples": 200},
                           "triggers": {"retrain_on_new_data": False}})
    store = PredictionStore(params.serve.store_url)
    now = utcnow()
    store.log(Prediction(f"r-{i}", 0, f"text {i}", "pos", confidence,
                         {"pos": confidence, "neg": 1 - confidence} if i % 2 else {"pos": confidence}, "1",
                         ts=now - timedelta(seconds=rows - i)) for i in range(rows))
    for i in range(labelled):
        store.attach_feedback(f"r-{i}", ["neg" if i % 3 == 0 else "pos"])
    champion = VersionInfo("1", None, "models:/x/1", {"test.accuracy": "0.860000"}, ("champion",))
    return params, Workspace(tmp_path), champion


@pytest.mark.parametrize("confidence, requested", [(0.65, True), (0.87, False)])
def test_a_window_whose_estimated_accuracy_dropped_requests_retraining(tmp_path, monkeypatch, confidence: float,
                                                                       requested: bool) -> None:
    params, workspace, champion = monitor_project(tmp_path, confidence)
    labels = ("neg", "pos")
    window = monitoring.read_window(params, workspace, "1")
    estimate = monitoring.estimate_window(params, workspace, window, labels)
    assert estimate.rows == 400 and estimate.accuracy == pytest.approx(confidence)
    decision = decide_estimated_drop(estimate, monitoring.tested_accuracy(champion), len(window), params.monitor)
    asked = []
    monkeypatch.setattr(monitor_flow_module, "request_retraining",
                        lambda workspace, params_path, name, reason: asked.append(reason) or {"mode": "test"})
    quiet = decide_drift(None, 0, params.monitor)  # no drift verdict: only the estimate can ask
    result = monitor_flow_module.trigger_retraining.fn(params, workspace, "params.yaml", quiet, labels, decision)
    assert decision.yes is requested and result["requested"] is requested
    if requested:
        assert asked == [f"estimated accuracy drop; 250 new labelled rows exported to {Path(result['exported']).name}"]
        assert "estimated accuracy dropped below the champion's" in result["reasons"]
    else:
        assert asked == [] and result["reasons"] == ["drift: insufficient data", "no estimated accuracy drop"]


def test_with_more_than_two_labels_the_window_is_estimated_from_its_logged_probabilities(tmp_path) -> None:
    params = parse_params({"serve": {"store_url": f"sqlite:///{tmp_path}/p.db"},
                           "monitor": {"window_hours": None, "bootstrap_samples": 100}})
    probs, _, _ = calibrated_rows(300, 3, seed=4)
    labels = ("a", "b", "c")
    store = PredictionStore(params.serve.store_url)
    store.log(Prediction(f"r-{i}", 0, "t", labels[row.argmax()], float(row.max()), dict(zip(labels, row.tolist())),
                         "1") for i, row in enumerate(probs))
    window = monitoring.read_window(params, Workspace(tmp_path), "1")
    estimate = monitoring.estimate_window(params, Workspace(tmp_path), window, labels)
    assert estimate.accuracy == pytest.approx(probs.max(1).mean())
    assert estimate.macro_f1 == pytest.approx(expected_macro_f1(probs))  # not the top-label-only completion
    assert estimate.macro_f1 != pytest.approx(expected_macro_f1(
        probability_matrix(None, [labels[j] for j in probs.argmax(1)], probs.max(1), labels)))


def test_the_shipped_params_yaml_writes_the_threshold_the_code_defaults_to() -> None:
    """Written out, not left to the default: test_params' comparison cannot see a missing key."""
    shipped = yaml.safe_load((Path(__file__).resolve().parents[2] / "params.yaml").read_text())
    assert shipped["monitor"]["max_estimated_accuracy_drop"] == MonitorConfig().max_estimated_accuracy_drop
