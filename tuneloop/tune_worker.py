"""One more worker on a project's tuning study (`tuneloop tune --workers N` starts them).

    python -m tuneloop.tune_worker --root . --params params.yaml

Started by hand on other machines with the same `tune.storage` (a shared RDB,
e.g. PostgreSQL) and the same workspace data, it searches the same study: the
workers stop together at `tune.n_trials`. With --parent-run, its trials are
logged as child runs of that MLflow run; without, they are not tracked.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from tuneloop.cli import offline_environment
from tuneloop.pipeline import stages
from tuneloop.pipeline.params import load_params
from tuneloop.pipeline.tune_runs import TrialRuns
from tuneloop.plumbing import tracking
from tuneloop.tasks import tune as tuning
from tuneloop.values.workspace import Workspace


def run_worker(params_path: Path, root: Path, parent_run_id: str | None, experiment_id: str | None,
               ) -> tuning.TuneResult:
    """Runs trials of the project's study until the workers together reach n_trials."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    params, ws = load_params(params_path), Workspace(root.resolve())
    runs = None
    if parent_run_id:
        if experiment_id is None:
            raise ValueError("a parent run needs its experiment id (--experiment-id)")
        tracking.configure_tracking(params.mlflow, ws.root)
        runs = TrialRuns(parent_run_id, experiment_id)
    return tuning.run_study(params.tune, params.finetune, stages.tune_data(params, ws), stages.tune_storage(params, ws),
                            ws.tune_dir, runs, on_trial=lambda trial: print(
                                f"tune worker {os.getpid()}: {tuning.describe_trial(trial)}", flush=True))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=str(__doc__).splitlines()[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="params.yaml, relative to --root")
    parser.add_argument("--root", type=Path, default=Path("."), help="the project folder (workspace root)")
    parser.add_argument("--parent-run", default=None, help="MLflow run id the trials' runs are children of")
    parser.add_argument("--experiment-id", default=None, help="that run's MLflow experiment id")
    args = parser.parse_args(argv)
    offline_environment()
    run_worker(args.params if args.params.is_absolute() else args.root / args.params, args.root,
               args.parent_run, args.experiment_id)


if __name__ == "__main__":
    main()
