"""`tuneloop deploy` against a real Prefect server on loopback: the deployments,
their schedules, the debounce limit, and the retrain trigger firing on the
event the incoming and monitor flows emit."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_SERVER_UI_ENABLED": "false", "PREFECT_API_URL": api}
    server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                               "--port", str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{api}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(1)
        else:
            pytest.fail("Prefect server did not start within 120 s")
        yield env
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.fixture(scope="module")
def deployed(prefect_server):
    result = subprocess.run([sys.executable, "-m", "tuneloop.cli", "deploy", "--root", str(REPO)],
                            env=prefect_server, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    api = prefect_server["PREFECT_API_URL"]
    deployments = httpx.post(f"{api}/deployments/filter", json={}, timeout=30).json()
    return {d["name"]: d for d in deployments}, api, prefect_server


def test_deploy_registers_retrain_monitor_and_incoming_with_schedules(deployed):
    deployments, _, _ = deployed
    assert set(deployments) == {"retrain", "monitor", "incoming"}
    crons = {name: [s["schedule"].get("cron") or s["schedule"].get("interval") for s in d["schedules"]]
             for name, d in deployments.items()}
    assert crons == {"retrain": ["0 3 * * 1"], "monitor": ["0 * * * *"], "incoming": [300.0]}
    assert all(d["work_pool_name"] == "tuneloop" for d in deployments.values())
    assert deployments["retrain"]["path"] == str(REPO) or deployments["retrain"]["pull_steps"]


def test_retraining_runs_one_at_a_time_and_drops_overlapping_triggers(deployed):
    deployments, _, _ = deployed
    limit = deployments["retrain"]["global_concurrency_limit"]
    assert limit["limit"] == 1
    assert deployments["retrain"]["concurrency_options"]["collision_strategy"] == "CANCEL_NEW"


def test_a_retrain_request_event_schedules_a_retrain_run(deployed):
    deployments, api, env = deployed
    code = ("from prefect.events import emit_event;"
            "emit_event('tuneloop.retrain.requested', resource={'prefect.resource.id': 'tuneloop.model.m'},"
            " payload={'reason': 'test'})")
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=120)
    retrain_id = deployments["retrain"]["id"]
    deadline = time.monotonic() + 60
    runs = []
    while time.monotonic() < deadline and not runs:
        runs = httpx.post(f"{api}/flow_runs/filter",
                          json={"deployments": {"id": {"any_": [retrain_id]}}}, timeout=30).json()
        time.sleep(2)
    assert runs, "the automation did not create a retrain flow run within 60 s"
