"""Tracking URIs: the environment points every project at a server, and one
process can work on several local projects without crossing their registries."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest

from tuneloop.plumbing.tracking import MlflowConfig, configure_tracking, tracking_uri


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
    from tuneloop.plumbing.tracking import log_stage, start_pipeline_run
    from tuneloop.values.workspace import Workspace

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
    from tuneloop.plumbing.tracking import current_run_id, end_pipeline_run, log_stage, start_pipeline_run
    from tuneloop.values.workspace import Workspace

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


# --- the pipeline run's params: every setting, within MLflow's limits ---------------------------


def test_settings_flatten_to_one_param_per_setting_named_at_the_dots() -> None:
    from tuneloop.plumbing.tracking import flat_params

    assert flat_params({"finetune": {"learning_rate": 0.002, "target_modules": ["q", "v"], "max_steps": None},
                        "model": {"base": "all-MiniLM-L6-v2", "calibrate": True}}) == {
        "finetune.learning_rate": "0.002", "finetune.target_modules": '["q", "v"]', "finetune.max_steps": "null",
        "model.base": "all-MiniLM-L6-v2", "model.calibrate": "true"}


def test_params_beyond_mlflows_limits_are_cut_to_fit_and_all_logged(mlflow_sandbox, tmp_path: Path) -> None:
    from tuneloop.plumbing.tracking import flat_params, start_pipeline_run
    from tuneloop.values.workspace import Workspace

    settings = {"section": {f"key{i}": i for i in range(150)}, "long": "x" * 7000,
                "odd key!": {"a/b": [1, 2]}, "k" * 300: 1}
    run_id = start_pipeline_run(mlflow_sandbox.config(experiment="params-test"), Workspace(tmp_path), {},
                                flat_params(settings))  # 153 params: more than MLflow takes in one request
    logged = mlflow.MlflowClient().get_run(run_id).data.params
    assert len(logged) == 153
    assert (logged["section.key0"], logged["section.key149"]) == ("0", "149")
    assert logged["long"] == "x" * 6000  # MLflow's longest param value
    assert logged["odd key_.a_b"] == "[1, 2]"  # characters MLflow refuses in a name become _
    assert logged["k" * 250] == "1"  # MLflow's longest name


def test_a_continued_pipeline_run_gets_the_params_its_first_stage_brings(mlflow_sandbox, tmp_path: Path) -> None:
    from tuneloop.plumbing.tracking import end_pipeline_run, stage_run, start_pipeline_run
    from tuneloop.values.workspace import Workspace

    ws = Workspace(tmp_path)
    ended = start_pipeline_run(mlflow_sandbox.config(experiment="continued-params"), ws, {},
                               {"finetune.epochs": "1"})
    end_pipeline_run(ws)
    with stage_run(ws, "finetune", {"epochs": 4}, pipeline_params={"finetune.epochs": "4"}) as run:
        pass
    client = mlflow.MlflowClient()
    assert run.pipeline_id != ended
    assert client.get_run(run.pipeline_id).data.params == {"finetune.epochs": "4"}
    assert client.get_run(run.run_id).data.params == {"finetune.epochs": "4"}
    assert client.get_run(ended).data.params == {"finetune.epochs": "1"}  # an ended run is never rewritten
