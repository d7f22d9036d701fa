"""tune: a hyperparameter search over the fine-tuning settings, with Optuna.

Training teaches the model from data; tuning searches the settings training
runs with. A study (TPE sampler, median pruning on validation macro-F1 after
each epoch) draws settings from the search space declared in `params.yaml`
(`tasks.tune_space`), fine-tunes with each and keeps every trial in an RDB
storage (SQLite beside `mlflow.db` by default), so an interrupted search
resumes where it stopped.

Several workers (processes, machines) can search one study at once: each
trial records its worker and beats a heartbeat. A trial whose worker is known
dead (same host, process gone) or whose heartbeat stopped for `grace_seconds`
is failed and queued again with the same settings; a live worker's running
trial is never touched. Together the workers stop at `n_trials`.

Trials see only train and validation rows: the test split is the evaluation
stage's alone. To fit a CPU budget a trial may train on a seeded subsample of
the train rows (`train_rows`); every trial uses the same subsample, so trials
compare settings on equal data, and the winner is then trained on all rows.
Tracking is the caller's: trials report through the `runs` object handed in
(`tuneloop.pipeline.tune_runs.TrialRuns` logs them to MLflow).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import time
import uuid
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import numpy as np

from tuneloop.tasks.finetune import finetune
from tuneloop.tasks.tune_space import ParamSpec, TuneConfig, decode, encode, suggest
from tuneloop.values.config import FinetuneConfig

COUNTED_STATES = ("COMPLETE", "PRUNED", "FAIL")  # trials that use up the budget (interrupted ones do not)
WORKER_ATTR = "worker"  # host:pid:token of the process running a trial


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


class Runs(Protocol):
    """Where trials are reported (MLflow child runs in `tuneloop.pipeline.tune_runs`)."""

    def start(self, trial, settings: dict[str, Any]) -> str: ...

    def log_epoch(self, run_id: str, epoch: int, value: float) -> None: ...

    def finish(self, run_id: str, state: str, metrics: dict[str, float] | None = None) -> None: ...


def open_storage(url: str, config: TuneConfig, runs: Runs | None = None):
    """An RDB storage whose trials beat a heartbeat; a trial silent for
    `grace_seconds` is failed by the next worker to start a trial, and queued
    again (`retry_stale`). SQLite waits up to 60 s for a lock other workers hold,
    and each transaction takes the write lock when it begins (`BEGIN IMMEDIATE`):
    SQLite ignores Optuna's `SELECT ... FOR UPDATE`, so without it two workers
    can both pop one queued trial, run it twice, and the slower one crashes
    telling a finished trial."""
    import optuna

    sqlite = url.startswith("sqlite")
    engine = {"connect_args": {"timeout": 60, "isolation_level": None}} if sqlite else None  # we BEGIN ourselves
    with warnings.catch_warnings():  # the heartbeat is "experimental" in Optuna 5, stable since 2.9
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        storage = optuna.storages.RDBStorage(
            url, engine_kwargs=engine, heartbeat_interval=config.heartbeat_seconds, grace_period=config.grace_seconds,
            heartbeat_stale_trial_callback=lambda study, trial: retry_stale(study, trial, runs))
    if sqlite:
        from sqlalchemy import event

        event.listen(storage.engine, "begin", lambda conn: conn.exec_driver_sql("BEGIN IMMEDIATE"))
    return storage


def open_study(config: TuneConfig, name: str, storage):
    """Creates the study or loads it from `storage` (a URL or an Optuna storage): a resumed search."""
    import optuna

    sampler = optuna.samplers.TPESampler(seed=config.seed, n_startup_trials=config.startup_trials)
    pruner = optuna.pruners.MedianPruner(n_startup_trials=config.pruner.n_startup_trials,
                                         n_warmup_steps=config.pruner.n_warmup_steps)
    return optuna.create_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner,
                               direction="maximize", load_if_exists=True)


def new_worker_id() -> str:
    """host:pid:token, unique to one `run_study` call."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def worker_dead(worker: str | None, me: str) -> bool:
    """Whether a RUNNING trial's worker is known to be gone: on this host, its
    process has exited, or it is this process under an earlier `run_study`
    (which cannot still be running). Other hosts' workers are judged by their
    heartbeat alone."""
    if not worker:
        return False
    host, pid, token = worker.rsplit(":", 2)
    my_host, my_pid, my_token = me.rsplit(":", 2)
    if host != my_host:
        return False
    return (pid == my_pid and token != my_token) or not pid_alive(int(pid))


def retry_stale(study, trial, runs: Runs | None) -> None:
    """Optuna's heartbeat callback: a trial whose worker stopped beating was
    failed; its settings run again, and its MLflow run is closed FAIL."""
    study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})
    if runs is not None and trial.user_attrs.get("mlflow_run_id"):
        runs.finish(trial.user_attrs["mlflow_run_id"], "FAIL")


def completed_trials(study) -> list:
    """The study's completed trials (not copied)."""
    from optuna.trial import TrialState

    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))


def epoch_reporter(trial, epochs: int, runs: Runs | None, run_id: str | None,
                   deadline: float | None = None) -> Callable[[int, float], None]:
    """finetune's `on_epoch_end`: reports validation macro-F1 to the trial and,
    while epochs are left to save, prunes it when the pruner says so or when
    the search's time budget (a `time.monotonic()` deadline) has run out and a
    trial has completed (the budget never stops a search before one has)."""
    import optuna

    def on_epoch_end(epoch: int, value: float) -> None:
        trial.report(value, epoch)
        if runs is not None and run_id is not None:
            runs.log_epoch(run_id, epoch, value)
        if epoch < epochs and deadline is not None and time.monotonic() > deadline and completed_trials(trial.study):
            trial.set_user_attr("stopped", "time budget spent")
            raise optuna.TrialPruned(f"the time budget ran out after epoch {epoch}")
        if epoch < epochs and trial.should_prune():
            raise optuna.TrialPruned(f"validation macro-F1 {value:.4f} after epoch {epoch} is below the median")

    return on_epoch_end


def objective(trial, config: TuneConfig, base: FinetuneConfig, data: TuneData, work_dir: Path,
              runs: Runs | None = None, deadline: float | None = None, worker: str | None = None) -> float:
    """Fine-tunes with the trial's settings on train rows, scores validation rows.

    Each trial trains in its own folder under `work_dir`, so workers sharing
    it never touch each other's checkpoints.

    Returns:
        The best epoch's validation macro-F1.

    Raises:
        optuna.TrialPruned: validation macro-F1 fell below the median of earlier trials.
    """
    import optuna

    if worker:
        trial.set_user_attr(WORKER_ATTR, worker)
    settings = suggest(trial, config.space, base)
    run_id = runs.start(trial, decode(trial.params, config.space)) if runs else None
    folder = trial_folder(work_dir, trial)
    checkpoints = folder / "checkpoints"
    try:
        result = finetune(data.base_model, data.base_path, data.train, data.validation, data.labels, settings,
                          folder / "model", checkpoints, data.data_key, progress=False,
                          on_epoch_end=epoch_reporter(trial, settings.epochs, runs, run_id, deadline))
    except KeyboardInterrupt:  # a stopped search: the next run retries this trial from its checkpoint
        trial.set_user_attr("interrupted", True)
        if runs is not None and run_id is not None:
            runs.finish(run_id, "FAIL")
        raise
    except Exception as error:
        shutil.rmtree(checkpoints, ignore_errors=True)  # a pruned or failed run is never resumed
        if runs is not None and run_id is not None:
            runs.finish(run_id, "PRUNED" if isinstance(error, optuna.TrialPruned) else "FAIL")
        raise
    finally:
        shutil.rmtree(folder / "model", ignore_errors=True)
    if runs is not None and run_id is not None:
        runs.finish(run_id, "COMPLETE", {"best_val_macro_f1": result.best_val_macro_f1,
                                         "seconds": result.seconds, "steps": result.steps})
    return result.best_val_macro_f1


def trial_folder(work_dir: Path, trial) -> Path:
    """The trial's own folder; a retry uses its original's, so it resumes that checkpoint."""
    return Path(work_dir) / f"trial-{trial.user_attrs.get('retry_of', trial.number)}"


def recover_interrupted(storage, name: str, worker: str, runs: Runs | None = None) -> list:
    """Trials an interrupted run left behind: RUNNING ones whose worker is
    known dead (`worker_dead`) are marked FAIL and `interrupted`, Ctrl-C'd
    ones already are. A RUNNING trial of a live worker, or of another host, is
    left to it and to the heartbeat.

    Returns:
        The interrupted trials not yet queued again.
    """
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState

    study_id = storage.get_study_id_from_name(name)
    trials = storage.get_all_trials(study_id, deepcopy=False)
    retried = {t.user_attrs.get("retry_of") for t in trials}
    found = []
    for trial in trials:
        if trial.state == TrialState.RUNNING and worker_dead(trial.user_attrs.get(WORKER_ATTR), worker):
            trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
            try:
                storage.set_trial_user_attr(trial_id, "interrupted", True)
                storage.set_trial_state_values(trial_id, TrialState.FAIL)
            except UpdateFinishedTrialError:  # another worker recovered it first
                continue
            if runs is not None and trial.user_attrs.get("mlflow_run_id"):
                runs.finish(trial.user_attrs["mlflow_run_id"], "FAIL")
        elif not (trial.state == TrialState.FAIL and trial.user_attrs.get("interrupted")):
            continue
        if trial.number not in retried:
            found.append(trial)
    return found


def budget_used(trials: Sequence) -> int:
    """Finished trials that use up the budget: not interrupted ones, nor
    failed ones queued again (a lost worker's trial runs again)."""
    retried = {t.user_attrs.get("retry_of") for t in trials}
    return sum(t.state.name in COUNTED_STATES and not t.user_attrs.get("interrupted") and t.number not in retried
               for t in trials)


def running(trials: Sequence) -> int:
    """Trials running now (in any worker)."""
    return sum(t.state.name == "RUNNING" for t in trials)


def stop_at_budget(n_trials: int) -> Callable[[Any, Any], None]:
    """A study callback: stops this worker once the finished trials plus those
    other workers are running reach `n_trials`, so N workers run n_trials together
    (two workers ending trials at the same instant may each start one more)."""

    def callback(study, _trial) -> None:
        trials = study.get_trials(deepcopy=False)
        if budget_used(trials) + running(trials) >= n_trials:
            study.stop()

    return callback


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


def prepare_study(config: TuneConfig, name: str, storage, base: FinetuneConfig, worker: str,
                  runs: Runs | None = None) -> tuple[Any, int, list[int]]:
    """Creates or loads the study, queues dead workers' trials again (this
    host's at once, others' once their heartbeat is stale) and, in a new
    study, `params.finetune`'s own values as trial 0.

    Returns:
        (study, trials it held before, numbers of the trials queued again).
    """
    import optuna

    with warnings.catch_warnings():  # "experimental" in Optuna 5, there since 2.9
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(open_study(config, name, storage))  # creates it on the first run
    interrupted = recover_interrupted(storage, name, worker, runs)
    study = open_study(config, name, storage)  # a fresh view, after the repairs
    before = sum(t.state.name != "WAITING" for t in study.trials)  # queued ones have not run yet
    for trial in interrupted:
        study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})
    if before == 0 and config.enqueue_defaults:
        study.enqueue_trial(encode(base, config.space), skip_if_exists=True)
    return study, before, [t.number for t in interrupted]


def run_study(config: TuneConfig, base: FinetuneConfig, data: TuneData, storage: str, work_dir: Path,
              runs: Runs | None = None, on_trial: Callable[[Any], None] | None = None) -> TuneResult:
    """Runs the study, or resumes it from storage, until it holds `n_trials`
    finished trials or `timeout_minutes` pass; interrupted trials run again.
    Any number of workers may run this on one study at once (see the module).

    Args:
        base: the settings trials start from; the space overrides the searched ones.
        data: train and validation rows (never test rows); trials train on
            `config.train_rows` of the train rows.
        storage: an Optuna RDB URL.
        work_dir: trial models and checkpoints (emptied as trials end).
        runs: where trials are reported (MLflow child runs), or None.
        on_trial: called with each finished FrozenTrial (progress lines).

    Raises:
        RuntimeError: no trial of the study completed.
    """
    import torch

    started = time.perf_counter()
    deadline = time.monotonic() + config.timeout_minutes * 60 if config.timeout_minutes else None
    name, worker = study_name(config, base, data), new_worker_id()
    trial_data = replace(data, train=subsample(data.train, config.train_rows, config.seed),
                         data_key=f"{data.data_key}:tune:{config.train_rows}:{config.seed}")
    study, before, retried = prepare_study(config, name, open_storage(storage, config, runs), base, worker, runs)
    remaining = config.n_trials - budget_used(study.trials) - running(study.trials)  # others' too
    callbacks = [stop_at_budget(config.n_trials)] + ([lambda _, trial: on_trial(trial)] if on_trial else [])
    if remaining > 0:
        study.optimize(lambda trial: objective(trial, config, base, trial_data, work_dir, runs, deadline, worker),
                       n_trials=remaining, catch=(torch.cuda.OutOfMemoryError,), gc_after_trial=True,
                       timeout=config.timeout_minutes * 60 if config.timeout_minutes else None, callbacks=callbacks)
    return summarise(study, config.space, before, retried, len(trial_data.train[0]), time.perf_counter() - started)


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
