"""tune: the search space is checked, trials are pruned, an interrupted study
resumes, the best settings reach finetune and the test split is never seen."""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path

import optuna
import pandas as pd
import pytest

import tuneloop.tasks.tune as tune
from tuneloop.model.calibration import Abstention
from tuneloop.pipeline.params import ParamsError, parse_params
from tuneloop.pipeline.tune_runs import TrialRuns
from tuneloop.tasks.finetune import FinetuneConfig, FinetuneResult
from tuneloop.tasks.ingest import DataVersion
from tuneloop.tasks.report import render_evaluation_report
from tuneloop.tasks.tune import TuneData, run_study
from tuneloop.tasks.tune_space import ParamSpec, PrunerConfig, TuneConfig, apply_params, suggest
from tuneloop.values.workspace import Workspace, write_json

FAST = FinetuneConfig(epochs=3, learning_rate=1e-2, batch_size=16, lora_r=8, max_length=32,
                      checkpoint_every_steps=0, patience=3, min_steps=0, min_examples_per_class=0,
                      head_init="random")  # exactly `epochs` epochs, no probe needed


@pytest.fixture(autouse=True)
def quiet_optuna():
    optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.fixture
def data(tiny_bert, toy_task) -> TuneData:
    return TuneData("tiny", tiny_bert, toy_task["train"], toy_task["validation"], tuple(toy_task["labels"]),
                    "d" * 32)


def mlflow_parent(sandbox) -> TrialRuns:
    from mlflow import MlflowClient

    run = MlflowClient().create_run(sandbox.experiment_id, run_name="tune")
    return TrialRuns(run.info.run_id, sandbox.experiment_id)


def child_runs(sandbox, parent_run_id: str) -> list:
    from mlflow import MlflowClient

    return MlflowClient().search_runs([sandbox.experiment_id],
                                      filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'")


# --- the search space -------------------------------------------------------------------------


def test_space_keys_that_are_not_finetune_settings_are_named() -> None:
    with pytest.raises(ValueError, match="settings finetune does not have: learning_rat, lora_rank;"):
        TuneConfig(space={"learning_rat": {"low": 1e-4, "high": 1e-3}, "lora_rank": {"choices": [4, 8]},
                          "epochs": {"low": 1, "high": 2}})


@pytest.mark.parametrize("spec, message", [
    ({"lo": 1e-4, "high": 1e-3}, "unknown keys lo"),
    ({"low": 1e-4}, "needs both low and high"),
    ({"low": 1e-4, "high": 1e-3, "choices": [1e-3]}, "not both"),
    ({"low": 1e-2, "high": 1e-3}, "above high"),
    ({"choices": []}, "must not be empty"),
])
def test_malformed_specs_are_refused_naming_the_setting(spec: dict, message: str) -> None:
    with pytest.raises(ValueError, match=f"tune.space.learning_rate: .*{message}"):
        TuneConfig(space={"learning_rate": spec})


def test_a_choice_finetune_would_refuse_fails_when_params_load() -> None:
    with pytest.raises(ValueError, match="tune.space.method: 'fulll' is not a valid value"):
        TuneConfig(space={"method": {"choices": ["lora", "fulll"]}})
    with pytest.raises(ValueError, match="tune.space.epochs: an integer setting needs integer"):
        TuneConfig(space={"epochs": {"low": 1, "high": 2.5}})


def test_params_yaml_errors_in_the_tune_section_name_the_key() -> None:
    for raw, named in [({"space": {"learning_rat": {"low": 1e-4, "high": 1e-3}}}, "learning_rat"),
                       ({"space": {"learning_rate": {"lo": 1e-4, "high": 1e-3}}}, "lo"),
                       ({"n_trial": 3}, "n_trial")]:
        with pytest.raises(ParamsError, match=named):
            parse_params({"tune": raw})


def test_yaml_exponents_without_a_dot_still_read_as_numbers() -> None:
    # PyYAML reads `1e-4` as a string; the spec's number type converts it
    params = parse_params({"tune": {"space": {"learning_rate": {"low": "1e-4", "high": "3e-3", "log": True}}}})
    assert params.tune.space["learning_rate"] == ParamSpec(low=1e-4, high=3e-3, log=True)


def test_shipped_space_searches_what_the_issue_lists() -> None:
    from tuneloop.pipeline.params import load_params

    params = load_params(Path(__file__).resolve().parents[2] / "params.yaml")
    assert not params.tune.enabled  # the default run stays within its budget
    assert {"learning_rate", "lora_r", "lora_alpha", "lora_dropout", "epochs", "batch_size",
            "max_length", "weight_decay", "warmup_ratio", "method"} <= set(params.tune.space)
    assert "target_modules" not in params.tune.space  # module names differ by architecture: all-linear fits any
    assert params.tune == TuneConfig(enabled=False)  # the code's defaults are the shipped ones


def test_suggest_turns_optuna_values_into_finetune_settings() -> None:
    config = TuneConfig(space={
        "target_modules": {"choices": [["query", "value"], ["query", "key", "value", "dense"]]},
        "lora_r": {"choices": [4, 8]}, "learning_rate": {"low": 1e-4, "high": 1e-2, "log": True},
        "epochs": {"low": 1, "high": 3}, "method": {"choices": ["lora", "full"]}})
    trial = optuna.trial.FixedTrial({"target_modules": '["query", "value"]', "lora_r": 4, "learning_rate": 3e-3,
                                     "epochs": 2, "method": "full"})
    settings = suggest(trial, config.space, FAST)
    assert settings == replace(FAST, target_modules=("query", "value"), lora_r=4, learning_rate=3e-3, epochs=2,
                               method="full")
    assert isinstance(settings.epochs, int)


# --- the study ------------------------------------------------------------------------------------


def test_trials_far_below_the_median_are_pruned_before_their_last_epoch(data, tmp_path, mlflow_sandbox) -> None:
    # learning rate 0 never learns: it falls behind the trial that does before its last epoch
    config = TuneConfig(n_trials=3, timeout_minutes=None, train_rows=None, startup_trials=6, seed=3,
                        pruner=PrunerConfig(n_startup_trials=1), space={"learning_rate": {"choices": [0.01, 0.0]}})
    runs = mlflow_parent(mlflow_sandbox)
    result = run_study(config, FAST, data, f"sqlite:///{tmp_path}/optuna.db", tmp_path / "work", runs)
    pruned = [t for t in result.trials if t["state"] == "PRUNED"]
    assert pruned and result.n_pruned == len(pruned)
    assert all(t["params"] == {"learning_rate": 0.0} for t in pruned)
    assert all(len(t["intermediate"]) < FAST.epochs for t in pruned)  # stopped before its last epoch
    assert result.best_params == {"learning_rate": 0.01}
    assert result.trials[0]["params"] == {"learning_rate": 0.01}  # trial 0 is params.finetune's own value
    children = {int(r.data.tags["optuna.trial"]): r for r in child_runs(mlflow_sandbox, runs.parent_run_id)}
    assert sorted(children) == [t["number"] for t in result.trials]
    for trial in result.trials:
        run = children[trial["number"]]
        assert run.data.tags["state"] == trial["state"]
        assert run.data.params == {"learning_rate": str(trial["params"]["learning_rate"])}
    from mlflow import MlflowClient

    complete = next(t for t in result.trials if t["state"] == "COMPLETE")
    history = MlflowClient().get_metric_history(children[complete["number"]].info.run_id, "val_macro_f1")
    assert [m.step for m in history] == [1, 2, 3]
    assert children[pruned[0]["number"]].info.status == "KILLED"


class Killed(BaseException):
    """What SIGKILL does to a trial: nothing gets to mark it finished."""


@pytest.mark.parametrize("interruption", [Killed, KeyboardInterrupt])
def test_an_interrupted_search_resumes_the_same_study(data, tmp_path, monkeypatch, mlflow_sandbox,
                                                       interruption) -> None:
    config = TuneConfig(n_trials=3, timeout_minutes=None, train_rows=64, pruner=PrunerConfig(n_startup_trials=10),
                        space={"learning_rate": {"low": 3e-3, "high": 3e-2}})
    base = replace(FAST, epochs=1)
    storage = f"sqlite:///{tmp_path}/optuna.db"
    runs = mlflow_parent(mlflow_sandbox)
    real_finetune, calls = tune.finetune, []

    def interrupted_at_the_second_trial(*args, **kwargs):
        calls.append(args[5].learning_rate)
        if len(calls) == 2:
            raise interruption()
        return real_finetune(*args, **kwargs)

    monkeypatch.setattr(tune, "finetune", interrupted_at_the_second_trial)
    with pytest.raises(interruption):
        run_study(config, base, data, storage, tmp_path / "work", runs)
    name = tune.study_name(config, base, data)
    before = {t.number: (t.state.name, t.value) for t in optuna.load_study(study_name=name, storage=storage).trials}
    assert [state for state, _ in before.values()] == ["COMPLETE", "RUNNING" if interruption is Killed else "FAIL"]

    result = run_study(config, base, data, storage, tmp_path / "work", runs)
    assert result.study_name == name
    assert result.resumed_trials == 2 and result.retried_trials == [1]
    after = {t["number"]: t for t in result.trials}
    assert (after[0]["state"], after[0]["value"]) == before[0]  # earlier trials are kept as they were
    assert after[1]["state"] == "FAIL"
    assert after[2]["retry_of"] == 1 and after[2]["params"] == after[1]["params"]  # the same settings, again
    assert after[2]["state"] == "COMPLETE"
    assert result.n_complete == 3 and len(result.trials) == 4  # the interrupted trial used up no budget
    assert result.new_trials == 2
    assert calls[2] == calls[1]
    trial_runs = {r.data.tags["optuna.trial"]: r for r in child_runs(mlflow_sandbox, runs.parent_run_id)}
    assert (trial_runs["1"].data.tags["state"], trial_runs["1"].info.status) == ("FAIL", "FAILED")
    assert [trial_runs[n].data.tags["state"] for n in ("0", "2", "3")] == ["COMPLETE"] * 3


def test_a_finished_study_runs_no_more_trials(data, tmp_path) -> None:
    config = TuneConfig(n_trials=2, timeout_minutes=None, train_rows=64, space={"lora_r": {"choices": [2, 4]}})
    storage = f"sqlite:///{tmp_path}/optuna.db"
    first = run_study(config, replace(FAST, epochs=1), data, storage, tmp_path / "work")
    again = run_study(config, replace(FAST, epochs=1), data, storage, tmp_path / "work")
    assert again.new_trials == 0 and again.resumed_trials == 2
    assert again.best_params == first.best_params and again.trials == first.trials


def test_no_trial_starts_once_the_time_budget_is_spent(data, tmp_path, monkeypatch) -> None:
    import time

    monkeypatch.setattr(tune, "finetune", lambda *args, **kwargs: time.sleep(0.2) or fake_result(0.5))
    config = TuneConfig(n_trials=5, timeout_minutes=0.001, space={"lora_r": {"choices": [2, 4]}})
    result = run_study(config, FAST, data, f"sqlite:///{tmp_path}/optuna.db", tmp_path / "work")
    assert result.n_complete == 1 and len(result.trials) == 1


def test_a_running_trial_stops_at_its_next_epoch_once_the_time_budget_is_spent() -> None:
    import time

    study = optuna.create_study(direction="maximize")
    spent = time.monotonic() - 1
    first = study.ask()
    tune.epoch_reporter(first, 3, None, None, spent)(1, 0.5)  # no trial completed yet: it goes on
    study.tell(first, 0.5)
    with pytest.raises(optuna.TrialPruned, match="time budget"):
        tune.epoch_reporter(study.ask(), 3, None, None, spent)(1, 0.9)
    tune.epoch_reporter(study.ask(), 3, None, None, spent)(3, 0.9)  # its last epoch: nothing left to save


def test_trials_train_on_the_same_seeded_subsample(data, tmp_path, monkeypatch) -> None:
    seen = []
    monkeypatch.setattr(tune, "finetune", lambda *args, **kwargs: seen.append(args[2]) or fake_result(0.5))
    config = TuneConfig(n_trials=3, train_rows=50, space={"lora_r": {"choices": [2, 4, 8]}})
    result = run_study(config, FAST, data, f"sqlite:///{tmp_path}/optuna.db", tmp_path / "work")
    assert result.train_rows == 50
    assert len(seen) == 3 and all(rows == seen[0] for rows in seen)
    assert len(seen[0][0]) == 50 and set(seen[0][0]) <= set(data.train[0])


def test_the_study_is_stored_beside_the_mlflow_sqlite_database(tmp_path) -> None:
    assert tune.default_storage(tmp_path, "sqlite:////srv/mlflow/mlflow.db") == "sqlite:////srv/mlflow/optuna.db"
    assert tune.default_storage(tmp_path, "http://mlflow:5000") == f"sqlite:///{tmp_path.resolve()}/optuna.db"


def fake_result(f1: float) -> FinetuneResult:
    return FinetuneResult(Path("."), f1, f1, 1, 1, False, 0, 1.0, 1.0, 1.0)


# --- the stage: best settings reach finetune, the test split is never seen -------------------------


@pytest.fixture
def workspace(tmp_path, toy_task, mlflow_sandbox) -> Workspace:
    """A workspace after split: train/validation toy rows and test rows no trial may see."""
    from tuneloop.plumbing import tracking

    ws = Workspace(tmp_path)
    labels = toy_task["labels"]
    frames = [pd.DataFrame({"text": texts, "label": [labels[i] for i in ys], "split": name})
              for name, (texts, ys) in (("train", toy_task["train"]), ("validation", toy_task["validation"]))]
    frames.append(pd.DataFrame({"text": [f"test only row {i} was great" for i in range(40)],
                                "label": labels * 20, "split": "test"}))
    ws.splits.parent.mkdir(parents=True)
    pd.concat(frames, ignore_index=True).to_parquet(ws.splits)
    write_json(ws.data_version, asdict(DataVersion("e" * 32, 1, "data/raw/x.csv", "x.csv", 360, 0)))
    tracking.start_pipeline_run(mlflow_sandbox.config(), ws, {})
    return ws


def stage_params(tiny_bert, sandbox, ws: Workspace, **tune_settings):
    raw_finetune = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(FAST).items()}
    tune_section = {"enabled": True, "n_trials": 2, "timeout_minutes": None, "train_rows": 128,
                    "storage": f"sqlite:///{ws.root}/optuna.db",
                    "space": {"lora_r": {"choices": [2, 4]}, "learning_rate": {"low": 5e-3, "high": 2e-2}},
                    **tune_settings}
    return parse_params({"model": {"base": str(tiny_bert)}, "validate": {"labels": ["negative", "positive"]},
                         "mlflow": {"tracking_uri": sandbox.tracking_uri, "experiment": sandbox.experiment},
                         "finetune": {**raw_finetune, "epochs": 1}, "tune": tune_section})


def test_tune_stage_never_reads_the_test_split_and_its_best_settings_reach_finetune(
        tiny_bert, workspace, mlflow_sandbox, monkeypatch) -> None:
    from tuneloop.pipeline import stages

    params = stage_params(tiny_bert, mlflow_sandbox, workspace)
    splits_read, texts_seen, real_finetune = [], set(), tune.finetune
    real_load_split = stages.load_split
    monkeypatch.setattr(stages, "load_split", lambda ws, name: splits_read.append(name) or real_load_split(ws, name))

    def spying_finetune(*args, **kwargs):
        texts_seen.update(args[2][0], args[3][0])
        return real_finetune(*args, **kwargs)

    monkeypatch.setattr(tune, "finetune", spying_finetune)
    record = stages.tune(params, workspace)
    assert set(splits_read) == {"train", "validation"}
    assert texts_seen and not any(text.startswith("test only") for text in texts_seen)
    assert json.loads(workspace.tune_result.read_text())["best_params"] == record["best_params"]
    assert (workspace.tune_reports / "optimisation_history.png").exists()

    used = []
    monkeypatch.setattr(stages, "finetune_model", lambda *args, **kwargs: used.append(args[5]) or fake_result(0.9))
    monkeypatch.setattr(stages, "calibrate_model", lambda *args: (1.0, Abstention()))  # nothing trained to calibrate
    stages.finetune(params, workspace)
    assert used == [apply_params(params.finetune, record["best_params"])]
    assert used[0].lora_r == record["best_params"]["lora_r"] != params.finetune.lora_r
    assert json.loads(stages.tuning_tags(params, workspace)["tuned_params"]) == record["best_params"]


def test_finetune_ignores_tuned_settings_when_tuning_is_off_or_they_are_for_other_data(
        tiny_bert, workspace, mlflow_sandbox) -> None:
    from tuneloop.pipeline import stages

    params = stage_params(tiny_bert, mlflow_sandbox, workspace)
    write_json(workspace.tune_result, {"enabled": True, "data_version": "e" * 32, "best_params": {"lora_r": 2}})
    assert stages.finetune_settings(params, workspace) == replace(params.finetune, lora_r=2)
    off = params.model_copy(update={"tune": replace(params.tune, enabled=False)})
    assert stages.finetune_settings(off, workspace) == params.finetune
    assert stages.tuning_tags(off, workspace) == {}
    write_json(workspace.tune_result, {"enabled": True, "data_version": "f" * 32, "best_params": {"lora_r": 2}})
    assert stages.finetune_settings(params, workspace) == params.finetune


def test_tune_stage_when_off_writes_only_that_it_is_off(tiny_bert, workspace, mlflow_sandbox) -> None:
    from tuneloop.pipeline import stages

    params = stage_params(tiny_bert, mlflow_sandbox, workspace, enabled=False)
    assert stages.tune(params, workspace) == {"enabled": False}
    assert json.loads(workspace.tune_result.read_text()) == {"enabled": False, "data_version": "e" * 32}


# --- the report --------------------------------------------------------------------------------------


def test_evaluation_report_gains_a_tuning_section_with_both_plots() -> None:
    tuning = {"study_name": "tuneloop-abc", "best_params": {"learning_rate": 0.002, "target_modules": ["query"]},
              "best_value": 0.91, "best_trial": 2, "n_complete": 3, "n_pruned": 1, "n_failed": 0, "train_rows": 1024,
              "importances": {"learning_rate": 0.8, "target_modules": 0.2},
              "trials": [{"number": 0, "state": "COMPLETE", "value": 0.85, "intermediate": [[1, 0.85]]},
                         {"number": 1, "state": "PRUNED", "value": None, "intermediate": [[1, 0.6]]},
                         {"number": 2, "state": "COMPLETE", "value": 0.91, "intermediate": [[1, 0.88], [2, 0.91]]},
                         {"number": 3, "state": "COMPLETE", "value": 0.9, "intermediate": [[1, 0.9]]}]}
    model = {"name": "challenger", "accuracy": 0.9, "macro_f1": 0.9}
    plain = render_evaluation_report({"labels": ["a", "b"], "models": {"challenger": model}})
    tuned = render_evaluation_report({"labels": ["a", "b"], "models": {"challenger": model}, "tuning": tuning})
    assert "<h2>Tuning</h2>" not in plain
    assert "<h2>Tuning</h2>" in tuned and "tuneloop-abc" in tuned and "query" in tuned
    assert tuned.count("<img") == plain.count("<img") + 2
    assert 'alt="optimisation history"' in tuned and 'alt="param importances"' in tuned
