"""A team's servers on loopback, started for a test and stopped after it.

PostgreSQL (Debian's package, a throwaway cluster in a temporary folder),
moto's S3 server (the object store), an MLflow tracking server backed by
PostgreSQL that proxies artefacts to S3, and a Prefect server. Each `start_*`
returns once the server answers; `Stack.stop` ends every process it started.
Used by tests/integration/test_team_stack.py; README "Real servers" runs the
same commands by hand.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

BUCKET = "tuneloop"
PG_USER, PG_PASSWORD = "tuneloop", "tuneloop-test-password"
S3_KEYS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


class StackUnavailable(RuntimeError):
    """A server's software cannot be installed on this machine (the test skips, saying why)."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Stack:
    """The servers' addresses and the processes to stop."""

    tmp: Path
    processes: list[subprocess.Popen] = field(default_factory=list)
    postgres_dir: Path | None = None
    postgres_port: int = 0
    s3_url: str = ""
    mlflow_url: str = ""
    prefect_api: str = ""

    def postgres_url(self, database: str) -> str:
        return f"postgresql+psycopg://{PG_USER}:{PG_PASSWORD}@127.0.0.1:{self.postgres_port}/{database}"

    def stop(self) -> None:
        """Stops every process (newest first), then PostgreSQL, and deletes its cluster."""
        for process in reversed(self.processes):
            stop_process(process)
        if self.postgres_dir is not None:
            as_postgres_user([pg_bin("pg_ctl"), "-D", str(self.postgres_dir / "data"), "stop", "-m", "fast"],
                             check=False)
            shutil.rmtree(self.postgres_dir, ignore_errors=True)


def stop_process(process: subprocess.Popen) -> None:
    """SIGTERM to the process's group (servers fork workers), SIGKILL after 20 s."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, 15)
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, 9)
        process.wait(timeout=10)
    except ProcessLookupError:
        pass


def launch(stack: Stack, name: str, command: list[str], env: dict[str, str], cwd: Path | None = None
           ) -> subprocess.Popen:
    """Starts a server in its own process group, its output in `<tmp>/<name>.log`."""
    log = (stack.tmp / f"{name}.log").open("w")
    process = subprocess.Popen(command, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True)
    stack.processes.append(process)
    return process


def wait_for_http(url: str, process: subprocess.Popen, log: Path, limit_s: float = 180) -> None:
    """Returns once `url` answers 200.

    Raises:
        RuntimeError: the process died or `limit_s` passed, with the log's tail.
    """
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{url}: the server exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} did not answer within {limit_s} s:\n{log.read_text()[-3000:]}")


# --- PostgreSQL -----------------------------------------------------------------------------------


def pg_bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    if not found:
        raise StackUnavailable(f"PostgreSQL's {name} is not installed")
    return found[-1]


def install_postgres() -> None:
    """Installs Debian's `postgresql` package when initdb is missing (as root, with apt).

    Raises:
        StackUnavailable: not root, no apt-get, or the install failed.
    """
    if glob.glob("/usr/lib/postgresql/*/bin/initdb"):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise StackUnavailable("PostgreSQL is not installed and this user cannot apt-get install it")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "postgresql"]
    if subprocess.run(install, env=env, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True)
        done = subprocess.run(install, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise StackUnavailable(f"apt-get install postgresql failed: {done.stderr[-500:]}")


def as_postgres_user(command: list[str], check: bool = True) -> subprocess.CompletedProcess:
    """PostgreSQL refuses to run as root: as root, run it as the package's `postgres` user."""
    prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    done = subprocess.run(prefix + command, capture_output=True, text=True, timeout=120)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return done


def start_postgres(stack: Stack, databases: tuple[str, ...]) -> None:
    """A new cluster under /tmp (the postgres user cannot enter pytest's root-only
    folders), password login on 127.0.0.1 only, and one database per name."""
    install_postgres()
    folder = Path(tempfile.mkdtemp(prefix="tuneloop-pg-"))
    (folder / "password").write_text(PG_PASSWORD)
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres")
        shutil.chown(folder / "password", "postgres")
    stack.postgres_dir, stack.postgres_port = folder, free_port()
    as_postgres_user([pg_bin("initdb"), "-D", str(folder / "data"), "-U", PG_USER, "--auth=scram-sha-256",
                      f"--pwfile={folder / 'password'}", "--no-sync"])
    options = f"-p {stack.postgres_port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off"
    as_postgres_user([pg_bin("pg_ctl"), "-D", str(folder / "data"), "-o", options, "-l", str(folder / "log"),
                      "-w", "start"])
    import psycopg

    with psycopg.connect(stack.postgres_url("postgres").replace("+psycopg", ""), autocommit=True) as conn:
        for name in databases:
            conn.execute(f'CREATE DATABASE "{name}"')


# --- S3, MLflow, Prefect --------------------------------------------------------------------------


def start_s3(stack: Stack) -> subprocess.Popen:
    """moto's standalone server; the bucket is created once it answers (`wait_for_s3`)."""
    port = free_port()
    stack.s3_url = f"http://127.0.0.1:{port}"
    return launch(stack, "s3", [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                  {**os.environ, **S3_KEYS})


def s3_client(stack: Stack):
    import boto3

    return boto3.client("s3", endpoint_url=stack.s3_url, aws_access_key_id=S3_KEYS["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=S3_KEYS["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1")


def wait_for_s3(stack: Stack, process: subprocess.Popen) -> None:
    wait_for_http(f"{stack.s3_url}/moto-api/", process, stack.tmp / "s3.log")
    s3_client(stack).create_bucket(Bucket=BUCKET)


def start_mlflow(stack: Stack, database: str) -> subprocess.Popen:
    """`mlflow server` on PostgreSQL, proxying artefacts to s3://BUCKET/mlartifacts:
    only the server holds storage credentials."""
    port = free_port()
    stack.mlflow_url = f"http://127.0.0.1:{port}"
    env = {**os.environ, **S3_KEYS, "MLFLOW_S3_ENDPOINT_URL": stack.s3_url}
    env.pop("MLFLOW_TRACKING_URI", None)
    return launch(stack, "mlflow", [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1",
                                    "--port", str(port), "--workers", "1",
                                    "--backend-store-uri", stack.postgres_url(database), "--serve-artifacts",
                                    "--artifacts-destination", f"s3://{BUCKET}/mlartifacts"], env)


def prefect_env(stack: Stack) -> dict[str, str]:
    return {"PREFECT_API_URL": stack.prefect_api, "PREFECT_HOME": str(stack.tmp / "prefect-home"),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_SERVER_UI_ENABLED": "false"}


def start_prefect(stack: Stack, database: str | None = None) -> subprocess.Popen:
    """`prefect server start` on loopback; on PostgreSQL database `database` (as
    a team runs it: SQLite's single writer timed out API reads under the worker's load)."""
    port = free_port()
    stack.prefect_api = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, **prefect_env(stack)}
    if database:
        env["PREFECT_API_DATABASE_CONNECTION_URL"] = stack.postgres_url(database).replace("+psycopg", "+asyncpg")
    return launch(stack, "prefect", [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                                     "--port", str(port)], env)


def start_worker(stack: Stack, project: Path, env: dict[str, str], pool: str = "tuneloop") -> subprocess.Popen:
    """`prefect worker start --pool POOL` from the project folder, as the README says."""
    return launch(stack, "worker", [sys.executable, "-m", "prefect", "worker", "start", "--pool", pool],
                  {**env, "PREFECT_WORKER_QUERY_SECONDS": "2"}, cwd=project)
