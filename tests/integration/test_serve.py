"""The real service: `tuneloop serve` in its own process on a loopback port,
against a SQLite MLflow registry, with traffic over HTTP.

Proves that predictions are answered and logged, feedback is stored, limits
give 4xx, and that a promotion and a `tuneloop rollback` are served within
seconds without a restart while a broken version never serves. Run once with a
tiny BERT (seconds) and once, marked slow, with the real all-MiniLM-L6-v2.
Follow latencies are printed (`pytest -s`) and recorded as junit properties.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ helpers (tiny_model)

from tiny_model import build_tiny_bert, sentiment_rows  # noqa: E402

from tuneloop.model.classifier import resolve_model_path  # noqa: E402
from tuneloop.plumbing.tracking import start_pipeline_run  # noqa: E402
from tuneloop.service.store import PredictionStore  # noqa: E402
from tuneloop.tasks import registry  # noqa: E402
from tuneloop.tasks.finetune import FinetuneConfig, finetune  # noqa: E402
from tuneloop.values.workspace import Workspace  # noqa: E402

POLL_SECONDS = 0.5
FOLLOW_LIMIT_S = 10.0
LIMITS = {"max_text_chars": 200, "max_batch": 8}
LABELS = ["negative", "positive"]


@dataclass
class Service:
    url: str
    project: Path
    model_name: str
    log: Path
    http: httpx.Client

    def version(self) -> str | None:
        response = self.http.get("/version")
        return response.json()["version"] if response.status_code == 200 else None

    def store(self) -> PredictionStore:
        return PredictionStore(f"sqlite:///{self.project / 'state' / 'predictions.db'}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def train(base_name: str, base_path: Path, out: Path, config: FinetuneConfig) -> Path:
    rows = sentiment_rows(128, seed=0), sentiment_rows(32, seed=1)
    return finetune(base_name, base_path, rows[0], rows[1], LABELS, config, out / "model", out / "checkpoints",
                    "serve-it", progress=False).model_dir


def register(sandbox, name: str, folder: Path, tmp: Path) -> str:
    """One pipeline run per version, as `tuneloop run` does."""
    workspace = Workspace(Path(tempfile.mkdtemp(dir=tmp)))
    run_id = start_pipeline_run(sandbox.config(model_name=name), workspace, {"data.md5": "0" * 32})
    return registry.create_version(name, run_id, folder, {}).version


def start(project: Path, port: int, log: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in {"MLFLOW_TRACKING_URI", "TUNELOOP_STORE_URL"}}
    with log.open("w") as sink:
        return subprocess.Popen([sys.executable, "-m", "tuneloop.cli", "serve", "--port", str(port),
                                 "--root", str(project)], cwd=project, env=env, stdout=sink, stderr=subprocess.STDOUT)


def wait_until_healthy(process: subprocess.Popen, http: httpx.Client, log: Path, limit_s: float = 240) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the service exited with {process.returncode}:\n{log.read_text()}")
        try:
            if http.get("/health").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    pytest.fail(f"the service was not healthy after {limit_s} s:\n{log.read_text()}")


def stop(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGINT)  # uvicorn shuts down cleanly: the follower thread stops
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


@pytest.fixture(scope="module", params=["tiny", pytest.param("minilm", marks=pytest.mark.slow)])
def service(request, mlflow_sandbox, tmp_path_factory):
    """Versions 1 and 2 (working) and 3 (corrupt adapter weights) registered, 1 champion, the service up."""
    tmp = tmp_path_factory.mktemp(f"serve-{request.param}")
    if request.param == "tiny":
        base_name = base_path = str(build_tiny_bert(tmp / "tiny-bert"))
        config = FinetuneConfig(epochs=1, max_steps=4, learning_rate=1e-2, batch_size=16, lora_r=8, max_length=32)
    else:
        base_name, base_path = "all-MiniLM-L6-v2", resolve_model_path("all-MiniLM-L6-v2")
        config = FinetuneConfig(epochs=1, max_steps=8, batch_size=16, max_length=32)
    good = train(base_name, Path(base_path), tmp / "trained", config)
    broken = shutil.copytree(good, tmp / "broken")
    (broken / "adapter_model.safetensors").write_bytes(b"these are not tensors")
    name = f"serve-it-{request.param}"
    for folder in (good, good, broken):
        register(mlflow_sandbox, name, folder, tmp)
    registry.move_champion(name, "1", "promote", "first")

    project = tmp / "project"
    project.mkdir()
    params = {"model": {"base": base_name},
              "mlflow": {"tracking_uri": mlflow_sandbox.tracking_uri, "experiment": mlflow_sandbox.experiment,
                         "model_name": name},
              "serve": {"poll_seconds": POLL_SECONDS, "device": "cpu", **LIMITS}}
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    port, log = free_port(), tmp / "serve.log"
    process = start(project, port, log)
    url = f"http://127.0.0.1:{port}"
    with httpx.Client(base_url=url, timeout=60) as http:
        try:
            wait_until_healthy(process, http, log)
            yield Service(url, project, name, log, http)
        finally:
            stop(process)


def promote_and_time(service: Service, to_version: str, move) -> float:
    """Seconds from starting the alias move to the service answering with `to_version`."""
    started = time.monotonic()
    move()
    deadline = started + FOLLOW_LIMIT_S
    while service.version() != to_version and time.monotonic() < deadline:
        time.sleep(0.02)
    seconds = time.monotonic() - started
    assert service.version() == to_version, f"still serving {service.version()} after {seconds:.1f} s"
    return seconds


def ensure_champion(service: Service, version: str) -> None:
    """Precondition for a test that moves the alias: `version` is champion and served."""
    current = registry.alias_version(service.model_name, registry.CHAMPION)
    if current.version != version:
        registry.move_champion(service.model_name, version, "promote", "test setup")
    promote_and_time(service, version, lambda: None)


# --- traffic --------------------------------------------------------------------------------------


def test_service_binds_loopback_and_loads_the_champion_at_startup(service):
    assert f"Uvicorn running on {service.url}" in service.log.read_text()
    health = service.http.get("/health").json()
    assert (health["status"], health["model"], health["version"], health["last_error"]) == (
        "ok", service.model_name, "1", None)
    assert service.http.get("/version").json()["labels"] == LABELS


def test_single_and_batch_predictions_are_answered_and_every_one_is_logged(service):
    single = service.http.post("/predict", json={"text": "the film was great"}).json()
    texts = ["the plot was awful", "the cast was superb really", "this movie was boring"]
    batch = service.http.post("/predict", json={"texts": texts}).json()
    for body, sent in ((single, ["the film was great"]), (batch, texts)):
        logged = service.store().request(body["request_id"])
        assert logged["text"].tolist() == sent
        assert logged["label"].tolist() == [p["label"] for p in body["predictions"]]
        assert logged["confidence"].tolist() == pytest.approx([p["confidence"] for p in body["predictions"]])
        assert set(logged["model_version"]) == {body["model_version"]}
        assert logged["ts"].notna().all()
        for p in body["predictions"]:
            assert set(p["probabilities"]) == set(LABELS)
            assert sum(p["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
            assert p["confidence"] == pytest.approx(max(p["probabilities"].values()))


def test_feedback_over_http_is_stored_with_its_prediction(service):
    body = service.http.post("/predict", json={"texts": ["the ending was good", "the acting was bad"]}).json()
    response = service.http.post("/feedback", json={"request_id": body["request_id"],
                                                    "labels": ["positive", "negative"]})
    assert response.status_code == 200 and response.json()["updated"] == 2
    assert service.store().request(body["request_id"])["true_label"].tolist() == ["positive", "negative"]
    assert service.http.post("/feedback", json={"request_id": "unknown", "label": "positive"}).status_code == 404


def test_limits_over_http_get_4xx_naming_the_limit(service):
    too_long = service.http.post("/predict", json={"text": "x" * (LIMITS["max_text_chars"] + 1)})
    assert too_long.status_code == 413 and "serve.max_text_chars = 200" in too_long.json()["detail"]
    too_many = service.http.post("/predict", json={"texts": ["good"] * (LIMITS["max_batch"] + 1)})
    assert too_many.status_code == 413 and "serve.max_batch = 8" in too_many.json()["detail"]
    assert service.http.post("/predict", json={"texts": []}).status_code == 422


# --- following the alias ------------------------------------------------------------------------


def test_promotion_is_served_within_seconds_without_a_restart(service, record_property):
    ensure_champion(service, "1")
    seconds = promote_and_time(service, "2", lambda: registry.move_champion(service.model_name, "2", "promote", "it"))
    record_property("promotion_follow_s", round(seconds, 3))
    print(f"\n[{service.model_name}] promotion served after {seconds:.2f} s (poll {POLL_SECONDS} s)")
    assert seconds < FOLLOW_LIMIT_S
    assert service.http.post("/predict", json={"text": "good"}).json()["model_version"] == "2"


def test_rollback_command_is_served_within_seconds_and_audited(service, record_property):
    from typer.testing import CliRunner

    from tuneloop.cli import app

    ensure_champion(service, "2")
    outcome = {}

    def roll_back():
        arguments = ["rollback", "--why", "live errors", "--root", str(service.project)]
        outcome["result"] = CliRunner().invoke(app, arguments)

    seconds = promote_and_time(service, "1", roll_back)
    result = outcome["result"]
    assert result.exit_code == 0, result.output
    assert "rolled back from version 2 to version 1 (live errors)" in result.output
    record_property("rollback_follow_s", round(seconds, 3))
    print(f"\n[{service.model_name}] rollback served after {seconds:.2f} s (poll {POLL_SECONDS} s)")
    assert seconds < FOLLOW_LIMIT_S
    entry = registry.audit_trail(service.model_name)[-1]
    assert (entry["action"], entry["from"], entry["to"], entry["why"]) == ("rollback", "2", "1", "live errors")
    assert service.http.post("/predict", json={"text": "good"}).json()["model_version"] == "1"


def test_broken_champion_never_serves_and_health_says_why(service):
    ensure_champion(service, "1")
    registry.move_champion(service.model_name, "3", "promote", "corrupt weights slip through")
    deadline = time.monotonic() + FOLLOW_LIMIT_S
    health = service.http.get("/health").json()
    while health["failed_version"] != "3" and time.monotonic() < deadline:
        time.sleep(0.1)
        health = service.http.get("/health").json()
    assert (health["status"], health["version"], health["champion"], health["failed_version"]) == (
        "ok", "1", "3", "3")
    assert "version 3 was not switched to (version 1 keeps serving)" in health["last_error"]
    time.sleep(3 * POLL_SECONDS)  # later polls neither retry nor switch
    assert service.http.post("/predict", json={"text": "good"}).json()["model_version"] == "1"
    assert service.log.read_text().count("version 3 was not switched to") == 1
    registry.rollback(service.model_name, why="3 does not load")  # the registry agrees again
    assert service.version() == "1"
