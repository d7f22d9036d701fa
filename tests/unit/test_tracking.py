"""Tracking URIs: the environment points every project at a server, and one
process can work on several local projects without crossing their registries."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest

from tasks.tracking import MlflowConfig, configure_tracking, tracking_uri


@pytest.fixture
def no_tracking_env(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    yield
    mlflow.set_tracking_uri(None)


def test_a_second_project_in_one_process_gets_its_own_sqlite_registry(tmp_path: Path, no_tracking_env) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir(), second.mkdir()
    configure_tracking(MlflowConfig(), first)  # mlflow exports MLFLOW_TRACKING_URI for project a
    assert tracking_uri(MlflowConfig(), second) == f"sqlite:///{(second / 'mlflow.db').resolve()}"


def test_the_environment_beats_params_and_the_local_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            no_tracking_env) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.internal:5000")
    assert tracking_uri(MlflowConfig(tracking_uri="sqlite:///x.db"), tmp_path) == "http://mlflow.internal:5000"


def test_params_beat_the_local_default(tmp_path: Path, no_tracking_env) -> None:
    assert tracking_uri(MlflowConfig(tracking_uri="postgresql://db/mlflow"), tmp_path) == "postgresql://db/mlflow"
