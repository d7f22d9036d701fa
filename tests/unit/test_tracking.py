"""Tracking URIs: the environment points every project at a server, and one
process can work on several local projects without crossing their registries."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest

from tuneloop.tasks.tracking import MlflowConfig, configure_tracking, tracking_uri


@pytest.fixture
def no_tracking_env(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    yield
    mlflow.set_tracking_uri(None)


def test_a_second_project_in_one_process_gets_its_own_sqlite_registry(tmp_path: Path, no_tracking_env) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir(), second.mkdir()
    configure_tracking(MlflowConfig(), first)  # mlflow exports MLFLOW_TRACKING_URI for project a
    assert tracking_uri(MlflowConfig(), second) == f"sqlite:///{(second / 'mlflow.db').resolve()}"


def test_the_environment_beats_params_and_the_local_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            no_tracking_env) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.internal:5000")
    assert tracking_uri(MlflowConfig(tracking_uri="sqlite:///x.db"), tmp_path) == "http://mlflow.internal:5000"


def test_params_beat_the_local_default(tmp_path: Path, no_tracking_env) -> None:
    assert tracking_uri(MlflowConfig(tracking_uri="postgresql://db/mlflow"), tmp_path) == "postgresql://db/mlflow"


# --- a stage run again is tracked as what really ran ---------------------------------------------


def test_a_stage_run_again_with_changed_params_logs_into_a_new_run_of_its_own(mlflow_sandbox, tmp_path: Path) -> None:
    from tuneloop.tasks.tracking import log_stage, start_pipeline_run
    from tuneloop.tasks.workspace import Workspace

    ws = Workspace(tmp_path)
    pipeline = start_pipeline_run(mlflow_sandbox.config(experiment="rerun-test"), ws, {"data.md5": "d" * 32})
    first = log_stage(ws, "finetune", {"best_val_macro_f1": 0.7}, params={"epochs": 1})
    second = log_stage(ws, "finetune", {"best_val_macro_f1": 0.8}, params={"epochs": 4})  # params.yaml edited
    client = mlflow.MlflowClient()
    runs = [client.get_run(run_id) for run_id in (first, second)]
    assert [r.data.params["finetune.epochs"] for r in runs] == ["1", "4"]
    assert [r.data.metrics["finetune.best_val_macro_f1"] for r in runs] == [0.7, 0.8]
    assert [r.data.tags["mlflow.parentRunId"] for r in runs] == [pipeline, pipeline]
    assert [(r.info.run_name, r.info.status) for r in runs] == [("finetune data:dddddddd", "FINISHED")] * 2
    history = client.get_metric_history(pipeline, "finetune.best_val_macro_f1")
    assert [m.value for m in history] == [0.7, 0.8]  # the pipeline's run shows the latest, keeps both


def test_a_stage_after_the_pipeline_run_ended_opens_a_new_pipeline_run_continuing_it(
        mlflow_sandbox, tmp_path: Path) -> None:
    from tuneloop.tasks.tracking import current_run_id, end_pipeline_run, log_stage, start_pipeline_run
    from tuneloop.tasks.workspace import Workspace

    ws = Workspace(tmp_path)
    ended = start_pipeline_run(mlflow_sandbox.config(experiment="continue-test"), ws, {"data.md5": "d" * 32})
    log_stage(ws, "finetune", params={"epochs": 1})
    end_pipeline_run(ws)  # registered: this pipeline run is done
    stage = log_stage(ws, "finetune", params={"epochs": 4})  # `dvc repro` after a params change, no new ingest
    client = mlflow.MlflowClient()
    parent = client.get_run(client.get_run(stage).data.tags["mlflow.parentRunId"])
    assert parent.info.run_id != ended and parent.info.run_id == current_run_id(ws)
    assert (parent.data.tags["tuneloop.continues"], parent.data.tags["data.md5"]) == (ended, "d" * 32)
    assert (parent.info.status, client.get_run(ended).info.status) == ("RUNNING", "FINISHED")
    assert client.get_run(ended).data.params == {}  # nothing rewritten in the ended run
