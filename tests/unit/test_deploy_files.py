"""deploy/: the compose stack wires its services together, the image installs
what the services run, and the Kubernetes work-pool template asks for a GPU
in the shape Prefect's kubernetes worker accepts. Images are not pulled or
built here; `docker compose config` runs when a compose CLI is installed."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
TUNELOOP_SERVICES = {"mlflow", "prefect-server", "worker", "serve"}


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())  # anchors and `<<:` merges resolved


def env(service: dict) -> dict[str, str]:
    """A service's environment with ${VAR:-default} replaced by its default."""
    return {k: re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", str(v)) for k, v in service.get("environment", {}).items()}


def test_the_stack_has_every_service_and_tuneloop_ones_run_the_tuneloop_image(compose) -> None:
    services = compose["services"]
    assert set(services) == {"postgres", "minio", "minio-bucket", "mlflow", "prefect-server", "worker", "serve"}
    assert {services[name]["image"] for name in TUNELOOP_SERVICES} == {"${TUNELOOP_IMAGE:-tuneloop:cpu}"}
    published = {name: [str(p).split(":")[0] for p in s.get("ports", [])] for name, s in services.items()}
    assert published == {"postgres": [], "minio": ["9001"], "minio-bucket": [], "mlflow": ["5000"],
                         "prefect-server": ["4200"], "worker": [], "serve": ["8000"]}


def test_mlflow_serves_artifacts_from_the_object_store_with_postgres_behind_it(compose) -> None:
    mlflow = compose["services"]["mlflow"]
    flags = dict(arg.removeprefix("--").split("=", 1) if "=" in arg else (arg.removeprefix("--"), True)
                 for arg in mlflow["command"][2:])
    assert flags["serve-artifacts"] is True and flags["artifacts-destination"].startswith("s3://mlflow/")
    backend = urlparse(re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", flags["backend-store-uri"]))
    assert (backend.scheme, backend.hostname, backend.path) == ("postgresql", "postgres", "/mlflow")
    assert urlparse(env(mlflow)["MLFLOW_S3_ENDPOINT_URL"]).hostname == "minio"
    assert env(mlflow)["AWS_ACCESS_KEY_ID"] == env(compose["services"]["minio"])["MINIO_ROOT_USER"]
    assert "mlflow:5000" in flags["allowed-hosts"].split(",")  # the other services' Host header
    assert mlflow["depends_on"]["minio-bucket"]["condition"] == "service_completed_successfully"


def test_every_database_a_service_names_is_created_in_postgres(compose) -> None:
    services = compose["services"]
    created = set(re.findall(r"CREATE DATABASE (\w+);", (DEPLOY / "postgres-init.sql").read_text()))
    created.add(env(services["postgres"])["POSTGRES_DB"])
    urls = [env(services["prefect-server"])["PREFECT_API_DATABASE_CONNECTION_URL"],
            env(services["worker"])["TUNELOOP_STORE_URL"], env(services["serve"])["TUNELOOP_STORE_URL"]]
    named = {urlparse(url).path.lstrip("/") for url in urls} | {"mlflow"}
    assert named == created == {"mlflow", "prefect", "predictions"}
    assert {urlparse(url).hostname for url in urls} == {"postgres"}


def test_worker_and_service_reach_prefect_and_mlflow_by_service_name(compose) -> None:
    services = compose["services"]
    for name in ("worker", "serve"):
        variables = env(services[name])
        assert urlparse(variables["PREFECT_API_URL"]).netloc == "prefect-server:4200"
        assert urlparse(variables["MLFLOW_TRACKING_URI"]).netloc == "mlflow:5000"
        assert variables["TUNELOOP_PROJECT"] == "/project" and services[name]["volumes"][0].endswith(":/project")
    assert services["worker"]["command"] == ["prefect", "worker", "start", "--pool", "tuneloop", "--type", "process"]
    assert "tuneloop" in (DEPLOY / "prefect.yaml").read_text()  # the pool the deployments name
    assert services["serve"]["command"][:2] == ["tuneloop", "serve"] and "0.0.0.0" in services["serve"]["command"]
    assert env(services["serve"])["TUNELOOP_TOKENS_FILE"].startswith("/run/secrets/")  # no tokens: no non-loopback bind


@pytest.mark.skipif(not (shutil.which("docker-compose") or shutil.which("docker")), reason="no compose CLI")
def test_compose_cli_accepts_the_file(tmp_path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("")
    for command in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(command[0]) is None or subprocess.run([*command, "version"], capture_output=True).returncode:
            continue  # not installed, or docker without the compose plugin
        done = subprocess.run([*command, "-f", str(DEPLOY / "docker-compose.yml"), "config", "--quiet"],
                              capture_output=True, text=True, env={"PATH": "/usr/bin:/usr/local/bin:/bin",
                                                                   "TUNELOOP_TOKENS_FILE": str(tokens)})
        assert done.returncode == 0, done.stderr
        return
    pytest.skip("docker has no compose plugin and docker-compose is not installed")


def test_the_image_installs_torch_from_a_build_arg_index_and_the_servers_clients() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu$", text, re.M)
    assert 'pip install --index-url "${TORCH_INDEX}"' in text
    copied = set(re.findall(r"^COPY (\w+) \1$", text, re.M))
    assert copied == {"tuneloop", "flows", "tasks"}  # pyproject's package-dir folders
    assert "psycopg2-binary" in text and "boto3" in text


@pytest.fixture(scope="module")
def job_template() -> dict:
    return json.loads((DEPLOY / "k8s-gpu-job-template.json").read_text())


def test_the_job_template_passes_prefect_servers_work_pool_validation(job_template) -> None:
    from prefect.server.schemas.actions import WorkPoolCreate

    pool = WorkPoolCreate(name="tuneloop-gpu", type="kubernetes", base_job_template=job_template)
    assert set(pool.base_job_template) == {"job_configuration", "variables"}
    # the fields prefect-kubernetes 0.8's KubernetesWorkerJobConfiguration reads
    assert set(job_template["job_configuration"]) == {
        "command", "env", "labels", "name", "namespace", "annotations", "cluster_config", "job_manifest",
        "job_watch_timeout_seconds", "pod_watch_timeout_seconds", "stream_output"}


def test_a_rendered_training_job_requests_one_gpu_in_the_container_prefect_runs(job_template) -> None:
    from prefect.utilities.templating import apply_values

    defaults = {k: v["default"] for k, v in job_template["variables"]["properties"].items() if "default" in v}
    manifest = apply_values(job_template["job_configuration"], {**defaults, "name": "retrain", "command": "x"})[
        "job_manifest"]
    pod = manifest["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["name"] == "prefect-job"  # what the worker requires, with these:
    assert (pod["restartPolicy"], pod["parallelism"], pod["completions"]) == ("Never", 1, 1)
    assert (manifest["apiVersion"], manifest["kind"]) == ("batch/v1", "Job")
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["image"] == "tuneloop:cuda"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    claims = [v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v]
    assert claims == ["tuneloop-project"] and container["workingDir"] == "/project"
