"""triggers: when to spend compute on retraining, and how to ask for it.

New labelled data (files in `data/incoming/`, or feedback-labelled production
predictions exported there) and significant drift both end in one request:
`request_retraining`. With a Prefect server it emits the event the `retrain`
deployment's trigger listens for (its concurrency limit of 1 with CANCEL_NEW
drops overlapping runs); without one it runs the flow in-process under a file
lock, so overlapping requests are dropped the same way.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Iterator

import pandas as pd

from tuneloop.tasks.ingest import IngestConfig, incoming_files, read_table
from tuneloop.tasks.lock import ProjectBusy, project_lock
from tuneloop.tasks.privacy import mask_pii
from tuneloop.tasks.workspace import Workspace

RETRAIN_EVENT = "tuneloop.retrain.requested"


@dataclass(frozen=True)
class TriggerConfig:
    min_new_labelled_rows: int = 200  # below this, new data is not worth a training run
    retrain_on_new_data: bool = True
    retrain_on_drift: bool = True
    __pydantic_config__ = {"extra": "forbid"}


@dataclass(frozen=True)
class TriggerDecision:
    retrain: bool
    reasons: tuple[str, ...]


def decide_retraining(new_rows: int, drift_significant: bool, config: TriggerConfig) -> TriggerDecision:
    """Retrain when enough new labelled rows exist and new data or drift asks for it."""
    enough = new_rows >= config.min_new_labelled_rows
    reasons = [f"{new_rows} new labelled rows ({'>=' if enough else '<'} {config.min_new_labelled_rows} required)"]
    wanted = (config.retrain_on_new_data and new_rows > 0) or (config.retrain_on_drift and drift_significant)
    if drift_significant:
        reasons.append("significant drift" + ("" if config.retrain_on_drift else " (retrain_on_drift is off)"))
    if not wanted:
        reasons.append("nothing asks for retraining")
    return TriggerDecision(enough and wanted, tuple(reasons))


def pending_incoming(config: IngestConfig, workspace: Workspace, merged: list[str]) -> tuple[list[Path], int]:
    """Incoming files not yet merged into a data version, and their row count."""
    new = [p for p in incoming_files(config, workspace.root)
           if str(p.relative_to(workspace.root)) not in set(merged)]
    return new, sum(len(read_table(p)) for p in new)


def export_feedback(window: pd.DataFrame, out_dir: Path, stamp: datetime,
                    mask: bool = False) -> tuple[Path | None, int]:
    """Writes feedback-labelled predictions as a labelled incoming file, each row
    with the name of the token that labelled it (`labelled_by`: provenance, kept
    in the data version's snapshot) and, when `mask`, its text masked of
    e-mails, phone and card numbers.

    Returns:
        The file (None when no row has a true label) and its row count.
    """
    labelled = window.dropna(subset=["true_label"])
    if labelled.empty:
        return None, 0
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"feedback-{stamp:%Y%m%dT%H%M%S}.csv"
    by = labelled["feedback_by"] if "feedback_by" in labelled else pd.Series(None, index=labelled.index)
    rows = pd.DataFrame({"text": labelled["text"].map(mask_pii) if mask else labelled["text"],
                         "label": labelled["true_label"], "labelled_by": by.fillna("unknown")})
    rows.to_csv(path, index=False)
    return path, len(labelled)


@contextmanager
def retrain_lock(workspace: Workspace) -> Iterator[bool]:
    """Yields True when this process holds the project's writer lock (tasks/lock.py),
    False when another process is writing (a retraining run, a stage): the request is then dropped."""
    lock = project_lock(workspace.root, "retrain (requested)", wait=0)
    try:
        lock.__enter__()
    except ProjectBusy:
        yield False
        return
    try:
        yield True
    finally:
        lock.__exit__(None, None, None)


def request_retraining(workspace: Workspace, params_path: str, model_name: str, reason: str) -> dict:
    """Asks for a retraining run: a Prefect event when a server is configured,
    else the retrain flow in-process (skipped if one is already running).

    Returns:
        {"mode": "event" | "inline" | "skipped", ...}.
    """
    if os.environ.get("PREFECT_API_URL"):
        from prefect.events import emit_event

        emit_event(RETRAIN_EVENT, resource={"prefect.resource.id": f"tuneloop.model.{model_name}"},
                   payload={"reason": reason, "root": str(workspace.root), "params_path": params_path})
        return {"mode": "event", "event": RETRAIN_EVENT, "reason": reason}
    from tuneloop.flows.retrain import retrain_flow

    with retrain_lock(workspace) as held:
        if not held:
            return {"mode": "skipped", "reason": "a retraining run is already in progress"}
        return {"mode": "inline", "reason": reason,
                "result": retrain_flow(params_path=params_path, root=str(workspace.root))}
