"""evaluate: base probe, champion and challenger on the same test rows.

One scoring path for every model: each becomes a function from texts to class
probabilities, and the same metrics code turns those into the numbers the gate
and the report use. Imports only torch, transformers, peft, numpy and pandas
(the HTML report is rendered by `tasks.report`, called from the I/O wrapper).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd

from tuneloop.model.calibration import (
    Abstention,
    abstains,
    decided_labels,
    risk_coverage,
    selective_summary,
    uncalibrated,
)
from tuneloop.model.metrics import accuracy, classification_summary, macro_f1, reliability
from tuneloop.tasks.perturbations import Perturbation, perturbations
from tuneloop.values.config import EvaluateConfig
from tuneloop.values.decision import TOLERANCE, Check, Decision, all_of
from tuneloop.values.errors import TuneloopError
from tuneloop.values.labels import label_index, label_indices

Scorer = Callable[[Sequence[str]], np.ndarray]
CORE_COLUMNS = {"row", "text", "label", "split", "id", "score"}
SLICE_PREFIX = "slice:"  # test_predictions columns holding each row's slice values
ROBUST_PREFIX = "unchanged:"  # test_predictions columns: per row, how many perturbations left the answer alone
# A lower scoring precision is allowed only when the model's test answers barely move:
MIN_AGREEMENT = 0.995  # share of test answers equal to fp32's
MAX_MACRO_F1_CHANGE = 0.005  # test macro-F1, either way
REGRESSION_PREFIX = "regression:"  # the gate's keys for the regression set's columns (domain, y_true, answers)
EARLIER_TEST_ROWS, REGRESSION_FILE = "earlier test rows", "regression file"  # the regression set's domains


@dataclass
class Candidate:
    """A model to evaluate: how to score it and what is known about it."""

    key: str  # base_probe | champion | challenger
    name: str
    scorer: Scorer
    version: str | None = None
    model_size_mb: float | None = None
    train_val_gap: float | None = None
    labels: list[str] | None = None  # the scorer's own label order; None: the evaluation's
    temperature: float = 1.0  # what the scorer's logits are divided by (its probabilities are calibrated)
    abstention: Abstention = Abstention()  # when it says "none of these"
    method: str | None = None  # lora | full | probe


def aligned(probs: np.ndarray, own: Sequence[str], labels: Sequence[str]) -> np.ndarray:
    """A model's probabilities over its own labels, as columns of the evaluation's
    `labels`: a label the model never learned (a new intent) gets probability 0,
    a label the evaluation no longer has is dropped."""
    out = np.zeros((len(probs), len(labels)), dtype=probs.dtype)
    index = label_index(labels)
    for j, name in enumerate(own):
        if name in index:
            out[:, index[name]] = probs[:, j]
    return out


def directory_size_mb(*paths: Path) -> float:
    """Size on disk of weight files (safetensors/bin) under the given folders."""
    total = 0
    for path in paths:
        total += sum(p.stat().st_size for p in Path(path).rglob("*") if p.suffix in {".safetensors", ".bin"})
    return total / 2**20


def slice_metrics(frame: pd.DataFrame, y_true: np.ndarray, y_pred: np.ndarray, columns: Sequence[str],
                  n_classes: int, min_rows: int) -> dict:
    """{column: {value: {rows, accuracy, macro_f1}}} for every slice value."""
    out: dict[str, dict] = {}
    for column in columns:
        out[column] = {}
        for value, rows in frame.groupby(column, sort=True).indices.items():
            if len(rows) < min_rows:
                continue
            out[column][str(value)] = {
                "rows": int(len(rows)), "accuracy": accuracy(y_true[rows], y_pred[rows]),
                "macro_f1": macro_f1(y_true[rows], y_pred[rows], n_classes),
            }
    return out


def slice_columns_of(frame: pd.DataFrame, config: EvaluateConfig) -> list[str]:
    if config.slice_columns is not None:
        return [c for c in config.slice_columns if c in frame.columns]
    return [c for c in frame.columns if c not in CORE_COLUMNS]


def candidate_probs(candidate: Candidate, texts: Sequence[str], labels: Sequence[str]) -> np.ndarray:
    """(rows, len(labels)) probabilities of one model, in the evaluation's label order."""
    probs = candidate.scorer(texts)
    if candidate.labels is not None and list(candidate.labels) != list(labels):
        probs = aligned(probs, candidate.labels, labels)
    return probs


def robustness_sample(rows: int, cap: int) -> np.ndarray:
    """Indices of at most `cap` of `rows` test rows, evenly spaced (all when they fit; none when cap is 0)."""
    if cap >= rows:
        return np.arange(rows)
    return np.unique(np.linspace(0, rows - 1, cap).round().astype(int)) if cap else np.arange(0)


def perturbed_texts(texts: Sequence[str], functions: dict[str, Perturbation]) -> dict[str, list[str]]:
    """Every text under each perturbation: {name: texts in order}."""
    return {name: [perturb(text) for text in texts] for name, perturb in functions.items()}


def score_robustness(candidate: Candidate, texts: Sequence[str], perturbed: dict[str, list[str]],
                     clean: np.ndarray, y_true: np.ndarray, labels: Sequence[str]) -> tuple[dict, np.ndarray]:
    """One model's answers on perturbed copies of the rows, against its answers on the clean ones.

    Only texts a perturbation changed are scored (in one call, so one progress bar);
    an unchanged text keeps its clean answer.

    Args:
        clean: the model's answers on `texts`; y_true: their labels.
    Returns:
        {rows, unchanged (pooled share), clean_macro_f1, perturbations: {name: {changed_texts,
        unchanged, macro_f1, macro_f1_drop}}} and, per row, how many perturbations left its answer alone.
    """
    altered = {name: np.flatnonzero([a != b for a, b in zip(texts, out)]) for name, out in perturbed.items()}
    batch = [perturbed[name][i] for name, rows in altered.items() for i in rows]
    answers = (decided_labels(candidate_probs(candidate, batch, labels), candidate.abstention, labels)
               if batch else np.zeros(0, dtype=int))
    n_classes, clean_f1 = len(labels), macro_f1(y_true, clean, len(labels))
    unchanged, per, start = np.zeros(len(texts), dtype=int), {}, 0
    for name, rows in altered.items():
        answer = clean.copy()
        answer[rows] = answers[start:start + len(rows)]
        start += len(rows)
        same = answer == clean
        unchanged += same
        f1 = macro_f1(y_true, answer, n_classes)
        per[name] = {"changed_texts": int(len(rows)), "unchanged": float(same.mean()) if len(same) else 1.0,
                     "macro_f1": f1, "macro_f1_drop": clean_f1 - f1}
    pooled = float(unchanged.mean() / len(perturbed)) if len(texts) and perturbed else 1.0
    return {"rows": len(texts), "unchanged": pooled, "clean_macro_f1": clean_f1, "perturbations": per}, unchanged


def timed_scoring(scorer: Scorer, texts: Sequence[str]) -> tuple[np.ndarray, float]:
    """`scorer(texts)` and its batch latency: the wall time of the whole call (tokenising
    included) divided by its rows, in ms per example. The gate's `max_latency_ms` and the
    baseline's choice of base model both read latencies measured this way."""
    started = time.perf_counter()
    probs = scorer(texts)
    return probs, (time.perf_counter() - started) * 1000 / max(1, len(texts))


def score_candidate(candidate: Candidate, test: pd.DataFrame, y_true: np.ndarray, labels: Sequence[str],
                    slices: Sequence[str], config: EvaluateConfig) -> tuple[dict, np.ndarray]:
    """Scores one model on the test rows; returns its metrics and probabilities.

    Latency is the wall time of scoring the whole test split divided by its
    rows (`timed_scoring`): batch latency per example. The metrics are
    on the model's answers: its top label, or, where it abstains and the data
    has an out-of-scope label, that label. ECE is given for the calibrated
    probabilities and for the raw ones (`ece_uncalibrated`).
    """
    probs, latency_ms = timed_scoring(lambda texts: candidate_probs(candidate, texts, labels), test["text"].tolist())
    answers = decided_labels(probs, candidate.abstention, labels)
    summary = classification_summary(probs, y_true, labels, answers)
    summary.update(
        name=candidate.name, version=candidate.version, method=candidate.method, latency_ms_per_example=latency_ms,
        model_size_mb=candidate.model_size_mb, train_val_gap=candidate.train_val_gap,
        slices=slice_metrics(test, y_true, answers, slices, len(labels), config.min_slice_rows),
        # labels of this data version the model never learned (new intents): it scores 0 on them
        unknown_labels=sorted(set(labels) - set(candidate.labels)) if candidate.labels is not None else [],
        temperature=candidate.temperature,
        ece_uncalibrated=reliability(uncalibrated(probs, candidate.temperature), y_true)["ece"],
        abstention={**selective_summary(probs, y_true, candidate.abstention, labels),
                    "rule": candidate.abstention.rule},
        risk_coverage=risk_coverage(probs, y_true),
    )
    return summary, probs


def evaluate_models(candidates: Sequence[Candidate], test: pd.DataFrame, labels: Sequence[str],
                    config: EvaluateConfig, data_version: str) -> tuple[dict, pd.DataFrame]:
    """Scores every candidate on identical rows.

    Returns:
        The evaluation dict (per model: accuracy, macro-F1, per-class scores,
        confusion matrix, ECE and reliability bins, slices, latency, size, gap,
        robustness under `config.perturbations`) and a per-row frame of true and
        predicted label indices (and perturbations survived) for the gate.
    """
    y_true = label_indices(test["label"], labels)
    slices = slice_columns_of(test, config)
    evaluation = {"data_version": data_version, "labels": list(labels), "test_rows": int(len(test)), "models": {}}
    predictions = pd.DataFrame({"row": test["row"].to_numpy(), "y_true": y_true})
    for column in slices:  # the gate bootstraps each slice on its own rows
        predictions[f"{SLICE_PREFIX}{column}"] = test[column].astype(str).to_numpy()
    for candidate in candidates:
        summary, probs = score_candidate(candidate, test, y_true, labels, slices, config)
        evaluation["models"][candidate.key] = summary
        predictions[candidate.key] = decided_labels(probs, candidate.abstention, labels)
        predictions[f"{candidate.key}_confidence"] = probs.max(1)
        oos = labels.index(candidate.abstention.out_of_scope) if candidate.abstention.out_of_scope in labels else None
        predictions[f"{candidate.key}_abstained"] = abstains(probs, candidate.abstention.threshold, oos)
    sample = robustness_sample(len(test), config.robustness_rows if config.perturbations else 0)
    if len(sample):
        texts = test["text"].iloc[sample].tolist()
        perturbed = perturbed_texts(texts, perturbations(config.perturbations, config.typo_rate))
        evaluation["robustness"] = {"rows": int(len(sample)), "perturbations": list(config.perturbations),
                                    "typo_rate": config.typo_rate}
        for candidate in candidates:
            clean = predictions[candidate.key].to_numpy()[sample]
            summary, unchanged = score_robustness(candidate, texts, perturbed, clean, y_true[sample], labels)
            evaluation["models"][candidate.key]["robustness"] = summary
            column = np.full(len(test), np.nan)
            column[sample] = unchanged
            predictions[f"{ROBUST_PREFIX}{candidate.key}"] = column  # NaN: a row left out of the sample
    return evaluation, predictions


class RegressionFileError(TuneloopError, ValueError):
    """evaluate.regression_file cannot be read as labelled rows."""


def read_regression_file(path: Path, labels: Sequence[str]) -> pd.DataFrame:
    """The rows of `evaluate.regression_file`: a CSV or JSONL (JSON lines) file with `text` and
    `label` columns and, optionally, `slice` (its domain in the report; "regression file" if absent).

    Raises:
        RegressionFileError: the file is missing or of another format, lacks a column, has an
            empty text, or holds a label this evaluation does not know (naming up to 5).
    """
    path = Path(path)
    readers = {".csv": lambda p: pd.read_csv(p, dtype=str, keep_default_na=False),
               ".jsonl": lambda p: pd.read_json(p, lines=True, dtype=False)}
    if path.suffix.lower() not in readers or not path.is_file():
        raise RegressionFileError(f"evaluate.regression_file: {path} is not a .csv or .jsonl file")
    try:
        frame = readers[path.suffix.lower()](path)
    except ValueError as err:
        raise RegressionFileError(f"evaluate.regression_file: {path} cannot be read: {err}") from err
    missing = [c for c in ("text", "label") if c not in frame.columns]
    if missing:
        raise RegressionFileError(f"evaluate.regression_file: {path} lacks the column(s) {missing}")
    frame = frame.assign(text=frame["text"].astype(str), label=frame["label"].astype(str),
                         slice=frame["slice"].astype(str) if "slice" in frame.columns else REGRESSION_FILE)
    if (frame["text"].str.strip() == "").any():
        raise RegressionFileError(f"evaluate.regression_file: {path} has rows with an empty text")
    unknown = sorted(set(frame["label"]) - set(labels))
    if unknown:
        raise RegressionFileError(f"evaluate.regression_file: {path} holds labels the data does not: {unknown[:5]}")
    return frame[["text", "label", "slice"]].reset_index(drop=True)


def regression_scores(y_true: np.ndarray, answers: np.ndarray, domains: np.ndarray, n_classes: int) -> dict:
    """{rows, accuracy, macro_f1, domains: {domain: {rows, accuracy, macro_f1}}} of one model."""
    per = {}
    for domain in dict.fromkeys(domains):  # in order of first appearance: earlier test rows first
        rows = domains == domain
        per[str(domain)] = {"rows": int(rows.sum()), "accuracy": accuracy(y_true[rows], answers[rows]),
                            "macro_f1": macro_f1(y_true[rows], answers[rows], n_classes)}
    return {"rows": int(len(y_true)), "accuracy": accuracy(y_true, answers) if len(y_true) else None,
            "macro_f1": macro_f1(y_true, answers, n_classes) if len(y_true) else None, "domains": per}


def evaluate_regression(candidates: Sequence[Candidate], test: pd.DataFrame, predictions: pd.DataFrame,
                        earlier: np.ndarray, extra: pd.DataFrame | None,
                        labels: Sequence[str]) -> tuple[dict, pd.DataFrame]:
    """Every candidate on the regression set, the check that retraining did not forget:
    the test rows that were test rows of the champion's data version too (`earlier`; their
    answers are taken from `predictions`, nothing is scored twice) and the rows of
    `evaluate.regression_file` (`extra`, scored here, each model in one call).

    Returns:
        {rows, domains: {domain: rows}, models: {key: regression_scores}} and, per row of the
        set, its domain, source row (the test row's `row`, or the file's 0-based line),
        `y_true` and each candidate's answer.
    """
    extra = extra if extra is not None else pd.DataFrame({"text": [], "label": [], "slice": []})
    earlier = np.asarray(earlier, dtype=bool)
    frame = pd.DataFrame({
        "domain": np.concatenate([np.full(int(earlier.sum()), EARLIER_TEST_ROWS, dtype=object),
                                  extra["slice"].to_numpy(dtype=object)]),
        "row": np.concatenate([test["row"].to_numpy()[earlier], np.arange(len(extra))]).astype(int),
        "y_true": np.concatenate([predictions["y_true"].to_numpy()[earlier],
                                  label_indices(extra["label"], labels)]).astype(int),
    })
    texts = extra["text"].tolist()
    summary = {"rows": int(len(frame)), "domains": {str(k): int(v) for k, v in frame["domain"].value_counts(
        sort=False).items()}, "models": {}}
    for candidate in candidates:
        new = (decided_labels(candidate_probs(candidate, texts, labels), candidate.abstention, labels)
               if texts else np.zeros(0, dtype=int))
        frame[candidate.key] = np.concatenate([predictions[candidate.key].to_numpy()[earlier], new]).astype(int)
        summary["models"][candidate.key] = regression_scores(frame["y_true"].to_numpy(),
                                                             frame[candidate.key].to_numpy(),
                                                             frame["domain"].to_numpy(), len(labels))
    return summary, frame


def precision_check(fp32_answers: np.ndarray, answers: np.ndarray, y_true: np.ndarray, n_labels: int,
                    precision: str) -> Decision:
    """May a model score in `precision`? Yes when its test answers in that precision
    (`answers`) equal its fp32 answers on at least MIN_AGREEMENT of the rows and its
    macro-F1 moves by at most MAX_MACRO_F1_CHANGE."""
    agreement = float((fp32_answers == answers).mean()) if len(answers) else 0.0
    before, after = macro_f1(y_true, fp32_answers, n_labels), macro_f1(y_true, answers, n_labels)
    return all_of(f"{precision} scoring", [
        Check("agreement", agreement >= MIN_AGREEMENT - TOLERANCE,
              f"{agreement:.2%} of {len(answers)} test answers equal fp32's (at least {MIN_AGREEMENT:.1%})"),
        Check("macro_f1", abs(after - before) <= MAX_MACRO_F1_CHANGE + TOLERANCE,
              f"test macro-F1 {after:.4f} in {precision}, {before:.4f} in fp32 (at most {MAX_MACRO_F1_CHANGE} apart)"),
    ])


def score_precision(candidate: Candidate, test: pd.DataFrame, labels: Sequence[str], fp32_answers: np.ndarray,
                    precision: str) -> dict:
    """`candidate` (loaded in `precision`) scores the test rows; its answers against fp32's.

    Returns:
        {"precision", "allowed", "reasons", "latency_ms_per_example"} for the evaluation.
    """
    probs, latency_ms = timed_scoring(lambda texts: candidate_probs(candidate, texts, labels), test["text"].tolist())
    answers = decided_labels(probs, candidate.abstention, labels)
    verdict = precision_check(fp32_answers, answers, label_indices(test["label"], labels), len(labels), precision)
    return {"precision": precision, "allowed": verdict.yes, "reasons": verdict.reasons,
            "latency_ms_per_example": latency_ms}


def classifier_candidate(key: str, name: str, model_dir: Path, base_model: str | None, batch_size: int,
                         version: str | None = None, train_val_gap: float | None = None,
                         precision: str | None = None) -> Candidate:
    """A model saved by the finetune or baseline stage (or downloaded from the registry).

    Args:
        base_model: overrides the base model the folder records (None: use the
            recorded one, which is right for a champion trained on another base).
        precision: "fp32" or "bf16"; None: what the folder allows on this machine.
    """
    from tuneloop.model.classifier import load_classifier, needs_base, predict_proba, read_meta, resolve_model_path

    classifier = load_classifier(model_dir, base_model, precision=precision)
    meta = read_meta(model_dir)
    size = directory_size_mb(model_dir)
    if needs_base(model_dir):  # serving needs the base weights too
        size += directory_size_mb(resolve_model_path(base_model or meta["base_model"]))

    def scorer(texts: Sequence[str]) -> np.ndarray:
        return predict_proba(classifier, texts, batch_size, progress=True)

    return Candidate(key, name, scorer, version, size, train_val_gap, list(classifier.labels),
                     classifier.temperature, classifier.abstention, meta.get("method"))
