"""The MLflow server lost in the middle of `tuneloop register`.

A real `mlflow server` (SQLite backend, artefacts served by the server) runs on
a loopback port in its own process group. A registration is started and the
whole group is SIGKILLed just before one of its calls to the server: the worst
moments, from "files uploaded, no version yet" to "promoted, pipeline run not
closed". While the server is down nothing half-registered is champion and the
command prints one error; after a restart on the same stores, registering
again finishes the job: one complete version for the challenger, `champion`
moved (or not) as the gate decided, its files verified, its reference data there.

MLflow's HTTP retries (about 4 minutes by default) are turned off here so a
dead server is seen at once.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict
from pathlib import Path

import pandas as pd
import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ helpers (tiny_model)

from tiny_model import build_tiny_bert, sentiment_rows  # noqa: E402

from tuneloop.pipeline.params import parse_params  # noqa: E402
from tuneloop.plumbing.integrity import folder_manifest  # noqa: E402
from tuneloop.plumbing.mlflow_model import REWRITTEN  # noqa: E402
from tuneloop.plumbing.tracking import start_pipeline_run  # noqa: E402
from tuneloop.tasks import registry  # noqa: E402
from tuneloop.tasks.finetune import FinetuneConfig, finetune  # noqa: E402
from tuneloop.tasks.ingest import DataVersion  # noqa: E402
from tuneloop.values.workspace import Workspace, write_json  # noqa: E402

LABELS = ["negative", "positive"]
FAST = FinetuneConfig(epochs=1, max_steps=4, learning_rate=1e-2, batch_size=16, lora_r=8, max_length=32)
NO_RETRIES = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def answers(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def group_alive(pgid: int) -> list[int]:
    """Pids of the process group that are not zombies."""
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            alive.append(int(stat.parent.name))
    return alive


class MlflowServer:
    """`mlflow server` on one loopback port and one pair of stores, killed and restarted at will."""

    def __init__(self, root: Path):
        self.root, self.port, self.process = root, free_port(), None
        self.uri = f"http://127.0.0.1:{self.port}"
        self.log = root / "server.log"

    def launch(self) -> None:
        command = [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri",
                   f"sqlite:///{self.root / 'mlflow.db'}", "--artifacts-destination", str(self.root / "artifacts"),
                   "--serve-artifacts", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"]
        env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
        with self.log.open("a") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                            start_new_session=True)  # its own group: workers die with it

    def start(self, seconds: float = 120) -> None:
        """Launches the server unless it was, and returns once /health answers."""
        if self.process is None:
            self.launch()
        deadline = time.monotonic() + seconds
        while not answers(self.port):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"mlflow server did not start:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.2)

    def kill(self) -> None:
        """SIGKILL to the whole group; returns once nothing of it runs and the port refuses."""
        if self.process is None:
            return
        pgid = self.process.pid
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(timeout=30)
        self.process = None
        deadline = time.monotonic() + 30
        while group_alive(pgid) or answers(self.port):
            assert time.monotonic() < deadline, f"mlflow server group {pgid} still alive: {group_alive(pgid)}"
            time.sleep(0.1)

    @property
    def running(self) -> bool:
        return self.process is not None


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One server and its stores for the module; each test kills it and restarts it."""
    import mlflow

    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        for key, value in NO_RETRIES.items():
            patch.setenv(key, value)
        server.launch()  # ready by the time the tiny model is trained
        try:
            yield server
        finally:
            server.kill()
            mlflow.set_tracking_uri(None)


@pytest.fixture(scope="module")
def tiny(server, tmp_path_factory) -> dict[str, Path]:
    """A tiny random BERT and a LoRA challenger trained on it in a few steps (the server starts meanwhile)."""
    out = tmp_path_factory.mktemp("registry-killed")
    base = build_tiny_bert(out / "tiny-bert")
    model = finetune("tiny", base, sentiment_rows(64, seed=0), sentiment_rows(32, seed=1), LABELS, FAST,
                     out / "challenger", out / "checkpoints", "killed", progress=False).model_dir
    return {"base": base, "challenger": model}


@pytest.fixture
def running(tiny, server) -> MlflowServer:
    """The server, answering (restarted if an earlier test left it dead)."""
    server.start()
    return server


def project(root: Path, server: MlflowServer, tiny: dict, name: str):
    """A workspace after ingest and split (its pipeline run opened), as `tuneloop register` finds it."""
    settings = {"model": {"base": str(tiny["base"])}, "validate": {"labels": LABELS},
                "mlflow": {"tracking_uri": server.uri, "experiment": "killed", "model_name": name}}
    root.mkdir()
    (root / "params.yaml").write_text(yaml.safe_dump(settings))
    ws = Workspace(root)
    texts, labels = sentiment_rows(16, seed=2)
    ws.splits.parent.mkdir(parents=True)
    pd.DataFrame({"text": texts, "label": [LABELS[i] for i in labels], "split": "test"}).to_parquet(ws.splits)
    write_json(ws.data_version, asdict(DataVersion("e" * 32, 1, "data/raw/x.csv", "x.csv", 64, 0)))
    params = parse_params(settings)
    start_pipeline_run(params.mlflow, ws, {"data.md5": "e" * 32})
    return params, ws


def evaluated(ws: Workspace, challenger: Path, promote: bool, macro_f1: float) -> None:
    """What finetune, evaluate and gate leave for register (macro_f1 makes each evaluation its own)."""
    shutil.rmtree(ws.challenger_dir, ignore_errors=True)
    shutil.copytree(challenger, ws.challenger_dir)
    scores = {"accuracy": macro_f1, "macro_f1": macro_f1, "ece": 0.05, "latency_ms_per_example": 1.0}
    write_json(ws.evaluation, {"models": {"challenger": scores},
                               "challenger_files": folder_manifest(ws.challenger_dir)})
    write_json(ws.decision, {"promote": promote, "reasons": [f"macro-F1 {macro_f1}"]})


def key_of(ws: Workspace) -> str:
    return registry.registration_key(json.loads(ws.evaluation.read_text()), json.loads(ws.decision.read_text()))


# The calls a registration makes, in order; the server dies just before the one named.
KILL_POINTS = {
    "files uploaded, no version yet": ("create_model_version", lambda args: True),
    "version created, reference data not uploaded": ("log_artifact", lambda args: True),
    "all written, not marked complete": ("set_model_version_tag", lambda args: args[3] == registry.REGISTRATION_TAG),
    "complete, no alias moved": ("set_registered_model_alias", lambda args: args[2] == registry.PREVIOUS),
    "previous moved, champion not": ("set_registered_model_alias", lambda args: args[2] == registry.CHAMPION),
    "champion moved, audit not written": ("set_registered_model_tag", lambda args: args[2].startswith("audit.")),
    "decision applied, not tagged": ("set_model_version_tag", lambda args: args[3] == "decision"),
    "all done, pipeline run not closed": ("set_tag", lambda args: args[2] == "tuneloop.outcome"),
}
ALIAS_POINTS = ("complete, no alias moved", "previous moved, champion not", "champion moved, audit not written")
# Each case costs a server restart (about 9 s on 2 cores): by default the alias caught half-moved (the
# CLI test below covers a version created but not complete); `-m slow` runs every point, promoted or rejected.
DEFAULT_CASE = ("previous moved, champion not", True)
CASES = [pytest.param(point, promote, id=f"{'promoted' if promote else 'rejected'}: {point}",
                      marks=() if (point, promote) == DEFAULT_CASE else pytest.mark.slow)
         for promote in (True, False) for point in KILL_POINTS if promote or point not in ALIAS_POINTS]


def kill_before(patch, server: MlflowServer, point: str) -> None:
    """Makes the named client call kill the server first (once): the call then finds it dead."""
    from mlflow import MlflowClient

    method, matches = KILL_POINTS[point]
    original = getattr(MlflowClient, method)

    def call(*args, **kwargs):
        if server.running and matches(args):
            server.kill()
        return original(*args, **kwargs)

    patch.setattr(MlflowClient, method, call)


def assert_nothing_half_registered_serves(name: str, cache: Path) -> None:
    """Champion and previous are complete versions; every incomplete version refuses to download."""
    for alias in (registry.CHAMPION, registry.PREVIOUS):
        version = registry.alias_version(name, alias)
        assert version is None or registry.is_complete(version.tags), f"{alias} is on an incomplete version"
    for version in registry.list_versions(name):
        if not registry.is_complete(version.tags):
            with pytest.raises(registry.IncompleteVersion):
                registry.download_version(name, version.version, cache)


@pytest.mark.parametrize("point, promote", CASES)
def test_server_killed_mid_registration_serves_nothing_half_registered_and_a_rerun_finishes_it(
        running, tiny, tmp_path, monkeypatch, point, promote) -> None:
    from tuneloop.pipeline import stages

    name = f"killed-{list(KILL_POINTS).index(point)}-{promote}"
    params, ws = project(tmp_path / "project", running, tiny, name)
    evaluated(ws, tiny["challenger"], promote=True, macro_f1=0.8)
    first = stages.register(params, ws)  # version 1, the champion the challenger is measured against
    evaluated(ws, tiny["challenger"], promote=promote, macro_f1=0.9)

    with monkeypatch.context() as patch:
        kill_before(patch, running, point)
        with pytest.raises(registry.RegistryUnavailable, match=f"{running.uri} did not answer while registering .* "
                                                               "run `tuneloop register` again to finish it"):
            stages.register(params, ws)
    assert not running.running

    running.start()  # same backend and artefact store
    assert_nothing_half_registered_serves(name, tmp_path / "cache-before")
    result = stages.register(params, ws)

    mine = [v for v in registry.list_versions(name) if v.tags.get(registry.KEY_TAG) == key_of(ws)]
    assert [(v.version, registry.is_complete(v.tags)) for v in mine] == [(result["version"], True)]
    version = mine[0]
    expected_champion = version.version if promote else first["version"]
    assert (result["champion"], registry.alias_version(name, registry.CHAMPION).version) == (expected_champion,) * 2
    assert version.tags["decision"] == ("promoted" if promote else "rejected")
    promotions = [e for e in registry.audit_trail(name) if e["action"] == "promote"]
    assert [(e["from"], e["to"]) for e in promotions] == (
        [(None, "1"), ("1", version.version)] if promote else [(None, "1")])
    if promote:
        assert registry.alias_version(name, registry.PREVIOUS).version == first["version"]
    assert_nothing_half_registered_serves(name, tmp_path / "cache-after")
    downloaded = registry.download_version(name, version.version, tmp_path / "cache-after")  # hashes checked
    trained = {path: sha for path, sha in folder_manifest(tiny["challenger"]).items() if path not in REWRITTEN}
    assert {path: sha for path, sha in folder_manifest(downloaded).items() if path not in REWRITTEN} == trained
    assert registry.download_reference(name, version.version, tmp_path / "cache-after").exists()
    client = registry.client()
    assert client.get_run(version.run_id).info.status == "FINISHED"
    leftover = client.search_runs([client.get_run(version.run_id).info.experiment_id],
                                  f"tags.`{registry.KEY_TAG}` = '{key_of(ws)}' and attributes.status = 'RUNNING'")
    assert leftover == []  # a version run cut off before its version was created is closed as abandoned
    assert client.get_run(json.loads(ws.run_state.read_text())["run_id"]).data.tags["tuneloop.version"] == \
        version.version


def tuneloop(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return subprocess.run([sys.executable, "-m", "tuneloop.cli", *args], cwd=cwd, env={**env, **NO_RETRIES},
                          capture_output=True, text=True, timeout=300)


def test_tuneloop_register_says_the_server_is_down_in_one_line_then_finishes_the_version_and_it_serves(
        running, tiny, tmp_path, monkeypatch) -> None:
    from tuneloop.model.classifier import load_classifier, predict_proba
    from tuneloop.pipeline import stages
    from tuneloop.service.serve import registry_loader

    name = "killed-cli"
    params, ws = project(tmp_path / "project", running, tiny, name)
    evaluated(ws, tiny["challenger"], promote=True, macro_f1=0.9)
    with monkeypatch.context() as patch:
        kill_before(patch, running, "version created, reference data not uploaded")
        with pytest.raises(registry.RegistryUnavailable):
            stages.register(params, ws)

    down = tuneloop("register", "--root", str(ws.root), cwd=ws.root)
    assert down.returncode == 2, down.stderr
    assert "Traceback" not in down.stderr + down.stdout
    (line,) = down.stderr.strip().splitlines()
    assert f"the MLflow server at {running.uri} did not answer (connection refused)" in line

    running.start()
    again = tuneloop("register", "--root", str(ws.root), cwd=ws.root)
    assert again.returncode == 0, again.stderr
    assert "version 1 holds this challenger, left incomplete by an interrupted registration: finishing it" \
        in again.stdout
    assert f"{name} version 1 promoted to champion; champion is version 1" in again.stdout
    (version,) = registry.list_versions(name)
    assert registry.is_complete(version.tags) and version.aliases == (registry.CHAMPION,)

    texts = ["the film was great", "the plot was awful really"]
    served = registry_loader(name, tmp_path / "serve-cache", "/params/base/moved/on", "cpu")("1")
    expected = predict_proba(load_classifier(tiny["challenger"], str(tiny["base"]), "cpu"), texts)
    assert predict_proba(served, texts) == pytest.approx(expected, abs=1e-6)
