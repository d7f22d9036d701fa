"""triggers: when new data or drift is worth a retraining run.

New labelled data (files in `data/incoming/`, or feedback-labelled production
predictions exported there, `tasks/feedback.py`), significant drift and an
estimated accuracy drop (`drift.decide_estimated_drop`) are weighed by one pure
decision; the request itself (a Prefect event or an
in-process run) is `tuneloop.flows.request`.
"""

from __future__ import annotations

from pathlib import Path

from tuneloop.tasks.ingest import incoming_files, read_table
from tuneloop.values.config import IngestConfig, TriggerConfig
from tuneloop.values.decision import Check, Decision
from tuneloop.values.workspace import Workspace


def decide_retraining(new_rows: int, drift_significant: bool, config: TriggerConfig,
                      estimated_drop: bool = False, replaced: str | None = None) -> Decision:
    """Retrain when enough new labelled rows exist and new data, drift or an
    estimated accuracy drop (monitor.max_estimated_accuracy_drop) asks for it,
    unless the champion whose window asked was `replaced` in the same monitor
    run by a version trained on other data (a promoted shadow, e.g. "v1 -> v2,
    shadow promoted"): the new champion's own window decides, and the labelled
    rows wait for that run."""
    enough = new_rows >= config.min_new_labelled_rows
    wanted = ((config.retrain_on_new_data and new_rows > 0) or (config.retrain_on_drift and drift_significant)
              or estimated_drop)
    checks = [Check("new_rows", enough, f"{new_rows} new labelled rows ({'>=' if enough else '<'} "
                                        f"{config.min_new_labelled_rows} required)")]
    if drift_significant:
        checks.append(Check("drift", config.retrain_on_drift, "significant drift"
                            + ("" if config.retrain_on_drift else " (retrain_on_drift is off)")))
    if estimated_drop:
        checks.append(Check("estimated_drop", True, "estimated accuracy dropped below the champion's"))
    if not wanted:
        checks.append(Check("asked", False, "nothing asks for retraining"))
    if replaced:
        checks.append(Check("champion", False, f"the champion was replaced in this run ({replaced}): "
                                               "the new champion's own window decides"))
    return Decision("retrain", enough and wanted and not replaced, tuple(checks), marks=("", ""))


def pending_incoming(config: IngestConfig, workspace: Workspace, merged: list[str]) -> tuple[list[Path], int]:
    """Incoming files not yet merged into a data version, and their row count."""
    new = [p for p in incoming_files(config, workspace.root)
           if str(p.relative_to(workspace.root)) not in set(merged)]
    return new, sum(len(read_table(p)) for p in new)
