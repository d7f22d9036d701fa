"""Shared fixtures for tuneloop's tests.

Everything here is offline and writes only under pytest's temporary folders.
Fixtures are named after what they provide, so later fixtures (a tiny BERT
model, say) can sit beside them without clashing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest

# Nothing in the test run may phone home or reach a model hub.
OFFLINE_ENVIRONMENT = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "DVC_NO_ANALYTICS": "1",
    "GX_ANALYTICS_ENABLED": "false",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    "TOKENIZERS_PARALLELISM": "false",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
}


@pytest.fixture(scope="session", autouse=True)
def offline_environment():
    """Sets the offline/no-telemetry variables for the whole session (restored afterwards)."""
    with pytest.MonkeyPatch.context() as patch:
        for key, value in OFFLINE_ENVIRONMENT.items():
            patch.setenv(key, value)
        yield


@dataclass(frozen=True)
class MlflowSandbox:
    """A temporary MLflow backend: SQLite database plus a local artefact folder."""

    root: Path  # holds mlflow.db and mlartifacts/; usable as a Workspace root
    tracking_uri: str
    experiment: str
    experiment_id: str

    def config(self, experiment: str | None = None, model_name: str = "tuneloop-test"):
        """The `mlflow` params section pointing at this sandbox."""
        from tuneloop.plumbing.tracking import MlflowConfig

        return MlflowConfig(tracking_uri=self.tracking_uri, experiment=experiment or self.experiment,
                            model_name=model_name)


@pytest.fixture(scope="module")
def mlflow_sandbox(tmp_path_factory: pytest.TempPathFactory):
    """One SQLite MLflow database per test module (creating it costs ~5 s).

    MLFLOW_TRACKING_URI is unset while the module runs, so a developer's real
    server is never touched; mlflow's global tracking URI (which mlflow also
    mirrors into that variable) is reset when the module ends. Tests sharing
    the sandbox should use distinct registered-model names
    (`mlflow_model_name`).
    """
    import mlflow

    from tuneloop.plumbing.tracking import MlflowConfig, configure_tracking

    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root}/mlflow.db"
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        try:
            experiment_id = configure_tracking(MlflowConfig(tracking_uri=uri, experiment="tuneloop-test"), root)
            yield MlflowSandbox(root, uri, "tuneloop-test", experiment_id)
        finally:
            mlflow.set_tracking_uri(None)  # also unsets MLFLOW_TRACKING_URI, which mlflow had set


@pytest.fixture
def mlflow_model_name(request: pytest.FixtureRequest) -> str:
    """A registered-model name unique to the requesting test."""
    return "tl-" + re.sub(r"[^A-Za-z0-9_-]+", "-", request.node.name).strip("-")


def pytest_sessionfinish(session, exitstatus) -> None:
    """Stops the temporary Prefect servers that ephemeral-mode flows started,
    while pytest's output streams are still open: left to Prefect's atexit
    hook, the stop line is logged to a closed stream and prints a "Logging
    error" traceback after the summary."""
    import sys

    if "prefect.server.api.server" not in sys.modules:
        return
    from prefect.server.api.server import SubprocessASGIServer

    for server in list(SubprocessASGIServer._instances.values()):
        server.stop()
