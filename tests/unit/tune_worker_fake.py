"""A tuning worker process for tests: the real `run_study` on a shared study,
with fine-tuning replaced by a sleep (what a trial costs is not under test).

    python tune_worker_fake.py STORAGE N_TRIALS SECONDS_PER_TRIAL WORK_DIR
    python tune_worker_fake.py pop STORAGE STUDY OUT_JSON   (pops queued trials as fast as it can)
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import optuna

import tuneloop.tasks.tune as tune
from tuneloop.tasks.finetune import FinetuneConfig, FinetuneResult

BASE = FinetuneConfig(epochs=1, min_steps=0, min_examples_per_class=0, head_init="random")
DATA = tune.TuneData("fake", Path("."), (["good", "bad"] * 4, [1, 0] * 4), (["good", "bad"], [1, 0]),
                     ("negative", "positive"), "f" * 32)


def config(n_trials: int) -> tune.TuneConfig:
    return tune.TuneConfig(n_trials=n_trials, timeout_minutes=None, train_rows=None, heartbeat_seconds=1,
                           grace_seconds=60, enqueue_defaults=False,
                           space={"learning_rate": {"low": 1e-4, "high": 1e-2}})


def sleeping_finetune(seconds: float):
    def fake(*args, **kwargs) -> FinetuneResult:
        time.sleep(seconds)
        f1 = args[5].learning_rate * 50  # a value that depends on the trial's settings
        return FinetuneResult(Path("."), f1, f1, 1, 1, False, 0, seconds, 1.0, 1.0)

    return fake


def pop_all(storage: str, study_name: str) -> list[int]:
    """Claims queued trials the way `study.optimize` does, until none is left."""
    study = optuna.load_study(study_name=study_name, storage=tune.open_storage(storage, config(1)))
    popped = []
    while (trial_id := study._pop_waiting_trial_id()) is not None:
        popped.append(trial_id)
    return popped


if __name__ == "__main__" and sys.argv[1] == "pop":
    Path(sys.argv[4]).write_text(json.dumps(pop_all(sys.argv[2], sys.argv[3])))
elif __name__ == "__main__":
    storage, n_trials, seconds, work_dir = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), Path(sys.argv[4])
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    tune.finetune = sleeping_finetune(seconds)
    tune.run_study(config(n_trials), BASE, DATA, storage, work_dir)
