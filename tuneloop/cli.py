"""`tuneloop`: the one entry point for users, `dvc.yaml` stages and deployments.

    tuneloop init DATA [DIR]      a project for your own labelled file (params.yaml fitted to it)
    tuneloop run [--tune]         the whole retraining flow (Prefect); --tune searches settings first
    tuneloop status --json        the registered model, its champion, the last decision
    tuneloop <stage>              one stage: ingest, validate, split, baseline, tune,
                                  finetune, evaluate, gate, register (what dvc.yaml calls)
    tuneloop finetune --nproc N   fine-tuning in N DDP processes (torchrun)
    tuneloop tune --workers N     N processes search one Optuna study
    tuneloop restore-data VERSION the exact data a registered version was trained on
    tuneloop serve                the champion behind an HTTP API, following the alias
    tuneloop rollback [--to V]    move `champion` back to `previous` (or to V)
    tuneloop shadow VERSION       score VERSION beside the champion until `monitor` promotes or discards it
    tuneloop monitor              drift, live metrics and automatic rollback of the champion

An expected failure (bad data, bad params, a missing file, no champion, an
MLflow server that does not answer) prints one message and exits 2; `--debug`
anywhere on the line shows its traceback.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn, Optional

import typer

# rich_markup_mode=None: plain Click help, where a flag reads `--tune / --no-tune` (Typer's rich
# help writes `<bool>` after every flag) and no rich import slows each command's start.
app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
                  help="Keep a fine-tuned text classifier good in production.")

ParamsOption = typer.Option(Path("params.yaml"), "--params", help="params.yaml, relative to --root")
RootOption = typer.Option(Path("."), "--root", help="the project folder (workspace root)")
SetOption = typer.Option(None, "--set", metavar="SECTION.KEY=VALUE",
                         help="override one params.yaml value, e.g. --set finetune.epochs=2 (repeatable; "
                              "the value is YAML; checked like params.yaml)")


def print_version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"tuneloop {version('tuneloop')}")
        raise typer.Exit()


@app.callback()
def entry(version: bool = typer.Option(False, "--version", callback=print_version, is_eager=True,
                                       help="print tuneloop's version and exit"),
          debug: bool = typer.Option(False, "--debug", help="show the traceback of a failure that otherwise ends in "
                                     "one line, and library warnings (anywhere on the line: tuneloop run --debug)")
          ) -> None:
    """Keep a fine-tuned text classifier good in production."""


def offline_environment() -> None:
    """Nothing is fetched from a model hub or phoned home at run time."""
    for key, value in {
        "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
        "TOKENIZERS_PARALLELISM": "false", "DVC_NO_ANALYTICS": "1", "GX_ANALYTICS_ENABLED": "false",
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false", "TRANSFORMERS_VERBOSITY": "error",
        "PREFECT_LOGGING_LEVEL": "WARNING", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1",  # DO_NOT_TRACK: Evidently's telemetry
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",  # a busy 2-core machine needs more than 20 s
    }.items():
        os.environ.setdefault(key, value)


# Library deprecation notices (transformers, PEFT, torch ...) speak to developers, not to someone
# reading one line per stage; PYTHONWARNINGS carries the choice into torchrun's and tune's workers.
QUIET_WARNINGS = "ignore::FutureWarning,ignore::DeprecationWarning"


def quiet_library_warnings() -> None:
    """FutureWarning and DeprecationWarning are not shown, here or in the
    processes this one starts, unless the user chose otherwise (PYTHONWARNINGS, -W)."""
    import warnings

    if os.environ.get("PYTHONWARNINGS") or sys.warnoptions:
        return
    os.environ["PYTHONWARNINGS"] = QUIET_WARNINGS
    for category in (FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category)


def fail(message: str, code: int = 2) -> NoReturn:
    typer.secho(message, fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def load(params: Path, root: Path, sets: Optional[list[str]] = None):
    """Validates params (with the `--set` overrides) once, at the edge; returns (params, workspace)."""
    from tuneloop.pipeline.params import ParamsError, load_params
    from tuneloop.values.workspace import Workspace

    root = root.resolve()
    try:
        return load_params(root / params, sets or ()), Workspace(root)
    except ParamsError as error:
        fail(str(error))


@contextmanager
def writing(loaded, workspace, command: str, continues_run: bool = False):
    """Holds the project's writer lock (refusing clearly when another command
    has it), marks runs whose process died KILLED, and closes this process's
    own runs FAILED or KILLED when the command dies of an error or a signal."""
    from tuneloop.plumbing import tracking
    from tuneloop.plumbing.lock import ProjectBusy, project_lock

    try:
        lock = project_lock(workspace.root, command)
        lock.__enter__()
    except ProjectBusy as error:
        fail(str(error))
    try:
        tracking.configure_tracking(loaded.mlflow, workspace.root)
        keep = tracking.current_run_id(workspace) if continues_run and workspace.run_state.exists() else None
        tracking.reap_dead_runs(loaded.mlflow.experiment, keep=keep)
        if keep:
            tracking.claim_run(workspace)
        yield
    except (KeyboardInterrupt, SystemExit) as error:
        close_own_runs(loaded, "KILLED", f"killed: {type(error).__name__} in {command}")
        raise
    except Exception as error:
        if not isinstance(error, typer.Exit):
            close_own_runs(loaded, "FAILED", f"failed in {command}: {type(error).__name__}")
        raise
    finally:
        lock.__exit__(None, None, None)


def close_own_runs(loaded, status: str, outcome: str) -> None:
    """Closes this process's runs, unless the MLflow server is what failed: the
    error that stopped the command is then the one to tell, and the next
    command's reaper marks the runs KILLED."""
    from tuneloop.plumbing import tracking
    from tuneloop.tasks import registry

    try:
        tracking.close_own_runs(loaded.mlflow.experiment, status, outcome)
    except Exception as error:
        if not registry.unreachable(error):
            raise


SIGNALLED: list[int] = []  # the signal that stopped this command, once one has


def terminate_on_sigterm() -> None:
    """SIGTERM ends the command like Ctrl-C: exit handlers run (Prefect's
    temporary server stops) and the command's MLflow run is closed KILLED."""
    def stop(signum, frame):
        SIGNALLED.append(signum)
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)


def run_stage(name: str, params: Path, root: Path, sets: Optional[list[str]] = None, **options) -> None:
    from tuneloop.pipeline import stages

    loaded, workspace = load(params, root, sets)
    with writing(loaded, workspace, name, continues_run=name != "ingest"):
        getattr(stages, name)(loaded, workspace, **options)


def stage_command(name: str, doc: str) -> None:
    def command(params: Path = ParamsOption, root: Path = RootOption, sets: Optional[list[str]] = SetOption) -> None:
        run_stage(name, params, root, sets)

    command.__doc__ = doc
    app.command(name)(command)


def stage_commands(docs: dict[str, str]) -> None:
    for name, doc in docs.items():
        stage_command(name, doc)


stage_commands({
    "ingest": "Read the source, snapshot it under DVC, push it, print its version.",
    "validate": "Run the Great Expectations suite; stop on a blocking rule.",
    "split": "Train/validation/test by a hash of each row's normalised text: duplicates share a split and no "
             "row changes split as the data grows (a declared split column is kept).",
    "baseline": "Base model's linear probe and zero-shot scores on the test split.",
})


@app.command("tune")
def tune_command(params: Path = ParamsOption, root: Path = RootOption, sets: Optional[list[str]] = SetOption,
                 workers: int = typer.Option(1, "--workers", min=1, help="search the study in N processes "
                                             "on this machine (they stop together at tune.n_trials)")) -> None:
    """Optuna search over tune.space (if tune.enabled); the best settings feed finetune."""
    run_stage("tune", params, root, sets, workers=workers)


@app.command("finetune")
def finetune_command(params: Path = ParamsOption, root: Path = RootOption, sets: Optional[list[str]] = SetOption,
                     nproc: int = typer.Option(1, "--nproc", min=1, help="train in N DDP processes on this machine "
                                               "(torchrun: gloo on CPU, NCCL with one GPU per process)")) -> None:
    """LoRA (or full) fine-tuning with early stopping and checkpoints."""
    run_stage("finetune", params, root, sets, nproc=nproc)


stage_commands({
    "evaluate": "Score base probe, champion and challenger on the same test rows.",
    "gate": "Decide promotion and print every reason.",
    "register": "Register the challenger; move `champion` if the gate passed.",
})


@app.command()
def init(data: Path = typer.Argument(..., help="your labelled file: CSV (, ; tab), JSON Lines or Parquet"),
         folder: Path = typer.Argument(Path("."), help="the project folder (created if needed)"),
         text: Optional[str] = typer.Option(None, "--text", help="the text column (default: proposed)"),
         label: Optional[str] = typer.Option(None, "--label", help="the label column (default: proposed)"),
         split: Optional[str] = typer.Option(None, "--split-column",
                                             help="a column of train/validation/test (default: proposed if any)"),
         model: str = typer.Option("all-MiniLM-L6-v2", "--model", help="base model: the bundled one or a local folder"),
         force: bool = typer.Option(False, "--force/--no-force", help="overwrite an existing params.yaml")) -> None:
    """Start a project for your own labelled file: params.yaml fitted to it, git and DVC set up."""
    from tuneloop.init import init_project

    proposal = init_project(data, folder, text, label, split, model, force)
    columns = proposal.columns
    typer.echo(f"read {proposal.rows} rows of {data}: text column {columns.text!r}, label column {columns.label!r} "
               f"({len(proposal.labels)} labels), split "
               + (f"column {columns.split!r}" if columns.split else "drawn by tuneloop (no split column)")
               + (f", slices {list(columns.slices)}" if columns.slices else ""))
    for note in proposal.notes:
        typer.echo(f"  {note}")
    typer.echo(f"wrote {folder.resolve() / 'params.yaml'}; next:\n  cd {folder} && tuneloop run")


@app.command()
def run(params: Path = ParamsOption, root: Path = RootOption,
        tune: bool = typer.Option(False, "--tune/--no-tune",
                                  help="search finetune's settings first (tune.enabled: true)"),
        commit: Optional[bool] = typer.Option(None, "--commit/--no-commit", show_default=False,
                                              help="commit dvc.lock, metrics/, plots/, params.yaml and "
                                              "data/raw/*.dvc after a run with params.yaml's values, so `dvc "
                                              "metrics diff HEAD~1` shows what changed against the previous run "
                                              "[default: ingest.commit_iterations, true as shipped]"),
        sets: Optional[list[str]] = SetOption) -> None:
    """Run the whole retraining flow and print the decision."""
    from tuneloop.values.errors import TuneloopError

    loaded, workspace = load(params, root, sets)
    from tuneloop.flows.ephemeral import start_ephemeral_server
    from tuneloop.flows.retrain import retrain_flow

    with writing(loaded, workspace, "run"):
        start_ephemeral_server(workspace.prefect_server_log)  # dies with this command, even a SIGKILLed one
        try:
            result = retrain_flow(params_path=str(params), root=str(workspace.root), tune_settings=tune,
                                  overrides=sets or [], commit=commit)
        except TuneloopError as error:
            from tuneloop.tasks.registry import RegistryUnavailable

            if os.environ.get("TUNELOOP_DEBUG"):
                raise
            unchanged = "" if isinstance(error, RegistryUnavailable) else ", the registry is unchanged"
            fail(f"retraining stopped{unchanged}:\n{error}")
    verdict = "made the shadow (tuneloop monitor decides)" if result.get("shadow") else \
        "promoted to champion" if result["promoted"] else "not promoted"
    typer.echo(f"\n{result['model']} version {result['version']} {verdict}; "
               f"champion: version {result['champion']}")
    typer.echo(f"report: {workspace.evaluation_report}")


@app.command()
def status(params: Path = ParamsOption, root: Path = RootOption,
           as_json: bool = typer.Option(False, "--json/--table", help="print JSON instead of a table"),
           sets: Optional[list[str]] = SetOption) -> None:
    """The registered model, its champion (data version, test metrics) and the last run's decision."""
    from tuneloop.plumbing.tracking import configure_tracking, reap_dead_runs
    from tuneloop.tasks.registry import model_status

    loaded, workspace = load(params, root, sets)
    configure_tracking(loaded.mlflow, workspace.root)
    reap_dead_runs(loaded.mlflow.experiment)  # a killed run reads KILLED, not RUNNING forever
    info = model_status(loaded.mlflow.model_name, loaded.mlflow.experiment)
    typer.echo(json.dumps(info, indent=2) if as_json else status_table(info))


def status_table(info: dict) -> str:
    """`tuneloop status` as two aligned columns, one fact per row."""
    champion, last = info["champion"] or {}, info["last_run"] or {}
    test = champion.get("test", {})
    rows = [
        ("model", info["model"]),
        ("versions", str(info["versions"])),
        ("champion", f"version {champion['version']}" if champion else "none yet (run `tuneloop run`)"),
    ]
    if champion:
        rows += [
            ("  data version", str(champion.get("data_md5") or "-")[:8]),
            ("  test macro-F1", f"{test['macro_f1']:.4f}" if "macro_f1" in test else "-"),
            ("  test accuracy", f"{test['accuracy']:.4f}" if "accuracy" in test else "-"),
            ("  test ECE", f"{test['ece']:.4f}" if "ece" in test else "-"),
        ]
    rows += [
        ("previous", f"version {info['previous']}" if info.get("previous") else "-"),
        *([("shadow", f"version {info['shadow']} (`tuneloop monitor` decides)")] if info.get("shadow") else []),
        ("last run", f"{last['outcome']} ({last['status']})" + (f", version {last['version']}" if last.get("version")
                                                                 else "") if last else "none"),
    ]
    if info["incomplete"]:
        rows.append(("unfinished", f"versions {', '.join(info['incomplete'])} (never served)"))
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


@app.command()
def incoming(params: Path = ParamsOption, root: Path = RootOption,
             sets: Optional[list[str]] = SetOption) -> None:
    """Retrain if data/incoming/ holds enough new labelled rows (what the `incoming` deployment runs)."""
    loaded, workspace = load(params, root, sets)
    from tuneloop.flows.ephemeral import start_ephemeral_server
    from tuneloop.flows.incoming import incoming_flow

    with writing(loaded, workspace, "incoming"):
        start_ephemeral_server(workspace.prefect_server_log)
        result = incoming_flow(params_path=str(params), root=str(workspace.root), overrides=sets or [])
    typer.echo(json.dumps({k: v for k, v in result.items() if k != "request"}, indent=2))


@app.command()
def monitor(params: Path = ParamsOption, root: Path = RootOption,
            as_json: bool = typer.Option(False, "--json/--summary", help="print the whole summary as JSON"),
            sets: Optional[list[str]] = SetOption) -> None:
    """Drift, live metrics and automatic rollback of the champion (what the `monitor` deployment runs)."""
    loaded, workspace = load(params, root, sets)
    from tuneloop.flows.ephemeral import start_ephemeral_server
    from tuneloop.flows.monitor import monitor_flow

    with writing(loaded, workspace, "monitor"):
        start_ephemeral_server(workspace.prefect_server_log)
        result = monitor_flow(params_path=str(params), root=str(workspace.root), overrides=sets or [])
    if as_json:
        typer.echo(json.dumps(result, indent=2, default=str))
        return
    if result["champion"] is None:
        return
    rollback = result["rollback"]
    typer.echo(f"\n{result['model']} v{result['champion']}: drift {result['drift']['status']}, "
               f"{'rolled back to v' + str(rollback['to']) if rollback['rolled_back'] else 'no rollback'}, "
               f"{'retraining requested' if result['retraining']['requested'] else 'no retraining'}")
    if "shadow" in result:
        from tuneloop.flows.monitor import shadow_line

        typer.echo(shadow_line(result["shadow"]))
    typer.echo(f"report: {result['report'] or '(none: too few predictions)'}; MLflow run {result['run_id']}")


def deployment_file(root: Path) -> Path:
    """The project's own deploy/prefect.yaml, else the one beside tuneloop's sources
    (a project made by `tuneloop init` has none)."""
    import tuneloop.flows

    for candidate in (root / "deploy" / "prefect.yaml",
                      Path(tuneloop.flows.__file__).resolve().parents[1] / "deploy" / "prefect.yaml"):
        if candidate.exists():
            return candidate
    fail(f"no deploy/prefect.yaml in {root}: copy tuneloop's deploy/prefect.yaml there")


@app.command()
def deploy(root: Path = RootOption) -> None:
    """Register the retrain, monitor and incoming deployments (deploy/prefect.yaml) with $PREFECT_API_URL."""
    import subprocess

    if not os.environ.get("PREFECT_API_URL"):
        fail("PREFECT_API_URL is not set: start a server (`prefect server start`) and export "
             "PREFECT_API_URL=http://127.0.0.1:4200/api first")
    root = root.resolve()
    env = {**os.environ, "TUNELOOP_PROJECT": str(root)}
    prefect = [sys.executable, "-m", "prefect", "--no-prompt"]
    pool = "tuneloop"  # the process work pool named in deploy/prefect.yaml
    pools = subprocess.run([*prefect, "work-pool", "ls"], env=env, capture_output=True, text=True)
    if pool not in pools.stdout:
        subprocess.run([*prefect, "work-pool", "create", pool, "--type", "process"], env=env, check=True)
    done = subprocess.run([*prefect, "deploy", "--all", "--prefect-file", str(deployment_file(root))],
                          cwd=root, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        fail(f"prefect deploy failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    typer.echo(f"deployments registered with {os.environ['PREFECT_API_URL']}; run them with:\n"
               f"  prefect worker start --pool {pool}")


@app.command()
def demo(root: Path = RootOption,
         movies: int = typer.Option(0, min=0, help="movie reviews the first model trains on (0: all 10,605; "
                                    "a few thousand rows do not beat the base probe with confidence)"),
         tweets: int = typer.Option(3500, min=1, help="tweets sent (and labelled) before the first monitoring "
                                    "run; fewer dilute their gain in a test split of mostly movie reviews"),
         later_tweets: int = typer.Option(160, min=1, help="tweets sent to the forced bad version"),
         workspace: Path = typer.Option(Path("/tmp/tuneloop-demo"), help="the demo's own project folder "
                                        "(new, empty, or one the demo made; outside this repo)")) -> None:
    """Play the production story on the shipped data: train, serve, drift, retrain, shadow on live traffic,
    promotion, bad version, rollback, shadow discarded."""
    from tuneloop.demo import DemoError, fresh_workspace, run_demo
    from tuneloop.flows.ephemeral import start_ephemeral_server
    from tuneloop.values.workspace import Workspace

    root, workspace = root.resolve(), workspace.resolve()
    try:
        fresh_workspace(workspace, root)  # deletes only a folder the demo created (its marker file)
        start_ephemeral_server(Workspace(workspace).prefect_server_log)
        table = run_demo(root, workspace, movies, tweets, later_tweets)
    except DemoError as error:
        fail(f"demo stopped: {error}")
    typer.echo(f"\n{table}\nreports, registry and logs: {workspace}")


@app.command("restore-data")
def restore_data_command(version: str, out: Optional[Path] = typer.Option(None, help="folder to restore into"),
                         params: Path = ParamsOption, root: Path = RootOption,
                         sets: Optional[list[str]] = SetOption) -> None:
    """Restore, through DVC, the exact data a registered model version was trained on."""
    from tuneloop.plumbing.tracking import configure_tracking
    from tuneloop.tasks import registry
    from tuneloop.tasks.ingest import restore_data
    from tuneloop.values.workspace import folder_problem

    try:
        version = registry.checked_version(version)
    except registry.TagError as error:
        fail(f"restore-data refused: {error}")
    if out is not None:
        unusable = folder_problem(out)
        if unusable:
            fail(f"restore-data refused, nothing was written: --out {out}: {unusable}")
    loaded, workspace = load(params, root, sets)
    configure_tracking(loaded.mlflow, workspace.root)
    from mlflow.exceptions import MlflowException

    try:
        tags = registry.checked_tags(registry.get_version(loaded.mlflow.model_name, version).tags,
                                     ("data.md5", "data.size", "data.path"))
    except MlflowException:
        fail(f"restore-data refused: {loaded.mlflow.model_name} has no version {version}")
    except registry.TagError as error:
        fail(f"restore-data refused, nothing was written: version {version}'s tags are not usable: {error}")
    target = out or workspace.restored_dir(f"v{version}")
    with writing(loaded, workspace, "restore-data"):
        path = restore_data(tags["data.md5"], int(tags["data.size"]), tags["data.path"], workspace.root,
                            target.resolve(), loaded.ingest.dvc_remote)
    typer.echo(f"version {version}'s data ({tags['data.md5']}) restored to {path}")


@app.command()
def serve(host: Optional[str] = typer.Option(None, help="interface to bind (default serve.host: 127.0.0.1)"),
          port: Optional[int] = typer.Option(None, help="port (default serve.port)"),
          params: Path = ParamsOption, root: Path = RootOption, sets: Optional[list[str]] = SetOption) -> None:
    """Serve the `champion` over HTTP; promotions and rollbacks take effect without a restart."""
    import logging
    from dataclasses import replace

    from tuneloop.plumbing.tracking import configure_tracking
    from tuneloop.service.serve import ServeRefused, run_service

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    loaded, workspace = load(params, root, sets)
    try:  # the flags are checked as params.yaml's serve section is
        config = replace(loaded.serve, host=host or loaded.serve.host,
                         port=loaded.serve.port if port is None else port)
    except ValueError as error:
        fail(f"serve refused: {error}")
    configure_tracking(loaded.mlflow, workspace.root)
    try:
        run_service(config, loaded.mlflow.model_name, loaded.model.base, workspace.root)
    except ServeRefused as error:
        fail(f"serve refused: {error}")


@app.command()
def rollback(to: Optional[str] = typer.Option(None, "--to", help="version to serve (default: `previous`)"),
             why: str = typer.Option("manual rollback", "--why", help="reason kept in the audit trail"),
             params: Path = ParamsOption, root: Path = RootOption, sets: Optional[list[str]] = SetOption) -> None:
    """Move `champion` back to `previous` (or --to VERSION) in one step, with an audit entry."""
    from tuneloop.plumbing.tracking import configure_tracking
    from tuneloop.tasks import registry

    loaded, workspace = load(params, root, sets)
    configure_tracking(loaded.mlflow, workspace.root)
    with writing(loaded, workspace, "rollback"):
        try:
            def check(version: str):
                return registry.verified_version(loaded.mlflow.model_name, version, workspace.models_cache,
                                                 loaded.model.base)

            entry = registry.rollback(loaded.mlflow.model_name, to, why, check=check)
        except registry.RollbackError as error:
            fail(f"rollback refused, the registry is unchanged: {error}")
    typer.echo(f"{loaded.mlflow.model_name}: champion rolled back from version {entry['from']} "
               f"to version {entry['to']} ({entry['why']}); version {entry['from']} is now `previous`")


@app.command()
def shadow(version: str = typer.Argument(..., help="the registered version to score beside the champion"),
           why: str = typer.Option("manual shadow", "--why", help="reason kept in the audit trail"),
           params: Path = ParamsOption, root: Path = RootOption, sets: Optional[list[str]] = SetOption) -> None:
    """Give VERSION the `shadow` alias: the service scores live traffic with it beside the champion,
    and `tuneloop monitor` promotes or discards it (params `shadow`)."""
    from tuneloop.plumbing.tracking import configure_tracking
    from tuneloop.tasks import registry

    try:
        version = registry.checked_version(version)
    except registry.TagError as error:
        fail(f"shadow refused, the registry is unchanged: {error}")
    loaded, workspace = load(params, root, sets)
    configure_tracking(loaded.mlflow, workspace.root)
    with writing(loaded, workspace, "shadow"):
        try:
            entry = registry.set_shadow(loaded.mlflow.model_name, version, why)
        except registry.ShadowError as error:
            fail(f"shadow refused, the registry is unchanged: {error}")
    name = loaded.mlflow.model_name
    was = f" (was version {entry['from']})" if entry and entry["from"] else ""
    typer.echo(f"{name}: version {version} is the shadow{was}; `tuneloop serve` scores it beside the champion "
               "and `tuneloop monitor` decides")


class QuietExpectedFailures:
    """A logging filter for Prefect's run loggers: a task or flow that fails with
    an expected error is told once, by the CLI, not also as Prefect tracebacks."""

    def filter(self, record) -> bool:
        from tuneloop.values.errors import TuneloopError

        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, TuneloopError):
            return False
        message = str(record.msg)
        return not (message.startswith("Finished in state Failed") and "Error" in message
                    and any(name in message for name in expected_error_names()))


@app.command()
def layout() -> None:
    """The code's floors, top down, with their modules: imports run only downward."""
    from tuneloop.layout import floor_table

    typer.echo(floor_table())


def expected_error_names() -> set[str]:
    from tuneloop.values.errors import TuneloopError

    found, todo = set(), [TuneloopError]
    while todo:
        cls = todo.pop()
        found.add(cls.__name__)
        todo += cls.__subclasses__()
    return found


def mlflow_is_a_server() -> bool:
    """Whether MLflow's tracking URI is a server that can fail to answer (not a SQLite file or a folder)."""
    import mlflow

    return mlflow.get_tracking_uri().split(":", 1)[0] in {"http", "https"}


def main() -> None:
    """The `tuneloop` command: expected failures end in one message and exit 2."""
    import logging

    from tuneloop.values.errors import TuneloopError

    offline_environment()
    terminate_on_sigterm()
    for name in ("mlflow.store.db.utils", "alembic"):  # "Creating initial MLflow database tables..." per new db
        logging.getLogger(name).setLevel(logging.WARNING)
    debug = "--debug" in sys.argv
    if debug:
        sys.argv.remove("--debug")
        os.environ["TUNELOOP_DEBUG"] = "1"
    else:
        quiet_library_warnings()
        for name in ("prefect.flow_runs", "prefect.task_runs"):
            logging.getLogger(name).addFilter(QuietExpectedFailures())
    try:
        app()
    except (TuneloopError, FileNotFoundError) as error:
        if debug:
            raise
        typer.secho(str(error), fg=typer.colors.RED, err=True)
        sys.exit(2)
    except Exception as error:
        from tuneloop.tasks import registry

        if SIGNALLED and not debug:  # what failed while stopping (a Prefect server gone with it) is not the news
            typer.secho(f"tuneloop stopped by {signal.Signals(SIGNALLED[0]).name}", fg=typer.colors.RED, err=True)
            sys.exit(128 + SIGNALLED[0])
        if debug or not registry.unreachable(error) or not mlflow_is_a_server():
            raise
        import mlflow

        typer.secho(f"the MLflow server at {mlflow.get_tracking_uri()} did not answer "
                    f"({registry.server_problem(error)}): start it, or point mlflow.tracking_uri (or "
                    "MLFLOW_TRACKING_URI) at a running one, and run the command again",
                    fg=typer.colors.RED, err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
