"""New-data trigger: labelled files dropped in `data/incoming/` start retraining
once there are enough new rows to be worth the compute."""

from __future__ import annotations

import json
from pathlib import Path

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from tuneloop.flows.request import request_retraining
from tuneloop.pipeline.params import load_params
from tuneloop.tasks.triggers import decide_retraining, pending_incoming
from tuneloop.values.workspace import Workspace


@task(cache_policy=NO_CACHE)
def count_pending(params, workspace: Workspace) -> tuple[list[str], int]:
    merged = (json.loads(workspace.data_version.read_text()).get("incoming", [])
              if workspace.data_version.exists() else [])
    files, rows = pending_incoming(params.ingest, workspace, merged)
    return [str(p.relative_to(workspace.root)) for p in files], rows


@flow(name="incoming")
def incoming_flow(params_path: str = "params.yaml", root: str = ".", overrides: list[str] | None = None) -> dict:
    """Counts incoming rows not yet in a data version; retrains past the minimum."""
    workspace = Workspace(Path(root).resolve())
    params = load_params(workspace.root / params_path, overrides or ())
    files, rows = count_pending(params, workspace)
    decision = decide_retraining(rows, drift_significant=False, config=params.triggers)
    print(("retraining: " if decision.yes else "not retraining: ") + "; ".join(decision.reasons), flush=True)
    result = {"files": files, "rows": rows, "retrain": decision.yes, "reasons": list(decision.reasons)}
    if decision.yes:
        result["request"] = request_retraining(workspace, params_path, params.mlflow.model_name,
                                               f"new data: {rows} rows in {', '.join(files)}")
    return result
