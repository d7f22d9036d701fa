"""The small tables `dvc plots show/diff` draws (declared under `plots:` in
dvc.yaml) and the flat numbers `dvc metrics show/diff` lists, cut from the
stages' full results."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Iterable, Sequence

HEADLINE = ("accuracy", "macro_f1", "ece")  # latency is in reports/evaluation.json: it differs every run
FINETUNE = ("best_val_macro_f1", "train_macro_f1", "epochs_run")


def write_csv(path: Path, columns: Sequence[str], rows: Iterable[Sequence]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(columns)
        writer.writerows(rows)
    return path


def confusion_rows(y_true: Iterable[int], y_pred: Iterable[int], labels: Sequence[str]) -> list[tuple[str, str]]:
    """One (actual, predicted) label pair per test row: DVC's confusion template counts them."""
    return [(labels[int(t)], labels[int(p)]) for t, p in zip(y_true, y_pred)]


def calibration_rows(reliability: dict) -> list[tuple[float, float, int]]:
    """(mean confidence, accuracy, rows) of each non-empty reliability bin."""
    return [(round(conf, 6), round(acc, 6), count) for conf, acc, count in
            zip(reliability["bin_confidence"], reliability["bin_accuracy"], reliability["bin_count"]) if count]


def training_rows(history: Sequence[dict]) -> list[tuple[int, int, float]]:
    """(epoch, step, validation macro-F1) after each epoch; epoch 0 is before training."""
    return [(int(h["epoch"]), int(h["step"]), round(float(h["val_macro_f1"]), 6)) for h in history]


def evaluation_headline(evaluation: dict) -> dict[str, dict[str, float]]:
    """Each model's headline test numbers: `dvc metrics show` prints them as model.metric columns,
    with `answers_kept` (the pooled share unchanged under perturbation) when robustness was scored."""
    out = {}
    for key, scores in evaluation["models"].items():
        out[key] = {name: round(float(scores[name]), 6) for name in HEADLINE}
        if scores.get("robustness"):
            out[key]["answers_kept"] = round(float(scores["robustness"]["unchanged"]), 6)
    return out


def finetune_headline(summary: dict) -> dict[str, float]:
    """The training numbers worth a `dvc metrics` column (MLflow gets them all)."""
    return {name: summary[name] for name in FINETUNE}
