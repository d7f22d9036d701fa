"""Parallel tuning workers: processes sharing one Optuna study run the asked
number of trials together, never fail each other's running trials, and a
dead worker's trial runs again (at once on the same host, after the heartbeat's
grace period from another host)."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from test_tune import workspace  # noqa: F401  (the fixture)
from tune_worker_fake import BASE, DATA, config, sleeping_finetune

import tuneloop.tasks.tune as tune

HELPER = Path(__file__).with_name("tune_worker_fake.py")


@pytest.fixture(autouse=True)
def quiet_optuna():
    optuna.logging.set_verbosity(optuna.logging.WARNING)


def start_helper(*args: object) -> subprocess.Popen:
    """`tune_worker_fake.py` with these arguments, in its own process."""
    env = {**os.environ, "PYTHONPATH": str(HELPER.parent)}
    return subprocess.Popen([sys.executable, str(HELPER), *map(str, args)], env=env)


def start_worker(storage: str, n_trials: int, seconds: float, work_dir: Path) -> subprocess.Popen:
    return start_helper(storage, n_trials, seconds, work_dir)


def trials(storage: str, n_trials: int) -> list:
    """The study's trials, read as a worker does (waiting out other workers' SQLite locks)."""
    cfg = config(n_trials)
    return tune.open_study(cfg, tune.study_name(cfg, BASE, DATA), tune.open_storage(storage, cfg)).get_trials(
        deepcopy=False)


def prepared(storage: str, n_trials: int):
    """The study as `tuneloop tune --workers` leaves it before starting the workers."""
    cfg = config(n_trials)
    return tune.prepare_study(cfg, tune.study_name(cfg, BASE, DATA), tune.open_storage(storage, cfg), BASE,
                              tune.new_worker_id())[0]


def finished_per_worker(trials: list) -> dict[int, int]:
    """How many finished (complete or pruned) trials each worker process ran, by pid: the
    `worker` user attribute, host:pid:search, that a worker sets on each trial it claims."""
    pids = [int(t.user_attrs["worker"].rsplit(":", 2)[1]) for t in trials if t.state.is_finished()]
    return {pid: pids.count(pid) for pid in set(pids)}


def test_two_worker_processes_run_the_asked_trials_together_and_fail_none(tmp_path) -> None:
    storage = f"sqlite:///{tmp_path}/optuna.db"
    prepared(storage, 6)
    workers = [start_worker(storage, 6, 2.0, tmp_path / "work") for _ in range(2)]  # 12 s of trials
    assert [w.wait(timeout=300) for w in workers] == [0, 0]
    done = trials(storage, 6)
    assert [t.state.name for t in done] == ["COMPLETE"] * 6  # six in all, not six each; none failed
    assert set(finished_per_worker(done)) == {w.pid for w in workers}  # each completed one or more


def test_two_workers_never_claim_the_same_queued_trial(tmp_path) -> None:
    """SQLite ignores SELECT ... FOR UPDATE: without a write lock taken at BEGIN,
    two workers popping the queue at once claimed the same trial (3-6 of 100
    here), ran it twice, and the slower one crashed telling a finished trial."""
    import json

    storage = f"sqlite:///{tmp_path}/optuna.db"
    study = optuna.create_study(study_name="queue", storage=storage)
    for i in range(200):
        study.enqueue_trial({"x": i})
    outs = [tmp_path / f"popped{k}.json" for k in range(2)]
    workers = [start_helper("pop", storage, "queue", out) for out in outs]
    assert [w.wait(timeout=300) for w in workers] == [0, 0]
    first, second = (json.loads(out.read_text()) for out in outs)
    assert set(first).isdisjoint(second)
    assert sorted(first + second) == sorted(t._trial_id for t in study.get_trials())  # every one claimed once


def test_a_killed_workers_trial_runs_again_with_the_same_settings(tmp_path, monkeypatch) -> None:
    storage = f"sqlite:///{tmp_path}/optuna.db"
    prepared(storage, 2)
    doomed = start_worker(storage, 2, 600.0, tmp_path / "work")  # its trial would take 10 minutes
    deadline = time.monotonic() + 120
    while not any(t.state.name == "RUNNING" and t.params for t in trials(storage, 2)):  # training, settings drawn
        assert time.monotonic() < deadline and doomed.poll() is None
        time.sleep(0.5)
    os.kill(doomed.pid, signal.SIGKILL)  # nothing gets to mark its trial finished
    doomed.wait()
    killed = trials(storage, 2)[0]
    assert killed.state.name == "RUNNING"

    monkeypatch.setattr(tune, "finetune", sleeping_finetune(0.0))
    result = tune.run_study(config(2), BASE, DATA, storage, tmp_path / "work")
    after = {t["number"]: t for t in result.trials}
    assert after[0]["state"] == "FAIL" and result.retried_trials == [0]
    retry = next(t for t in result.trials if t["retry_of"] == 0)
    assert retry["state"] == "COMPLETE" and retry["params"] == after[0]["params"]
    assert result.n_complete == 2  # the dead worker's trial used up none of the budget


def remote_running_trial(study, worker: str, heartbeat_age_s: int, db: Path) -> int:
    """A trial another machine runs: its worker id names another host, and its last heartbeat is this old."""
    trial = study.ask()
    trial.set_user_attr("worker", worker)
    study._storage.record_heartbeat(trial._trial_id)
    with sqlite3.connect(db) as connection:
        connection.execute("UPDATE trial_heartbeats SET heartbeat = datetime(heartbeat, ?) WHERE trial_id = ?",
                           (f"-{heartbeat_age_s} seconds", trial._trial_id))
    return trial.number


def test_another_hosts_trial_is_failed_and_retried_only_once_its_heartbeat_is_stale(tmp_path, monkeypatch) -> None:
    storage = f"sqlite:///{tmp_path}/optuna.db"
    study = prepared(storage, 3)
    silent = remote_running_trial(study, "elsewhere:1:aaaa", 3600, tmp_path / "optuna.db")  # an hour, grace 60 s
    beating = remote_running_trial(study, "elsewhere:2:bbbb", 0, tmp_path / "optuna.db")
    monkeypatch.setattr(tune, "finetune", sleeping_finetune(0.0))
    result = tune.run_study(config(3), BASE, DATA, storage, tmp_path / "work")
    states = {t["number"]: t["state"] for t in result.trials}
    assert states[silent] == "FAIL" and states[beating] == "RUNNING"  # the live remote trial is left alone
    retries = [t for t in result.trials if t["retry_of"] == silent]
    assert len(retries) == 1 and retries[0]["state"] == "COMPLETE"
    # 2 complete here + 1 still running elsewhere = the 3 asked for
    assert result.n_complete == 2


def test_only_a_gone_process_on_this_host_counts_as_a_dead_worker() -> None:
    me = tune.new_worker_id()
    host, pid, _ = me.rsplit(":", 2)
    assert tune.worker_dead(f"{host}:{pid}:earlier0", me)  # this process, an earlier search in it
    assert not tune.worker_dead(me, me)
    assert not tune.worker_dead(f"{host}:{os.getppid()}:abcd1234", me)  # a live process
    assert not tune.worker_dead(f"another-host:{pid}:abcd1234", me)  # judged by its heartbeat
    assert not tune.worker_dead(None, me)


def test_tune_stage_with_two_workers_logs_every_trial_of_both_under_its_tuning_run(
        tiny_bert, workspace, mlflow_sandbox, monkeypatch) -> None:
    from contextlib import contextmanager

    from mlflow import MlflowClient
    from test_tune import child_runs, stage_params

    from tuneloop.pipeline import stages

    launched, real_launch = [], stages.launch_tune_workers

    @contextmanager
    def recording_launch(*args, **kwargs):
        with real_launch(*args, **kwargs) as workers:
            launched.extend(workers)
            yield workers

    monkeypatch.setattr(stages, "launch_tune_workers", recording_launch)
    params = stage_params(tiny_bert, mlflow_sandbox, workspace, n_trials=4)
    record = stages.tune(params, workspace, workers=2)
    assert record["n_complete"] + record["n_pruned"] == 4 and record["n_failed"] == 0
    assert record["resumed_trials"] == 0
    storage = f"sqlite:///{workspace.root}/optuna.db"
    study = optuna.load_study(study_name=record["study_name"], storage=storage)
    per_worker = finished_per_worker(study.trials)
    assert len(launched) == 2 and set(per_worker) == {w.pid for w in launched}  # each worker finished 1 or more
    assert sum(per_worker.values()) == 4  # and nothing else ran one
    tune_run = MlflowClient().search_runs([mlflow_sandbox.experiment_id],
                                          filter_string=f"tags.`optuna.study` = '{record['study_name']}'")[0]
    trial_runs = child_runs(mlflow_sandbox, tune_run.info.run_id)
    assert sorted(int(r.data.tags["optuna.trial"]) for r in trial_runs) == [0, 1, 2, 3]
    assert {r.info.status for r in trial_runs} <= {"FINISHED", "KILLED"}


@pytest.mark.parametrize("heartbeat, grace", [(0, 60), (30, 30), (30, 10)])
def test_a_grace_period_not_above_the_heartbeat_is_refused(heartbeat: int, grace: int) -> None:
    with pytest.raises(ValueError, match="grace_seconds above it"):
        tune.TuneConfig(heartbeat_seconds=heartbeat, grace_seconds=grace)
