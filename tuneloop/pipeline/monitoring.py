"""The monitor's reads and writes: the window, the champion's files, the rollback, the MLflow run.

Stage I/O for `flows/monitor.py`, as `tuneloop/pipeline/stages.py` is for the retrain
flow: each function reads what it needs from the store, the registry and the
workspace, calls the pure work in `tasks/` (drift, metrics, feedback, rollback), and
writes the outcome back. The flow only composes them.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, replace
from datetime import timedelta
from pathlib import Path

import pandas as pd

from tuneloop.model.metrics import EstimatedPerformance, estimate_performance
from tuneloop.pipeline.params import Params
from tuneloop.plumbing.tracking import configure_tracking, flatten
from tuneloop.service.store import PredictionStore, store_url, utcnow
from tuneloop.tasks import registry
from tuneloop.tasks.drift import (
    DriftMetrics,
    abstention_shift,
    classifier_predictor,
    compute_drift,
    current_frame,
    encoder_embedder,
    probability_matrix,
    reference_frame,
    sample,
)
from tuneloop.tasks.feedback import export_feedback, labelled_rows, last_feedback_export
from tuneloop.tasks.rollback import arrival_action, compare_live, decide_rollback, rollback_blocker
from tuneloop.tasks.shadow import DISCARD, PROMOTE, shadow_decision, shadow_stats
from tuneloop.values.workspace import Workspace


def prediction_store(params: Params, workspace: Workspace) -> PredictionStore:
    """The store the service logs to ($TUNELOOP_STORE_URL, serve.store_url, SQLite in the workspace)."""
    return PredictionStore(store_url(params.serve, workspace.root))


def read_window(params: Params, workspace: Workspace, version: str) -> pd.DataFrame:
    """The champion's window, with the text of only the rows that need one: the drift
    sample (`current_frame` draws the same rows) and the labelled rows (rollback
    re-scores them); the other rows' text is None. Memory grows by ~100 bytes a
    row, not by the texts."""
    config = params.monitor
    store = prediction_store(params, workspace)
    start = utcnow() - timedelta(hours=config.window_hours) if config.window_hours else None
    window = store.window(start=start, model_version=version, limit=config.window_rows, texts=False)
    needed = set(sample(window, config.sample_rows, config.seed)["id"]) | set(
        window.loc[window["true_label"].notna(), "id"])
    texts = store.texts(sorted(needed))
    window["text"] = [texts.get(i) for i in window["id"]]
    return window


def champion_labels(params: Params, workspace: Workspace, version: str) -> tuple[str, ...]:
    """The labels feedback is scored against: params' list, or with `labels: auto`
    the champion's own (what it can predict)."""
    if params.declared_labels:
        return params.declared_labels
    model_dir = registry.download_version(params.mlflow.model_name, version, workspace.models_cache)
    return tuple(json.loads((model_dir / "labels.json").read_text()))


def version_predictor(params: Params, workspace: Workspace, version: str):
    """A registered version scoring texts on the base model it was trained on, both
    checked against their recorded hashes (as serve and evaluate load them)."""
    model_dir, base = registry.verified_version(params.mlflow.model_name, version, workspace.models_cache,
                                                fallback_base=params.model.base)
    return classifier_predictor(model_dir, str(base) if base else params.model.base, params.monitor)


def measure_drift(params: Params, workspace: Workspace, version: str, window: pd.DataFrame,
                  report_path: Path) -> DriftMetrics:
    """The champion's reference sample (scored by the champion) against the window."""
    from tuneloop.model.classifier import resolve_model_path

    config = params.monitor
    embed = encoder_embedder(resolve_model_path(params.model.base), config)
    reference = cached_reference(params, workspace, version, embed)
    metrics = compute_drift(reference, current_frame(window, config, embed), config, report_path)
    expected = expected_abstention(params, workspace, version)
    served = window["abstained"] if "abstained" in window else []
    return replace(metrics, **abstention_shift(list(served), expected))


def estimate_window(params: Params, workspace: Workspace, window: pd.DataFrame,
                    labels: tuple[str, ...]) -> EstimatedPerformance | None:
    """Accuracy and macro-F1 of every prediction in the window, estimated from their
    logged calibrated probabilities alone (None: an empty window). With two labels
    the served confidence holds both probabilities, so nothing more is read."""
    if window.empty:
        return None
    config = params.monitor
    logged = None
    if len(labels) > 2:
        fetched = prediction_store(params, workspace).probabilities(window["id"].tolist())
        logged = [fetched.get(i) for i in window["id"]]
    probs = probability_matrix(logged, window["label"].tolist(), window["confidence"].tolist(), labels)
    return estimate_performance(probs, config.bootstrap_samples, config.confidence, config.seed)


def tested_accuracy(version: registry.VersionInfo) -> float | None:
    """The version's test accuracy as registered (tag `test.accuracy`; None: not recorded)."""
    value = version.tags.get("test.accuracy")
    return float(value) if value else None


def cached_reference(params: Params, workspace: Workspace, version: str, embed) -> pd.DataFrame:
    """The version's reference sample, scored and embedded once per version and
    reference settings, then read back (a registered version never changes: its
    files are hash-checked when loaded)."""
    import hashlib

    name, config = params.mlflow.model_name, params.monitor
    key = json.dumps([name, version, params.model.base, config.reference_split, config.sample_rows, config.seed,
                      config.max_length])
    path = workspace.models_cache / f"reference-{hashlib.sha256(key.encode()).hexdigest()[:16]}.parquet"
    if path.exists():
        return pd.read_parquet(path)
    splits = pd.read_parquet(registry.download_reference(name, version, workspace.models_cache))
    reference = reference_frame(splits, config, version_predictor(params, workspace, version), embed)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    reference.to_parquet(partial)
    partial.replace(path)
    return reference


def expected_abstention(params: Params, workspace: Workspace, version: str) -> float | None:
    """The share of validation rows the version abstained on (None: registered before abstention)."""
    from tuneloop.model.classifier import read_meta

    model_dir = registry.download_version(params.mlflow.model_name, version, workspace.models_cache)
    abstention = read_meta(model_dir).get("abstention")
    return abstention.get("validation_abstain_rate") if abstention else None


def check_rollback(params: Params, workspace: Workspace, version: str, window: pd.DataFrame,
                   labels: tuple[str, ...]) -> dict:
    """Re-scores the previous champion on the champion's labelled rows when a
    rollback could follow, decides, and moves the alias back if it must."""
    name, config = params.mlflow.model_name, params.monitor
    previous = registry.alias_version(name, registry.PREVIOUS)
    previous_version = previous.version if previous else None
    arrival = arrival_action(registry.audit_trail(name), version)
    rows = labelled_rows(window, labels)
    comparison = None
    # rollback_blocker refuses without a previous champion: previous_version is set below it
    if rollback_blocker(config, len(rows), previous_version, arrival) is None and previous_version is not None:
        predicted, _ = version_predictor(params, workspace, previous_version)(rows["text"].tolist())
        comparison = compare_live(rows["true_label"], rows["label"], predicted, labels, previous_version, config)
    decision = decide_rollback(config, len(rows), previous_version, arrival, comparison)
    result = {"rolled_back": False, "reasons": decision.reasons, "from": version, "to": previous_version,
              "comparison": asdict(comparison) if comparison else None}
    current = registry.alias_version(name, registry.CHAMPION)
    if (decision.yes and previous_version is not None and current is not None
            and current.version == version):  # nobody moved it meanwhile
        result["audit"] = registry.move_champion(name, previous_version, "auto-rollback", "; ".join(decision.reasons))
        result["rolled_back"] = True
    return result


def check_shadow(params: Params, workspace: Workspace, champion: str) -> dict:
    """The shadow version judged on the champion's predictions it also scored since it
    became the shadow; promoted (audited `shadow-promote`) or discarded (audited
    `shadow-discard`, tagged with the reasons) once the baking window is full.

    Returns:
        {"shadow", "verdict" (promote | discard | wait | None: no shadow), "reasons", "stats"}.
    """
    from datetime import datetime, timezone

    name = params.mlflow.model_name
    shadow = registry.alias_version(name, registry.SHADOW)
    if shadow is None:
        return {"shadow": None, "verdict": None, "reasons": ["no shadow version"], "stats": None}
    started = registry.shadow_started(name, shadow.version)
    start = datetime.fromtimestamp(started, timezone.utc) if started is not None else utcnow()
    pairs = prediction_store(params, workspace).shadow_pairs(shadow.version, champion, start)
    labels = champion_labels(params, workspace, champion)
    stats = shadow_stats(pairs, labels, start, utcnow(), params.shadow)
    verdict, reasons = shadow_decision(stats, params.shadow)
    result = {"shadow": shadow.version, "champion": champion, "verdict": verdict, "reasons": reasons,
              "stats": asdict(stats)}
    current = registry.alias_version(name, registry.SHADOW)
    if current is None or current.version != shadow.version:  # someone moved it meanwhile: judge it next time
        return {**result, "verdict": "wait", "reasons": ["the shadow alias moved during the check"]}
    if verdict == PROMOTE:
        result["audit"] = registry.promote_shadow(name, shadow.version, "shadow passed: " + "; ".join(reasons))
    elif verdict == DISCARD:
        result["audit"] = registry.discard_shadow(name, shadow.version, reasons)
    return result


def log_monitoring(params: Params, workspace: Workspace, version: str, summary: dict) -> str:
    """One MLflow run (experiment `<experiment>-monitor`, so `tuneloop status`
    keeps showing pipeline runs) tagged with the model version; the live and
    drift numbers also go on the version itself as tags."""
    from mlflow.entities import Metric, Param

    name = params.mlflow.model_name
    experiment_id = configure_tracking(replace(params.mlflow, experiment=f"{params.mlflow.experiment}-monitor"),
                                       workspace.root)
    client = registry.client()
    tags = {"model_name": name, "model_version": version, "drift.status": summary["drift"]["status"],
            "rolled_back": str(summary["rollback"]["rolled_back"]).lower()}
    run = client.create_run(experiment_id, tags=tags, run_name=f"monitor v{version}")
    numbers = {"window_rows": summary["window_rows"], "live": summary["live"],
               "estimated": summary["estimated"]["metrics"] or {},
               "drift": summary["drift"]["metrics"] or {}, "rollback": summary["rollback"]["comparison"] or {}}
    now = int(time.time() * 1000)
    client.log_batch(run.info.run_id, metrics=[Metric(k, v, now, 0) for k, v in flatten("", numbers).items()],
                     params=[Param(k, str(v)) for k, v in asdict(params.monitor).items()])
    client.log_text(run.info.run_id, json.dumps(summary, indent=2, default=str), "monitor/summary.json")
    if summary["report"]:
        client.log_artifact(run.info.run_id, summary["report"], artifact_path="monitor")
    client.set_terminated(run.info.run_id)
    version_tags = {f"live.{k}": v for k, v in summary["live"].items() if v is not None}
    estimate = summary["estimated"]["metrics"] or {}
    version_tags.update({f"estimated.{k}": f"{estimate[k]:.6f}" for k in ("accuracy", "macro_f1") if k in estimate})
    version_tags.update({"drift.status": summary["drift"]["status"], "monitor.run_id": run.info.run_id,
                         "monitor.at": summary["at"]})
    for key, value in version_tags.items():
        client.set_model_version_tag(name, version, key, str(value))
    return run.info.run_id


def new_feedback(params: Params, workspace: Workspace, labels: tuple[str, ...]) -> pd.DataFrame:
    """Feedback-labelled rows since the last export to the incoming folder."""
    incoming = incoming_folder(params, workspace)
    return labelled_rows(prediction_store(params, workspace).labelled(last_feedback_export(incoming)), labels)


def export_new_feedback(params: Params, workspace: Workspace, rows: pd.DataFrame) -> Path:
    """Writes those rows to the incoming folder: the next data version includes them."""
    path, _ = export_feedback(rows, incoming_folder(params, workspace), utcnow(), mask=params.serve.mask_pii)
    if path is None:
        raise ValueError("no labelled row to export: retraining asks for new labelled rows")
    return path


def incoming_folder(params: Params, workspace: Workspace) -> Path:
    """The folder labelled feedback goes to (flows/monitor.py checks that it is set first)."""
    if params.ingest.incoming_dir is None:
        raise ValueError("ingest.incoming_dir is not set: feedback cannot reach training")
    return workspace.root / params.ingest.incoming_dir
