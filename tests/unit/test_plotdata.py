"""The tables `dvc plots` draws and the numbers `dvc metrics` lists, cut from the stages' results."""

from __future__ import annotations

import csv
from pathlib import Path

from tuneloop.tasks.plotdata import (
    calibration_rows,
    confusion_rows,
    evaluation_headline,
    finetune_headline,
    training_rows,
    write_csv,
)


def test_confusion_rows_name_the_actual_and_predicted_label_of_each_row() -> None:
    assert confusion_rows([0, 1, 1], [0, 0, 1], ["neg", "pos"]) == [("neg", "neg"), ("pos", "neg"), ("pos", "pos")]


def test_calibration_rows_keep_only_bins_with_rows() -> None:
    bins = {"bin_confidence": [None, 0.55, 0.95], "bin_accuracy": [None, 0.5, 1.0], "bin_count": [0, 2, 2]}
    assert calibration_rows(bins) == [(0.55, 0.5, 2), (0.95, 1.0, 2)]


def test_training_rows_are_one_per_epoch_with_its_validation_macro_f1() -> None:
    history = [{"epoch": 0, "step": 0, "val_macro_f1": 0.5}, {"epoch": 1, "step": 12, "val_macro_f1": 0.81234567}]
    assert training_rows(history) == [(0, 0, 0.5), (1, 12, 0.812346)]


def test_metrics_keep_only_the_headline_numbers_flat_per_model() -> None:
    evaluation = {"models": {"challenger": {"accuracy": 0.9, "macro_f1": 0.8, "ece": 0.05,
                                            "latency_ms_per_example": 3.0,
                                            "per_class": {"neg": {"f1": 0.7}}, "confusion_matrix": [[1]]}}}
    assert evaluation_headline(evaluation) == {"challenger": {"accuracy": 0.9, "macro_f1": 0.8, "ece": 0.05}}
    summary = {"best_val_macro_f1": 0.8, "train_macro_f1": 0.9, "epochs_run": 2, "seconds": 14.1, "steps": 8}
    assert finetune_headline(summary) == {"best_val_macro_f1": 0.8, "train_macro_f1": 0.9, "epochs_run": 2}


def test_metrics_add_the_share_of_answers_kept_when_robustness_was_scored() -> None:
    evaluation = {"models": {
        "champion": {"accuracy": 0.9, "macro_f1": 0.8, "ece": 0.05, "robustness": {"unchanged": 0.9712345678}},
        "challenger": {"accuracy": 0.9, "macro_f1": 0.8, "ece": 0.05}}}
    assert evaluation_headline(evaluation) == {
        "champion": {"accuracy": 0.9, "macro_f1": 0.8, "ece": 0.05, "answers_kept": 0.971235},
        "challenger": {"accuracy": 0.9, "macro_f1": 0.8, "ece": 0.05}}


def test_write_csv_writes_a_header_then_the_rows(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "plots" / "t.csv", ("actual", "predicted"), [("a", "b")])
    assert list(csv.reader(path.open())) == [["actual", "predicted"], ["a", "b"]]
