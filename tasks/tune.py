"""tune: a hyperparameter search over the fine-tuning settings, with Optuna.

Training teaches the model from data; tuning searches the settings training
runs with. A study (TPE sampler, median pruning on validation macro-F1 after
each epoch) draws settings from the search space declared in `params.yaml`,
fine-tunes with each and keeps every trial in an RDB storage (SQLite beside
`mlflow.db` by default), so an interrupted search resumes where it stopped.

Trials see only train and validation rows: the test split is the evaluation
stage's alone. To fit a CPU budget a trial may train on a seeded subsample of
the train rows (`train_rows`); every trial uses the same subsample, so trials
compare settings on equal data, and the winner is then trained on all rows.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
import typing
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from tuneloop.tasks.finetune import FinetuneConfig, finetune

SCALAR_TYPES = (type(None), bool, int, float, str)  # what Optuna stores as a categorical choice
COUNTED_STATES = ("COMPLETE", "PRUNED", "FAIL")  # trials that use up the budget (interrupted ones do not)


@dataclass(frozen=True)
class ParamSpec:
    """One searched setting: a range `{low, high[, log][, step]}` or `{choices}`."""

    low: int | float | None = None
    high: int | float | None = None
    log: bool = False  # sample uniformly in log space (learning rates)
    step: int | float | None = None
    choices: tuple[Any, ...] | None = None  # any YAML values, lists included (target_modules)
    __pydantic_config__ = {"extra": "forbid"}

    def __post_init__(self) -> None:
        if self.choices is not None:
            if self.low is not None or self.high is not None or self.log or self.step is not None:
                raise ValueError("give either {low, high[, log][, step]} or {choices}, not both")
            if len(self.choices) == 0:
                raise ValueError("choices must not be empty")
            object.__setattr__(self, "choices", tuple(tuple(c) if isinstance(c, list) else c for c in self.choices))
        elif self.low is None or self.high is None:
            raise ValueError("a range needs both low and high (or give choices)")
        elif self.low > self.high:
            raise ValueError(f"low {self.low} is above high {self.high}")
        elif self.log and (self.low <= 0 or self.step is not None):
            raise ValueError("a log range needs low > 0 and no step")


@dataclass(frozen=True)
class PrunerConfig:
    n_startup_trials: int = 2  # completed trials before any pruning: the median needs a few values
    n_warmup_steps: int = 0  # epochs every trial trains before it may be pruned
    __pydantic_config__ = {"extra": "forbid"}


def default_space() -> dict[str, ParamSpec]:
    """The search space shipped in params.yaml."""
    return {
        "method": ParamSpec(choices=("lora",)),
        "learning_rate": ParamSpec(low=3e-4, high=4e-3, log=True),
        "lora_r": ParamSpec(choices=(8, 16, 32)),
        "lora_alpha": ParamSpec(choices=(16, 32)),
        "lora_dropout": ParamSpec(low=0.0, high=0.2),
        "epochs": ParamSpec(low=1, high=2),
        "batch_size": ParamSpec(choices=(16, 32)),
        "max_length": ParamSpec(choices=(64, 128)),
        "weight_decay": ParamSpec(low=0.0, high=0.1),
        "warmup_ratio": ParamSpec(low=0.0, high=0.2),
    }


@dataclass(frozen=True)
class TuneConfig:
    enabled: bool = False  # off: finetune trains with params.finetune as written
    n_trials: int = 12  # finished trials the study aims for, counting those of earlier, interrupted runs
    timeout_minutes: float | None = 11.0  # per run: no trial starts after it, a running one stops at its next epoch
    study_name: str = "tuneloop"  # prefix; the data version and search settings complete the name
    storage: str | None = None  # Optuna RDB URL; None: sqlite optuna.db beside the MLflow SQLite db
    seed: int = 0  # TPE sampler and train subsample
    startup_trials: int = 4  # random trials before TPE models the results
    train_rows: int | None = 3072  # rows each trial trains on (seeded subsample); None: every train row
    enqueue_defaults: bool = True  # trial 0 runs params.finetune's own values: the search starts from them
    pruner: PrunerConfig = PrunerConfig()
    space: dict[str, ParamSpec] = field(default_factory=default_space)
    __pydantic_config__ = {"extra": "forbid"}

    def __post_init__(self) -> None:
        specs = {name: as_spec(name, spec) for name, spec in dict(self.space).items()}
        unknown = sorted(set(specs) - {f.name for f in fields(FinetuneConfig)})
        if unknown:
            raise ValueError(f"tune.space names settings finetune does not have: {', '.join(unknown)}; "
                             f"searchable: {', '.join(f.name for f in fields(FinetuneConfig))}")
        for name, spec in specs.items():
            check_values(name, spec)
        object.__setattr__(self, "space", specs)
        if self.n_trials < 1 or (self.train_rows is not None and self.train_rows < 1):
            raise ValueError("tune.n_trials and tune.train_rows must be at least 1")


def as_spec(name: str, spec: Any) -> ParamSpec:
    """A ParamSpec from a mapping, naming unknown keys (pydantic hands ParamSpecs through)."""
    if isinstance(spec, ParamSpec):
        return spec
    if not isinstance(spec, dict):
        raise ValueError(f"tune.space.{name} must be {{low, high[, log][, step]}} or {{choices}}, got {spec!r}")
    unknown = sorted(set(spec) - {f.name for f in fields(ParamSpec)})
    if unknown:
        raise ValueError(f"tune.space.{name}: unknown keys {', '.join(unknown)}; "
                         "a spec is {low, high[, log][, step]} or {choices}")
    try:
        return ParamSpec(**spec)
    except ValueError as error:
        raise ValueError(f"tune.space.{name}: {error}") from None


def is_int_setting(name: str) -> bool:
    hint = typing.get_type_hints(FinetuneConfig)[name]
    return hint is int or set(typing.get_args(hint)) == {int, type(None)}


def check_values(name: str, spec: ParamSpec) -> None:
    """Every value the spec can give must make a valid FinetuneConfig (a typo in
    `method: {choices: [lora, fulll]}` fails here, not twenty minutes in)."""
    values = spec.choices if spec.choices is not None else (spec.low, spec.high)
    if spec.choices is None and is_int_setting(name) and not all(float(v).is_integer() for v in values):
        raise ValueError(f"tune.space.{name}: an integer setting needs integer low and high")
    for value in values:
        try:
            apply_params(FinetuneConfig(), {name: value})
        except (TypeError, ValueError) as error:
            raise ValueError(f"tune.space.{name}: {value!r} is not a valid value: {error}") from None


def apply_params(base: FinetuneConfig, values: dict[str, Any]) -> FinetuneConfig:
    """`base` with `values` over it; lists become tuples (JSON and YAML have no tuples)."""
    return replace(base, **{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def choice_label(value: Any) -> Any:
    """What Optuna stores for a choice: scalars as they are, lists as JSON text."""
    return value if isinstance(value, SCALAR_TYPES) else json.dumps(list(value))


def suggest_value(trial, name: str, spec: ParamSpec) -> Any:
    if spec.choices is not None:
        labels = {choice_label(c): c for c in spec.choices}
        return labels[trial.suggest_categorical(name, list(labels))]
    if is_int_setting(name):
        return trial.suggest_int(name, int(spec.low), int(spec.high), step=int(spec.step or 1), log=spec.log)
    return trial.suggest_float(name, float(spec.low), float(spec.high), step=spec.step, log=spec.log)


def suggest(trial, space: dict[str, ParamSpec], base: FinetuneConfig) -> FinetuneConfig:
    """The trial's settings: `base` with one value drawn for every searched setting."""
    return apply_params(base, {name: suggest_value(trial, name, spec) for name, spec in space.items()})


def decode(params: dict[str, Any], space: dict[str, ParamSpec]) -> dict[str, Any]:
    """A trial's Optuna params as finetune values (JSON text back to lists)."""
    out = {}
    for name, value in params.items():
        spec = space.get(name)
        labels = {choice_label(c): c for c in spec.choices} if spec and spec.choices is not None else {}
        chosen = labels.get(value, value)
        out[name] = list(chosen) if isinstance(chosen, tuple) else chosen
    return out


def encode(config: FinetuneConfig, space: dict[str, ParamSpec]) -> dict[str, Any]:
    """`config`'s values of the searched settings as Optuna params, leaving out any
    the space cannot produce (so enqueueing the defaults never leaves the space)."""
    out = {}
    for name, spec in space.items():
        value = getattr(config, name)
        if spec.choices is not None:
            label = choice_label(value)
            if label in {choice_label(c) for c in spec.choices}:
                out[name] = label
        elif value is not None and spec.low <= value <= spec.high:
            out[name] = value
    return out


@dataclass(frozen=True)
class TuneData:
    """What every trial trains from: the base model and train/validation rows only."""

    base_model: str  # the name recorded in saved models
    base_path: Path
    train: tuple[Sequence[str], Sequence[int]]
    validation: tuple[Sequence[str], Sequence[int]]
    labels: tuple[str, ...]
    data_key: str  # the data version


@dataclass
class TuneResult:
    study_name: str
    best_params: dict[str, Any]  # finetune setting -> value, the searched settings only
    best_value: float  # the best trial's validation macro-F1
    best_trial: int
    n_complete: int
    n_pruned: int
    n_failed: int
    resumed_trials: int  # trials the study already held when this run started
    retried_trials: list[int]  # interrupted trials queued again with the same settings
    new_trials: int  # trials run by this call
    train_rows: int  # rows each trial trained on
    seconds: float
    trials: list[dict] = field(default_factory=list)
    importances: dict[str, float] = field(default_factory=dict)


def subsample(rows: tuple[Sequence[str], Sequence[int]], n: int | None, seed: int) -> tuple[list[str], list[int]]:
    """A seeded random subset of `n` rows (all rows when n is None or larger)."""
    texts, labels = rows
    picked = np.sort(np.random.default_rng(seed).permutation(len(texts))[:n]) if n else range(len(texts))
    return [texts[i] for i in picked], [int(labels[i]) for i in picked]


def study_name(config: TuneConfig, base: FinetuneConfig, data: TuneData) -> str:
    """`<study_name>-<data version>-<settings hash>`: the same data, base model, space and
    trial settings continue one study; changing any of them starts a new one."""
    key = json.dumps([data.data_key, data.base_model, config.train_rows, config.seed, asdict(base),
                      {k: asdict(v) for k, v in sorted(config.space.items())}], sort_keys=True, default=str)
    return f"{config.study_name}-{data.data_key[:8]}-{hashlib.sha256(key.encode()).hexdigest()[:8]}"


def default_storage(root: Path, mlflow_uri: str | None = None) -> str:
    """`sqlite:///.../optuna.db` in the folder of the MLflow SQLite database, or in `root`."""
    folder = Path(root)
    if mlflow_uri and mlflow_uri.startswith("sqlite:///"):
        folder = Path(mlflow_uri[len("sqlite:///"):]).parent
    return f"sqlite:///{(folder / 'optuna.db').resolve()}"


def redact(url: str) -> str:
    """The storage URL without its password, for logs and metrics."""
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def open_study(config: TuneConfig, name: str, storage):
    """Creates the study or loads it from `storage` (a URL or an Optuna storage): a resumed search."""
    import optuna

    sampler = optuna.samplers.TPESampler(seed=config.seed, n_startup_trials=config.startup_trials)
    pruner = optuna.pruners.MedianPruner(n_startup_trials=config.pruner.n_startup_trials,
                                         n_warmup_steps=config.pruner.n_warmup_steps)
    return optuna.create_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner,
                               direction="maximize", load_if_exists=True)


@dataclass(frozen=True)
class TrialRuns:
    """MLflow runs of the trials: one child run per trial under the tuning run,
    with its settings, per-epoch `val_macro_f1` (step = epoch) and a `state` tag."""

    parent_run_id: str
    experiment_id: str

    def start(self, trial, settings: dict[str, Any]) -> str:
        from mlflow import MlflowClient

        client = MlflowClient()
        run = client.create_run(self.experiment_id, run_name=f"trial-{trial.number}", tags={
            "mlflow.parentRunId": self.parent_run_id, "optuna.trial": str(trial.number), "state": "RUNNING"})
        client.log_batch(run.info.run_id, params=param_list(settings))
        trial.set_user_attr("mlflow_run_id", run.info.run_id)  # a resumed study closes it if the trial dies
        return run.info.run_id

    def log_epoch(self, run_id: str, epoch: int, value: float) -> None:
        from mlflow import MlflowClient

        MlflowClient().log_metric(run_id, "val_macro_f1", value, step=epoch)

    def finish(self, run_id: str, state: str, metrics: dict[str, float] | None = None) -> None:
        close_trial_run(run_id, state, metrics)


def param_list(values: dict[str, Any]):
    from mlflow.entities import Param

    return [Param(k, json.dumps(v) if isinstance(v, (list, tuple)) else str(v)) for k, v in values.items()]


def close_trial_run(run_id: str, state: str, metrics: dict[str, float] | None = None) -> None:
    """Tags the trial's run with its Optuna state and ends it (FAIL -> FAILED, PRUNED -> KILLED)."""
    from mlflow import MlflowClient

    client = MlflowClient()
    for key, value in (metrics or {}).items():
        client.log_metric(run_id, key, value)
    client.set_tag(run_id, "state", state)
    client.set_terminated(run_id, {"COMPLETE": "FINISHED", "PRUNED": "KILLED"}.get(state, "FAILED"))


def completed_trials(study) -> list:
    """The study's completed trials (not copied)."""
    from optuna.trial import TrialState

    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))


def epoch_reporter(trial, epochs: int, runs: TrialRuns | None, run_id: str | None,
                   deadline: float | None = None) -> Callable[[int, float], None]:
    """finetune's `on_epoch_end`: reports validation macro-F1 to the trial and,
    while epochs are left to save, prunes it when the pruner says so or when
    the search's time budget (a `time.monotonic()` deadline) has run out and a
    trial has completed (the budget never stops a search before one has)."""
    import optuna

    def on_epoch_end(epoch: int, value: float) -> None:
        trial.report(value, epoch)
        if runs is not None:
            runs.log_epoch(run_id, epoch, value)
        if epoch < epochs and deadline is not None and time.monotonic() > deadline and completed_trials(trial.study):
            trial.set_user_attr("stopped", "time budget spent")
            raise optuna.TrialPruned(f"the time budget ran out after epoch {epoch}")
        if epoch < epochs and trial.should_prune():
            raise optuna.TrialPruned(f"validation macro-F1 {value:.4f} after epoch {epoch} is below the median")

    return on_epoch_end


def objective(trial, config: TuneConfig, base: FinetuneConfig, data: TuneData, work_dir: Path,
              runs: TrialRuns | None = None, deadline: float | None = None) -> float:
    """Fine-tunes with the trial's settings on train rows, scores validation rows.

    Returns:
        The best epoch's validation macro-F1.

    Raises:
        optuna.TrialPruned: validation macro-F1 fell below the median of earlier trials.
    """
    import optuna

    settings = suggest(trial, config.space, base)
    run_id = runs.start(trial, decode(trial.params, config.space)) if runs else None
    checkpoints = work_dir / "checkpoints"
    try:
        result = finetune(data.base_model, data.base_path, data.train, data.validation, data.labels, settings,
                          work_dir / "model", checkpoints, data.data_key, progress=False,
                          on_epoch_end=epoch_reporter(trial, settings.epochs, runs, run_id, deadline))
    except KeyboardInterrupt:  # a stopped search: the next run retries this trial from its checkpoint
        trial.set_user_attr("interrupted", True)
        if runs is not None:
            runs.finish(run_id, "FAIL")
        raise
    except Exception as error:
        shutil.rmtree(checkpoints, ignore_errors=True)  # a pruned or failed run is never resumed
        if runs is not None:
            runs.finish(run_id, "PRUNED" if isinstance(error, optuna.TrialPruned) else "FAIL")
        raise
    finally:
        shutil.rmtree(work_dir / "model", ignore_errors=True)
    if runs is not None:
        runs.finish(run_id, "COMPLETE", {"best_val_macro_f1": result.best_val_macro_f1,
                                         "seconds": result.seconds, "steps": result.steps})
    return result.best_val_macro_f1


def recover_interrupted(storage, name: str) -> list:
    """Trials an interrupted run left behind: RUNNING ones (the process was
    killed) are marked FAIL and `interrupted`, Ctrl-C'd ones already are.

    Assumes one search per study at a time: a RUNNING trial is a dead one.

    Returns:
        The interrupted trials not yet queued again.
    """
    from optuna.trial import TrialState

    study_id = storage.get_study_id_from_name(name)
    trials = storage.get_all_trials(study_id, deepcopy=False)
    retried = {t.user_attrs.get("retry_of") for t in trials}
    found = []
    for trial in trials:
        if trial.state == TrialState.RUNNING:
            trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
            storage.set_trial_user_attr(trial_id, "interrupted", True)
            storage.set_trial_state_values(trial_id, TrialState.FAIL)
            if trial.user_attrs.get("mlflow_run_id"):
                close_trial_run(trial.user_attrs["mlflow_run_id"], "FAIL")
        elif not (trial.state == TrialState.FAIL and trial.user_attrs.get("interrupted")):
            continue
        if trial.number not in retried:
            found.append(trial)
    return found


def counted(trial) -> bool:
    """Whether a finished trial uses up the trial budget (an interrupted one does not)."""
    return trial.state.name in COUNTED_STATES and not trial.user_attrs.get("interrupted")


def trial_summary(trial, space: dict[str, ParamSpec]) -> dict:
    return {"number": trial.number, "state": trial.state.name, "value": trial.value,
            "params": decode(trial.params, space), "retry_of": trial.user_attrs.get("retry_of"),
            "intermediate": sorted([int(step), value] for step, value in trial.intermediate_values.items()),
            "seconds": trial.duration.total_seconds() if trial.duration else None}


def param_importances(study, min_complete: int = 3) -> dict[str, float]:
    """Optuna's parameter importances (PED-ANOVA by default) over the completed
    trials; empty while fewer than `min_complete` completed (one or two trials
    give every setting the same share)."""
    import optuna

    if len(completed_trials(study)) < min_complete:
        return {}
    try:
        return {k: float(v) for k, v in optuna.importance.get_param_importances(study).items()}
    except (RuntimeError, ValueError, ZeroDivisionError):
        return {}


def run_study(config: TuneConfig, base: FinetuneConfig, data: TuneData, storage: str, work_dir: Path,
              runs: TrialRuns | None = None, on_trial: Callable[[Any], None] | None = None) -> TuneResult:
    """Runs the study, or resumes it from storage, until it holds `n_trials`
    finished trials or `timeout_minutes` pass; interrupted trials run again.

    Args:
        base: the settings trials start from; the space overrides the searched ones.
        data: train and validation rows (never test rows); trials train on
            `config.train_rows` of the train rows.
        storage: an Optuna RDB URL.
        work_dir: trial models and checkpoints (emptied as trials end).
        on_trial: called with each finished FrozenTrial (progress lines).

    Raises:
        RuntimeError: no trial of the study completed.
    """
    import optuna
    import torch

    started = time.perf_counter()
    deadline = time.monotonic() + config.timeout_minutes * 60 if config.timeout_minutes else None
    name = study_name(config, base, data)
    trial_data = replace(data, train=subsample(data.train, config.train_rows, config.seed),
                         data_key=f"{data.data_key}:tune:{config.train_rows}:{config.seed}")
    rdb = optuna.storages.RDBStorage(storage)
    open_study(config, name, rdb)  # creates it on the first run
    interrupted = recover_interrupted(rdb, name)
    study = open_study(config, name, rdb)  # a fresh view, after the repairs
    before = len(study.trials)
    for trial in interrupted:
        study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})
    if before == 0 and config.enqueue_defaults:
        study.enqueue_trial(encode(base, config.space))
    remaining = config.n_trials - sum(counted(t) for t in study.trials)
    if remaining > 0:
        study.optimize(lambda trial: objective(trial, config, base, trial_data, work_dir, runs, deadline),
                       n_trials=remaining, catch=(torch.cuda.OutOfMemoryError,), gc_after_trial=True,
                       timeout=config.timeout_minutes * 60 if config.timeout_minutes else None,
                       callbacks=[lambda _, trial: on_trial(trial)] if on_trial else None)
    return summarise(study, config.space, before, [t.number for t in interrupted],
                     len(trial_data.train[0]), time.perf_counter() - started)


def summarise(study, space: dict[str, ParamSpec], before: int, retried: list[int], train_rows: int,
              seconds: float) -> TuneResult:
    """The study's best settings, trial counts, trials and importances."""
    trials = study.get_trials(deepcopy=False)
    states = [t.state.name for t in trials]
    if "COMPLETE" not in states:
        raise RuntimeError(f"study {study.study_name}: no trial completed ({len(trials)} trials); "
                           "see the trials' MLflow runs for their errors")
    best = study.best_trial
    return TuneResult(
        study_name=study.study_name, best_params=decode(best.params, space), best_value=float(best.value),
        best_trial=best.number, n_complete=states.count("COMPLETE"), n_pruned=states.count("PRUNED"),
        n_failed=states.count("FAIL"), resumed_trials=before, retried_trials=retried,
        new_trials=sum(t.state.is_finished() for t in trials[before:]), train_rows=train_rows,
        seconds=seconds, trials=[trial_summary(t, space) for t in trials], importances=param_importances(study),
    )


def describe_trial(trial) -> str:
    """One progress line for a finished trial."""
    seconds = f" in {trial.duration.total_seconds():.0f}s" if trial.duration else ""
    if trial.state.name == "COMPLETE":
        return f"trial {trial.number} complete: validation macro-F1 {trial.value:.4f}{seconds}"
    if trial.state.name == "PRUNED" and trial.intermediate_values:
        epoch = max(trial.intermediate_values)
        return (f"trial {trial.number} pruned after epoch {epoch} "
                f"(validation macro-F1 {trial.intermediate_values[epoch]:.4f}){seconds}")
    return f"trial {trial.number} {trial.state.name.lower()}{seconds}"


def open_tune_run(experiment_id: str, pipeline_run_id: str, name: str, config: TuneConfig, storage: str) -> str:
    """The MLflow run of the search, a child of the pipeline's run; a resumed
    search within the same pipeline run continues its earlier tuning run."""
    from mlflow import MlflowClient

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
    from mlflow import MlflowClient

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
