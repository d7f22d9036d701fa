"""One writer per project, and runs whose process died.

Real `tuneloop` processes: a `tuneloop split` continuing a pipeline run holds
the project lock while it blocks reading its input (a FIFO that never gets a
writer); a second `tuneloop run` is refused naming it; the first is SIGKILLed;
the next command finds its MLflow run RUNNING with a dead pid and marks it
KILLED, and the kernel has released the lock.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from tuneloop.plumbing.lock import ProjectBusy, lock_path, project_lock
from tuneloop.plumbing.tracking import start_pipeline_run
from tuneloop.values.workspace import Workspace


def tuneloop(root: Path, *args: str, wait: float = 0, **popen) -> subprocess.Popen:
    env = {**os.environ, "TUNELOOP_LOCK_WAIT": str(wait)}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.Popen([sys.executable, "-m", "tuneloop.cli", *args, "--root", str(root)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def wait_for(condition, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not happen within {seconds} s")
        time.sleep(0.2)


@pytest.fixture
def project(tmp_path, mlflow_sandbox) -> Path:
    """A project whose recorded pipeline run is RUNNING and whose dataset is a FIFO nobody writes."""
    import yaml

    root = tmp_path / "project"
    (root / "data" / "prepared").mkdir(parents=True)
    os.mkfifo(root / "data" / "prepared" / "dataset.parquet")  # reading it blocks: a stage that never ends
    mlflow = {"tracking_uri": mlflow_sandbox.tracking_uri, "experiment": "writers", "model_name": "tl-writers"}
    (root / "params.yaml").write_text(yaml.safe_dump({"mlflow": mlflow}))
    start_pipeline_run(mlflow_sandbox.config(experiment="writers"), Workspace(root), {"data.md5": "0" * 32})
    return root


def run_of(root: Path):
    import mlflow

    return mlflow.MlflowClient().get_run(json.loads((root / "state" / "run.json").read_text())["run_id"])


def test_second_writer_is_refused_and_a_killed_writers_run_is_marked_killed(project):
    first = tuneloop(project, "split")
    try:
        wait_for(lambda: run_of(project).data.tags.get("tuneloop.pid") == str(first.pid), 120,
                 "`tuneloop split` claiming the pipeline run")
        assert first.poll() is None  # blocked in the stage, holding the lock
        second = tuneloop(project, "run")
        output, _ = second.communicate(timeout=120)
        assert second.returncode == 2, output
        assert f"run refused: `tuneloop split` (pid {first.pid} on " in output
        assert "is writing to this project" in output and "Traceback" not in output
        assert run_of(project).info.status == "RUNNING"
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    status = tuneloop(project, "status", "--json")
    output, _ = status.communicate(timeout=120)
    assert status.returncode == 0, output
    assert json.loads(output[output.index("{"):])["last_run"]["status"] == "KILLED"
    run = run_of(project)
    assert run.info.status == "KILLED"
    assert run.data.tags["tuneloop.outcome"] == f"killed: its process {first.pid} died while the run was running"
    with project_lock(project, "test", wait=0):  # the kernel released the dead writer's lock
        pass


def test_a_waiting_writer_gets_the_lock_once_the_holder_exits(tmp_path, monkeypatch):
    import tuneloop.plumbing.lock as lock

    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys; from tuneloop.plumbing.lock import project_lock\n"
        f"with project_lock({str(tmp_path)!r}, 'run'):\n"
        "    print('held', flush=True); sys.stdin.readline()")],  # holds it until told to go
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(ProjectBusy, match=rf"test refused: `tuneloop run` \(pid {holder.pid} on .*\) is writing"):
        with project_lock(tmp_path, "test", wait=0):
            pass
    retries = []

    def let_the_holder_go_once_waiting(seconds: float) -> None:  # the lock's pause between tries
        if not retries:
            holder.stdin.close()  # its readline ends: it exits, and the kernel drops its lock
            holder.wait(timeout=30)
        retries.append(seconds)
        time.sleep(seconds)

    monkeypatch.setattr(lock, "time", SimpleNamespace(monotonic=time.monotonic, sleep=let_the_holder_go_once_waiting))
    with project_lock(tmp_path, "test", wait=30):
        assert json.loads(lock_path(tmp_path).read_text())["pid"] == os.getpid()
    assert holder.returncode == 0 and len(retries) >= 1  # it waited, then got the lock


def test_the_lock_is_reentrant_within_one_process(tmp_path):
    with project_lock(tmp_path, "run"):
        with project_lock(tmp_path, "retrain flow"):
            assert json.loads(lock_path(tmp_path).read_text())["command"] == "run"
        assert json.loads(lock_path(tmp_path).read_text())["command"] == "run"  # still held by the outer one
    assert lock_path(tmp_path).read_text() == ""
