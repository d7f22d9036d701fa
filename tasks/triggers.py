"""triggers: when to spend compute on retraining, and how to ask for it.

New labelled data (files in `data/incoming/`, or feedback-labelled production
predictions exported there) and significant drift both end in one request:
`request_retraining`. With a Prefect server it emits the event the `retrain`
deployment's trigger listens for (its concurrency limit of 1 with CANCEL_NEW
drops overlapping runs); without one it runs the flow in-process under a file
lock, so overlapping requests are dropped the same way.
"""

from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Iterator

import pandas as pd

from tasks.ingest import IngestConfig, incoming_files, read_table
from tasks.workspace import Workspace

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


def export_feedback(window: pd.DataFrame, out_dir: Path, stamp: datetime) -> tuple[Path | None, int]:
    """Writes feedback-labelled predictions as a labelled incoming file.

    Returns:
        The file (None when no row has a true label) and its row count.
    """
    labelled = window.dropna(subset=["true_label"])
    if labelled.empty:
        return None, 0
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"feedback-{stamp:%Y%m%dT%H%M%S}.csv"
    labelled[["text", "true_label"]].rename(columns={"true_label": "label"}).to_csv(path, index=False)
    return path, len(labelled)


@contextmanager
def retrain_lock(workspace: Workspace) -> Iterator[bool]:
    """Yields True when this process holds the project's retraining lock,
    False when another retraining is running (the request is then dropped)."""
    path = workspace.root / "state" / "retrain.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


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
    from flows.retrain import retrain_flow

    with retrain_lock(workspace) as held:
        if not held:
            return {"mode": "skipped", "reason": "a retraining run is already in progress"}
        return {"mode": "inline", "reason": reason,
                "result": retrain_flow(params_path=params_path, root=str(workspace.root))}
