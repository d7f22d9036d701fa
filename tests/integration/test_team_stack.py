"""The team stack, started on loopback and used for real: PostgreSQL (MLflow's
backend store, the prediction store and the Prefect server's database), moto's
S3 server (MLflow's artefacts and the DVC remote), an MLflow server proxying
artefacts, a Prefect server and a process worker running the deployments of `tuneloop deploy`.

The story: new labelled data → two overlapping retrain requests → one retrain
run executed by the worker (the other CANCELLED) → version 1 champion →
`tuneloop serve` logs predictions to PostgreSQL → feedback on drifted traffic →
the `monitor` deployment sees drift and asks for retraining → a second run
registers version 2, promoted and followed by the service → `tuneloop rollback`
followed too. Each part's seconds are printed (`pytest -s`) and recorded as
junit properties. A tiny BERT keeps training to seconds on two cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import httpx
import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ helpers

from team_stack import (  # noqa: E402
    BUCKET,
    S3_KEYS,
    Stack,
    StackUnavailable,
    free_port,
    launch,
    prefect_env,
    s3_client,
    start_mlflow,
    start_postgres,
    start_prefect,
    start_s3,
    start_worker,
    stop_process,
    wait_for_http,
    wait_for_s3,
)
from tiny_model import build_tiny_bert, sentiment_rows  # noqa: E402

pytestmark = pytest.mark.slow

MODEL = "team-sentiment"
LABELS = ("negative", "positive")
TERMINAL = {"COMPLETED", "CANCELLED", "FAILED", "CRASHED"}


@dataclass
class Story:
    """What the story did: flow runs by name, service follow times, part timings."""

    stack: Stack
    project: Path
    env: dict[str, str]
    incoming_outputs: list[dict] = field(default_factory=list)
    retrain_runs: list[dict] = field(default_factory=list)  # the first two requests' runs
    monitor_run: dict = field(default_factory=dict)
    drift_retrain_run: dict = field(default_factory=dict)
    predictions_sent: int = 0
    followed: dict[str, str | None] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    scheduled: dict[str, int] = field(default_factory=dict)  # runs the scheduler planned per deployment
    deployments: dict[str, dict] = field(default_factory=dict)  # as registered by `tuneloop deploy`


def labelled_rows(n: int, seed: int) -> list[dict]:
    texts, labels = sentiment_rows(n, seed=seed)
    return [{"text": t, "label": LABELS[y]} for t, y in zip(texts, labels)]


def drifted_texts(n: int) -> list[tuple[str, str]]:
    """Long, many-sentence, digit-heavy posts: far from the short movie lines in
    every text descriptor (length, words, sentences, non-letters)."""
    rows = []
    for i in range(n):
        good = i % 2 == 0
        mood = "Great deal, love it!" if good else "Awful service, never again!"
        rows.append((f"Order #{1000 + i} arrived on 2026-11-{i % 28 + 1:02d}. {mood} Paid $ {i * 7 + 13}.99 "
                     f"for {i % 9 + 2} items (ref {i * 31 % 997}). Rated {i % 5 + 1}/5. Update {i}: ok.",
                     LABELS[good]))
    return rows


def write_project(root: Path, base: Path, stack: Stack) -> None:
    """A small project: tiny BERT, 240 rows, S3 remote, settings that keep every stage fast."""
    import pandas as pd

    root.mkdir()
    pd.DataFrame(labelled_rows(240, seed=0)).to_csv(root / "reviews.csv", index=False)
    params = {
        "model": {"base": str(base)},
        "mlflow": {"experiment": "team", "model_name": MODEL},  # the server: $MLFLOW_TRACKING_URI
        "ingest": {"source": "reviews.csv", "dvc_remote": f"s3://{BUCKET}/dvc", "length_slices": []},
        "validate": {"labels": list(LABELS), "min_rows_per_class": 20},
        "baseline": {"probe_c": [1.0], "max_length": 48, "device": "cpu"},
        "finetune": {"epochs": 1, "batch_size": 16, "max_length": 48, "min_steps": 0,
                     "min_examples_per_class": 0, "max_steps": 12, "device": "cpu"},
        # mechanics, not quality: a random tiny model is let through (non-inferiority margin -1)
        "gate": {"min_gain_over_base": -1.0, "min_gain_over_champion": -1.0, "max_slice_regression": 1.0,
                 "bootstrap_samples": 200},
        "triggers": {"min_new_labelled_rows": 30},
        "serve": {"poll_seconds": 0.5, "device": "cpu"},
        "monitor": {"min_rows": 30, "sample_rows": 100, "device": "cpu", "min_labelled_rows": 1000,
                    "bootstrap_samples": 200},
    }
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    dvc = [sys.executable, "-m", "dvc"]
    for command in (["init", "--no-scm", "-q"], ["remote", "add", "-d", "tuneloop", f"s3://{BUCKET}/dvc"],
                    # the endpoint in the project's config, the keys in the git-ignored local one
                    ["remote", "modify", "tuneloop", "endpointurl", stack.s3_url],
                    ["remote", "modify", "--local", "tuneloop", "access_key_id", S3_KEYS["AWS_ACCESS_KEY_ID"]],
                    ["remote", "modify", "--local", "tuneloop", "secret_access_key",
                     S3_KEYS["AWS_SECRET_ACCESS_KEY"]]):
        subprocess.run(dvc + command, cwd=root, check=True, capture_output=True)


def tuneloop(story: Story, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "tuneloop.cli", *args, "--root", str(story.project)],
                          cwd=story.project, env=story.env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"tuneloop {' '.join(args)}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def prefect(story: Story, method: str, path: str, body: dict | None = None):
    """One call to the Prefect API; a 503 (its database busy) is tried again."""
    for attempt in range(10):
        response = httpx.request(method, f"{story.stack.prefect_api}{path}", json=body, timeout=60)
        if response.status_code != 503:
            break
        time.sleep(1 + attempt)
    response.raise_for_status()
    return response.json() if response.content else None


def deployment_runs(story: Story, name: str, scheduled: bool = False) -> list[dict]:
    """The flow runs of deployment `name` that requests started (or, `scheduled`,
    those its schedule made), oldest first, with their state names."""
    deployment = prefect(story, "GET", f"/deployments/name/{name}/{name}")
    runs = prefect(story, "POST", "/flow_runs/filter",
                   {"deployments": {"id": {"any_": [deployment["id"]]}}, "sort": "EXPECTED_START_TIME_ASC"})
    return [{"id": r["id"], "state": r["state"]["type"], "name": r["state"]["name"]} for r in runs
            if r["auto_scheduled"] == scheduled]


def switch_schedules_off(story: Story, names: tuple[str, ...]) -> dict[str, int]:
    """Waits for the scheduler to plan runs of every deployment (the schedules
    work), then turns the schedules off and deletes those runs, so that only the
    story's requests start runs.

    Returns:
        How many runs the scheduler had planned, per deployment.
    """
    deadline, planned = time.monotonic() + 90, {}
    while time.monotonic() < deadline:
        planned = {name: len(deployment_runs(story, name, scheduled=True)) for name in names}
        if all(planned.values()):
            break
        time.sleep(2)
    for name in names:
        deployment = prefect(story, "GET", f"/deployments/name/{name}/{name}")
        for schedule in deployment["schedules"]:
            prefect(story, "PATCH", f"/deployments/{deployment['id']}/schedules/{schedule['id']}", {"active": False})
        for run in deployment_runs(story, name, scheduled=True):
            httpx.delete(f"{story.stack.prefect_api}/flow_runs/{run['id']}", timeout=30)
    return planned


def wait_for_runs(story: Story, name: str, count: int, limit_s: float) -> list[dict]:
    """Waits until deployment `name` has `count` runs, all finished."""
    deadline = time.monotonic() + limit_s
    runs: list[dict] = []
    while time.monotonic() < deadline:
        runs = deployment_runs(story, name)
        if len(runs) >= count and all(r["state"] in TERMINAL for r in runs):
            return runs
        time.sleep(2)
    worker_log = (story.stack.tmp / "worker.log").read_text()[-6000:]
    pytest.fail(f"{name}: runs {runs} not finished within {limit_s} s; worker log:\n{worker_log}")


@contextmanager
def timed(story: Story, part: str) -> Iterator[None]:
    """Records and prints the seconds `part` took."""
    start = time.monotonic()
    yield
    story.seconds[part] = round(time.monotonic() - start, 1)
    print(f"[team stack] {part}: {story.seconds[part]} s", flush=True)


def start_servers(stack: Stack) -> None:
    """PostgreSQL and S3 first (MLflow and Prefect keep their state in PostgreSQL)."""
    s3 = start_s3(stack)
    start_postgres(stack, ("mlflow", "predictions", "prefect"))
    prefect_server = start_prefect(stack, "prefect")
    wait_for_s3(stack, s3)
    mlflow = start_mlflow(stack, "mlflow")
    wait_for_http(f"{stack.mlflow_url}/health", mlflow, stack.tmp / "mlflow.log")
    wait_for_http(f"{stack.prefect_api}/health", prefect_server, stack.tmp / "prefect.log")


def client_env(stack: Stack) -> dict[str, str]:
    """What a team member exports: no storage credentials (MLflow proxies; DVC's are in .dvc/config.local)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_S3"))}
    return {**env, **prefect_env(stack), "MLFLOW_TRACKING_URI": stack.mlflow_url,
            # plain postgresql://, as a team writes it: tuneloop connects with psycopg 3
            "TUNELOOP_STORE_URL": stack.postgres_url("predictions").replace("+psycopg", "")}


def retrain_on_new_data(story: Story) -> None:
    """Two `tuneloop incoming` requests before the worker is up: both retrain runs
    are scheduled; the worker starts one, the limit cancels the other."""
    import pandas as pd

    incoming = story.project / "data" / "incoming"
    incoming.mkdir(parents=True)
    pd.DataFrame(labelled_rows(40, seed=5)).to_csv(incoming / "batch-1.csv", index=False)
    for _ in range(2):
        out = tuneloop(story, "incoming").stdout
        story.incoming_outputs.append(json.loads(out[out.index("{"):]))  # after the flow's one-line verdict
    deadline = time.monotonic() + 60
    while len(deployment_runs(story, "retrain")) < 2 and time.monotonic() < deadline:
        time.sleep(1)
    start_worker(story.stack, story.project, story.env)
    story.retrain_runs = wait_for_runs(story, "retrain", 2, limit_s=600)


def serve(story: Story) -> tuple[subprocess.Popen, httpx.Client]:
    port = free_port()
    process = launch(story.stack, "serve", [sys.executable, "-m", "tuneloop.cli", "serve", "--port", str(port),
                                            "--root", str(story.project)], story.env, cwd=story.project)
    wait_for_http(f"http://127.0.0.1:{port}/health", process, story.stack.tmp / "serve.log", limit_s=240)
    return process, httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60)


def send_drifted_traffic(story: Story, http: httpx.Client) -> None:
    """40 predictions in batches of 10, each labelled back through /feedback."""
    rows = drifted_texts(40)
    for start in range(0, len(rows), 10):
        batch = rows[start:start + 10]
        answer = http.post("/predict", json={"texts": [t for t, _ in batch]})
        assert answer.status_code == 200, answer.text
        feedback = http.post("/feedback", json={"request_id": answer.json()["request_id"],
                                                "labels": [label for _, label in batch]})
        assert feedback.status_code == 200, feedback.text
        story.predictions_sent += len(batch)


def follow(http: httpx.Client, version: str, limit_s: float = 120) -> float:
    """Seconds until the service answers with `version`."""
    started = time.monotonic()
    while time.monotonic() - started < limit_s:
        if http.get("/version").json().get("version") == version:
            return round(time.monotonic() - started, 1)
        time.sleep(0.2)
    pytest.fail(f"the service did not follow to version {version} within {limit_s} s")


def run_monitor_deployment(story: Story) -> None:
    """A `monitor` run created through the API, executed by the worker; its drift request's retrain run too."""
    deployment = prefect(story, "GET", "/deployments/name/monitor/monitor")
    prefect(story, "POST", f"/deployments/{deployment['id']}/create_flow_run", {})
    story.monitor_run = wait_for_runs(story, "monitor", 1, limit_s=400)[0]
    story.drift_retrain_run = wait_for_runs(story, "retrain", 3, limit_s=600)[-1]


@pytest.fixture(scope="module")
def story(tmp_path_factory) -> Story:
    tmp = tmp_path_factory.mktemp("team-stack")
    stack = Stack(tmp)
    try:
        story = Story(stack, tmp / "project", {})
        with timed(story, "servers up (postgres, s3, mlflow, prefect)"):
            try:
                start_servers(stack)
            except StackUnavailable as why:
                pytest.skip(f"the team stack cannot start here: {why}")
        write_project(story.project, build_tiny_bert(tmp / "tiny-bert"), stack)
        story.env = client_env(stack)
        with timed(story, "tuneloop deploy, schedules planned then off"):
            tuneloop(story, "deploy")
            story.deployments = {d["name"]: d for d in prefect(story, "POST", "/deployments/filter", {})}
            story.scheduled = switch_schedules_off(story, ("retrain", "monitor", "incoming"))
        with timed(story, "new data: two requests, one retrain run by the worker"):
            retrain_on_new_data(story)
        with timed(story, "tuneloop serve up"):
            process, http = serve(story)
        with timed(story, "drifted traffic and feedback"):
            send_drifted_traffic(story, http)
        with timed(story, "monitor deployment run, drift retrain run"):
            run_monitor_deployment(story)
        with timed(story, "promotion followed (from the run's end)"):
            story.followed["promotion"] = str(follow(http, "2"))
        with timed(story, "tuneloop rollback followed"):
            tuneloop(story, "rollback", "--why", "team stack test")
            story.followed["rollback"] = str(follow(http, "1"))
        http.close()
        stop_process(process)
        yield story
    finally:
        stack.stop()


# --- what each server holds afterwards -------------------------------------------------------------


def test_the_server_schedules_retrain_monitor_and_incoming_runs(story):
    assert all(count >= 1 for count in story.scheduled.values()), story.scheduled


def test_deployments_load_tuneloops_modules_in_the_project_folder_a_worker_anywhere_finds(story):
    assert {name: d["entrypoint"] for name, d in story.deployments.items()} == {
        name: f"tuneloop.flows.{name}:{name}_flow" for name in ("retrain", "monitor", "incoming")}
    for deployment in story.deployments.values():
        assert deployment["job_variables"]["env"] == {"TUNELOOP_PROJECT": str(story.project)}
        assert deployment["parameters"] == {"params_path": "params.yaml", "root": "."}


def test_two_overlapping_requests_start_one_retrain_run_the_other_is_cancelled(story):
    assert [o["retrain"] for o in story.incoming_outputs] == [True, True]
    assert [o["rows"] for o in story.incoming_outputs] == [40, 40]
    assert sorted(r["state"] for r in story.retrain_runs) == ["CANCELLED", "COMPLETED"]


def test_drift_seen_by_the_monitor_run_starts_a_retrain_run_the_worker_completes(story):
    assert story.monitor_run["state"] == "COMPLETED"
    assert story.drift_retrain_run["state"] == "COMPLETED"
    exported = sorted(p.name for p in (story.project / "data" / "incoming").iterdir())
    assert exported[0] == "batch-1.csv" and exported[1].startswith("feedback-") and len(exported) == 2


def test_registry_on_the_mlflow_server_holds_two_versions_with_champion_back_on_1(story):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=story.stack.mlflow_url)
    versions = {v.version: v for v in client.search_model_versions(f"name = '{MODEL}'")}
    assert sorted(versions) == ["1", "2"]
    assert all(v.tags["tuneloop.registration"] == "complete" for v in versions.values())
    assert client.get_model_version_by_alias(MODEL, "champion").version == "1"
    assert client.get_model_version_by_alias(MODEL, "previous").version == "2"
    assert versions["1"].tags["drift.status"] == "drift"


def test_predictions_and_feedback_are_rows_in_postgresql(story):
    import psycopg

    url = story.stack.postgres_url("predictions").replace("+psycopg", "")
    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT model_version, count(*), count(true_label) FROM predictions "
                            "GROUP BY model_version").fetchall()
    assert rows == [("1", story.predictions_sent, story.predictions_sent)]


def test_mlflow_keeps_its_runs_in_postgresql_and_its_artefacts_in_the_bucket(story):
    import psycopg

    with psycopg.connect(story.stack.postgres_url("mlflow").replace("+psycopg", "")) as conn:
        versions = conn.execute("SELECT count(*) FROM model_versions").fetchone()[0]
    assert versions == 2
    keys = [o["Key"] for page in s3_client(story.stack).get_paginator("list_objects_v2").paginate(Bucket=BUCKET)
            for o in page.get("Contents", [])]
    assert any(k.startswith("mlartifacts/") and k.endswith("adapter_model.safetensors") for k in keys)
    assert any(k.startswith("mlartifacts/") and k.endswith("splits.parquet") for k in keys)
    md5 = json.loads((story.project / "data" / "prepared" / "version.json").read_text())["md5"]
    assert f"dvc/files/md5/{md5[:2]}/{md5[2:]}" in keys  # the latest data version, in the DVC remote
    assert sum(k.startswith("dvc/files/md5/") for k in keys) == 2  # one snapshot per retraining


def test_the_service_follows_a_promotion_and_a_rollback(story, record_property):
    assert set(story.followed) == {"promotion", "rollback"}
    for part, seconds in story.seconds.items():
        record_property(part, seconds)
    print(f"[team stack] seconds per part: {json.dumps(story.seconds, indent=2)}")
