"""MLflow runs of a tuning search: one run for the search, a child run per trial.

Stage I/O: `tasks.tune` never imports MLflow; it calls the `TrialRuns` it is
handed (start, log_epoch, finish) and returns a TuneResult, which the stage
logs here.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

from mlflow import MlflowClient
from mlflow.entities import Param

from tuneloop.tasks.tune import TuneResult, redact
from tuneloop.tasks.tune_space import TuneConfig


@dataclass(frozen=True)
class TrialRuns:
    """MLflow runs of the trials: one child run per trial under the tuning run,
    with its settings, per-epoch `val_macro_f1` (step = epoch) and a `state` tag."""

    parent_run_id: str
    experiment_id: str

    def start(self, trial, settings: dict[str, Any]) -> str:
        client = MlflowClient()
        run = client.create_run(self.experiment_id, run_name=f"trial-{trial.number}", tags={
            "mlflow.parentRunId": self.parent_run_id, "optuna.trial": str(trial.number), "state": "RUNNING"})
        client.log_batch(run.info.run_id, params=param_list(settings))
        trial.set_user_attr("mlflow_run_id", run.info.run_id)  # a resumed study closes it if the trial dies
        return run.info.run_id

    def log_epoch(self, run_id: str, epoch: int, value: float) -> None:
        MlflowClient().log_metric(run_id, "val_macro_f1", value, step=epoch)

    def finish(self, run_id: str, state: str, metrics: dict[str, float] | None = None) -> None:
        close_trial_run(run_id, state, metrics)


def param_list(values: dict[str, Any]):
    return [Param(k, json.dumps(v) if isinstance(v, (list, tuple)) else str(v)) for k, v in values.items()]


def close_trial_run(run_id: str, state: str, metrics: dict[str, float] | None = None) -> None:
    """Tags the trial's run with its Optuna state and ends it (FAIL -> FAILED, PRUNED -> KILLED)."""
    client = MlflowClient()
    for key, value in (metrics or {}).items():
        client.log_metric(run_id, key, value)
    client.set_tag(run_id, "state", state)
    client.set_terminated(run_id, {"COMPLETE": "FINISHED", "PRUNED": "KILLED"}.get(state, "FAILED"))


def open_tune_run(experiment_id: str, pipeline_run_id: str, name: str, config: TuneConfig, storage: str) -> str:
    """The MLflow run of the search, a child of the pipeline's run; a resumed
    search within the same pipeline run continues its earlier tuning run."""
    client = MlflowClient()
    found = client.search_runs([experiment_id], max_results=1, filter_string=(
        f"tags.mlflow.parentRunId = '{pipeline_run_id}' and tags.`optuna.study` = '{name}'"))
    if found:
        client.update_run(found[0].info.run_id, status="RUNNING")
        return found[0].info.run_id
    run = client.create_run(experiment_id, run_name="tune", tags={
        "mlflow.parentRunId": pipeline_run_id, "optuna.study": name, "optuna.storage": redact(storage)})
    settings = {k: v for k, v in asdict(config).items() if k != "space"}
    settings["space"] = {k: {f: v for f, v in asdict(spec).items() if v is not None and v is not False}
                         for k, spec in config.space.items()}
    client.log_batch(run.info.run_id, params=param_list({k: json.dumps(v, default=str) if isinstance(v, dict) else v
                                                          for k, v in settings.items()}))
    return run.info.run_id


def close_tune_run(run_id: str, result: TuneResult | None, artifacts: Sequence[Path] = ()) -> None:
    """Logs the search's outcome and plots to its run and ends it (FAILED without a result)."""
    client = MlflowClient()
    if result is None:
        client.set_terminated(run_id, "FAILED")
        return
    for key in ("best_value", "n_complete", "n_pruned", "n_failed", "new_trials", "seconds"):
        client.log_metric(run_id, key, float(getattr(result, key)))
    client.set_tag(run_id, "best_params", json.dumps(result.best_params, sort_keys=True))
    client.set_tag(run_id, "best_trial", str(result.best_trial))
    for path in artifacts:
        client.log_artifact(run_id, str(path))
    client.set_terminated(run_id, "FINISHED")
