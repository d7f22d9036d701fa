"""Starting the fine-tuning and tuning stages in several processes on this machine.

`tuneloop finetune --nproc N` runs `torchrun --standalone --nproc-per-node N
-m tuneloop.distributed_finetune`; the ranks read the workspace, rank 0 writes
the model and a result file, and the launching command (which holds the
project lock and the MLflow run) reads that result back and logs it.

`tuneloop tune --workers N` starts N - 1 `python -m tuneloop.tune_worker`
processes beside itself on the one Optuna study.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import yaml

from tuneloop.pipeline.params import Params
from tuneloop.tasks.finetune import FinetuneResult
from tuneloop.values.errors import TuneloopError

WORKER_MODULE = "tuneloop.distributed_finetune"


class DistributedRunFailed(TuneloopError, RuntimeError):
    """A rank of a distributed fine-tuning run failed (its output above says why)."""


def torchrun_command(nproc: int, params_path: Path, root: Path, result_path: Path) -> list[str]:
    """`torchrun --standalone --nproc-per-node N -m tuneloop.distributed_finetune ...`, with this Python."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", WORKER_MODULE, "--params", str(params_path), "--root", str(root), "--result", str(result_path)]


def launch(params: Params, root: Path, nproc: int) -> FinetuneResult:
    """Runs fine-tuning in `nproc` DDP processes and returns rank 0's result.

    The validated params travel to the ranks as a YAML file, so every rank
    trains with exactly the settings this process loaded.

    Raises:
        DistributedRunFailed: a rank exited with an error; run the stage again
            to resume from the checkpoint rank 0 last wrote.
    """
    with tempfile.TemporaryDirectory(prefix="tuneloop-ddp-") as folder:
        params_path, result_path = write_params(params, Path(folder)), Path(folder) / "result.json"
        done = subprocess.run(torchrun_command(nproc, params_path, root, result_path), env=dict(os.environ))
        if done.returncode != 0 or not result_path.exists():
            raise DistributedRunFailed(f"distributed fine-tuning ({nproc} processes) failed with exit code "
                                       f"{done.returncode}; run the stage again to resume from its checkpoint")
        return read_result(result_path)


def write_result(result: FinetuneResult, path: Path) -> None:
    path.write_text(json.dumps(asdict(result), default=str))


def read_result(path: Path) -> FinetuneResult:
    raw = json.loads(path.read_text())
    return FinetuneResult(**{**raw, "model_dir": Path(raw["model_dir"])})


def write_params(params: Params, folder: Path) -> Path:
    """The validated params (overrides included, e.g. `--tune`) as the YAML file other processes load."""
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(params.model_dump(mode="json", by_alias=True), sort_keys=False))
    return path


def tune_worker_command(params_path: Path, root: Path, parent_run_id: str | None, experiment_id: str | None,
                        ) -> list[str]:
    command = [sys.executable, "-m", "tuneloop.tune_worker", "--params", str(params_path), "--root", str(root)]
    if parent_run_id:
        command += ["--parent-run", parent_run_id, "--experiment-id", str(experiment_id)]
    return command


@contextmanager
def launch_tune_workers(params: Params, root: Path, count: int, parent_run_id: str | None = None,
                        experiment_id: str | None = None):
    """Starts `count` tuning workers on this machine; yields their processes.
    Leaving the block early (an error, Ctrl-C) terminates any still running."""
    with tempfile.TemporaryDirectory(prefix="tuneloop-tune-") as folder:
        command = tune_worker_command(write_params(params, Path(folder)), root, parent_run_id, experiment_id)
        workers = [subprocess.Popen(command, env=dict(os.environ)) for _ in range(count)]
        try:
            yield workers
        finally:
            for worker in workers:
                if worker.poll() is None:
                    worker.terminate()
                    worker.wait()
