"""The retraining request: what the incoming and monitor flows call.

With a Prefect server it emits the event the `retrain` deployment's trigger
listens for (its concurrency limit of 1 with CANCEL_NEW drops overlapping runs);
without one it runs the retrain flow in-process under the project lock, so
overlapping requests are dropped the same way.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

from tuneloop.flows.retrain import retrain_flow
from tuneloop.plumbing.lock import ProjectBusy, project_lock
from tuneloop.values.workspace import Workspace

RETRAIN_EVENT = "tuneloop.retrain.requested"


@contextmanager
def retrain_lock(workspace: Workspace) -> Iterator[bool]:
    """Yields True when this process holds the project's writer lock (tuneloop/plumbing/lock.py),
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
    with retrain_lock(workspace) as held:
        if not held:
            return {"mode": "skipped", "reason": "a retraining run is already in progress"}
        return {"mode": "inline", "reason": reason,
                "result": retrain_flow(params_path=params_path, root=str(workspace.root))}
