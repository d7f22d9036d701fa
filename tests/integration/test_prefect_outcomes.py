"""What a Prefect user sees when a run ends, read back from a real (temporary)
Prefect server: a failed stage's error and its one-line reason in the flow
run's logs, a final state message saying what the retraining did, and a link
to the MLflow run when MLflow is a web server."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tuneloop.plumbing import runlog

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_prefect_ui import read_back  # noqa: E402  the Prefect API read-back of the UI test

RESULT = {"model": "tl-outcome", "version": "3", "promoted": True, "champion": "3", "reasons": []}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """A flow whose validate stage fails, a flow that finishes as retrain_flow does, and a
    flow that publishes an MLflow server's run, each read back from the Prefect API."""
    from prefect import flow, task
    from prefect.states import Completed
    from prefect.testing.utilities import prefect_test_harness

    from tuneloop.flows.retrain import run_step

    class Failing(ValueError):
        pass

    @task(name="validate")
    def validate(params, workspace):
        raise Failing("data validation failed: 2 blocking rule(s) failed\n  - min_rows_per_class: 'negative' (28 rows)")

    @flow(name="retrain-fails")
    def fails() -> None:
        run_step(validate, None, None, record=False)

    @flow(name="retrain-finishes")
    def finishes():
        return Completed(message=runlog.outcome_message(RESULT), data=RESULT)

    @flow(name="retrain-on-a-server")
    def on_a_server() -> None:
        runlog.publish_mlflow_run("abc123", "7", "https://ana:s3cret@mlflow.example.org:5000/")

    with prefect_test_harness(server_startup_timeout=180):
        failed = fails(return_state=True)
        finished = finishes(return_state=True)
        returned = finishes()
        linked = on_a_server(return_state=True)
        return {"failed": (failed, read_back(failed.state_details.flow_run_id)), "finished": finished,
                "returned": returned, "linked": read_back(linked.state_details.flow_run_id)}


def test_a_failed_stage_leaves_its_error_and_one_line_reason_in_the_flow_runs_logs(runs) -> None:
    state, seen = runs["failed"]
    assert state.is_failed()
    failure = [m for m in seen["logs"] if m.startswith("[2/9] validate failed")]
    assert failure and failure[0].splitlines()[0] == ("[2/9] validate failed: Failing: data validation failed: "
                                                      "2 blocking rule(s) failed")
    assert "min_rows_per_class: 'negative' (28 rows)" in failure[0]  # the whole message follows the line
    assert "data validation failed" in state.message


def test_a_finished_retraining_says_what_it_did_in_its_final_state_and_still_returns_its_result(runs) -> None:
    assert runs["finished"].is_completed()
    assert runs["finished"].message == "tl-outcome version 3 promoted to champion; champion: version 3"
    assert runs["returned"] == RESULT


def test_an_mlflow_server_run_is_a_link_artifact_without_the_credentials(runs) -> None:
    link = runs["linked"]["artifacts"]["mlflow-run-link"]
    # Prefect 3 stores a link artifact as the markdown link its UI renders
    assert link.data == "[MLflow run abc123](https://mlflow.example.org:5000/#/experiments/7/runs/abc123)"
    assert "s3cret" not in link.data and "ana" not in link.data
    assert runlog.run_link("abc123", "7", "sqlite:///mlflow.db") is None  # a file has no page to link
