"""MLflow experiment tracking: one MLflow run per pipeline run, one child run per stage run.

The ingest stage opens the pipeline's run and records its id under `state/`;
every later stage logs through the client (no global active run), so the
Prefect flow, `dvc repro` and single `tuneloop <stage>` calls log alike.

What a run says must be what ran. Each stage run gets a child run of its own
holding its settings and numbers, so a stage run again after a params change
(`dvc repro`, `dvc exp run -S ...`, by hand) adds a run instead of rewriting
one. A pipeline run ends at registration (or failure); a stage run after that,
without a new ingest, opens a new pipeline run continuing the ended one (tag
`tuneloop.continues`), so each pipeline run registers at most one version.

A stage's run opens when the stage starts (`stage_run`) and ends with it
(FINISHED, or FAILED when the stage raised), so the UI shows a running stage as
RUNNING, its curves as they grow (finetune's loss), and its real duration. The
pipeline run carries the run's settings as params (`finetune.learning_rate`).
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import sqlite3
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence
from urllib.parse import urlparse
from urllib.request import url2pathname

from tuneloop.values.config import MlflowConfig
from tuneloop.values.workspace import Workspace, read_json, write_json

log = logging.getLogger("tuneloop.tracking")

# mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI: the value we set is not the user's.
_SET_HERE: set[str] = set()
ARTIFACTS = "mlartifacts"  # the local store's artefact folder, in the project
# Where MLflow's SQL store records artefact locations: absolute file:// URIs (or paths)
LOCATION_COLUMNS = (("experiments", "artifact_location"), ("runs", "artifact_uri"), ("model_versions", "source"),
                    ("model_versions", "storage_location"), ("logged_models", "artifact_location"))


def tracking_uri(config: MlflowConfig, root: Path) -> str:
    """Environment beats params beats the local default, so one variable
    points any project at a real MLflow server. A URI this process set for an
    earlier project does not count as the environment's."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env in _SET_HERE:
        env = None
    return env or config.tracking_uri or f"sqlite:///{(root / 'mlflow.db').resolve()}"


def project_database(uri: str, root: Path) -> Path | None:
    """The SQLite file behind `uri` when it exists inside the project folder `root`, else None."""
    if not uri.startswith("sqlite:///"):
        return None
    path = Path(uri.removeprefix("sqlite:///")).resolve()
    return path if path.is_file() and Path(root).resolve() in path.parents else None


def recorded_roots(connection: sqlite3.Connection) -> set[str]:
    """The project folders (file URIs) a store's experiments were made in: the
    folders whose `mlartifacts/` their artefact locations name."""
    locations = [row[0] or "" for row in connection.execute("SELECT artifact_location FROM experiments")]
    return {location.removesuffix(f"/{ARTIFACTS}") for location in locations
            if location.startswith("file://") and location.endswith(f"/{ARTIFACTS}")}


def relocate_store(database: Path, root: Path) -> list[str]:
    """After a project folder was copied or moved (`cp -a`, `mv`), points every
    artefact location its SQLite store records inside the old folder at the same
    place inside `root`. MLflow records absolute locations, so without this the
    copy would read, and write into, the original's `mlartifacts/`. Idempotent.

    Returns:
        The old folders (file URIs) the locations were moved from; empty when none were.
    """
    new_uri = Path(root).resolve().as_uri()
    connection = sqlite3.connect(database, timeout=60, isolation_level=None)
    try:  # closing without COMMIT rolls every rewrite back
        tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if "experiments" not in tables:
            return []
        connection.execute("BEGIN IMMEDIATE")  # one writer: two commands opening a copy rewrite it once
        moved = sorted(recorded_roots(connection) - {new_uri})
        for old_uri in moved:
            old_path, new_path = url2pathname(urlparse(old_uri).path), str(Path(root).resolve())
            for old, new in ((old_uri + "/", new_uri + "/"), (old_path + "/", new_path + "/")):
                for table, column in LOCATION_COLUMNS:
                    if table in tables:
                        connection.execute(f"UPDATE {table} SET {column} = ? || substr({column}, ?) "
                                           f"WHERE substr({column}, 1, ?) = ?", (new, len(old) + 1, len(old), old))
        connection.execute("COMMIT")
    finally:
        connection.close()
    for old_uri in moved:
        log.info("this project was copied or moved from %s: its MLflow store now names artefacts under %s",
                 old_uri, new_uri)
    return moved


def configure_tracking(config: MlflowConfig, root: Path) -> str:
    """Points MLflow at the tracking server and makes sure the experiment
    exists (artefacts in `mlartifacts/` for the local default). A project's own
    SQLite store that was copied or moved with the project is first pointed at
    its new folder (`relocate_store`).

    Returns:
        The experiment id.
    """
    import mlflow

    logging.getLogger("alembic").setLevel(logging.WARNING)  # migration chatter on first use
    logging.getLogger("mlflow.pyfunc").setLevel(logging.WARNING)  # "validating input example" at each registration
    uri = tracking_uri(config, root)
    database = project_database(uri, root)
    if database is not None:
        relocate_store(database, root)
    user_set = os.environ.get("MLFLOW_TRACKING_URI") == uri and uri not in _SET_HERE
    mlflow.set_tracking_uri(uri)
    if not user_set:
        _SET_HERE.add(uri)
    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name(config.experiment)
    if experiment is not None:
        return experiment.experiment_id
    location = (root / ARTIFACTS).resolve().as_uri() if uri.startswith("sqlite") else None
    # the UI opens a model-training experiment on its runs, not on the GenAI traces overview
    return client.create_experiment(config.experiment, artifact_location=location,
                                    tags={"mlflow.experimentKind": "custom_model_development"})


def process_started(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid apart."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def owner_tags() -> dict[str, str]:
    """Which process runs a pipeline run: how a later command tells a dead run from a live one."""
    pid = os.getpid()
    return {"tuneloop.pid": str(pid), "tuneloop.host": socket.gethostname(),
            "tuneloop.pid_started": process_started(pid) or ""}


def process_alive(pid: int, started: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: alive
    return not started or process_started(pid) in (None, started)


def running_runs(experiment: str) -> list:
    import mlflow

    found = mlflow.MlflowClient().get_experiment_by_name(experiment)
    if found is None:
        return []
    return mlflow.MlflowClient().search_runs([found.experiment_id], "attributes.status = 'RUNNING'", max_results=500)


def reap_dead_runs(experiment: str, keep: str | None = None) -> list[str]:
    """Marks KILLED every RUNNING pipeline run of this host whose process is dead
    (SIGKILL, power loss): without this it would read RUNNING forever.

    Args:
        keep: a run id to leave alone (the run a stage command continues, as under `dvc repro`).

    Returns:
        The run ids marked KILLED.
    """
    import mlflow

    client, host, reaped = mlflow.MlflowClient(), socket.gethostname(), []
    for run in running_runs(experiment):
        tags, run_id = run.data.tags, run.info.run_id
        pid = tags.get("tuneloop.pid", "")
        if run_id == keep or tags.get("tuneloop.host") != host or not pid.isdigit():
            continue
        if process_alive(int(pid), tags.get("tuneloop.pid_started")):
            continue
        client.set_tag(run_id, "tuneloop.outcome", f"killed: its process {pid} died while the run was running")
        client.set_terminated(run_id, status="KILLED")
        reaped.append(run_id)
    return reaped


def close_own_runs(experiment: str, status: str, outcome: str) -> list[str]:
    """Closes the RUNNING pipeline runs this process owns (a failure or a signal ended it)."""
    import mlflow

    client, mine, closed = mlflow.MlflowClient(), owner_tags(), []
    for run in running_runs(experiment):
        tags = run.data.tags
        if (tags.get("tuneloop.pid"), tags.get("tuneloop.host")) == (mine["tuneloop.pid"], mine["tuneloop.host"]):
            client.set_tag(run.info.run_id, "tuneloop.outcome", outcome)
            client.set_terminated(run.info.run_id, status=status)
            closed.append(run.info.run_id)
    return closed


def claim_run(workspace: Workspace) -> None:
    """A stage command continuing the recorded pipeline run becomes its owner."""
    import mlflow

    if not workspace.run_state.exists():
        return
    client = mlflow.MlflowClient()
    run_id = current_run_id(workspace)
    for key, value in owner_tags().items():
        client.set_tag(run_id, key, value)


PREFECT_TAG = "prefect.flow_run_id"  # on every run a Prefect flow made: the flow run to open in the Prefect UI
SOURCE_TAGS = ("mlflow.source.git.commit", "mlflow.source.name", "mlflow.source.type", PREFECT_TAG)


def prefect_flow_run_id() -> str | None:
    """The Prefect flow run this code runs inside, or None (a CLI stage, `dvc repro`)."""
    if "prefect" not in sys.modules:  # a process that never imported Prefect runs no flow
        return None
    from prefect.runtime import flow_run

    return flow_run.get_id()


def prefect_flow_name() -> str | None:
    """The name of the Prefect flow this code runs inside (`retrain`), or None."""
    from prefect.runtime import flow_run

    return flow_run.get_flow_name()


def source_tags(commit: str) -> dict[str, str]:
    """MLflow's standard source tags (the UI's Source column and git link), and
    the Prefect flow run when a flow runs the stage.

    Args:
        commit: the project's git HEAD, `-dirty` suffixed with local changes (`unknown` outside git).
    """
    flow_run = prefect_flow_run_id()
    tags = {"mlflow.source.type": "JOB",
            "mlflow.source.name": f"prefect flow {prefect_flow_name()}" if flow_run else f"tuneloop {cli_command()}"}
    if commit != "unknown":
        tags["mlflow.source.git.commit"] = commit.removesuffix("-dirty")
    if flow_run:
        tags[PREFECT_TAG] = str(flow_run)
    return tags


def cli_command() -> str:
    """The tuneloop subcommand running (`register`, `run` ...), or `stage` when not started by the CLI."""
    words = [w for w in sys.argv[1:] if not w.startswith("-")]
    return words[0] if words and Path(sys.argv[0]).name == "tuneloop" else "stage"


def run_name(stage: str, data_md5: str | None, detail: str = "") -> str:
    """What the MLflow UI lists: `finetune lora data:1a2b3c4d`."""
    return " ".join(part for part in (stage, detail, f"data:{data_md5[:8]}" if data_md5 else "") if part)


def start_pipeline_run(config: MlflowConfig, workspace: Workspace, tags: dict[str, str],
                       params: Mapping[str, str] | None = None, started_ms: int | None = None) -> str:
    """Opens the MLflow run of a new pipeline run and records its id (and, as
    tags, the process running it).

    Args:
        params: the run's settings, flattened (`flat_params`): the run's Parameters in the UI.
        started_ms: when the run began (epoch ms); None: now.
    """
    import mlflow

    experiment_id = configure_tracking(config, workspace.root)
    run = mlflow.MlflowClient().create_run(experiment_id, start_time=started_ms,
                                           run_name=run_name("retrain", tags.get("data.md5")),
                                           tags={**tags, **owner_tags()})
    log_new_params(run.info.run_id, params or {}, {})
    write_json(workspace.run_state, {"run_id": run.info.run_id, "experiment_id": experiment_id})
    return run.info.run_id


def recorded_run_id(workspace: Workspace) -> str:
    """The pipeline run recorded under `state/`, whether or not it has ended."""
    return read_json(workspace.run_state)["run_id"]


def current_run_id(workspace: Workspace) -> str:
    """The pipeline run stages log under: the recorded one while it runs, else
    a new one continuing it (recorded in its place)."""
    import mlflow

    state = read_json(workspace.run_state)
    run = mlflow.MlflowClient().get_run(state["run_id"])
    if run.info.status == "RUNNING":
        return run.info.run_id
    return continue_pipeline_run(workspace, state["experiment_id"], run)


def last_stage_run(workspace: Workspace, stage: str, data_md5: str) -> str | None:
    """The newest FINISHED run of `stage` on data version `data_md5` in the project's
    experiment (the run that trained what is being registered), or None."""
    import mlflow

    experiment_id = read_json(workspace.run_state)["experiment_id"]
    found = mlflow.MlflowClient().search_runs(
        [experiment_id], f"tags.`tuneloop.stage` = '{stage}' and tags.`data.md5` = '{data_md5}' "
                         "and attributes.status = 'FINISHED'", order_by=["attributes.start_time DESC"], max_results=1)
    return found[0].info.run_id if found else None


def continue_pipeline_run(workspace: Workspace, experiment_id: str, ended) -> str:
    """Opens the pipeline run that continues an ended one: same data tags, a
    link back (`tuneloop.continues`), recorded as the current pipeline run."""
    import mlflow

    tags = {k: v for k, v in ended.data.tags.items() if k.startswith("data.") or k in SOURCE_TAGS}
    tags["tuneloop.continues"] = ended.info.run_id
    name = run_name("retrain", tags.get("data.md5"), "continued")
    run = mlflow.MlflowClient().create_run(experiment_id, run_name=name,
                                           tags=tags)
    write_json(workspace.run_state, {"run_id": run.info.run_id, "experiment_id": experiment_id})
    return run.info.run_id


def start_stage_run(workspace: Workspace, stage: str, detail: str = "",
                    pipeline_params: Mapping[str, str] | None = None, started_ms: int | None = None) -> str:
    """A new run for one run of `stage`, child of the current pipeline run, named
    after the stage, `detail` and the data version, with the pipeline's source tags
    and, like a pipeline run, its process (so a killed stage's run is reaped KILLED).

    Args:
        pipeline_params: the run's flattened params (`flat_params`), logged on the
            pipeline run where it lacks them (a continued pipeline run starts without).
        started_ms: when the stage began (epoch ms); None: now.
    """
    import mlflow

    client = mlflow.MlflowClient()
    parent_id = current_run_id(workspace)
    parent_run = client.get_run(parent_id)
    parent = parent_run.data.tags
    log_new_params(parent_id, pipeline_params or {}, parent_run.data.params)
    experiment_id = read_json(workspace.run_state)["experiment_id"]
    inherited = {k: v for k, v in parent.items() if k in SOURCE_TAGS or k == "data.md5"}
    flow_run = prefect_flow_run_id()
    if flow_run:  # a stage the flow retried or resumed runs in a newer flow run than the pipeline run's
        inherited[PREFECT_TAG] = str(flow_run)
    run = client.create_run(experiment_id, start_time=started_ms,
                            run_name=run_name(stage, parent.get("data.md5"), detail),
                            tags={**inherited, **owner_tags(), "mlflow.parentRunId": parent_id,
                                  "tuneloop.stage": stage})
    return run.info.run_id


PARAM_KEY = re.compile(r"[^0-9A-Za-z_\-. :]")  # what MLflow accepts in a param name, less `/`
MAX_PARAM_KEY, MAX_PARAM_VALUE, PARAMS_PER_BATCH = 250, 6000, 100  # MLflow's limits (mlflow.utils.validation)


def flat_params(values: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested settings as MLflow params: {"finetune": {"learning_rate": 0.002}} ->
    {"finetune.learning_rate": "0.002"}. Lists are JSON; names keep only the
    characters MLflow accepts and values are cut to its limits."""
    out: dict[str, str] = {}
    for key, value in values.items():
        name = PARAM_KEY.sub("_", f"{prefix}{key}")[:MAX_PARAM_KEY]
        if isinstance(value, Mapping) and value:
            out.update(flat_params(value, f"{name}."))
        else:
            text = value if isinstance(value, str) else json.dumps(value, default=str)
            out[name] = text[:MAX_PARAM_VALUE]
    return out


def log_new_params(run_id: str, params: Mapping[str, str], logged: Mapping[str, str]) -> list[str]:
    """Logs the params `run_id` does not hold yet, 100 to a request. MLflow params
    never change: a key already logged keeps its value (a stage run again with
    other settings holds them on its own run).

    Returns:
        The keys logged.
    """
    import mlflow
    from mlflow.entities import Param

    new = [Param(key, value) for key, value in params.items() if key not in logged]
    for start in range(0, len(new), PARAMS_PER_BATCH):
        mlflow.MlflowClient().log_batch(run_id, params=new[start : start + PARAMS_PER_BATCH])
    return [param.key for param in new]


def flatten(prefix: str, values: Any) -> dict[str, float]:
    """Nested numeric values as MLflow metric names: {"a": {"b": 1}} -> {"prefix.a.b": 1.0}."""
    out: dict[str, float] = {}
    if isinstance(values, dict):
        for key, value in values.items():
            out.update(flatten(f"{prefix}.{key}" if prefix else str(key), value))
    elif isinstance(values, (int, float)) and not isinstance(values, bool):
        out[prefix] = float(values)
    return out


def curve_metrics(stage: str, curves: Mapping[str, Sequence[tuple[int, float]]], now: int) -> list:
    """{name: [(step, value), ...]} as MLflow metrics `stage.name` at their steps: the UI's charts."""
    from mlflow.entities import Metric

    return [Metric(f"{stage}.{name}", float(value), now, int(step))
            for name, points in curves.items() for step, value in points]


@dataclass(frozen=True)
class StageRun:
    """One stage's open MLflow run and the pipeline run it is a child of."""

    run_id: str
    pipeline_id: str
    stage: str


def now_ms() -> int:
    return int(time.time() * 1000)


@contextmanager
def stage_run(workspace: Workspace, stage: str, params: Mapping[str, Any] | None = None, detail: str = "",
              pipeline_params: Mapping[str, str] | None = None, started_ms: int | None = None) -> Iterator[StageRun]:
    """The MLflow run of one run of `stage`, open while the stage works: RUNNING
    in the UI, its metrics there as they are logged, its duration the stage's.
    It ends FINISHED when the block ends, FAILED when it raises an error, KILLED
    when a signal stops it (Ctrl-C, SIGTERM as SystemExit, Prefect's
    TerminationSignal: any BaseException that is not an Exception).

    Args:
        params: the stage's settings, logged as `stage.key` params.
        detail: words the run's name adds after the stage (`lora`).
        pipeline_params: the run's flattened params, for the pipeline run (`start_stage_run`).
        started_ms: when the stage began (epoch ms), for a stage whose run opens after its work.
    """
    import mlflow
    from mlflow.entities import Param

    client = mlflow.MlflowClient()
    run = StageRun(start_stage_run(workspace, stage, detail, pipeline_params, started_ms),
                   current_run_id(workspace), stage)
    settings = [Param(f"{stage}.{k}", str(v)[:MAX_PARAM_VALUE]) for k, v in (params or {}).items()]
    for start in range(0, len(settings), PARAMS_PER_BATCH):
        client.log_batch(run.run_id, params=settings[start : start + PARAMS_PER_BATCH])
    try:
        yield run
    except Exception as error:
        end_stage_run(run.run_id, "FAILED", f"failed: {type(error).__name__}: {error}")
        raise
    except BaseException as signal:
        end_stage_run(run.run_id, "KILLED", f"killed during {stage} ({type(signal).__name__})")
        raise
    client.set_terminated(run.run_id)


def end_stage_run(run_id: str, status: str, outcome: str) -> None:
    """Ends a stage's run with its outcome, unless the MLflow server is what failed
    (the error that stopped the stage is then the one to tell; the reaper ends it)."""
    import mlflow

    try:
        client = mlflow.MlflowClient()
        client.set_tag(run_id, "tuneloop.outcome", outcome[:MAX_PARAM_VALUE])
        client.set_terminated(run_id, status=status)
    except Exception as error:  # noqa: BLE001 - the stage's own error propagates instead
        log.warning("could not end the stage's MLflow run %s %s: %s", run_id, status, error)


def log_stage_metrics(run: StageRun, metrics: Any, step: int = 0) -> None:
    """Logs a stage's numbers (nested dicts become `stage.a.b`) to its run and the
    pipeline's run (latest value first, earlier ones kept as metric history)."""
    import mlflow
    from mlflow.entities import Metric

    now = now_ms()
    metric_list = [Metric(k, v, now, step) for k, v in flatten(run.stage, metrics or {}).items()]
    if metric_list:
        for run_id in (run.run_id, run.pipeline_id):
            mlflow.MlflowClient().log_batch(run_id, metrics=metric_list)


def set_stage_tags(run: StageRun, tags: Mapping[str, str]) -> None:
    """Tags on the stage's run (values cut to MLflow's limit): what names mean (`baseline.candidate.0`)."""
    import mlflow
    from mlflow.entities import RunTag

    mlflow.MlflowClient().log_batch(run.run_id, tags=[RunTag(k, str(v)[:MAX_PARAM_VALUE]) for k, v in tags.items()])


def log_points(run: StageRun, step: int, values: Mapping[str, float]) -> None:
    """Logs {name: value} at `step` as `stage.name` on the stage's and the
    pipeline's runs: one point of a live curve (loss while training)."""
    log_stage_metrics(run, dict(values), step)


def log_curves(run: StageRun, curves: Mapping[str, Sequence[tuple[int, float]]]) -> None:
    """{name: [(step, value), ...]} at their steps, at once (a curve made in other processes)."""
    import mlflow

    metric_list = curve_metrics(run.stage, curves, now_ms())
    for start in range(0, len(metric_list), 1000):  # MLflow's metrics per request
        for run_id in (run.run_id, run.pipeline_id):
            mlflow.MlflowClient().log_batch(run_id, metrics=metric_list[start : start + 1000])


def log_stage_artifacts(run: StageRun, artifacts: Iterable[Path]) -> None:
    """Files under `stage/`, folders under `stage/<folder name>/`, on the stage's run."""
    import mlflow

    client = mlflow.MlflowClient()
    for path in artifacts:
        path = Path(path)
        if path.is_dir():
            client.log_artifacts(run.run_id, str(path), artifact_path=f"{run.stage}/{path.name}")
        elif path.exists():
            client.log_artifact(run.run_id, str(path), artifact_path=run.stage)


def log_stage(workspace: Workspace, stage: str, metrics: Any = None, params: dict | None = None,
              artifacts: Iterable[Path] = (), curves: Mapping[str, Sequence[tuple[int, float]]] | None = None,
              detail: str = "", started_ms: int | None = None) -> str:
    """Logs one run of a stage whose work is done (ingest, whose data version
    names the pipeline run, so its run cannot open before): its settings,
    numbers and files in a new child run of the pipeline's run, dated from
    `started_ms` so its duration is the stage's.

    Returns:
        The stage run's id.
    """
    with stage_run(workspace, stage, params, detail, started_ms=started_ms) as run:
        log_stage_metrics(run, metrics)
        log_curves(run, curves or {})
        log_stage_artifacts(run, artifacts)
    return run.run_id


def log_dataset(run_ids: Sequence[str], frame, data_md5: str, path: str, name: str, context: str) -> None:
    """Logs `frame` as an MLflow dataset input of each run: the UI's Datasets
    column. Its digest is the data version's DVC md5, so a dataset in MLflow
    and `dvc` name the same snapshot; its source is the DVC-tracked path."""
    import warnings

    import mlflow
    from mlflow.data.pandas_dataset import from_pandas  # what mlflow.data.from_pandas is, bound at run time
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    with warnings.catch_warnings():  # MLflow warns that several source kinds could read a plain path
        warnings.simplefilter("ignore", UserWarning)
        dataset = from_pandas(frame, source=path, name=name, digest=data_md5,
                              targets="label" if "label" in frame.columns else None)
        entity = dataset._to_mlflow_entity()  # infers the schema: warns about integer columns
    entry = DatasetInput(entity, tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)])
    for run_id in run_ids:
        mlflow.MlflowClient().log_inputs(run_id, datasets=[entry])


def end_pipeline_run(workspace: Workspace, status: str = "FINISHED") -> None:
    import mlflow

    mlflow.MlflowClient().set_terminated(recorded_run_id(workspace), status=status)
