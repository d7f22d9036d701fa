"""What the Prefect UI shows of a stage: its line in the flow run's logs, the
gate's decision and metrics as artifacts, the MLflow run on the flow run.

Everything here is a no-op outside a Prefect flow or task run (a single
`tuneloop <stage>`, `dvc repro`): those have no flow run to annotate and must
not start a Prefect server to say so. Stage lines still print to the terminal
as before; the copy sent to Prefect goes only to its API, never to the console,
so the terminal keeps one line per stage whatever Prefect's log level.
"""

from __future__ import annotations

import logging
import sys
from uuid import UUID

STAGE_LOGGER = "tuneloop.pipeline.stages"  # API-only: propagates nowhere, so the console never shows it twice


def in_prefect_run() -> bool:
    """Whether this code runs inside a Prefect flow or task run."""
    if "prefect" not in sys.modules:  # a process that never imported Prefect runs no flow
        return False
    from prefect.context import FlowRunContext, TaskRunContext

    return FlowRunContext.get() is not None or TaskRunContext.get() is not None


def stage_logger() -> logging.Logger:
    """A logger whose one handler is Prefect's API handler (records join the current flow or task run)."""
    logger = logging.getLogger(STAGE_LOGGER)
    if not logger.handlers:
        from prefect.logging.handlers import APILogHandler

        logger.addHandler(APILogHandler())
        logger.setLevel(logging.INFO)
        logger.propagate = False
    return logger


def log_line(line: str, level: int = logging.INFO) -> None:
    """Sends a stage line to the Prefect run's logs (the UI's Logs tab), when inside a run."""
    if in_prefect_run():
        stage_logger().log(level, line)


def reason(error: BaseException) -> str:
    """An error in one line: its type and the first line of its message."""
    first = next((line.strip() for line in str(error).splitlines() if line.strip()), "")
    return f"{type(error).__name__}: {first}" if first else type(error).__name__


def log_failure(position: str, stage: str, error: BaseException) -> str:
    """The line saying a stage failed and why, at ERROR in the flow run's logs
    (the whole message follows it, for the reasons a validation lists).

    Returns:
        The line: `[2/9] validate failed: DataValidationError: data validation failed: ...`.
    """
    line = f"[{position}] {stage} failed: {reason(error)}"
    rest = str(error).strip()
    log_line(line + (f"\n{rest}" if "\n" in rest else ""), logging.ERROR)
    return line


def outcome_message(result: dict) -> str:
    """What a finished retraining did, as the flow run's final state message."""
    verdict = "promoted to champion" if result["promoted"] else "registered, not promoted"
    return f"{result['model']} version {result['version']} {verdict}; champion: version {result['champion']}"


def metrics_rows(evaluation: dict) -> list[dict]:
    """One row per scored model: the numbers the gate compared, as a Prefect table."""
    columns = ("accuracy", "macro_f1", "ece", "latency_ms_per_example")
    return [{"model": key, **{c: round(float(m[c]), 4) for c in columns if c in m}}
            for key, m in evaluation.get("models", {}).items()]


def decision_markdown(promote: bool, reasons: list[str], data_md5: str | None) -> str:
    """The gate's decision and every reason, as the Prefect UI renders it."""
    verdict = "PROMOTE" if promote else "REJECT"
    lines = [f"# Gate: {verdict}", "", f"Data version `{data_md5}`" if data_md5 else "", ""]
    return "\n".join(lines + [f"- {reason}" for reason in reasons]) + "\n"


def publish_gate(promote: bool, reasons: list[str], evaluation: dict) -> None:
    """The gate's decision (markdown) and the metrics it compared (table) as
    artifacts of the flow run, under keys that keep their history across runs."""
    if not in_prefect_run():
        return
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    create_markdown_artifact(decision_markdown(promote, reasons, evaluation.get("data_version")),
                             key="gate-decision", description="promote or reject, with every reason")
    create_table_artifact(metrics_rows(evaluation), key="evaluation-metrics",
                          description="test-split metrics of every model the gate compared")


def without_password(uri: str) -> str:
    """A tracking URI fit to show: `https://user:secret@host` loses its secret."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    return urlunsplit(parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@")))


def run_link(run_id: str, experiment_id: str, tracking_uri: str) -> str | None:
    """The MLflow UI's page of a run, when the tracking URI is a web server (else None:
    a SQLite file or a folder has no page until someone starts `mlflow ui` on it)."""
    from urllib.parse import urlsplit

    parts = urlsplit(tracking_uri)
    if parts.scheme not in {"http", "https"}:
        return None
    host = parts.netloc.rpartition("@")[2]  # the browser asks for credentials itself
    return f"{parts.scheme}://{host}{parts.path.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


def publish_mlflow_run(run_id: str, experiment_id: str, tracking_uri: str) -> None:
    """The pipeline's MLflow run on the flow run: a tag `mlflow-run:<id>` (the
    runs list shows it), a markdown artifact saying where to find it and, on an
    MLflow server, a link artifact that opens the run in its UI."""
    if not in_prefect_run():
        return
    from prefect.artifacts import create_link_artifact, create_markdown_artifact
    from prefect.client.orchestration import get_client
    from prefect.runtime import flow_run

    run_id_text = flow_run.get_id()
    if run_id_text is None:  # a task run outside any flow run: nothing to tag
        return
    flow_run_id = UUID(run_id_text)
    where = without_password(tracking_uri)
    with get_client(sync_client=True) as client:
        tags = client.read_flow_run(flow_run_id).tags
        client.update_flow_run(flow_run_id, tags=[*tags, f"mlflow-run:{run_id}"])
    create_markdown_artifact(
        f"# MLflow run\n\n- run id `{run_id}`\n- experiment id `{experiment_id}`\n- tracking URI `{where}`\n\n"
        f"Open it with `mlflow ui --backend-store-uri {where}`, experiment {experiment_id}.\n",
        key="mlflow-run", description="the MLflow run this flow run logs to")
    link = run_link(run_id, experiment_id, tracking_uri)
    if link:
        create_link_artifact(link, link_text=f"MLflow run {run_id}", key="mlflow-run-link",
                             description="opens the pipeline's run in the MLflow UI")
