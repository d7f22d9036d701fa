"""drift: is production still the data the champion learned from, and is the champion still good?

A window of logged predictions is compared with the champion's reference data
(a sample of its training split, scored by the champion) by Evidently: text
descriptors, the base encoder's embeddings, predicted labels and confidences.
The decision is a pure function returning its reasons, like the gate. Without
labels, the window's accuracy is estimated from its logged calibrated
probabilities (`metrics.estimate_performance`) and compared with the
champion's test accuracy by another pure decision. Live metrics from feedback
are in `tasks/feedback.py`, the rollback decision in `tasks/rollback.py`.

Evidently (0.7) is imported only where a report is built, so the decisions
import nothing heavy.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence, cast

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike

from tuneloop.model.metrics import EstimatedPerformance
from tuneloop.values.config import MonitorConfig
from tuneloop.values.decision import TOLERANCE, Check, Decision

TEXT, PREDICTION, CONFIDENCE = "text", "prediction", "confidence"
EMBEDDING = "text_embedding"  # the Evidently embedding set: columns emb_0 ... emb_<hidden-1>
DESCRIPTORS = ("chars", "words", "sentences", "non_letter_pct")
SIGNAL_MARKS = ("DRIFT ", "ok    ")  # a drifted signal, a quiet one
DROP_MARKS = ("DROP  ", "ok    ")  # the estimated accuracy fell too far, or did not

Embed = Callable[[Sequence[str]], np.ndarray]  # texts -> (rows, hidden) sentence embeddings
Predict = Callable[[Sequence[str]], tuple[list[str], np.ndarray]]  # texts -> predicted labels, confidences


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
    # "none of these" answers: the window's share against the share the champion gave on validation
    abstain_expected: float | None = None
    abstain_rate: float | None = None
    abstain_p_value: float | None = None  # one-sided binomial: more abstentions than expected

    def to_dict(self) -> dict:
        return asdict(self)


# --- frames ------------------------------------------------------------------------------------


def sample(frame: pd.DataFrame, rows: int, seed: int) -> pd.DataFrame:
    """At most `rows` rows, drawn without replacement, in their original order."""
    if len(frame) <= rows:
        return frame.reset_index(drop=True)
    return frame.sample(rows, random_state=seed).sort_index().reset_index(drop=True)


def drift_frame(texts: Iterable[str], predicted: Iterable[str], confidence: ArrayLike,
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
    from tuneloop.model.classifier import mean_pooled_embeddings
    from tuneloop.tasks.baseline import load_encoder

    encoder, tokenizer = load_encoder(base_path, config.device)
    return lambda texts: mean_pooled_embeddings(encoder, tokenizer, list(texts), config.max_length, config.batch_size)


def classifier_predictor(model_dir: Path, base_model: str, config: MonitorConfig) -> Predict:
    """A registered version's predicted labels and confidences."""
    from tuneloop.model.classifier import load_classifier, predict_proba

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

    # evidently's @autoregister decorator hides the class's own signature (and __call__) from type checkers
    return cast(Any, ModelDriftMethod)(threshold=config.embedding_auc)


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
    current_data, reference_data = (Dataset.from_pandas(frame, data_definition=definition,
                                                        descriptors=text_descriptors())
                                     for frame in (current, reference))
    metrics = drift_report_metrics(config, with_embeddings=report_path is not None)
    # EmbeddingsDrift's t-SNE is OpenMP code: on a busy 2-core machine (serving beside it) two
    # spinning threads took 37 s for 300 rows, one thread 2.5 s.
    with threadpool_limits(1, user_api="openmp"):
        snapshot = Report(list(metrics.values())).run(current_data, reference_data)
    # typed as the base MetricResult: these metrics give a SingleValue (.value) or, for
    # DriftedColumnsCount, a CountValue (.share)
    result: dict[str, Any] = {key: snapshot.metric_results[metric.metric_id] for key, metric in metrics.items()}
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


def abstention_shift(abstained: Sequence[bool | None], expected: float | None) -> dict:
    """The window's abstention rate against the champion's rate on validation: a rise
    means more inputs fit none of its labels. Rows logged before abstention existed
    (None) are left out; a model that never abstains gives no signal.

    Returns:
        {abstain_expected, abstain_rate, abstain_p_value}; the last two None without a signal.
    """
    from scipy import stats

    known = np.asarray([bool(a) for a in abstained if a is not None and not pd.isna(a)], dtype=bool)
    if expected is None or expected <= 0 or not len(known):
        return {"abstain_expected": expected, "abstain_rate": float(known.mean()) if len(known) else None,
                "abstain_p_value": None}
    test = stats.binomtest(int(known.sum()), len(known), min(expected, 1.0), alternative="greater")
    return {"abstain_expected": float(expected), "abstain_rate": float(known.mean()),
            "abstain_p_value": float(test.pvalue)}


def probability_matrix(logged: Sequence[dict | None] | None, predicted: Sequence[str], confidence: Sequence[float],
                       labels: Sequence[str]) -> np.ndarray:
    """(rows, labels) calibrated probabilities from the store's per-row {label: p}.

    A row missing some labels (logged with its top label only, None, or `logged`
    None: no row fetched) keeps its predicted label's confidence and shares what
    is left equally among the labels it lacks: exact for two labels."""
    index = {label: j for j, label in enumerate(labels)}
    out = np.full((len(predicted), len(labels)), np.nan)
    for i, row in enumerate(logged or ()):
        for label, p in (row or {}).items():
            if label in index:
                out[i, index[label]] = float(p)
    rows = np.arange(len(predicted))
    top = np.array([index.get(label, -1) for label in predicted], dtype=np.int64)  # (rows,) -1: unknown label
    known = top >= 0
    fill = known & np.isnan(out[rows, np.where(known, top, 0)])
    out[rows[fill], top[fill]] = np.asarray(confidence, dtype=float)[fill]
    missing = np.isnan(out)
    left = np.clip(1.0 - np.nansum(out, axis=1), 0.0, None) / np.maximum(missing.sum(1), 1)  # (rows,)
    return np.where(missing, left[:, None], out)


# --- the decisions (pure) --------------------------------------------------------------------


def decide_drift(metrics: DriftMetrics | None, window_rows: int, config: MonitorConfig) -> Decision:
    """Significant drift when any signal crosses its threshold; every signal
    gives its reason. Too few rows is "insufficient data", never drift."""
    if metrics is None or window_rows < config.min_rows:
        return Decision("drift", False, note=f"{window_rows} predictions in the window, fewer than "
                                             f"min_rows {config.min_rows}: no drift verdict", marks=SIGNAL_MARKS)
    drifted = [n for n, d in metrics.descriptor_distance.items() if d >= config.descriptor_distance]
    distances = ", ".join(f"{n} {d:.3f}" for n, d in metrics.descriptor_distance.items())
    signals = (
        Check("embeddings", metrics.embedding_auc >= config.embedding_auc,
              f"embeddings: a classifier tells current from reference with ROC AUC {metrics.embedding_auc:.3f} "
              f"(drift at >= {config.embedding_auc}; 0.5 = indistinguishable)"),
        Check("text_descriptors", metrics.descriptor_share >= config.descriptor_share,
              f"text descriptors: {len(drifted)} of {len(metrics.descriptor_distance)} drifted, share "
              f"{metrics.descriptor_share:.2f} (drift at >= {config.descriptor_share}); Wasserstein {distances} "
              f"(each drifts at >= {config.descriptor_distance})"),
        Check("predictions", metrics.prediction_p_value < config.prediction_p_value,
              f"predicted labels: chi-square p = {metrics.prediction_p_value:.4f} (drift below "
              f"{config.prediction_p_value})"),
        Check("confidence", metrics.confidence_distance >= config.confidence_distance,
              f"confidence: Wasserstein distance {metrics.confidence_distance:.3f} (drift at >= "
              f"{config.confidence_distance})"),
    )
    if metrics.abstain_p_value is not None:
        signals += (Check("abstentions", metrics.abstain_p_value < config.abstain_p_value,
                          f"abstentions (\"none of these\"): {metrics.abstain_rate:.1%} of the window against "
                          f"{metrics.abstain_expected:.1%} on validation, binomial p = {metrics.abstain_p_value:.4g} "
                          f"(drift below {config.abstain_p_value})"),)
    return Decision("drift", any(s.passed for s in signals), signals, marks=SIGNAL_MARKS)


def drift_status(decision: Decision) -> str:
    """"drift", "no drift", or "insufficient data" when no signal could be measured."""
    if decision.note:
        return "insufficient data"
    return "drift" if decision.yes else "no drift"


def decide_estimated_drop(estimate: EstimatedPerformance | None, reference_accuracy: float | None,
                          window_rows: int, config: MonitorConfig) -> Decision:
    """Yes when the window's estimated accuracy (CBPE, without labels) lies more than
    `max_estimated_accuracy_drop` below the champion's test accuracy: a retraining
    reason like drift. No verdict (a note) when it is switched off, the window is
    under `min_rows`, or the champion has no recorded test accuracy."""
    limit = config.max_estimated_accuracy_drop
    if limit is None:
        return Decision("estimated drop", False, note="monitor.max_estimated_accuracy_drop is null: not checked",
                        marks=DROP_MARKS)
    if estimate is None or window_rows < config.min_rows:
        return Decision("estimated drop", False, note=f"{window_rows} predictions in the window, fewer than "
                                                      f"min_rows {config.min_rows}: no estimate", marks=DROP_MARKS)
    said = (f"estimated accuracy {estimate.accuracy:.3f} ({estimate.confidence:.0%} range "
            f"{estimate.accuracy_low:.3f}-{estimate.accuracy_high:.3f}), macro-F1 {estimate.macro_f1:.3f}, "
            f"from the calibrated confidences of {estimate.rows} predictions")
    if reference_accuracy is None:
        return Decision("estimated drop", False, note=f"{said}; the champion has no test accuracy to compare with",
                        marks=DROP_MARKS)
    drop = reference_accuracy - estimate.accuracy
    where = "below" if drop >= 0 else "above"
    check = Check("estimated_accuracy", drop - limit > TOLERANCE,
                  f"{said}: {abs(drop):.3f} {where} the champion's test accuracy {reference_accuracy:.3f} "
                  f"(retrain when more than {limit})")
    return Decision("estimated drop", check.passed, (check,), marks=DROP_MARKS)
