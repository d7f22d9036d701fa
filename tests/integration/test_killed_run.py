"""A SIGKILLed `tuneloop run` leaves no Prefect server behind.

The real command starts Prefect's ephemeral API server and blocks in ingest
(a test hook holds it where it opens its source). It is killed with SIGKILL, which runs no
exit handler; the server must still go, because a watcher process stops it
once the pipe that only the command held is closed. SIGTERM is tried too: the
command exits and stops the server itself.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml


def servers_of(prefect_home: Path) -> list[int]:
    """Pids of Prefect API servers started with this PREFECT_HOME."""
    marker = f"PREFECT_HOME={prefect_home}".encode()
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if (proc.name.isdigit() and b"prefect.server.api.server:create_app" in (proc / "cmdline").read_bytes()
                    and marker in (proc / "environ").read_bytes().split(b"\0")):
                found.append(int(proc.name))
        except OSError:
            continue
    return found


# Loaded by the command's Python (sitecustomize on PYTHONPATH): when ingest opens the source,
# it says so in a file and holds there (a sleep, so a signal still ends it), never reading.
HOLD_AT_THE_SOURCE = """
import os, sys, time

def hold_at_the_source(event, args):
    if event == "open" and str(args[0]).endswith("source.csv"):
        with open(os.environ["TUNELOOP_TEST_REACHED"], "w"):
            pass
        while True:
            time.sleep(60)

sys.addaudithook(hold_at_the_source)
"""


def wait_for(condition, seconds: float, what: str):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.25)
    pytest.fail(f"{what} did not happen within {seconds} s")


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the servers through /proc")
@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_killed_run_leaves_no_prefect_server_behind(tmp_path, how):
    project, home = tmp_path / "project", tmp_path / "prefect"
    project.mkdir()
    (project / "source.csv").write_text("text,label\ngood,positive\n")
    hook, reached = tmp_path / "hook", tmp_path / "ingest-reached"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(HOLD_AT_THE_SOURCE)  # a run that never ends by itself
    params = {"ingest": {"source": "source.csv", "incoming_dir": None},
              "mlflow": {"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db"}}
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    env = {k: v for k, v in os.environ.items() if k not in {"PREFECT_API_URL", "MLFLOW_TRACKING_URI"}}
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false", TUNELOOP_TEST_REACHED=str(reached),
               PYTHONPATH=os.pathsep.join(filter(None, [str(hook), os.environ.get("PYTHONPATH")])))
    run = subprocess.Popen([sys.executable, "-m", "tuneloop.cli", "run", "--root", str(project)], env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        (server,) = wait_for(lambda: servers_of(home), 240, "the ephemeral Prefect server starting")
        wait_for(lambda: reached.exists() or run.poll() is not None, 240, "the flow's ingest opening its source")
        assert run.poll() is None and reached.exists()  # the flow is under way, held in ingest
        run.send_signal(how)
        run.wait(timeout=60)
        wait_for(lambda: not servers_of(home), 30, "the Prefect server exiting after its command died")
    finally:
        if run.poll() is None:
            run.kill()
        for pid in servers_of(home):  # never leave one behind, even when the test fails
            os.kill(pid, signal.SIGKILL)
    assert run.returncode == (-signal.SIGKILL if how == signal.SIGKILL else 128 + signal.SIGTERM)
