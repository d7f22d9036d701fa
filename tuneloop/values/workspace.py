"""Where every stage reads and writes, relative to one project root.

The layout is the contract between stages: `dvc.yaml` declares the same paths,
and the Prefect flow passes nothing between tasks that is not also on disk, so
`tuneloop run`, `dvc repro` and a single `tuneloop <stage>` agree.

`metrics/` holds only small, flat JSON numbers (`dvc metrics show/diff`) and
`plots/` the small CSV tables `dvc plots show/diff` draws; both are tracked in
git. Everything bulky (per-class detail, per-row predictions, reasons) lives
under `reports/`, `models/` and `data/`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Workspace:
    root: Path

    # ingest: the DVC-tracked snapshot of the source and its canonical table
    @property
    def raw_dir(self) -> Path:
        return self.root / "data" / "raw"

    @property
    def dataset(self) -> Path:
        return self.root / "data" / "prepared" / "dataset.parquet"

    @property
    def data_version(self) -> Path:
        return self.root / "data" / "prepared" / "version.json"

    # validate
    @property
    def validation_dir(self) -> Path:
        return self.root / "reports" / "validation"

    @property
    def validation_summary(self) -> Path:
        """Every rule's verdict and message."""
        return self.validation_dir / "summary.json"

    @property
    def validation_metrics(self) -> Path:
        return self.root / "metrics" / "validation.json"

    # split
    @property
    def splits(self) -> Path:
        return self.root / "data" / "split" / "splits.parquet"

    # baseline
    @property
    def probe_dir(self) -> Path:
        return self.root / "models" / "probe"

    @property
    def baseline_metrics(self) -> Path:
        return self.root / "metrics" / "baseline.json"

    @property
    def base_choice(self) -> Path:
        """The base model the baseline chose, and every candidate's validation macro-F1 and latency."""
        return self.root / "reports" / "baseline.json"

    # finetune
    @property
    def challenger_dir(self) -> Path:
        return self.root / "models" / "challenger"

    @property
    def checkpoint_dir(self) -> Path:
        return self.root / "models" / "checkpoints"

    @property
    def finetune_metrics(self) -> Path:
        return self.root / "metrics" / "finetune.json"

    @property
    def training_plot(self) -> Path:
        """Validation macro-F1 per epoch, for `dvc plots`."""
        return self.root / "plots" / "training.csv"

    # tune (optional): the best settings finetune applies, the trials' scratch space, the plots
    @property
    def tune_result(self) -> Path:
        return self.root / "reports" / "tune.json"

    @property
    def tune_dir(self) -> Path:
        return self.root / "state" / "tune"

    @property
    def tune_reports(self) -> Path:
        return self.root / "reports" / "tuning"

    # evaluate
    @property
    def evaluation(self) -> Path:
        """Every model's scores in full: per class, per slice, calibration bins."""
        return self.root / "reports" / "evaluation.json"

    @property
    def evaluation_metrics(self) -> Path:
        """The headline numbers per model, for `dvc metrics`."""
        return self.root / "metrics" / "evaluation.json"

    @property
    def test_predictions(self) -> Path:
        return self.root / "reports" / "test_predictions.parquet"

    @property
    def regression_predictions(self) -> Path:
        """Per row of the regression set (earlier test rows, evaluate.regression_file): domain, truth, answers."""
        return self.root / "reports" / "regression_predictions.parquet"

    @property
    def confusion_plot(self) -> Path:
        """The challenger's (actual, predicted) label per test row, for `dvc plots`."""
        return self.root / "plots" / "confusion.csv"

    @property
    def calibration_plot(self) -> Path:
        """The challenger's reliability bins, for `dvc plots`."""
        return self.root / "plots" / "calibration.csv"

    @property
    def evaluation_report(self) -> Path:
        return self.root / "reports" / "evaluation.html"

    @property
    def evaluation_plots(self) -> Path:  # confusion matrices and calibration as PNG, for the MLflow UI
        return self.root / "reports" / "evaluation_plots"

    # gate and register
    @property
    def decision(self) -> Path:
        """The gate's decision with every reason."""
        return self.root / "reports" / "gate.json"

    @property
    def gate_metrics(self) -> Path:
        """promote: 1 or 0, for `dvc metrics`."""
        return self.root / "metrics" / "gate.json"

    @property
    def registration(self) -> Path:
        return self.root / "metrics" / "register.json"

    # bookkeeping shared by the stages of one pipeline run
    @property
    def run_state(self) -> Path:
        return self.root / "state" / "run.json"

    @property
    def models_cache(self) -> Path:
        """Registry versions downloaded for scoring (champion, rollback targets)."""
        return self.root / "state" / "registry_cache"

    @property
    def embedding_cache(self) -> Path:
        """The base models' pooled embeddings of the last baseline run's texts
        (tasks/baseline.py `EmbeddingCache`): a retrain embeds only new texts."""
        return self.root / "state" / "embeddings"

    @property
    def project_lock(self) -> Path:
        """The one-writer lock (tuneloop/plumbing/lock.py)."""
        return self.root / "state" / "project.lock"

    # serve and monitor
    @property
    def prefect_server_log(self) -> Path:
        """What the command's ephemeral Prefect server writes (flows/ephemeral.py)."""
        return self.root / "state" / "prefect-server.log"

    @property
    def predictions_db(self) -> Path:
        """The prediction store when no other URL is set (SQLite)."""
        return self.root / "state" / "predictions.db"

    # restore-data: data versions brought back through DVC
    def restored_dir(self, key: str) -> Path:
        return self.root / "data" / "restored" / key

    # demo: the deliberately broken version it registers
    @property
    def demo_bad_model(self) -> Path:
        return self.root / "state" / "bad-model"


def write_json(path: Path, payload: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")
    return path


def read_json(path: Path) -> Any:
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run the stage that writes it first")
    return json.loads(path.read_text())


def folder_problem(folder: Path) -> str | None:
    """Why `folder` cannot be made or written into, or None: its nearest existing
    ancestor must be a writable folder (`/dev/null/x` has a device for a parent,
    `data.csv/project` a file)."""
    existing = Path(folder).absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable"
    return None
