"""Evaluation with fake models: same rows for every model, hand-checked metrics and slices."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import pytest

from tuneloop.tasks.evaluate import (
    ROBUST_PREFIX,
    Candidate,
    EvaluateConfig,
    RegressionFileError,
    directory_size_mb,
    evaluate_models,
    evaluate_regression,
    read_regression_file,
    robustness_sample,
)
from tuneloop.tasks.split import SplitConfig, earlier_test_rows, split_dataset

LABELS = ["negative", "positive"]
CLEAN = EvaluateConfig(robustness_rows=0)  # the clean test rows only: robustness has its own tests below

# Six test rows in a non-sorted source order; two slice columns.
TEST = pd.DataFrame({
    "row": [14, 3, 27, 8, 1, 19],
    "text": ["dull", "tedious", "lovely", "great fun", "a delight", "so boring"],
    "label": ["negative", "negative", "positive", "positive", "positive", "negative"],
    "split": ["test"] * 6,
    "length_bucket": ["<10", "<10", "<10", ">=25", ">=25", ">=25"],
    "site": ["imdb", "rt", "imdb", "rt", "imdb", "rt"],
})
Y_TRUE = [0, 0, 1, 1, 1, 0]

# challenger: right on rows 1-5 with confidence 0.9, wrong on row 6 with 0.6
CHALLENGER_PROBS = np.array([[0.9, 0.1], [0.9, 0.1], [0.1, 0.9], [0.1, 0.9], [0.1, 0.9], [0.4, 0.6]])
# probe: says positive (0.6) to everything
PROBE_PROBS = np.tile([0.4, 0.6], (6, 1))


class FixedScorer:
    """Returns fixed probabilities and records the texts it was asked to score."""

    def __init__(self, probs: np.ndarray) -> None:
        self.probs = probs
        self.calls: list[list[str]] = []

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        self.calls.append(list(texts))
        assert len(texts) == len(self.probs)
        return self.probs


def candidates() -> tuple[list[Candidate], dict[str, FixedScorer]]:
    scorers = {"base_probe": FixedScorer(PROBE_PROBS), "challenger": FixedScorer(CHALLENGER_PROBS)}
    return [
        Candidate("base_probe", "base + probe", scorers["base_probe"], model_size_mb=90.5),
        Candidate("challenger", "challenger (lora)", scorers["challenger"], version="7",
                  model_size_mb=91.0, train_val_gap=0.03),
    ], scorers


@pytest.fixture(scope="module")
def evaluated() -> tuple[dict, pd.DataFrame, dict[str, FixedScorer]]:
    models, scorers = candidates()
    evaluation, predictions = evaluate_models(models, TEST, LABELS, CLEAN, data_version="f" * 32)
    return evaluation, predictions, scorers


def test_every_model_scores_the_same_test_texts_once_in_order(evaluated) -> None:
    _, _, scorers = evaluated
    for scorer in scorers.values():
        assert scorer.calls == [TEST["text"].tolist()]


def test_predictions_frame_has_one_row_per_test_row_in_order(evaluated) -> None:
    evaluation, predictions, _ = evaluated
    assert [c for c in predictions.columns if not c.startswith("slice:")] == [
        "row", "y_true", "base_probe", "base_probe_confidence", "base_probe_abstained", "challenger",
        "challenger_confidence", "challenger_abstained"]
    # each row's slice values, for the gate's per-slice bootstrap
    assert {c[len("slice:"):] for c in predictions.columns if c.startswith("slice:")} == set(
        evaluation["models"]["challenger"]["slices"])
    assert predictions["row"].tolist() == [14, 3, 27, 8, 1, 19]
    assert predictions["y_true"].tolist() == Y_TRUE
    assert predictions["challenger"].tolist() == [0, 0, 1, 1, 1, 1]
    assert predictions["base_probe"].tolist() == [1] * 6
    np.testing.assert_allclose(predictions["challenger_confidence"], [0.9] * 5 + [0.6])


def test_evaluation_header_names_data_version_labels_and_rows(evaluated) -> None:
    evaluation, _, _ = evaluated
    assert evaluation["data_version"] == "f" * 32
    assert evaluation["labels"] == LABELS
    assert evaluation["test_rows"] == 6
    assert list(evaluation["models"]) == ["base_probe", "challenger"]


def test_challenger_metrics_match_hand_computation(evaluated) -> None:
    m = evaluated[0]["models"]["challenger"]
    # confusion [[2, 1], [0, 3]]: negative P=1 R=2/3 F1=0.8; positive P=3/4 R=1 F1=6/7
    assert m["confusion_matrix"] == [[2, 1], [0, 3]]
    assert m["accuracy"] == pytest.approx(5 / 6)
    assert m["macro_f1"] == pytest.approx((0.8 + 6 / 7) / 2)
    assert m["per_class"]["negative"] == pytest.approx({"precision": 1.0, "recall": 2 / 3, "f1": 0.8, "support": 3})
    assert m["per_class"]["positive"] == pytest.approx({"precision": 0.75, "recall": 1.0, "f1": 6 / 7, "support": 3})
    # 5 rows at 0.9 all right, 1 row at 0.6 wrong: 5/6 * 0.1 + 1/6 * 0.6
    assert m["ece"] == pytest.approx(5 / 6 * 0.1 + 1 / 6 * 0.6)


def test_probe_that_never_predicts_negative_scores_zero_f1_on_it(evaluated) -> None:
    m = evaluated[0]["models"]["base_probe"]
    assert m["confusion_matrix"] == [[0, 3], [0, 3]]
    assert m["accuracy"] == pytest.approx(0.5)
    assert m["per_class"]["negative"]["f1"] == 0.0
    assert m["macro_f1"] == pytest.approx((0 + 2 / 3) / 2)
    assert m["ece"] == pytest.approx(0.1)  # confidence 0.6, accuracy 0.5


def test_slices_are_computed_per_value_of_every_extra_column(evaluated) -> None:
    slices = evaluated[0]["models"]["challenger"]["slices"]
    assert set(slices) == {"length_bucket", "site"}  # row, text, label, split are not slices
    assert slices["length_bucket"]["<10"] == {"rows": 3, "accuracy": 1.0, "macro_f1": 1.0}
    long = slices["length_bucket"][">=25"]
    # y_true [1, 1, 0], predicted [1, 1, 1]: negative F1 0, positive P=2/3 R=1 F1=0.8
    assert long["rows"] == 3
    assert long["accuracy"] == pytest.approx(2 / 3)
    assert long["macro_f1"] == pytest.approx(0.4)
    # site: imdb rows 1, 3, 5 all right; rt rows 2, 4, 6 has the one error
    assert slices["site"]["imdb"]["accuracy"] == 1.0
    assert slices["site"]["rt"]["accuracy"] == pytest.approx(2 / 3)


def test_latency_size_gap_name_and_version_are_reported(evaluated) -> None:
    models = evaluated[0]["models"]
    challenger, probe = models["challenger"], models["base_probe"]
    for m in (challenger, probe):
        assert isinstance(m["latency_ms_per_example"], float) and m["latency_ms_per_example"] >= 0
    assert (challenger["name"], challenger["version"]) == ("challenger (lora)", "7")
    assert (challenger["model_size_mb"], challenger["train_val_gap"]) == (91.0, 0.03)
    assert (probe["version"], probe["model_size_mb"], probe["train_val_gap"]) == (None, 90.5, None)


def test_latency_is_scoring_time_per_test_row() -> None:
    import time

    def slow(texts: Sequence[str]) -> np.ndarray:
        time.sleep(0.06)
        return CHALLENGER_PROBS

    evaluation, _ = evaluate_models([Candidate("challenger", "slow", slow)], TEST, LABELS, CLEAN, "v")
    assert evaluation["models"]["challenger"]["latency_ms_per_example"] >= 60 / 6


def test_slice_columns_config_restricts_slices() -> None:
    models, _ = candidates()
    config = EvaluateConfig(slice_columns=("site", "not_a_column"), robustness_rows=0)
    evaluation, _ = evaluate_models(models, TEST, LABELS, config, "v")
    for m in evaluation["models"].values():
        assert list(m["slices"]) == ["site"]
    evaluation, _ = evaluate_models(models, TEST, LABELS, EvaluateConfig(slice_columns=(), robustness_rows=0), "v")
    assert evaluation["models"]["challenger"]["slices"] == {}


def test_min_slice_rows_leaves_small_slice_values_out() -> None:
    frame = TEST.assign(site=["imdb", "imdb", "imdb", "imdb", "rt", "rt"])
    models, _ = candidates()
    evaluation, _ = evaluate_models(models, frame, LABELS, EvaluateConfig(min_slice_rows=3, robustness_rows=0), "v")
    assert list(evaluation["models"]["challenger"]["slices"]["site"]) == ["imdb"]


def test_directory_size_mb_counts_only_weight_files(tmp_path: Path) -> None:
    model = tmp_path / "model"
    (model / "nested").mkdir(parents=True)
    (model / "model.safetensors").write_bytes(b"\0" * 2**20)
    (model / "nested" / "adapter.bin").write_bytes(b"\0" * 2**19)
    (model / "config.json").write_bytes(b"{}" * 5000)
    (model / "tokenizer.json").write_bytes(b"x" * 2**20)
    (model / "README.md").write_text("weights")
    base = tmp_path / "base"
    base.mkdir()
    (base / "pytorch_model.bin").write_bytes(b"\0" * 2**18)
    assert directory_size_mb(model) == pytest.approx(1.5)
    assert directory_size_mb(model, base) == pytest.approx(1.75)
    assert directory_size_mb(tmp_path / "empty_or_missing") == 0.0


# --- robustness: the same candidates on perturbed copies of the test rows ---------------------

POSITIVE_WORDS = ("lovely", "fun", "delight")


class KeywordScorer:
    """Positive when a positive word occurs in the text; `fragile` matches case-sensitively,
    so upper-casing turns every positive answer negative. Records each call's texts."""

    def __init__(self, fragile: bool) -> None:
        self.fragile = fragile
        self.calls: list[list[str]] = []

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        self.calls.append(list(texts))
        seen = [t if self.fragile else t.lower() for t in texts]
        positive = np.array([any(word in t for word in POSITIVE_WORDS) for t in seen], dtype=float)
        return np.stack([1 - positive * 0.8 - 0.1, positive * 0.8 + 0.1], axis=1)


def robustness_run(perturbations: tuple[str, ...], rows: int = 500) -> tuple[dict, pd.DataFrame, dict]:
    scorers = {"champion": KeywordScorer(fragile=False), "challenger": KeywordScorer(fragile=True)}
    models = [Candidate(key, key, scorer) for key, scorer in scorers.items()]
    config = EvaluateConfig(robustness_rows=rows, perturbations=perturbations)
    evaluation, predictions = evaluate_models(models, TEST, LABELS, config, "v")
    return evaluation, predictions, scorers


def test_robustness_reports_answers_kept_and_macro_f1_drop_per_perturbation() -> None:
    evaluation, _, _ = robustness_run(("uppercase", "whitespace"))
    assert evaluation["robustness"] == {"rows": 6, "perturbations": ["uppercase", "whitespace"], "typo_rate": 0.05}
    robust = evaluation["models"]["champion"]["robustness"]
    assert robust["unchanged"] == 1.0 and robust["clean_macro_f1"] == 1.0
    assert robust["perturbations"]["uppercase"] == {"changed_texts": 6, "unchanged": 1.0, "macro_f1": 1.0,
                                                    "macro_f1_drop": 0.0}
    fragile = evaluation["models"]["challenger"]["robustness"]
    # upper case: the 3 positive rows answered negative; negative F1 2/3, positive 0
    assert fragile["perturbations"]["uppercase"] == pytest.approx(
        {"changed_texts": 6, "unchanged": 0.5, "macro_f1": 1 / 3, "macro_f1_drop": 2 / 3})
    assert fragile["perturbations"]["whitespace"]["unchanged"] == 1.0
    assert fragile["unchanged"] == pytest.approx(0.75)  # (3 + 6) of 12 answers kept
    assert fragile["rows"] == 6


def test_each_row_counts_the_perturbations_its_answer_survived_for_the_gate() -> None:
    _, predictions, _ = robustness_run(("uppercase", "whitespace"))
    assert predictions[f"{ROBUST_PREFIX}champion"].tolist() == [2] * 6
    assert predictions[f"{ROBUST_PREFIX}challenger"].tolist() == [2, 2, 1, 1, 1, 2]


def test_only_texts_a_perturbation_changes_are_scored_in_one_call() -> None:
    _, _, scorers = robustness_run(("expand", "add_punctuation", "lowercase"))
    # expand finds no contraction; lowercase changes nothing in these lower-case texts
    assert scorers["champion"].calls == [TEST["text"].tolist(), [t + "." for t in TEST["text"]]]


def test_robustness_rows_caps_the_rows_perturbed_and_leaves_the_rest_empty() -> None:
    evaluation, predictions, scorers = robustness_run(("uppercase",), rows=3)
    assert evaluation["robustness"]["rows"] == 3
    assert scorers["challenger"].calls[1] == ["DULL", "LOVELY", "SO BORING"]  # rows 0, 2 and 5
    column = predictions[f"{ROBUST_PREFIX}challenger"]
    assert column.isna().tolist() == [False, True, False, True, True, False]
    assert column.dropna().tolist() == [1, 0, 1]


def test_no_robustness_rows_means_no_perturbed_scoring() -> None:
    evaluation, predictions, scorers = robustness_run(("uppercase",), rows=0)
    assert "robustness" not in evaluation and "robustness" not in evaluation["models"]["challenger"]
    assert not any(c.startswith(ROBUST_PREFIX) for c in predictions.columns)
    assert len(scorers["challenger"].calls) == 1


@pytest.mark.parametrize(("rows", "cap", "expected"), [
    (6, 10, [0, 1, 2, 3, 4, 5]), (6, 6, [0, 1, 2, 3, 4, 5]), (6, 3, [0, 2, 5]), (5, 2, [0, 4]), (6, 0, []),
])
def test_robustness_sample_spreads_the_cap_evenly_over_the_rows(rows: int, cap: int, expected: list[int]) -> None:
    assert robustness_sample(rows, cap).tolist() == expected


# --- forgetting: the regression set is the earlier test rows plus the regression file -------------

class TextScorer:
    """Probabilities looked up per text; records each call's texts."""

    def __init__(self, probs: dict[str, list[float]]) -> None:
        self.probs, self.calls = probs, []

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        self.calls.append(list(texts))
        return np.array([self.probs[t] for t in texts]).reshape(len(texts), 2)


def regression_run(earlier: list[bool], extra: pd.DataFrame | None) -> tuple[dict, pd.DataFrame, dict]:
    # champion: right everywhere; challenger: CHALLENGER_PROBS on the test rows (wrong on "so boring")
    # and wrong on the file's "awful"
    right = {t: [0.9, 0.1] if y == 0 else [0.1, 0.9] for t, y in zip(TEST["text"], Y_TRUE)}
    right.update({"awful": [0.8, 0.2], "superb": [0.3, 0.7]})
    scorers = {"champion": TextScorer(right),
               "challenger": TextScorer({**dict(zip(TEST["text"], CHALLENGER_PROBS.tolist())),
                                         "awful": [0.2, 0.8], "superb": [0.1, 0.9]})}
    models = [Candidate(key, key, scorer) for key, scorer in scorers.items()]
    evaluation, predictions = evaluate_models(models, TEST, LABELS, CLEAN, "v")
    summary, frame = evaluate_regression(models, TEST, predictions, np.array(earlier), extra, LABELS)
    return summary, frame, scorers


FILE_ROWS = pd.DataFrame({"text": ["awful", "superb"], "label": ["negative", "positive"],
                          "slice": ["reviews 2019"] * 2})
EARLIER = [True, False, True, False, False, True]  # "dull", "lovely" and "so boring" were test rows before


def test_the_regression_set_is_the_earlier_test_rows_then_the_files_rows_with_reused_answers() -> None:
    summary, frame, scorers = regression_run(EARLIER, FILE_ROWS)
    assert frame["domain"].tolist() == ["earlier test rows"] * 3 + ["reviews 2019"] * 2
    assert frame["row"].tolist() == [14, 27, 19, 0, 1]  # the test rows' own ids, then the file's lines
    assert frame["y_true"].tolist() == [0, 1, 0, 0, 1]
    assert frame["champion"].tolist() == [0, 1, 0, 0, 1]
    assert frame["challenger"].tolist() == [0, 1, 1, 1, 1]
    # the test rows are not scored again: one more call per model, for the file's texts
    assert scorers["challenger"].calls == [TEST["text"].tolist(), ["awful", "superb"]]


def test_the_regression_set_is_scored_per_domain_with_exact_values() -> None:
    summary, _, _ = regression_run(EARLIER, FILE_ROWS)
    assert summary["rows"] == 5 and summary["domains"] == {"earlier test rows": 3, "reviews 2019": 2}
    assert summary["models"]["champion"] == {"rows": 5, "accuracy": 1.0, "macro_f1": 1.0, "domains": {
        "earlier test rows": {"rows": 3, "accuracy": 1.0, "macro_f1": 1.0},
        "reviews 2019": {"rows": 2, "accuracy": 1.0, "macro_f1": 1.0}}}
    forgot = summary["models"]["challenger"]
    # pooled: negative F1 2/(2+2) = 0.5, positive 4/(4+2); earlier rows: 2/3 each; the file: 0 and 2/3
    assert {k: forgot[k] for k in ("rows", "accuracy", "macro_f1")} == pytest.approx(
        {"rows": 5, "accuracy": 0.6, "macro_f1": (0.5 + 2 / 3) / 2})
    assert forgot["domains"]["earlier test rows"] == pytest.approx({"rows": 3, "accuracy": 2 / 3, "macro_f1": 2 / 3})
    assert forgot["domains"]["reviews 2019"] == pytest.approx({"rows": 2, "accuracy": 0.5, "macro_f1": 1 / 3})


def test_no_earlier_rows_and_no_file_give_an_empty_regression_set_scoring_nothing() -> None:
    summary, frame, scorers = regression_run([False] * 6, None)
    assert len(frame) == 0 and summary["rows"] == 0 and summary["domains"] == {}
    assert summary["models"]["challenger"] == {"rows": 0, "accuracy": None, "macro_f1": None, "domains": {}}
    assert len(scorers["challenger"].calls) == 1


def test_earlier_test_rows_are_the_test_rows_of_the_older_split_still_held() -> None:
    old = pd.DataFrame({"text": [f"old request {i}" for i in range(300)], "label": "a"})
    grown = pd.concat([old.iloc[10:], pd.DataFrame({"text": [f"new request {i}" for i in range(300)], "label": "b"})])
    grown.loc[grown["text"] == "old request 50", "text"] = "  OLD request 50 "  # the same text, normalised
    before, now = split_dataset(old, SplitConfig()), split_dataset(grown, SplitConfig())
    test = now[now["split"] == "test"].reset_index(drop=True)
    mask = earlier_test_rows(test["text"], before)
    held = set(before.loc[before["split"] == "test", "text"]) - {f"old request {i}" for i in range(10)}
    assert set(test.loc[mask, "text"].str.strip().str.lower()) == held and len(held) > 10
    assert not test.loc[~mask, "text"].str.startswith("old").any()  # every other test row is new


def test_a_regression_file_is_read_from_csv_or_jsonl_with_its_slice_or_a_default(tmp_path: Path) -> None:
    (tmp_path / "old.csv").write_text("text,label,slice\nawful,negative,reviews 2019\n")
    (tmp_path / "old.jsonl").write_text('{"text": "superb", "label": "positive"}\n')
    assert read_regression_file(tmp_path / "old.csv", LABELS).to_dict("records") == [
        {"text": "awful", "label": "negative", "slice": "reviews 2019"}]
    assert read_regression_file(tmp_path / "old.jsonl", LABELS).to_dict("records") == [
        {"text": "superb", "label": "positive", "slice": "regression file"}]


@pytest.mark.parametrize(("name", "content", "said"), [
    ("old.csv", "text,label\nawful,neutral\n", "holds labels the data does not: ['neutral']"),
    ("old.csv", "text\nawful\n", "lacks the column(s) ['label']"),
    ("old.csv", "text,label\n ,negative\n", "rows with an empty text"),
    ("old.txt", "awful", "is not a .csv or .jsonl file"),
    ("old.jsonl", "not json", "cannot be read"),
])
def test_a_bad_regression_file_is_refused_naming_the_problem(tmp_path: Path, name: str, content: str,
                                                              said: str) -> None:
    (tmp_path / name).write_text(content)
    with pytest.raises(RegressionFileError, match=re.escape(said)):
        read_regression_file(tmp_path / name, LABELS)
