"""Drift monitoring: the decisions as tables of cases, live metrics on a
hand-made window, and Evidently's scores on small synthetic frames (seconds)."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timezone

import numpy as np
import pandas as pd
import pytest

from tuneloop.tasks.drift import (
    DESCRIPTORS,
    DriftMetrics,
    MonitorConfig,
    compute_drift,
    current_frame,
    decide_drift,
    drift_frame,
    drift_status,
    reference_frame,
)
from tuneloop.tasks.feedback import last_feedback_export, live_metrics
from tuneloop.tasks.rollback import LiveComparison, arrival_action, compare_live, decide_rollback, rollback_blocker

LABELS = ["negative", "positive"]
CONFIG = MonitorConfig(min_rows=100, embedding_auc=0.6, descriptor_distance=0.15, descriptor_share=0.5,
                       prediction_p_value=0.01, confidence_distance=0.2, rollback_margin=0.02,
                       min_labelled_rows=50)


def metrics(auc=0.5, share=0.0, distances=(0.05, 0.05, 0.05, 0.05), p=0.5, confidence=0.05) -> DriftMetrics:
    return DriftMetrics(500, 500, auc, share, dict(zip(DESCRIPTORS, distances)), p, confidence)


# --- decide_drift --------------------------------------------------------------------------------

DRIFT_CASES = {
    # name: (metrics, window rows, expected status, signals that fire)
    "same domain": (metrics(), 500, "no drift", []),
    "embeddings alone": (metrics(auc=0.99), 500, "drift", ["embeddings"]),
    "embeddings at the threshold": (metrics(auc=0.6), 500, "drift", ["embeddings"]),
    "embeddings just under": (metrics(auc=0.599), 500, "no drift", []),
    "half the descriptors": (metrics(share=0.5, distances=(0.2, 0.3, 0.1, 0.1)), 500, "drift", ["text_descriptors"]),
    "one descriptor of four": (metrics(share=0.25, distances=(0.9, 0.1, 0.1, 0.1)), 500, "no drift", []),
    "predicted labels": (metrics(p=0.001), 500, "drift", ["predictions"]),
    "p-value at the threshold is not drift": (metrics(p=0.01), 500, "no drift", []),
    "confidence": (metrics(confidence=0.25), 500, "drift", ["confidence"]),
    "everything": (metrics(0.99, 1.0, (0.7, 0.7, 1.2, 1.5), 0.0, 0.3), 500, "drift",
                   ["embeddings", "text_descriptors", "predictions", "confidence"]),
    "too few rows, even with drift": (metrics(auc=0.99), 99, "insufficient data", []),
    "no metrics": (None, 20, "insufficient data", []),
}


@pytest.mark.parametrize("case", DRIFT_CASES, ids=list(DRIFT_CASES))
def test_decide_drift(case: str) -> None:
    given, rows, status, firing = DRIFT_CASES[case]
    decision = decide_drift(given, rows, CONFIG)
    assert drift_status(decision) == status
    assert decision.yes == (status == "drift")
    assert [s.name for s in decision.checks if s.passed] == firing


def test_every_drift_signal_gives_its_reason_with_value_and_threshold() -> None:
    decision = decide_drift(metrics(auc=0.989, p=0.8579), 500, CONFIG)
    assert len(decision.reasons) == 4
    assert decision.reasons[0] == ("DRIFT embeddings: a classifier tells current from reference with ROC AUC 0.989 "
                                   "(drift at >= 0.6; 0.5 = indistinguishable)")
    assert decision.reasons[2] == "ok    predicted labels: chi-square p = 0.8579 (drift below 0.01)"


def test_insufficient_data_names_the_rows_and_the_minimum() -> None:
    assert decide_drift(None, 12, CONFIG).reasons == [
        "12 predictions in the window, fewer than min_rows 100: no drift verdict"]


# --- decide_rollback ------------------------------------------------------------------------------


def comparison(champion=0.60, previous=0.85, low=0.15, high=0.35, rows=200) -> LiveComparison:
    return LiveComparison("macro_f1", rows, champion, previous, low, high, "1")


ROLLBACK_CASES = {
    # name: (comparison, config, labelled rows, previous version, champion arrival, rollback?, words in the reason)
    "previous clearly better": (comparison(), CONFIG, 200, "1", "promote", True, "better by +0.2500"),
    "a forced champion is rolled back too": (comparison(), CONFIG, 200, "1", "forced", True, "lies above zero"),
    "gap at the margin": (comparison(0.80, 0.82, 0.001, 0.04), CONFIG, 200, "1", "promote", True, "+0.0200"),
    "gap under the margin": (comparison(0.80, 0.81, 0.001, 0.03), CONFIG, 200, "1", "promote", False, "+0.0100"),
    "interval includes zero": (comparison(0.70, 0.80, -0.01, 0.2), CONFIG, 200, "1", "promote", False,
                               "includes zero"),
    "champion better": (comparison(0.85, 0.60, -0.35, -0.15), CONFIG, 200, "1", "promote", False,
                        "by -0.2500 (rollback at >= +0.0200), 95% CI [-0.3500, -0.1500] lies below zero"),
    "too few labelled rows": (None, CONFIG, 49, "1", "promote", False, "49 labelled live rows"),
    "no previous champion": (None, CONFIG, 200, None, "promote", False, "no previous champion"),
    "restored champions do not flap": (comparison(), CONFIG, 200, "1", "auto-rollback", False,
                                       "arrived by auto-rollback"),
    "manual rollback target is kept": (comparison(), CONFIG, 200, "1", "rollback", False,
                                       "arrived by rollback; a restored champion"),
    "switched off": (comparison(), replace(CONFIG, auto_rollback=False), 200, "1", "promote", False,
                     "auto_rollback is off"),
    "not compared": (None, CONFIG, 200, "1", "promote", False, "v1 was not scored"),
}


@pytest.mark.parametrize("case", ROLLBACK_CASES, ids=list(ROLLBACK_CASES))
def test_decide_rollback(case: str) -> None:
    given, config, labelled, previous, arrival, expected, words = ROLLBACK_CASES[case]
    decision = decide_rollback(config, labelled, previous, arrival, given)
    assert decision.yes is expected
    assert words in " ".join(decision.reasons)


@pytest.mark.parametrize("case", ROLLBACK_CASES, ids=list(ROLLBACK_CASES))
def test_models_are_compared_only_when_a_rollback_could_follow(case: str) -> None:
    given, config, labelled, previous, arrival, expected, _ = ROLLBACK_CASES[case]
    blocked = rollback_blocker(config, labelled, previous, arrival) is not None
    assert blocked == (case in {"too few labelled rows", "no previous champion", "restored champions do not flap",
                                "manual rollback target is kept", "switched off"})


def test_rollback_reason_names_both_models_metric_and_interval() -> None:
    (reason,) = decide_rollback(CONFIG, 200, "1", "promote", comparison()).reasons
    assert reason == ("live macro_f1 on 200 labelled rows: champion 0.6000, previous (v1) 0.8500; previous is better "
                      "by +0.2500 (rollback at >= +0.0200), 95% CI [+0.1500, +0.3500] lies above zero")


def test_arrival_is_the_newest_move_to_the_version() -> None:
    trail = [{"action": "promote", "from": None, "to": "1"}, {"action": "promote", "from": "1", "to": "2"},
             {"action": "auto-rollback", "from": "2", "to": "1"}]
    assert arrival_action(trail, "1") == "auto-rollback"
    assert arrival_action(trail, "2") == "promote"
    assert arrival_action(trail, "3") is None


def test_new_feedback_counts_from_the_newest_export(tmp_path) -> None:
    assert last_feedback_export(tmp_path) is None
    for name in ("feedback-20250101T100000.csv", "feedback-20250302T080910.csv", "feedback-notes.csv", "x.csv"):
        (tmp_path / name).write_text("text,label\n")
    assert last_feedback_export(tmp_path) == datetime(2025, 3, 2, 8, 9, 10, tzinfo=timezone.utc)


# --- live metrics ---------------------------------------------------------------------------------


def window(labels: list[str], true: list[str | None]) -> pd.DataFrame:
    return pd.DataFrame({"text": [f"t{i}" for i in range(len(labels))], "label": labels, "true_label": true,
                         "confidence": 0.9})


def test_live_metrics_score_only_rows_with_a_known_feedback_label() -> None:
    # 6 labelled rows: negative 1/2 right, positive 3/4 right; 1 unlabelled, 1 neutral feedback
    frame = window(["negative", "positive", "positive", "positive", "positive", "negative", "negative", "positive"],
                   ["negative", "negative", "positive", "positive", "positive", "positive", None, "neutral"])
    live = live_metrics(frame, LABELS)
    assert live.labelled_rows == 6
    assert live.accuracy == pytest.approx(4 / 6)
    # negative: P 1/2, R 1/2, F1 0.5; positive: P 3/4, R 3/4, F1 0.75
    assert live.macro_f1 == pytest.approx((0.5 + 0.75) / 2)


def test_live_metrics_without_feedback_are_none() -> None:
    live = live_metrics(window(["positive", "negative"], [None, None]), LABELS)
    assert (live.labelled_rows, live.accuracy, live.macro_f1) == (0, None, None)


def test_compare_live_scores_both_models_on_the_same_rows() -> None:
    true = ["negative", "positive"] * 50
    previous = list(true)
    champion = ["positive"] * 100  # never says negative
    result = compare_live(true, champion, previous, LABELS, "3", replace(CONFIG, bootstrap_samples=200))
    assert (result.rows, result.previous, result.previous_version) == (100, 1.0, "3")
    assert result.champion == pytest.approx((0.0 + 2 / 3) / 2)  # positive: P 0.5, R 1 -> F1 2/3
    assert result.low > 0.5


# --- frames and Evidently ------------------------------------------------------------------------


def fake_embed(texts) -> np.ndarray:
    """Two features that follow the text: its length and whether it shouts."""
    return np.asarray([[len(t) / 50, float("!" in t)] for t in texts])


def fake_predict(texts) -> tuple[list[str], np.ndarray]:
    return ["positive" if "good" in t else "negative" for t in texts], np.full(len(texts), 0.8)


def test_reference_frame_samples_the_reference_split_and_adds_the_champions_predictions() -> None:
    splits = pd.DataFrame({"text": [f"good film {i}" for i in range(30)] + ["bad"] * 10,
                           "label": "positive", "split": ["train"] * 30 + ["test"] * 10})
    frame = reference_frame(splits, replace(CONFIG, sample_rows=20), fake_predict, fake_embed)
    assert len(frame) == 20
    assert frame["text"].str.startswith("good film").all()
    assert set(frame["prediction"]) == {"positive"}
    assert list(frame.columns[:5]) == ["text", "prediction", "confidence", "emb_0", "emb_1"]


def test_reference_frame_refuses_a_missing_split() -> None:
    splits = pd.DataFrame({"text": ["a"], "label": ["positive"], "split": ["test"]})
    with pytest.raises(ValueError, match="no 'train' rows"):
        reference_frame(splits, CONFIG, fake_predict, fake_embed)


def test_current_frame_keeps_the_labels_and_confidences_that_were_served() -> None:
    served = pd.DataFrame({"text": ["x", "y"], "label": ["negative", "positive"], "confidence": [0.7, 0.95]})
    frame = current_frame(served, CONFIG, fake_embed)
    assert frame["prediction"].tolist() == ["negative", "positive"]
    assert frame["confidence"].tolist() == [0.7, 0.95]


def synthetic(n: int, seed: int, shouting: bool) -> pd.DataFrame:
    """Calm reviews, or short shouted posts: different lengths, punctuation and embeddings."""
    rng = np.random.default_rng(seed)
    if shouting:
        texts = [f"OMG {'!' * int(rng.integers(3, 9))} #{i} lol :)" for i in range(n)]
    else:
        texts = [" ".join(["A calm and measured review of the film."] * int(rng.integers(1, 4))) + f" Number {i}."
                 for i in range(n)]
    embeddings = fake_embed(texts) + rng.normal(0, 0.05, (n, 2))
    predicted = np.where(rng.random(n) < (0.9 if shouting else 0.5), "positive", "negative")
    return drift_frame(texts, predicted, rng.uniform(0.6, 1.0, n), embeddings)


@pytest.fixture(scope="module")
def scored() -> dict:
    reference = synthetic(120, 0, shouting=False)
    return {"same": compute_drift(reference, synthetic(120, 1, shouting=False), CONFIG),
            "shifted": compute_drift(reference, synthetic(120, 2, shouting=True), CONFIG),
            "reference": reference}


def test_evidently_finds_no_drift_between_two_samples_of_one_source(scored) -> None:
    same = scored["same"]
    assert same.embedding_auc < 0.6
    assert same.descriptor_share == 0.0
    assert drift_status(decide_drift(same, 120, CONFIG)) == "no drift"


def test_evidently_finds_every_text_signal_and_the_label_shift(scored) -> None:
    shifted = scored["shifted"]
    assert shifted.embedding_auc > 0.95
    assert shifted.descriptor_share == 1.0
    assert min(shifted.descriptor_distance.values()) > 0.15
    assert shifted.prediction_p_value < 0.01  # 50% -> 90% positive
    assert drift_status(decide_drift(shifted, 120, CONFIG)) == "drift"


def test_html_report_is_written_and_scores_embeddings_as_the_direct_method_does(scored, tmp_path) -> None:
    current = synthetic(60, 3, shouting=True)
    path = tmp_path / "monitor" / "report.html"
    with_report = compute_drift(scored["reference"].iloc[:60], current, CONFIG, report_path=path)
    without = compute_drift(scored["reference"].iloc[:60], current, CONFIG)
    html = path.read_text()
    assert with_report.report == str(path)
    assert "Drift in embeddings 'text_embedding'" in html
    assert "Drift in column 'prediction'" in html and "Drift in column 'chars'" in html
    assert with_report.embedding_auc == without.embedding_auc
    assert with_report.descriptor_distance == without.descriptor_distance


def test_unknown_rollback_metric_is_refused() -> None:
    with pytest.raises(ValueError, match="rollback_metric"):
        MonitorConfig(rollback_metric="f2")


def test_store_hands_back_rows_labelled_after_a_moment(tmp_path) -> None:
    from tuneloop.service.store import Prediction, PredictionStore, utcnow

    store = PredictionStore(f"sqlite:///{tmp_path / 'predictions.db'}")
    store.log(Prediction(f"r{i}", 0, f"text {i}", "positive", 0.9, {"positive": 0.9}, "1") for i in range(3))
    store.attach_feedback("r0", ["negative"])
    middle = utcnow()
    store.attach_feedback("r2", ["positive"])
    assert store.labelled()["request_id"].tolist() == ["r0", "r2"]
    assert store.labelled(since=middle)[["request_id", "true_label"]].values.tolist() == [["r2", "positive"]]
