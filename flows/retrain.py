"""The retraining flow: versioned data to a registered, gated model.

It only composes: every step is a stage function from `tuneloop.pipeline.stages`,
wrapped as a Prefect task. Data and models pass between tasks on disk (the
workspace), never as task results, so each task can run alone via the CLI or
`dvc repro` and give the same outputs.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import cast

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed

from tuneloop.pipeline import stages
from tuneloop.pipeline.params import Params, load_params
from tuneloop.plumbing import runlog
from tuneloop.plumbing.dvclock import commit_iteration, commits_iteration, record_stage
from tuneloop.plumbing.lock import project_lock
from tuneloop.tasks import registry
from tuneloop.values.workspace import Workspace, read_json


def stage_task(fn, **options):
    # Stages read and write the workspace: caching on inputs would skip real work.
    return task(fn, name=fn.__name__, cache_policy=NO_CACHE, **options)


ingest = stage_task(stages.ingest, retries=2, retry_delay_seconds=5)  # a remote DVC push can flake
validate = stage_task(stages.validate)
split = stage_task(stages.split)
baseline = stage_task(stages.baseline)
tune = stage_task(stages.tune, retries=1)  # resumes its Optuna study; only notes `off` unless tune.enabled
finetune = stage_task(stages.finetune, retries=1)  # resumes from its last checkpoint
evaluate = stage_task(stages.evaluate)
gate = stage_task(stages.gate)
register = stage_task(stages.register, retries=2, retry_delay_seconds=5)  # a remote registry can flake


@flow(name="retrain")
def retrain_flow(params_path: str = "params.yaml", root: str = ".", tune_settings: bool = False,
                 overrides: list[str] | None = None, commit: bool | None = None) -> dict:
    """ingest → validate → split → baseline → [tune] → finetune → evaluate → gate → register.

    Args:
        tune_settings: search finetune's settings first, as if params said
            `tune.enabled: true` (`tuneloop run --tune`).
        overrides: `section.key=value` strings over params.yaml (`--set`).
        commit: whether a run with params.yaml's values commits dvc.lock,
            metrics/, plots/, params.yaml and the data's .dvc pointer in the
            project's git repo, so the next run can be diffed against it
            (`--commit/--no-commit`); None: as `ingest.commit_iterations` says.

    Returns:
        The registration: model name, new version, whether it was promoted,
        the champion's version and the gate's reasons.
    """
    workspace = Workspace(Path(root).resolve())
    params = load_params(workspace.root / params_path, overrides or ())
    if tune_settings:
        params = params.model_copy(update={"tune": replace(params.tune, enabled=True)})
    # dvc.lock records params.yaml's values: a run with other values must not claim them
    as_params_yaml = not tune_settings and not overrides
    if not as_params_yaml:
        print("dvc.lock left as it was: this run's params differ from params.yaml (--tune or --set)", flush=True)
    with project_lock(workspace.root, "retrain flow"):  # one writer: a CLI run or a deployment, not both
        result = run_stages(params, workspace, record=as_params_yaml)
        if commits_iteration(params.ingest.commit_iterations, commit, as_params_yaml):
            verdict = "promoted" if result["promoted"] else "rejected"
            print(commit_iteration(workspace.root, f"tuneloop run: {result['model']} v{result['version']} {verdict}, "
                                                   f"data {read_json(workspace.data_version)['md5'][:8]}"), flush=True)
    # the flow run's final state says what happened; a caller still gets the dict (Prefect unwraps
    # a returned State into its data, which its annotations cannot say)
    return cast(dict, Completed(message=runlog.outcome_message(result), data=result))


def run_step(stage_task, params: Params, workspace: Workspace, record: bool):
    """One stage as a task; a failure is logged to the flow run, with its reason, before it propagates."""
    try:
        result = stage_task(params, workspace)
    except Exception as error:
        position = f"{stages.STAGES.index(stage_task.name) + 1}/{len(stages.STAGES)}"
        runlog.log_failure(position, stage_task.name, error)
        raise
    if record:
        record_stage(workspace.root, stage_task.name)
    return result


def run_stages(params: Params, workspace: Workspace, record: bool = True) -> dict:
    """The stages in order, under the caller's project lock; with `record`,
    each finished stage is written into dvc.lock, so `dvc status` agrees."""

    def step(stage_task):
        return run_step(stage_task, params, workspace, record)

    step(ingest)
    step(validate)
    step(split)
    try:
        step(baseline)
        step(tune)
        step(finetune)
        step(evaluate)
        step(gate)
        return step(register)
    except Exception:
        try:
            stages.finish_run(workspace, "FAILED", "failed before registration")
        except Exception as closing:
            if not registry.unreachable(closing):  # a lost server: the reaper closes the run later
                raise
        raise
