"""feedback: production rows labelled by people, as live metrics and as new training data.

The service stores feedback labels beside its predictions (`tuneloop/service/store.py`).
Here they become live accuracy and macro-F1 of the champion, and, exported to
the incoming folder, rows of the next data version.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

from tuneloop.values.labels import label_indices
from tuneloop.values.privacy import mask_pii

FEEDBACK_FILE = "feedback-%Y%m%dT%H%M%S.csv"  # an export's name: when it was written


@dataclass(frozen=True)
class LiveMetrics:
    labelled_rows: int
    accuracy: float | None  # None without labelled rows
    macro_f1: float | None


def labelled_rows(window: pd.DataFrame, labels: Sequence[str]) -> pd.DataFrame:
    """Rows whose feedback label is one the model knows."""
    return window[window["true_label"].isin(list(labels))].reset_index(drop=True)


def encode(values: Iterable[str], labels: Sequence[str]) -> np.ndarray:
    """Label names as class indices; a name outside `labels` (another model's
    label set) becomes class len(labels), a class of its own: always wrong."""
    return label_indices(values, labels, unknown=len(labels))


def live_metrics(window: pd.DataFrame, labels: Sequence[str]) -> LiveMetrics:
    """Accuracy and macro-F1 of the logged predictions against their feedback labels."""
    from tuneloop.model.metrics import accuracy, macro_f1

    rows = labelled_rows(window, labels)
    if rows.empty:
        return LiveMetrics(0, None, None)
    y_true, y_pred = encode(rows["true_label"], labels), encode(rows["label"], labels)
    return LiveMetrics(len(rows), accuracy(y_true, y_pred), macro_f1(y_true, y_pred, len(labels) + 1))


def export_feedback(window: pd.DataFrame, out_dir: Path, stamp: datetime,
                    mask: bool = False) -> tuple[Path | None, int]:
    """Writes feedback-labelled predictions as a labelled incoming file, each row
    with the name of the token that labelled it (`labelled_by`: provenance, kept
    in the data version's snapshot) and, when `mask`, its text masked of
    e-mails, phone and card numbers.

    Returns:
        The file (None when no row has a true label) and its row count.
    """
    labelled = window.dropna(subset=["true_label"])
    if labelled.empty:
        return None, 0
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / stamp.strftime(FEEDBACK_FILE)
    by = labelled["feedback_by"] if "feedback_by" in labelled else pd.Series(None, index=labelled.index)
    rows = pd.DataFrame({"text": labelled["text"].map(mask_pii) if mask else labelled["text"],
                         "label": labelled["true_label"], "labelled_by": by.fillna("unknown")})
    rows.to_csv(path, index=False)
    return path, len(labelled)


def last_feedback_export(incoming_dir: Path) -> datetime | None:
    """When labelled feedback was last exported for retraining: rows labelled
    since then are the new ones. (Rows labelled in the export's own second may
    be exported twice; the split keeps duplicates together, so nothing leaks.)"""
    stamps = []
    for path in Path(incoming_dir).glob("feedback-*.csv"):
        try:
            stamps.append(datetime.strptime(path.name, FEEDBACK_FILE).replace(tzinfo=timezone.utc))
        except ValueError:
            continue
    return max(stamps, default=None)
