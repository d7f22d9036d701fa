"""What the Prefect UI shows of a flow running tuneloop's stages, read back from
a real (temporary) Prefect server: the stage lines in the flow run's logs, the
gate's decision and metrics as artifacts, the MLflow run on the flow run, and
the flow run on the MLflow runs; the terminal keeps one line per stage."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tuneloop.pipeline.params import parse_params
from tuneloop.plumbing import tracking
from tuneloop.values.workspace import Workspace, write_json

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
from test_gate import build_case, spread  # noqa: E402  the gate's own scenario builder

REVIEWS = "text,label\n" + "\n".join(f"review number {i} was {'good' if i % 2 else 'bad'},"
                                     f"{'positive' if i % 2 else 'negative'}" for i in range(40)) + "\n"


@pytest.fixture(scope="module")
def flow_run(tmp_path_factory, mlflow_sandbox) -> dict:
    """ingest and gate run as tasks of one flow on a temporary Prefect server."""
    from prefect import flow
    from prefect.testing.utilities import prefect_test_harness

    from tuneloop.flows.retrain import stage_task
    from tuneloop.pipeline import stages

    root = tmp_path_factory.mktemp("project")
    (root / "incoming").mkdir()
    (root / "incoming" / "reviews.csv").write_text(REVIEWS)
    params = parse_params({"ingest": {"source": "incoming/reviews.csv", "dvc_remote": ".dvc-remote"},
                           "mlflow": {"tracking_uri": mlflow_sandbox.tracking_uri,
                                      "experiment": mlflow_sandbox.experiment, "model_name": "tl-prefect-ui"}})
    ws = Workspace(root)
    evaluation, predictions = build_case(challenger_wrong=spread(10), probe_wrong=spread(40))
    write_json(ws.evaluation, evaluation)
    pd.DataFrame({k: np.asarray(v) for k, v in predictions.items()}).to_parquet(ws.test_predictions)

    @flow(name="retrain-ui-check")
    def ingest_and_gate() -> None:
        stage_task(stages.ingest)(params, ws)
        stage_task(stages.gate)(params, ws)

    with prefect_test_harness(server_startup_timeout=180):
        state = ingest_and_gate(return_state=True)
        assert state.is_completed(), state.message
        return {"id": state.state_details.flow_run_id, "ws": ws, **read_back(state.state_details.flow_run_id)}


def read_back(flow_run_id) -> dict:
    """The flow run's logs, artifacts and tags as the Prefect API serves them."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()
    with get_client(sync_client=True) as client:
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(
            any_=[flow_run_id])))
        tags = client.read_flow_run(flow_run_id).tags
    return {"logs": [log.message for log in logs], "artifacts": {a.key: a for a in artifacts}, "tags": tags}


def test_the_flow_runs_logs_hold_each_stage_line_which_the_console_does_not_repeat(flow_run) -> None:
    import logging

    from prefect.logging.handlers import APILogHandler, PrefectConsoleHandler

    from tuneloop.plumbing.runlog import STAGE_LOGGER

    lines = [m for m in flow_run["logs"] if m.startswith("[")]
    assert [line.split(":")[0] for line in lines] == ["[1/9] ingest", "[8/9] gate"]
    assert "40 rows from incoming/reviews.csv" in lines[0]
    assert lines[1].startswith("[8/9] gate: PROMOTE")
    logger = logging.getLogger(STAGE_LOGGER)  # the terminal has the printed line; this copy goes to the API only
    kinds = {type(h) for h in logger.handlers}
    assert not logger.propagate and APILogHandler in kinds and PrefectConsoleHandler not in kinds


def test_the_gate_decision_and_the_metrics_it_compared_are_artifacts(flow_run) -> None:
    decision, metrics = flow_run["artifacts"]["gate-decision"], flow_run["artifacts"]["evaluation-metrics"]
    assert decision.type == "markdown" and decision.data.startswith("# Gate: PROMOTE")
    assert metrics.type == "table"
    assert {row["model"] for row in json.loads(metrics.data)} == {"base_probe", "challenger"}


def test_the_mlflow_run_is_on_the_flow_run_and_the_flow_run_on_the_mlflow_runs(flow_run) -> None:
    import mlflow

    run_id = tracking.recorded_run_id(flow_run["ws"])
    assert f"mlflow-run:{run_id}" in flow_run["tags"]
    assert run_id in flow_run["artifacts"]["mlflow-run"].data
    client = mlflow.MlflowClient()
    pipeline = client.get_run(run_id)
    stage_runs = client.search_runs([pipeline.info.experiment_id], f"tags.`mlflow.parentRunId` = '{run_id}'")
    assert pipeline.data.tags["prefect.flow_run_id"] == str(flow_run["id"])
    assert pipeline.data.tags["mlflow.source.name"] == "prefect flow retrain-ui-check"
    assert {r.data.tags["prefect.flow_run_id"] for r in stage_runs} == {str(flow_run["id"])}
