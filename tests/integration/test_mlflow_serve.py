"""The champion served by MLflow's own server, no tuneloop service involved:
`mlflow models serve -m models:/NAME@champion --env-manager local` on a
loopback port answers `/invocations` with labels and probabilities, here and
in a Python where tuneloop is not installed (`tests/isolated_python.py`)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ helpers (tiny_model)

from isolated_python import isolated_environment, isolated_python, tuneloop_importable  # noqa: E402
from tiny_model import build_tiny_bert, sentiment_rows  # noqa: E402

from tuneloop.plumbing import mlflow_model
from tuneloop.plumbing.tracking import start_pipeline_run  # noqa: E402
from tuneloop.tasks import registry  # noqa: E402
from tuneloop.tasks.finetune import FinetuneConfig, finetune  # noqa: E402
from tuneloop.values.workspace import Workspace  # noqa: E402

pytestmark = pytest.mark.slow

NAME = "tl-mlflow-serve"
CARD = mlflow_model.CardFacts(NAME, "0" * 32, "reviews.csv", "tiny", "0" * 64, "unknown", {"macro_f1": 0.5})


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def champion(mlflow_sandbox, tmp_path_factory) -> str:
    """A tiny LoRA model packaged as the register stage does, registered and promoted."""
    tmp = tmp_path_factory.mktemp("mlflow-serve")
    base = build_tiny_bert(tmp / "tiny-bert")
    trained = finetune("tiny", base, sentiment_rows(128, 0), sentiment_rows(32, 1), ["negative", "positive"],
                       FinetuneConfig(epochs=1, max_steps=4, batch_size=16, lora_r=8, max_length=32),
                       tmp / "trained", tmp / "checkpoints", "mlflow-serve", progress=False).model_dir
    packaged = mlflow_model.save_version_model(trained, str(base), base, CARD, tmp / "package" / "model",
                                               tmp / "package")
    run_id = start_pipeline_run(mlflow_sandbox.config(model_name=NAME), Workspace(tmp), {"data.md5": "0" * 32})
    version = registry.create_version(NAME, run_id, packaged, {}).version
    registry.move_champion(NAME, version, "promote", "test")
    return mlflow_sandbox.tracking_uri


def serve_and_ask(python: Path, env: dict, tmp_path: Path) -> list[dict]:
    """Starts `python -m mlflow models serve` on the champion, asks two texts, stops it."""
    port, log = free_port(), tmp_path / "serve.log"
    command = [str(python), "-m", "mlflow", "models", "serve", "-m", f"models:/{NAME}@champion",
               "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"]
    with log.open("w") as sink:
        process = subprocess.Popen(command, env=env, cwd=tmp_path, stdout=sink, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as http:
            wait_for_ping(process, http, log)
            answer = http.post("/invocations", json={"dataframe_records": [{"text": "the film was great"},
                                                                          {"text": "the plot was awful"}]})
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)
    assert answer.status_code == 200, answer.text
    return answer.json()["predictions"]


def check_predictions(predictions: list[dict]) -> None:
    assert [set(p) for p in predictions] == [{"label", "confidence", "probabilities", "abstained"}] * 2
    assert {p["label"] for p in predictions} <= {"negative", "positive"}
    assert [sum(p["probabilities"].values()) for p in predictions] == pytest.approx([1.0, 1.0], abs=1e-5)


def test_mlflow_models_serve_answers_invocations_for_the_champion(champion, tmp_path) -> None:
    bin_dir = str(Path(sys.executable).parent)  # MLflow runs `uvicorn` from PATH, as in an activated venv
    env = {**os.environ, "MLFLOW_TRACKING_URI": champion, "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}"}
    check_predictions(serve_and_ask(Path(sys.executable), env, tmp_path))


def test_mlflow_models_serve_answers_where_tuneloop_is_not_installed(champion, tmp_path) -> None:
    python = isolated_python(tmp_path / "venv")
    assert "No module named 'tuneloop'" in tuneloop_importable(python, tmp_path).stderr
    check_predictions(serve_and_ask(python, isolated_environment(tmp_path / "venv", MLFLOW_TRACKING_URI=champion),
                                    tmp_path))


def wait_for_ping(process: subprocess.Popen, http: httpx.Client, log: Path, limit_s: float = 240) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"mlflow models serve exited with {process.returncode}:\n{log.read_text()}")
        try:
            if http.get("/ping").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    pytest.fail(f"mlflow models serve did not answer /ping after {limit_s} s:\n{log.read_text()}")
