"""The monitoring flow: is the champion still seeing its data, and still good?

Window of the champion's logged predictions → Evidently drift against its
training split (HTML under `reports/monitor/`) → live accuracy/macro-F1 from
feedback → drift decision → automatic rollback when the previous champion is
better on the same labelled rows → one MLflow run with every number, and the
numbers on the model version as tags → a retraining request on significant
drift with enough new labelled rows. Decisions are pure functions in
`tasks.drift`; this file only composes.
"""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from datetime import timedelta
from pathlib import Path

import pandas as pd
from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from tuneloop.tasks import registry
from tuneloop.tasks.drift import (
    DriftDecision,
    DriftMetrics,
    LiveMetrics,
    arrival_action,
    classifier_predictor,
    compare_live,
    compute_drift,
    current_frame,
    decide_drift,
    decide_rollback,
    encoder_embedder,
    labelled_rows,
    last_feedback_export,
    live_metrics,
    reference_frame,
    rollback_blocker,
)
from tuneloop.tasks.store import PredictionStore, utcnow
from tuneloop.tasks.workspace import Workspace
from tuneloop.params import Params, load_params


def say(message: str) -> None:
    print(f"[monitor] {message}", flush=True)


def prediction_store(params: Params, workspace: Workspace) -> PredictionStore:
    from tuneloop.tasks.serve import store_url  # the URL the service logs to ($TUNELOOP_STORE_URL, serve.store_url, SQLite)

    return PredictionStore(store_url(params.serve, workspace.root))


@task(cache_policy=NO_CACHE)
def read_window(params: Params, workspace: Workspace, version: str) -> pd.DataFrame:
    config = params.monitor
    start = utcnow() - timedelta(hours=config.window_hours) if config.window_hours else None
    return prediction_store(params, workspace).window(start=start, model_version=version, limit=config.window_rows)


@task(cache_policy=NO_CACHE)
def measure_drift(params: Params, workspace: Workspace, version: str, window: pd.DataFrame,
                  report_path: Path) -> DriftMetrics:
    """The champion's reference sample (scored by the champion) against the window."""
    from tuneloop.tasks.classifier import resolve_model_path

    name, config = params.mlflow.model_name, params.monitor
    splits = pd.read_parquet(registry.download_reference(name, version, workspace.models_cache))
    predict = classifier_predictor(registry.download_version(name, version, workspace.models_cache),
                                   params.model.base, config)
    embed = encoder_embedder(resolve_model_path(params.model.base), config)
    reference = reference_frame(splits, config, predict, embed)
    return compute_drift(reference, current_frame(window, config, embed), config, report_path)


@task(cache_policy=NO_CACHE)
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
    if rollback_blocker(config, len(rows), previous_version, arrival) is None:
        model_dir = registry.download_version(name, previous_version, workspace.models_cache)
        predicted, _ = classifier_predictor(model_dir, params.model.base, config)(rows["text"].tolist())
        comparison = compare_live(rows["true_label"], rows["label"], predicted, labels, previous_version, config)
    decision = decide_rollback(config, len(rows), previous_version, arrival, comparison)
    result = {"rolled_back": False, "reasons": decision.reasons, "from": version, "to": previous_version,
              "comparison": asdict(comparison) if comparison else None}
    current = registry.alias_version(name, registry.CHAMPION)
    if decision.rollback and current is not None and current.version == version:  # nobody moved it meanwhile
        result["audit"] = registry.move_champion(name, previous_version, "auto-rollback", "; ".join(decision.reasons))
        result["rolled_back"] = True
    return result


@task(cache_policy=NO_CACHE)
def log_monitoring(params: Params, workspace: Workspace, version: str, summary: dict) -> str:
    """One MLflow run (experiment `<experiment>-monitor`, so `tuneloop status`
    keeps showing pipeline runs) tagged with the model version; the live and
    drift numbers also go on the version itself as tags."""
    import time

    from mlflow.entities import Metric, Param

    from tuneloop.tasks.tracking import configure_tracking, flatten

    name = params.mlflow.model_name
    experiment_id = configure_tracking(replace(params.mlflow, experiment=f"{params.mlflow.experiment}-monitor"),
                                       workspace.root)
    client = registry.client()
    tags = {"model_name": name, "model_version": version, "drift.status": summary["drift"]["status"],
            "rolled_back": str(summary["rollback"]["rolled_back"]).lower()}
    run = client.create_run(experiment_id, tags=tags, run_name=f"monitor v{version}")
    numbers = {"window_rows": summary["window_rows"], "live": summary["live"],
               "drift": summary["drift"]["metrics"] or {}, "rollback": summary["rollback"]["comparison"] or {}}
    now = int(time.time() * 1000)
    client.log_batch(run.info.run_id, metrics=[Metric(k, v, now, 0) for k, v in flatten("", numbers).items()],
                     params=[Param(k, str(v)) for k, v in asdict(params.monitor).items()])
    client.log_text(run.info.run_id, json.dumps(summary, indent=2, default=str), "monitor/summary.json")
    if summary["report"]:
        client.log_artifact(run.info.run_id, summary["report"], artifact_path="monitor")
    client.set_terminated(run.info.run_id)
    version_tags = {f"live.{k}": v for k, v in summary["live"].items() if v is not None}
    version_tags.update({"drift.status": summary["drift"]["status"], "monitor.run_id": run.info.run_id,
                         "monitor.at": summary["at"]})
    for key, value in version_tags.items():
        client.set_model_version_tag(name, version, key, str(value))
    return run.info.run_id


@task(cache_policy=NO_CACHE)
def trigger_retraining(params: Params, workspace: Workspace, params_path: str, drift: DriftDecision,
                       labels: tuple[str, ...]) -> dict:
    """On significant drift with enough feedback labelled since the last export,
    exports those rows to the incoming folder (the next data version includes
    them) and asks for retraining (`tasks.triggers.request_retraining`: a Prefect
    event with a server, else the retrain flow in-process)."""
    from tuneloop.tasks.triggers import decide_retraining, export_feedback, request_retraining

    if not drift.significant:
        return {"requested": False, "reasons": [f"drift: {drift.status}"]}
    if not params.ingest.incoming_dir:
        return {"requested": False, "reasons": ["ingest.incoming_dir is not set: feedback cannot reach training"]}
    incoming = workspace.root / params.ingest.incoming_dir
    new = labelled_rows(prediction_store(params, workspace).labelled(last_feedback_export(incoming)), labels)
    decision = decide_retraining(len(new), drift_significant=True, config=params.triggers)
    result = {"requested": decision.retrain, "new_labelled_rows": len(new), "reasons": list(decision.reasons)}
    if decision.retrain:
        path, _ = export_feedback(new, incoming, utcnow(), mask=params.serve.mask_pii)
        result["exported"] = str(path)
        reason = f"significant drift; {len(new)} new labelled rows exported to {path.name}"
        result["request"] = request_retraining(workspace, params_path, params.mlflow.model_name, reason)
    return result


def champion_labels(params: Params, workspace: Workspace, version: str) -> tuple[str, ...]:
    """The labels feedback is scored against: params' list, or with `labels: auto`
    the champion's own (what it can predict)."""
    if params.declared_labels:
        return params.declared_labels
    model_dir = registry.download_version(params.mlflow.model_name, version, workspace.models_cache)
    return tuple(json.loads((model_dir / "labels.json").read_text()))


def live_summary(live: LiveMetrics) -> dict:
    return {"labelled_rows": live.labelled_rows, "accuracy": live.accuracy, "macro_f1": live.macro_f1}


@flow(name="monitor")
def monitor_flow(params_path: str = "params.yaml", root: str = ".", overrides: list[str] | None = None) -> dict:
    """window → drift + live metrics → decisions → rollback → MLflow → retraining request.

    Returns:
        model, champion, window_rows, live metrics, drift (status, reasons,
        metrics), rollback (rolled_back, reasons, comparison), retraining,
        the report's path and the MLflow run id.
    """
    from tuneloop.tasks.tracking import configure_tracking

    workspace = Workspace(Path(root).resolve())
    params = load_params(workspace.root / params_path, overrides or ())
    configure_tracking(params.mlflow, workspace.root)
    name = params.mlflow.model_name
    champion = registry.alias_version(name, registry.CHAMPION)
    if champion is None:
        say(f"{name} has no champion: nothing to monitor")
        return {"model": name, "champion": None}
    at = utcnow()
    window = read_window(params, workspace, champion.version)
    labels = champion_labels(params, workspace, champion.version)
    live = live_metrics(window, labels)
    metrics = None
    if len(window) >= params.monitor.min_rows:
        report = workspace.root / params.monitor.report_dir / f"{at:%Y%m%dT%H%M%S}-v{champion.version}.html"
        metrics = measure_drift(params, workspace, champion.version, window, report)
    drift = decide_drift(metrics, len(window), params.monitor)
    say(f"{name} v{champion.version}: {len(window)} predictions, {live.labelled_rows} labelled, "
        f"live macro-F1 {live.macro_f1 if live.macro_f1 is None else round(live.macro_f1, 4)}; "
        f"drift: {drift.status}" + "".join(f"\n      {r}" for r in drift.reasons))
    rollback = check_rollback(params, workspace, champion.version, window, labels)
    say(("ROLLED BACK to v" + str(rollback["to"]) if rollback["rolled_back"] else "no rollback")
        + "".join(f"\n      {r}" for r in rollback["reasons"]))
    summary = {"model": name, "champion": champion.version, "at": at.isoformat(), "window_rows": len(window),
               "live": live_summary(live), "report": metrics.report if metrics else None,
               "drift": {"status": drift.status, "significant": drift.significant, "reasons": drift.reasons,
                         "metrics": metrics.to_dict() if metrics else None},
               "rollback": rollback}
    summary["run_id"] = log_monitoring(params, workspace, champion.version, summary)
    summary["retraining"] = trigger_retraining(params, workspace, params_path, drift, labels)
    say(("retraining requested" if summary["retraining"]["requested"] else "no retraining") + ": "
        + "; ".join(summary["retraining"]["reasons"]))
    return summary
