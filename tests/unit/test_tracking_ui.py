"""What the MLflow UI shows while and after the finetune stage ran, read back
from a real (SQLite) MLflow store: a stage run that is RUNNING with its loss
curve growing while it trains, then FINISHED with the training's duration, a run
name saying what ran, MLflow's source tags, the data version as a dataset input,
loss, learning-rate and validation curves, and the run's settings as the
pipeline run's params."""

from __future__ import annotations

import time
from dataclasses import asdict

import pandas as pd
import pytest

from tuneloop.pipeline.params import parse_params
from tuneloop.plumbing import tracking
from tuneloop.tasks.ingest import DataVersion
from tuneloop.values.workspace import Workspace, write_json

MD5 = "0123456789abcdef0123456789abcdef"
COMMIT = "a" * 40


def tiny_params(tiny_bert, labels: list[str], mlflow_sandbox):
    return parse_params({
        "model": {"base": str(tiny_bert)}, "validate": {"labels": labels},
        "finetune": {"epochs": 2, "min_steps": 0, "min_examples_per_class": 0, "batch_size": 16, "lora_r": 8,
                     "max_length": 32, "learning_rate": 1e-2, "head_init": "random", "checkpoint_every_steps": 0},
        "mlflow": {"tracking_uri": mlflow_sandbox.tracking_uri, "experiment": mlflow_sandbox.experiment,
                   "model_name": "tl-tracking-ui"}})


@pytest.fixture(scope="module")
def finetuned(tiny_bert, toy_task, mlflow_sandbox, tmp_path_factory) -> dict:
    """The finetune stage run once on the tiny model, logging to the sandbox;
    `during` holds what MLflow said of the stage run at each point training reported."""
    from tuneloop.pipeline import stages

    ws = Workspace(tmp_path_factory.mktemp("project"))
    labels = toy_task["labels"]
    rows = [(t, labels[y], split) for split in ("train", "validation") for t, y in zip(*toy_task[split])]
    ws.splits.parent.mkdir(parents=True)
    pd.DataFrame(rows, columns=["text", "label", "split"]).to_parquet(ws.splits)
    write_json(ws.data_version, asdict(DataVersion(MD5, 1, "data/raw/reviews.csv", "reviews.csv", 320, 0,
                                                   labels=labels)))
    params = tiny_params(tiny_bert, labels, mlflow_sandbox)
    pipeline = tracking.start_pipeline_run(params.mlflow, ws, {"data.md5": MD5, **tracking.source_tags(COMMIT)})
    during, log_points = [], tracking.log_points

    def watched(run, step: int, values: dict) -> None:  # what the UI would show right after each point
        log_points(run, step, values)
        client = tracking_client()
        during.append({"step": step, "names": sorted(values), "status": client.get_run(run.run_id).info.status,
                       "loss_points": len(client.get_metric_history(run.run_id, "finetune.loss"))})

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tracking, "log_points", watched)
        started = time.time()
        result = stages.finetune(params, ws)
        ended = time.time()
    client = tracking_client()
    (run,) = [r for r in client.search_runs([mlflow_sandbox.experiment_id], f"tags.`mlflow.parentRunId` = '{pipeline}'")
              if r.data.tags.get("tuneloop.stage") == "finetune"]
    return {"run": run, "pipeline": client.get_run(pipeline), "result": result, "during": during,
            "params": params, "wall": (started, ended)}


def test_the_finetune_run_is_running_and_shows_its_loss_while_it_trains(finetuned) -> None:
    during, result = finetuned["during"], finetuned["result"]
    assert [p["step"] for p in during if "loss" in p["names"]] == [p["step"] for p in result.curve]
    assert {p["status"] for p in during} == {"RUNNING"}
    # each loss point is in MLflow as soon as training reports it, long before the stage ends
    assert [p["loss_points"] for p in during if "loss" in p["names"]] == list(range(1, len(result.curve) + 1))
    assert [p["step"] for p in during if p["names"] == ["val_macro_f1"]] == [h["step"] for h in result.history]


def test_the_finetune_run_ends_finished_and_lasts_as_long_as_the_stage(finetuned) -> None:
    info, result = finetuned["run"].info, finetuned["result"]
    started, ended = finetuned["wall"]
    assert info.status == "FINISHED"
    assert info.end_time - info.start_time >= result.seconds * 1000  # training is inside the run
    assert started * 1000 - 1000 <= info.start_time and info.end_time <= ended * 1000 + 1000


def test_the_pipeline_run_carries_the_runs_settings_as_params(finetuned, tiny_bert) -> None:
    logged = finetuned["pipeline"].data.params
    assert logged["finetune.learning_rate"] == "0.01"
    assert logged["finetune.epochs"] == "2"
    assert logged["finetune.method"] == "lora"
    assert logged["model.base"] == str(tiny_bert)
    assert logged["validate.labels"] == '["negative", "positive"]'
    assert logged["validate.severity.pii"] == "warning"  # nested settings nest at the dots
    assert logged["mlflow.model_name"] == "tl-tracking-ui"
    assert logged == stages_params(finetuned["params"])  # every setting, nothing else


def stages_params(params) -> dict[str, str]:
    from tuneloop.pipeline.stages import pipeline_params

    return pipeline_params(params)


def test_a_stage_that_fails_ends_its_run_failed_with_the_reason(tiny_bert, toy_task, mlflow_sandbox,
                                                                 tmp_path) -> None:
    from tuneloop.pipeline import stages

    ws = Workspace(tmp_path)
    params = tiny_params(tiny_bert, toy_task["labels"], mlflow_sandbox)
    pipeline = tracking.start_pipeline_run(params.mlflow, ws, {"data.md5": MD5})
    with pytest.raises(FileNotFoundError):
        stages.finetune(params, ws)  # no split written: the stage fails once its run is open
    (run,) = tracking_client().search_runs([mlflow_sandbox.experiment_id],
                                           f"tags.`mlflow.parentRunId` = '{pipeline}'")
    assert (run.data.tags["tuneloop.stage"], run.info.status) == ("finetune", "FAILED")
    assert run.data.tags["tuneloop.outcome"].startswith("failed: FileNotFoundError")
    assert tracking_client().get_run(pipeline).info.status == "RUNNING"  # the command's error handler ends it


class TerminationSignal(BaseException):
    """What Prefect raises in a task when the process gets SIGTERM (a BaseException)."""


def test_a_stage_stopped_by_a_signal_ends_its_run_killed_not_failed(tiny_bert, toy_task, mlflow_sandbox,
                                                                    tmp_path) -> None:
    ws = Workspace(tmp_path)
    params = tiny_params(tiny_bert, toy_task["labels"], mlflow_sandbox)
    pipeline = tracking.start_pipeline_run(params.mlflow, ws, {"data.md5": MD5})
    for signal in (TerminationSignal(), KeyboardInterrupt(), SystemExit(143)):
        with pytest.raises(type(signal)), tracking.stage_run(ws, "finetune"):
            raise signal
    runs = tracking_client().search_runs([mlflow_sandbox.experiment_id],
                                         f"tags.`mlflow.parentRunId` = '{pipeline}'")
    assert sorted((r.info.status, r.data.tags["tuneloop.outcome"]) for r in runs) == [
        ("KILLED", "killed during finetune (KeyboardInterrupt)"), ("KILLED", "killed during finetune (SystemExit)"),
        ("KILLED", "killed during finetune (TerminationSignal)")]


def tracking_client():
    import mlflow

    return mlflow.MlflowClient()


def test_the_finetune_run_is_named_after_method_and_data_version(finetuned) -> None:
    assert finetuned["run"].info.run_name == f"finetune lora data:{MD5[:8]}"
    assert finetuned["pipeline"].info.run_name == f"retrain data:{MD5[:8]}"


def test_stage_and_pipeline_runs_carry_mlflows_source_tags(finetuned) -> None:
    for run in (finetuned["run"], finetuned["pipeline"]):
        tags = run.data.tags
        assert tags["mlflow.source.git.commit"] == COMMIT
        assert tags["mlflow.source.type"] == "JOB"
        assert tags["mlflow.source.name"].startswith("tuneloop ")
        assert "prefect.flow_run_id" not in tags  # no flow ran this stage


def test_the_data_version_is_a_dataset_input_whose_digest_is_the_dvc_md5(finetuned) -> None:
    for run in (finetuned["run"], finetuned["pipeline"]):
        (entry,) = run.inputs.dataset_inputs
        assert (entry.dataset.name, entry.dataset.digest) == ("reviews.csv", MD5)
        assert {t.key: t.value for t in entry.tags}["mlflow.data.context"] == "training"
        assert '"data/raw/reviews.csv"' in entry.dataset.source


def test_loss_learning_rate_and_validation_macro_f1_are_curves_over_steps(finetuned) -> None:
    client, run_id, result = tracking_client(), finetuned["run"].info.run_id, finetuned["result"]
    loss = [(m.step, m.value) for m in client.get_metric_history(run_id, "finetune.loss")]
    rate = [(m.step, m.value) for m in client.get_metric_history(run_id, "finetune.learning_rate")]
    f1 = [(m.step, m.value) for m in client.get_metric_history(run_id, "finetune.val_macro_f1")]
    assert sorted(loss) == [(p["step"], pytest.approx(p["loss"])) for p in result.curve]
    assert sorted(rate) == [(p["step"], pytest.approx(p["learning_rate"])) for p in result.curve]
    assert sorted(f1) == [(h["step"], pytest.approx(h["val_macro_f1"])) for h in result.history]
    assert len(loss) >= 2 and len(f1) == 2  # 16 steps, read every LOSS_EVERY and at each epoch's end; 2 epochs
    assert rate[-1][1] < rate[0][1]  # the linear schedule decays


def test_the_experiment_opens_on_its_training_runs_not_the_genai_overview(finetuned, mlflow_sandbox) -> None:
    experiment = tracking_client().get_experiment(mlflow_sandbox.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
