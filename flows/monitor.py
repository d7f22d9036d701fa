"""The monitoring flow: is the champion still seeing its data, and still good?

Window of the champion's logged predictions → Evidently drift against its
training split (HTML under `reports/monitor/`) → live accuracy/macro-F1 from
feedback, and estimated from the calibrated probabilities without labels →
drift and estimated-drop decisions → automatic rollback when the previous
champion is better on the same labelled rows → the shadow version, if any,
promoted or discarded on the live requests it scored beside the champion
(`tasks/shadow.py`) → one MLflow run with every number, and the numbers on the
model version as tags → a retraining request on
significant drift or an estimated accuracy drop, with enough new labelled rows,
unless the shadow replaced the champion in this run. Decisions are pure functions in
`tasks/` (drift, rollback, shadow, triggers); reads and writes are `tuneloop.pipeline.monitoring`;
this file only composes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, ParamSpec, TypeVar

from prefect import Task, flow, task
from prefect.cache_policies import NO_CACHE

from tuneloop.flows.request import request_retraining
from tuneloop.pipeline import monitoring
from tuneloop.pipeline.params import Params, load_params
from tuneloop.plumbing.tracking import configure_tracking
from tuneloop.service.store import utcnow
from tuneloop.tasks import registry
from tuneloop.tasks.drift import decide_drift, decide_estimated_drop, drift_status
from tuneloop.tasks.feedback import LiveMetrics, live_metrics
from tuneloop.tasks.triggers import decide_retraining
from tuneloop.values.decision import Decision
from tuneloop.values.workspace import Workspace


def say(message: str) -> None:
    print(f"[monitor] {message}", flush=True)


P = ParamSpec("P")
R = TypeVar("R")


def io_task(fn: Callable[P, R]) -> Task[P, R]:
    # They read the store and the registry: caching on inputs would skip real work.
    return task(name=fn.__name__, cache_policy=NO_CACHE)(fn)


read_window = io_task(monitoring.read_window)
measure_drift = io_task(monitoring.measure_drift)
estimate_window = io_task(monitoring.estimate_window)
check_rollback = io_task(monitoring.check_rollback)
check_shadow = io_task(monitoring.check_shadow)
log_monitoring = io_task(monitoring.log_monitoring)


@task(cache_policy=NO_CACHE)
def trigger_retraining(params: Params, workspace: Workspace, params_path: str, drift: Decision,
                       labels: tuple[str, ...], estimated: Decision | None = None,
                       replaced: str | None = None) -> dict:
    """On significant drift or an estimated accuracy drop, with enough feedback
    labelled since the last export, exports those rows to the incoming folder
    (the next data version includes them) and asks for retraining
    (`flows/request.py`: a Prefect event with a server, else the retrain flow
    in-process)."""
    dropped = estimated is not None and estimated.yes
    if not drift.yes and not dropped:
        return {"requested": False, "reasons": [f"drift: {drift_status(drift)}", "no estimated accuracy drop"]}
    if not params.ingest.incoming_dir:
        return {"requested": False, "reasons": ["ingest.incoming_dir is not set: feedback cannot reach training"]}
    new = monitoring.new_feedback(params, workspace, labels)
    decision = decide_retraining(len(new), drift_significant=drift.yes, config=params.triggers,
                                 estimated_drop=dropped, replaced=replaced)
    result = {"requested": decision.yes, "new_labelled_rows": len(new), "reasons": list(decision.reasons)}
    if decision.yes:
        path = monitoring.export_new_feedback(params, workspace, new)
        result["exported"] = str(path)
        why = "; ".join(["significant drift"] * drift.yes + ["estimated accuracy drop"] * dropped)
        reason = f"{why}; {len(new)} new labelled rows exported to {path.name}"
        result["request"] = request_retraining(workspace, params_path, params.mlflow.model_name, reason)
    return result


def shadow_line(shadow: dict) -> str:
    """One line per outcome: promoted, discarded, waiting (with what is missing), or no shadow."""
    if shadow["shadow"] is None:
        return "no shadow version"
    said = {"promote": "PROMOTED to champion", "discard": "DISCARDED", "wait": "waiting"}[shadow["verdict"]]
    return f"shadow v{shadow['shadow']} {said}: " + "; ".join(shadow["reasons"])


def replaced_champion(champion: str, summary: dict) -> str | None:
    """"v1 -> v2, shadow promoted" when this run promoted the shadow, else None.

    The promoted shadow learned from other data than the champion whose window
    drifted, so its own window decides on retraining. After a rollback the restored
    champion faces the same traffic: drift still asks (None)."""
    shadow = summary.get("shadow") or {}
    if shadow.get("verdict") == "promote":
        return f"v{champion} -> v{shadow['shadow']}, shadow promoted"
    return None


def live_summary(live: LiveMetrics) -> dict:
    return {"labelled_rows": live.labelled_rows, "accuracy": live.accuracy, "macro_f1": live.macro_f1}


@flow(name="monitor")
def monitor_flow(params_path: str = "params.yaml", root: str = ".", overrides: list[str] | None = None) -> dict:
    """window → drift + live and estimated metrics → decisions → rollback → MLflow → retraining request.

    Returns:
        model, champion, window_rows, live metrics, estimated (metrics,
        reference accuracy, drop, reasons), drift (status, reasons, metrics),
        rollback (rolled_back, reasons, comparison), retraining, the report's
        path and the MLflow run id.
    """
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
    labels = monitoring.champion_labels(params, workspace, champion.version)
    live = live_metrics(window, labels)
    metrics = None
    if len(window) >= params.monitor.min_rows:
        report = workspace.root / params.monitor.report_dir / f"{at:%Y%m%dT%H%M%S}-v{champion.version}.html"
        metrics = measure_drift(params, workspace, champion.version, window, report)
    drift = decide_drift(metrics, len(window), params.monitor)
    estimate = estimate_window(params, workspace, window, labels) if len(window) >= params.monitor.min_rows else None
    reference_accuracy = monitoring.tested_accuracy(champion)
    estimated = decide_estimated_drop(estimate, reference_accuracy, len(window), params.monitor)
    say(f"{name} v{champion.version}: {len(window)} predictions, {live.labelled_rows} labelled, "
        f"live macro-F1 {live.macro_f1 if live.macro_f1 is None else round(live.macro_f1, 4)}; "
        f"drift: {drift_status(drift)}" + "".join(f"\n      {r}" for r in drift.reasons)
        + "\n    without labels:" + "".join(f"\n      {r}" for r in estimated.reasons))
    rollback = check_rollback(params, workspace, champion.version, window, labels)
    say(("ROLLED BACK to v" + str(rollback["to"]) if rollback["rolled_back"] else "no rollback")
        + "".join(f"\n      {r}" for r in rollback["reasons"]))
    summary = {"model": name, "champion": champion.version, "at": at.isoformat(), "window_rows": len(window),
               "live": live_summary(live), "report": metrics.report if metrics else None,
               "estimated": {"metrics": estimate.to_dict() if estimate else None,
                             "reference_accuracy": reference_accuracy, "drop": estimated.yes,
                             "reasons": estimated.reasons},
               "drift": {"status": drift_status(drift), "significant": drift.yes, "reasons": drift.reasons,
                         "metrics": metrics.to_dict() if metrics else None},
               "rollback": rollback}
    if not rollback["rolled_back"]:  # after a rollback the shadow's pairs are against another champion
        summary["shadow"] = check_shadow(params, workspace, champion.version)
        say(shadow_line(summary["shadow"]))
    summary["run_id"] = log_monitoring(params, workspace, champion.version, summary)
    summary["retraining"] = trigger_retraining(params, workspace, params_path, drift, labels, estimated,
                                               replaced_champion(champion.version, summary))
    say(("retraining requested" if summary["retraining"]["requested"] else "no retraining") + ": "
        + "; ".join(summary["retraining"]["reasons"]))
    return summary
