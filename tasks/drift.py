"""drift: is production still the data the champion learned from, and is the champion still good?

A window of logged predictions is compared with the champion's reference data
(a sample of its training split, scored by the champion) by Evidently: text
descriptors, the base encoder's embeddings, predicted labels and confidences.
Where feedback labels exist, live accuracy and macro-F1 are measured, and the
previous champion is re-scored on the same labelled rows so a rollback compares
two models on identical inputs. The decisions are pure functions returning
their reasons, like the gate.

Evidently (0.7) is imported only where a report is built, so the decisions
import nothing heavy.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd

from tuneloop.tasks.metrics import interval_position

TEXT, PREDICTION, CONFIDENCE = "text", "prediction", "confidence"
EMBEDDING = "text_embedding"  # the Evidently embedding set: columns emb_0 ... emb_<hidden-1>
DESCRIPTORS = ("chars", "words", "sentences", "non_letter_pct")
ROLLBACK_ACTIONS = ("rollback", "auto-rollback")  # how a champion arrives when it was restored

Embed = Callable[[Sequence[str]], np.ndarray]  # texts -> (rows, hidden) sentence embeddings
Predict = Callable[[Sequence[str]], tuple[list[str], np.ndarray]]  # texts -> predicted labels, confidences


@dataclass(frozen=True)
class MonitorConfig:
    # the window: the champion's predictions of the last `window_hours`, newest `window_rows` at most
    window_hours: float | None = 24.0  # None: no time bound
    window_rows: int | None = 5000  # None: no row bound
    min_rows: int = 200  # fewer predictions: "insufficient data", never a drift verdict
    # Both sides are sampled to this many rows: bounds CPU time (embeddings, Evidently's
    # domain classifier and t-SNE picture) and keeps the tests' power the same for any window.
    sample_rows: int = 500
    reference_split: str = "train"  # the rows the champion learned from; `test` gives held-out predictions
    seed: int = 0
    batch_size: int = 64
    max_length: int = 128
    device: str = "auto"
    # Drift thresholds, set from 500 vs 500 rows: 40 pairs of disjoint movie-review samples (no
    # drift) against movie reviews vs tweets / NYT editorials (drift); see README "Monitoring".
    embedding_auc: float = 0.6  # domain classifier's ROC AUC; same domain 0.46-0.57, other domains >= 0.95
    descriptor_distance: float = 0.15  # normed Wasserstein for one descriptor; same domain <= 0.165, NYT >= 0.15
    descriptor_share: float = 0.5  # so one noisy descriptor alone never makes drift
    prediction_p_value: float = 0.001  # chi-square on label counts; at 0.01 an hourly check cries wolf weekly
    confidence_distance: float = 0.25  # normed Wasserstein of confidences; same domain up to 0.16
    # Automatic rollback: the previous champion, re-scored on the champion's labelled live
    # rows, must beat it by the margin with its bootstrap interval above zero.
    auto_rollback: bool = True
    rollback_metric: str = "macro_f1"
    rollback_margin: float = 0.02
    min_labelled_rows: int = 100  # fewer labelled rows: too noisy to move the champion
    bootstrap_samples: int = 1000
    confidence: float = 0.95
    report_dir: str = "reports/monitor"
    __pydantic_config__ = {"extra": "forbid"}

    def __post_init__(self) -> None:
        if self.rollback_metric not in {"macro_f1", "accuracy"}:
            raise ValueError(f"monitor.rollback_metric must be 'macro_f1' or 'accuracy', got {self.rollback_metric!r}")
        if self.min_rows < 2 or self.sample_rows < 2:
            raise ValueError("monitor.min_rows and monitor.sample_rows must be at least 2")


@dataclass(frozen=True)
class DriftMetrics:
    reference_rows: int
    current_rows: int
    embedding_auc: float  # 0.5: the embeddings are indistinguishable; 1.0: perfectly separable
    descriptor_share: float  # share of DESCRIPTORS whose distance reached the threshold
    descriptor_distance: dict[str, float]  # normed Wasserstein distance per descriptor
    prediction_p_value: float
    confidence_distance: float
    report: str | None = None  # the Evidently HTML, when written

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class LiveMetrics:
    labelled_rows: int
    accuracy: float | None  # None without labelled rows
    macro_f1: float | None


@dataclass(frozen=True)
class LiveComparison:
    """Champion and previous champion scored on the same labelled live rows."""

    metric: str
    rows: int
    champion: float
    previous: float
    low: float  # confidence interval of previous - champion (paired bootstrap)
    high: float
    previous_version: str


@dataclass(frozen=True)
class Signal:
    name: str
    drifted: bool
    reason: str


@dataclass(frozen=True)
class DriftDecision:
    status: str  # "drift" | "no drift" | "insufficient data"
    signals: tuple[Signal, ...] = ()
    note: str = ""

    @property
    def significant(self) -> bool:
        return self.status == "drift"

    @property
    def reasons(self) -> list[str]:
        return [self.note] if self.note else [("DRIFT " if s.drifted else "ok    ") + s.reason for s in self.signals]


@dataclass(frozen=True)
class RollbackDecision:
    rollback: bool
    reasons: list[str] = field(default_factory=list)


# --- frames ------------------------------------------------------------------------------------


def sample(frame: pd.DataFrame, rows: int, seed: int) -> pd.DataFrame:
    """At most `rows` rows, drawn without replacement, in their original order."""
    if len(frame) <= rows:
        return frame.reset_index(drop=True)
    return frame.sample(rows, random_state=seed).sort_index().reset_index(drop=True)


def drift_frame(texts: Sequence[str], predicted: Sequence[str], confidence: Sequence[float],
                embeddings: np.ndarray) -> pd.DataFrame:
    """One row per text: text, prediction, confidence, emb_0 ... emb_<hidden-1>."""
    frame = pd.DataFrame({TEXT: list(texts), PREDICTION: list(predicted),
                          CONFIDENCE: np.asarray(confidence, dtype=float)})
    vectors = np.asarray(embeddings, dtype=float)  # (rows, hidden)
    columns = [f"emb_{i}" for i in range(vectors.shape[1])]
    return pd.concat([frame, pd.DataFrame(vectors, columns=columns)], axis=1)


def embedding_columns(frame: pd.DataFrame) -> list[str]:
    return [c for c in frame.columns if c.startswith("emb_")]


def reference_frame(splits: pd.DataFrame, config: MonitorConfig, predict: Predict, embed: Embed) -> pd.DataFrame:
    """A sample of the champion's `reference_split` rows, with the champion's
    predictions and confidences on them.

    Raises:
        ValueError: the splits hold no row of that split.
    """
    rows = splits[splits["split"] == config.reference_split]
    if rows.empty:
        raise ValueError(f"the champion's reference data has no {config.reference_split!r} rows")
    rows = sample(rows, config.sample_rows, config.seed)
    predicted, confidence = predict(rows["text"].tolist())
    return drift_frame(rows["text"], predicted, confidence, embed(rows["text"].tolist()))


def current_frame(window: pd.DataFrame, config: MonitorConfig, embed: Embed) -> pd.DataFrame:
    """A sample of the window's logged predictions (label, confidence as served)."""
    rows = sample(window, config.sample_rows, config.seed)
    return drift_frame(rows["text"], rows["label"], rows["confidence"], embed(rows["text"].tolist()))


def encoder_embedder(base_path: Path, config: MonitorConfig) -> Embed:
    """Mean-pooled sentence embeddings from the base model's encoder: the same
    instrument for both sides, whatever the champion's weights."""
    from tuneloop.tasks.baseline import load_encoder
    from tuneloop.tasks.classifier import mean_pooled_embeddings

    encoder, tokenizer = load_encoder(base_path, config.device)
    return lambda texts: mean_pooled_embeddings(encoder, tokenizer, list(texts), config.max_length, config.batch_size)


def classifier_predictor(model_dir: Path, base_model: str, config: MonitorConfig) -> Predict:
    """A registered version's predicted labels and confidences."""
    from tuneloop.tasks.classifier import load_classifier, predict_proba

    classifier = load_classifier(model_dir, base_model, config.device)

    def predict(texts: Sequence[str]) -> tuple[list[str], np.ndarray]:
        probs = predict_proba(classifier, list(texts), config.batch_size)  # (rows, labels)
        return [classifier.labels[i] for i in probs.argmax(1)], probs.max(1)

    return predict


# --- Evidently ---------------------------------------------------------------------------------


def text_descriptors() -> list:
    """Row-level text statistics that need no download (Evidently's OOV and
    Sentiment descriptors fetch NLTK corpora, so they are left out)."""
    from evidently.descriptors import NonLetterCharacterPercentage, SentenceCount, TextLength, WordCount

    return [TextLength(TEXT, alias="chars"), WordCount(TEXT, alias="words"),
            SentenceCount(TEXT, alias="sentences"), NonLetterCharacterPercentage(TEXT, alias="non_letter_pct")]


def embedding_method(config: MonitorConfig):
    """Evidently's domain-classifier method: ROC AUC of a linear classifier
    trained to tell current from reference embeddings on half the rows."""
    from evidently.metrics.embeddings import ModelDriftMethod

    return ModelDriftMethod(threshold=config.embedding_auc)


def drift_report_metrics(config: MonitorConfig, with_embeddings: bool) -> dict:
    """The report's metrics by key; thresholds come from params, so the HTML
    marks drift exactly where the decision does."""
    from evidently.metrics import DriftedColumnsCount, EmbeddingsDrift, ValueDrift

    distance = {"method": "wasserstein", "threshold": config.descriptor_distance}
    metrics = {
        "descriptor_share": DriftedColumnsCount(columns=list(DESCRIPTORS), drift_share=config.descriptor_share,
                                                num_method="wasserstein", num_threshold=config.descriptor_distance),
        **{name: ValueDrift(column=name, **distance) for name in DESCRIPTORS},
        PREDICTION: ValueDrift(column=PREDICTION, method="chisquare", threshold=config.prediction_p_value),
        CONFIDENCE: ValueDrift(column=CONFIDENCE, method="wasserstein", threshold=config.confidence_distance),
    }
    if with_embeddings:  # its t-SNE picture costs ~15 s for 1000 rows on a busy core; numbers alone skip it
        metrics[EMBEDDING] = EmbeddingsDrift(embeddings_name=EMBEDDING, drift_method=embedding_method(config))
    return metrics


def compute_drift(reference: pd.DataFrame, current: pd.DataFrame, config: MonitorConfig,
                  report_path: Path | None = None) -> DriftMetrics:
    """Evidently's drift scores of `current` against `reference` (frames from
    `drift_frame`); writes the HTML report when `report_path` is given.

    Without a report the embedding score comes from the same Evidently drift
    method called directly, which skips EmbeddingsDrift's t-SNE plot.
    """
    from evidently import DataDefinition, Dataset, Report
    from threadpoolctl import threadpool_limits  # a scikit-learn dependency

    vectors = embedding_columns(reference)
    definition = DataDefinition(text_columns=[TEXT], categorical_columns=[PREDICTION],
                                numerical_columns=[CONFIDENCE], embeddings={EMBEDDING: vectors})
    datasets = [Dataset.from_pandas(frame, data_definition=definition, descriptors=text_descriptors())
                for frame in (current, reference)]
    metrics = drift_report_metrics(config, with_embeddings=report_path is not None)
    # EmbeddingsDrift's t-SNE is OpenMP code: on a busy 2-core machine (serving beside it) two
    # spinning threads took 37 s for 300 rows, one thread 2.5 s.
    with threadpool_limits(1, user_api="openmp"):
        snapshot = Report(list(metrics.values())).run(*datasets)
    result = {key: snapshot.metric_results[metric.metric_id] for key, metric in metrics.items()}
    if report_path is not None:
        Path(report_path).parent.mkdir(parents=True, exist_ok=True)
        snapshot.save_html(str(report_path))
        auc = result[EMBEDDING].value
    else:
        auc = embedding_method(config)(current[vectors].copy(), reference[vectors].copy())[0]
    return DriftMetrics(
        reference_rows=len(reference), current_rows=len(current), embedding_auc=float(auc),
        descriptor_share=float(result["descriptor_share"].share.value),
        descriptor_distance={name: float(result[name].value) for name in DESCRIPTORS},
        prediction_p_value=float(result[PREDICTION].value), confidence_distance=float(result[CONFIDENCE].value),
        report=str(report_path) if report_path is not None else None,
    )


# --- live metrics ------------------------------------------------------------------------------


def labelled_rows(window: pd.DataFrame, labels: Sequence[str]) -> pd.DataFrame:
    """Rows whose feedback label is one the model knows."""
    return window[window["true_label"].isin(list(labels))].reset_index(drop=True)


def encode(values: Sequence[str], labels: Sequence[str]) -> np.ndarray:
    """Label names as class indices; a name outside `labels` (another model's
    label set) becomes class len(labels), a class of its own: always wrong."""
    index = {name: i for i, name in enumerate(labels)}
    return np.asarray([index.get(v, len(labels)) for v in values], dtype=int)


def live_metrics(window: pd.DataFrame, labels: Sequence[str]) -> LiveMetrics:
    """Accuracy and macro-F1 of the logged predictions against their feedback labels."""
    from tuneloop.tasks.metrics import accuracy, macro_f1

    rows = labelled_rows(window, labels)
    if rows.empty:
        return LiveMetrics(0, None, None)
    y_true, y_pred = encode(rows["true_label"], labels), encode(rows["label"], labels)
    return LiveMetrics(len(rows), accuracy(y_true, y_pred), macro_f1(y_true, y_pred, len(labels) + 1))


def compare_live(true: Sequence[str], champion: Sequence[str], previous: Sequence[str], labels: Sequence[str],
                 previous_version: str, config: MonitorConfig) -> LiveComparison:
    """Both models' metric on the same labelled rows, with a paired bootstrap
    interval of previous - champion."""
    from tuneloop.tasks.metrics import metric_function, paired_bootstrap

    y_true, y_champion, y_previous = (encode(column, labels) for column in (true, champion, previous))
    score = metric_function(config.rollback_metric, len(labels) + 1)
    ci = paired_bootstrap(y_true, y_previous, y_champion, score, config.bootstrap_samples, config.confidence,
                          config.seed)
    return LiveComparison(config.rollback_metric, len(y_true), score(y_true, y_champion), score(y_true, y_previous),
                          ci["low"], ci["high"], str(previous_version))


# --- decisions (pure) --------------------------------------------------------------------------


def decide_drift(metrics: DriftMetrics | None, window_rows: int, config: MonitorConfig) -> DriftDecision:
    """Significant drift when any signal crosses its threshold; every signal
    gives its reason. Too few rows is "insufficient data", never drift."""
    if metrics is None or window_rows < config.min_rows:
        return DriftDecision("insufficient data", note=f"{window_rows} predictions in the window, fewer than "
                                                       f"min_rows {config.min_rows}: no drift verdict")
    drifted = [n for n, d in metrics.descriptor_distance.items() if d >= config.descriptor_distance]
    distances = ", ".join(f"{n} {d:.3f}" for n, d in metrics.descriptor_distance.items())
    signals = (
        Signal("embeddings", metrics.embedding_auc >= config.embedding_auc,
               f"embeddings: a classifier tells current from reference with ROC AUC {metrics.embedding_auc:.3f} "
               f"(drift at >= {config.embedding_auc}; 0.5 = indistinguishable)"),
        Signal("text_descriptors", metrics.descriptor_share >= config.descriptor_share,
               f"text descriptors: {len(drifted)} of {len(metrics.descriptor_distance)} drifted, share "
               f"{metrics.descriptor_share:.2f} (drift at >= {config.descriptor_share}); Wasserstein {distances} "
               f"(each drifts at >= {config.descriptor_distance})"),
        Signal("predictions", metrics.prediction_p_value < config.prediction_p_value,
               f"predicted labels: chi-square p = {metrics.prediction_p_value:.4f} (drift below "
               f"{config.prediction_p_value})"),
        Signal("confidence", metrics.confidence_distance >= config.confidence_distance,
               f"confidence: Wasserstein distance {metrics.confidence_distance:.3f} (drift at >= "
               f"{config.confidence_distance})"),
    )
    status = "drift" if any(s.drifted for s in signals) else "no drift"
    return DriftDecision(status, signals)


def rollback_blocker(config: MonitorConfig, labelled: int, previous_version: str | None,
                     champion_arrival: str | None) -> str | None:
    """Why no rollback can happen before the models are compared, or None.
    These checks are cheap; the comparison costs a model load."""
    if not config.auto_rollback:
        return "auto_rollback is off"
    if previous_version is None:
        return "no previous champion to roll back to"
    if champion_arrival in ROLLBACK_ACTIONS:
        return f"the champion arrived by {champion_arrival}; a restored champion is not rolled back automatically"
    if labelled < config.min_labelled_rows:
        return (f"{labelled} labelled live rows, fewer than min_labelled_rows {config.min_labelled_rows}: "
                "no rollback verdict")
    return None


def decide_rollback(config: MonitorConfig, labelled: int, previous_version: str | None,
                    champion_arrival: str | None, comparison: LiveComparison | None) -> RollbackDecision:
    """Roll back when the previous champion beats the champion on the same
    labelled live rows by at least the margin, with its interval above zero.

    Args:
        labelled: the window's labelled rows (the champion's live evidence).
        previous_version: the `previous` alias, None when unset.
        champion_arrival: the audit action that made the champion (`promote`,
            `forced`, `rollback`, ...). A champion that was itself restored by a
            rollback is not rolled back again automatically, so two versions never flap.
        comparison: both models on those rows; None when not computed.
    """
    blocker = rollback_blocker(config, labelled, previous_version, champion_arrival)
    if blocker is not None:
        return RollbackDecision(False, [blocker])
    if comparison is None:
        return RollbackDecision(False, [f"previous champion v{previous_version} was not scored on the live rows"])
    gap = comparison.previous - comparison.champion
    level = int(round(config.confidence * 100))
    worse = gap >= config.rollback_margin - 1e-9 and comparison.low > 0  # 0.82 - 0.80 is 0.0199999...
    reason = (f"live {comparison.metric} on {comparison.rows} labelled rows: champion {comparison.champion:.4f}, "
              f"previous (v{comparison.previous_version}) {comparison.previous:.4f}; previous is better by "
              f"{gap:+.4f} (rollback at >= {config.rollback_margin:+.4f}), {level}% CI "
              f"[{comparison.low:+.4f}, {comparison.high:+.4f}] {interval_position(comparison.low, comparison.high)}")
    return RollbackDecision(worse, [reason])


def arrival_action(trail: Sequence[dict], version: str) -> str | None:
    """The action of the newest audit entry that moved `champion` to `version`."""
    moves = [entry["action"] for entry in trail if entry.get("to") == str(version)]
    return moves[-1] if moves else None


# --- retraining --------------------------------------------------------------------------------

FEEDBACK_FILE = "feedback-%Y%m%dT%H%M%S.csv"  # the names triggers.export_feedback writes


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
