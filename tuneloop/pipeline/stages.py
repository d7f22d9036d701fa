"""The pipeline's stages as the CLI, `dvc.yaml` and the Prefect flow call them.

Each function hands a stage module only its own params section, works inside
the stage's own MLflow run (open while it works: `stage_run`), logs what the
stage produced there and into the pipeline's run, and prints one line saying
what happened. The work itself lives in `tasks/`.
"""

from __future__ import annotations

import json
import subprocess
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import pandas as pd

from tuneloop.model.classifier import read_meta, resolve_model_path, resolve_pooling
from tuneloop.pipeline import tune_runs
from tuneloop.pipeline.launch import launch, launch_tune_workers
from tuneloop.pipeline.params import Params
from tuneloop.plumbing import integrity, mlflow_model, runlog, tracking
from tuneloop.tasks import plotdata, registry
from tuneloop.tasks import tune as tuning
from tuneloop.tasks.baseline import check_probe_pooling, probe_head, run_baseline
from tuneloop.tasks.evaluate import (
    REGRESSION_PREFIX,
    classifier_candidate,
    evaluate_models,
    evaluate_regression,
    read_regression_file,
    score_precision,
)
from tuneloop.tasks.finetune import FinetuneConfig, FinetuneResult, calibrate_model
from tuneloop.tasks.finetune import finetune as finetune_model
from tuneloop.tasks.gate import CHALLENGER, PROBE, Decision, decide_promotion, outcome
from tuneloop.tasks.ingest import DataVersion, load_data_version, run_ingest
from tuneloop.tasks.report import write_evaluation_plots, write_evaluation_report, write_tuning_plots
from tuneloop.tasks.split import (
    SplitError,
    check_declared_split,
    check_trainable,
    earlier_test_rows,
    load_split,
    run_split,
)
from tuneloop.tasks.tune_space import apply_params
from tuneloop.tasks.validate import DataValidationError, ValidationReport, check_report, validate_dataset
from tuneloop.values.errors import TuneloopError
from tuneloop.values.labels import label_indices
from tuneloop.values.workspace import Workspace, read_json, write_json

STAGES = ("ingest", "validate", "split", "baseline", "tune", "finetune", "evaluate", "gate", "register")


def say(stage: str, message: str) -> None:
    """One progress line per stage, numbered like the pipeline: on the terminal,
    and in the Prefect flow run's logs when a flow runs the stage."""
    position = STAGES.index(stage) + 1 if stage in STAGES else "-"
    line = f"[{position}/{len(STAGES)}] {stage}: {message}"
    print(line, flush=True)
    runlog.log_line(line)


def git_commit(ws: Workspace) -> str:
    """HEAD of the project's git repo (suffixed `-dirty` with local changes), or `unknown`."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ws.root, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ws.root,
                               capture_output=True, text=True, check=True).stdout.strip()
        return head.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def pipeline_params(params: Params) -> dict[str, str]:
    """The run's settings (params.yaml with --set and --tune applied) as MLflow
    params of the pipeline run, one per setting: `finetune.learning_rate`."""
    return tracking.flat_params(params.model_dump(mode="json", by_alias=True))


@contextmanager
def stage_run(params: Params, ws: Workspace, stage: str, settings: Mapping[str, Any] | None = None,
              detail: str = "") -> Iterator[tracking.StageRun]:
    """The stage's MLflow run, open while the block works (`tracking.stage_run`),
    child of the pipeline run, which gets the run's params if it lacks them."""
    with tracking.stage_run(ws, stage, settings, detail, pipeline_params(params)) as run:
        yield run


def ingest(params: Params, ws: Workspace) -> DataVersion:
    """The data version names the pipeline run, so the run opens once it is
    known; the ingest stage's run is dated from the stage's start."""
    started = tracking.now_ms()
    version = run_ingest(params.ingest, ws)
    commit = git_commit(ws)
    run_id = tracking.start_pipeline_run(params.mlflow, ws, {"data.md5": version.md5, "git.commit": commit,
                                                             **tracking.source_tags(commit)},
                                         pipeline_params(params), started)
    runlog.publish_mlflow_run(run_id, read_json(ws.run_state)["experiment_id"],
                              tracking.tracking_uri(params.mlflow, ws.root))
    tracking.log_stage(ws, "ingest", {"rows": version.rows, "excluded_rows": version.excluded_rows},
                       params={"source": version.source, "data_md5": version.md5}, started_ms=started)
    excluded = f", {version.excluded_rows} rows with excluded labels dropped" if version.excluded_rows else ""
    say("ingest", f"{version.rows} rows from {version.source}, data version {version.short}{excluded}")
    return version


def validate(params: Params, ws: Workspace) -> ValidationReport:
    """Raises DataValidationError (and closes the run as failed) on a blocking rule."""
    with stage_run(params, ws, "validate") as run:
        frame = pd.read_parquet(ws.dataset)
        report = validate_dataset(frame, params.validate_, ws.validation_dir)
        if params.declared_labels is None:
            say("validate", f"{len(load_data_version(ws).labels)} labels read from the data (validate.labels: auto)")
        write_json(ws.validation_summary, report.to_dict())
        write_json(ws.validation_metrics, {"errors": len(report.errors), "warnings": len(report.warnings)})
        tracking.log_stage_metrics(run, {"errors": len(report.errors), "warnings": len(report.warnings)})
        tracking.log_stage_artifacts(run, [ws.validation_dir])
        for warning in report.warnings:
            say("validate", f"warning: {warning.message}")
        try:
            check_report(report)
            check_declared_split(frame)
            check_trainable(frame, params.split)  # before baseline loads any model
        except (DataValidationError, SplitError):
            finish_run(ws, "FAILED", "stopped at validation")
            raise
    say("validate", f"{len(report.results)} rules passed or warned, report {report.page}")
    return report


def split(params: Params, ws: Workspace) -> dict[str, int]:
    with stage_run(params, ws, "split", asdict(params.split)) as run:
        counts = run_split(params.split, ws)
        tracking.log_stage_metrics(run, counts)
    moved = counts.get("leaked_to_train")
    say("split", ", ".join(f"{name} {counts[name]}" for name in ("train", "validation", "test"))
        + (f"; {moved} validation/test rows repeating a train text moved to train" if moved else ""))
    return counts


def baseline(params: Params, ws: Workspace) -> dict:
    """Probes the base model (or each of `baseline.candidates`, held to `gate.max_latency_ms`)
    and logs every candidate's validation macro-F1 and latency: metrics
    `baseline.candidate.<i>.*`, tags `baseline.candidate.<i>` naming them."""
    bases = candidate_bases(params)  # every folder checked before any model loads
    budget = params.gate.max_latency_ms if params.baseline.candidates else None
    with stage_run(params, ws, "baseline", asdict(params.baseline)) as run:
        result = run_baseline(params.baseline, params.model, bases, project_labels(params, ws), ws, budget)
        probe, base = result["probe"], result["base"]
        tracking.log_stage_metrics(run, {"probe": {k: probe[k] for k in ("accuracy", "macro_f1", "c", "temperature")},
                                         "zero_shot": result["zero_shot"], "embeddings": result["embeddings"],
                                         "candidate": {
                                             str(i): {"macro_f1": c["validation_macro_f1"],
                                                      "latency_ms_per_example": c["latency_ms_per_example"]}
                                             for i, c in enumerate(base["candidates"])}})
        tracking.set_stage_tags(run, {"baseline.base_model": base["chosen"],
                                      **{f"baseline.candidate.{i}": c["name"]
                                         for i, c in enumerate(base["candidates"])}})
    chose = (f"base {base['chosen']} of {len(bases)} candidates (best validation macro-F1 within "
             f"{budget:g} ms per example); " if params.baseline.candidates else "")
    say("baseline", f"{chose}probe macro-F1 {probe['macro_f1']:.4f} ({probe['setting']}, chosen on validation; "
                    f"temperature {probe['temperature']:.2f}), "
                    f"zero-shot macro-F1 {result['zero_shot']['macro_f1']:.4f}; {embedded_line(result['embeddings'])}")
    return result


def embedded_line(counts: dict[str, int]) -> str:
    """How many texts the base embedded and how many rows came from the last run's embeddings."""
    if not counts["reused"]:
        return f"{counts['computed']} texts embedded"
    return f"{counts['computed']} new texts embedded, {counts['reused']} rows from the last run's embeddings"


def candidate_bases(params: Params) -> dict[str, Path]:
    """{name: local folder} of `baseline.candidates` in order, or of `model.base` alone.

    Raises:
        TuneloopError: a candidate is neither the bundled model nor a local model folder.
    """
    if not params.baseline.candidates:
        return {params.model.base: resolve_model_path(params.model.base)}
    bases = {}
    for i, name in enumerate(params.baseline.candidates):
        try:
            bases[name] = resolve_model_path(name)
        except FileNotFoundError as error:
            raise TuneloopError(f"baseline.candidates[{i}]: {error}") from None
    return bases


def base_model(params: Params, ws: Workspace) -> str:
    """The base model this run trains, evaluates and registers: `model.base`, or, with
    `baseline.candidates` listed, the one the baseline stage chose (reports/baseline.json).

    Raises:
        TuneloopError: candidates are listed but the baseline has not chosen among them.
    """
    if not params.baseline.candidates:
        return params.model.base
    if not ws.base_choice.exists():
        raise TuneloopError(f"{ws.base_choice} is missing: run `tuneloop baseline` first (baseline.candidates "
                            "are listed, and it chooses the base model among them)")
    choice = read_json(ws.base_choice)
    if [c["name"] for c in choice["candidates"]] != list(params.baseline.candidates):
        raise TuneloopError("baseline.candidates changed since the baseline chose a base model: "
                            "run `tuneloop baseline` again")
    return choice["chosen"]


def base_choice_tag(ws: Workspace) -> dict[str, str]:
    """The version tag `base_model.candidates`: every candidate's validation macro-F1 and
    latency as JSON, as many as fit a tag ({} when the baseline chose none)."""
    if not ws.base_choice.exists():
        return {}
    rows = [{"name": c["name"], "macro_f1": round(c["validation_macro_f1"], 4),
             "latency_ms": round(c["latency_ms_per_example"], 2)} for c in read_json(ws.base_choice)["candidates"]]
    while len(json.dumps(rows)) > registry.MAX_TAG and len(rows) > 1:
        rows.pop()
    return {"base_model.candidates": json.dumps(rows)[:registry.MAX_TAG]}


def project_labels(params: Params, ws: Workspace) -> tuple[str, ...]:
    """The label set: as listed in params (validate.labels), or, with `auto`,
    the ingested data version's own.

    Raises:
        FileNotFoundError: `auto` and no data ingested yet.
    """
    return params.declared_labels or tuple(load_data_version(ws).labels)


def labelled_rows(frame: pd.DataFrame, labels: tuple[str, ...]) -> tuple[list[str], list[int]]:
    """(texts, label indices) of a split."""
    return frame["text"].tolist(), label_indices(frame["label"], labels).tolist()


def tuning_record(params: Params, ws: Workspace) -> dict | None:
    """metrics/tune.json when tuning is on and searched the current data version, else None."""
    if not params.tune.enabled or not ws.tune_result.exists():
        return None
    record = read_json(ws.tune_result)
    current = record.get("enabled") and record.get("data_version") == load_data_version(ws).md5
    return record if current else None


def finetune_settings(params: Params, ws: Workspace) -> FinetuneConfig:
    """params.finetune, with the tuned values over it when tuning is on and current."""
    record = tuning_record(params, ws)
    return apply_params(params.finetune, record["best_params"]) if record else params.finetune


def record_tuning(ws: Workspace, record: dict, result: tuning.TuneResult, tune_run: str,
                  run: tracking.StageRun) -> None:
    """Writes metrics/tune.json and the plots, and logs them to the tuning run, the stage's run and the pipeline's."""
    write_json(ws.tune_result, record)
    tune_runs.close_tune_run(tune_run, result, [ws.tune_result, *write_tuning_plots(record, ws.tune_reports)])
    tracking.log_stage_metrics(run, {k: record[k] for k in ("best_value", "n_complete", "n_pruned", "n_failed")})
    # tags, not params: a resumed or extended search may change them within one pipeline run
    run_id = tracking.current_run_id(ws)
    registry.client().set_tag(run_id, "tune.study", result.study_name)
    registry.client().set_tag(run_id, "tune.best_params", json.dumps(result.best_params, sort_keys=True))


def tune_data(params: Params, ws: Workspace) -> tuning.TuneData:
    """What every trial trains from: the base model, train and validation rows (never test rows)."""
    labels = project_labels(params, ws)
    base = base_model(params, ws)
    return tuning.TuneData(base, resolve_model_path(base),
                           labelled_rows(load_split(ws, "train"), labels),
                           labelled_rows(load_split(ws, "validation"), labels), labels, load_data_version(ws).md5)


def tune_storage(params: Params, ws: Workspace) -> str:
    """tune.storage, or SQLite optuna.db beside the MLflow SQLite database."""
    return params.tune.storage or tuning.default_storage(ws.root, tracking.tracking_uri(params.mlflow, ws.root))


def tune(params: Params, ws: Workspace, workers: int = 1) -> dict:
    """Searches finetune's settings on train and validation rows (never test
    rows); the best go to metrics/tune.json, which finetune applies. With
    workers > 1, that many processes search the one study together."""
    version = load_data_version(ws)
    if not params.tune.enabled:
        write_json(ws.tune_result, {"enabled": False, "data_version": version.md5})
        say("tune", "off (tune.enabled: false): finetune uses params.finetune; `tuneloop run --tune` searches first")
        return {"enabled": False}
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # one line per trial is printed below
    with stage_run(params, ws, "tune") as run:
        data, storage = tune_data(params, ws), tune_storage(params, ws)
        experiment_id = read_json(ws.run_state)["experiment_id"]
        name = tuning.study_name(params.tune, params.finetune, data)
        tune_run = tune_runs.open_tune_run(experiment_id, run.pipeline_id, name, params.tune, storage)
        runs = tune_runs.TrialRuns(tune_run, experiment_id)
        try:
            result = search(params, ws, data, storage, runs, workers)
        except BaseException:
            tune_runs.close_tune_run(tune_run, None)
            raise
        record = {"enabled": True, "data_version": version.md5, "storage": tuning.redact(storage), **asdict(result)}
        record_tuning(ws, record, result, tune_run, run)
    resumed = f", resumed a study of {result.resumed_trials} trials" if result.resumed_trials else ""
    say("tune", f"{result.n_complete} complete, {result.n_pruned} pruned, {result.n_failed} failed trials on "
                f"{result.train_rows} train rows in {result.seconds:.0f}s{resumed}; best validation macro-F1 "
                f"{result.best_value:.4f} (trial {result.best_trial}): {json.dumps(result.best_params)}")
    return record


def search(params: Params, ws: Workspace, data: tuning.TuneData, storage: str, runs: tune_runs.TrialRuns,
           workers: int) -> tuning.TuneResult:
    """Runs the study in this process, or, with workers > 1, in that many
    `tuneloop.tune_worker` processes started once the study is prepared, and
    summarises it when all have stopped."""
    on_trial = lambda trial: say("tune", tuning.describe_trial(trial))  # noqa: E731
    if workers == 1:
        return tuning.run_study(params.tune, params.finetune, data, storage, ws.tune_dir, runs, on_trial=on_trial)
    started = time.perf_counter()
    name = tuning.study_name(params.tune, params.finetune, data)
    _, before, retried = tuning.prepare_study(params.tune, name, tuning.open_storage(storage, params.tune, runs),
                                              params.finetune, tuning.new_worker_id(), runs)
    with launch_tune_workers(params, ws.root, workers, runs.parent_run_id, runs.experiment_id) as started_workers:
        failed = [code for code in (worker.wait() for worker in started_workers) if code != 0]
    if failed:
        say("tune", f"warning: {len(failed)} of {workers} workers exited with an error (exit codes {failed}); "
                    "a trial they left running runs again in the next search")
    rows = len(tuning.subsample(data.train, params.tune.train_rows, params.tune.seed)[0])
    return tuning.summarise(tuning.open_study(params.tune, name, storage), params.tune.space, before, retried, rows,
                            time.perf_counter() - started)


def start_head(params: Params, ws: Workspace, base_path, settings: FinetuneConfig):
    """The baseline's probe as the head's start (`finetune.head_init: probe`), else None."""
    if settings.head_init != "probe":
        return None
    from transformers import AutoConfig

    return probe_head(ws.probe_dir, project_labels(params, ws), AutoConfig.from_pretrained(base_path).hidden_size,
                      resolve_pooling(params.model.pooling, base_path))


def finetune_inputs(params: Params, ws: Workspace) -> dict:
    """The fine-tuning core's arguments, read from the workspace (files only,
    no tracking): what one process or every rank of a distributed run trains on."""
    labels = project_labels(params, ws)
    settings = finetune_settings(params, ws)  # the tuned values when tuning is on
    base = base_model(params, ws)
    base_path = resolve_model_path(base)
    return dict(base_model=base, base_path=base_path,
                train=labelled_rows(load_split(ws, "train"), labels),
                validation=labelled_rows(load_split(ws, "validation"), labels), labels=labels, config=settings,
                out_dir=ws.challenger_dir, checkpoint_dir=ws.checkpoint_dir, data_key=load_data_version(ws).md5,
                head=start_head(params, ws, base_path, settings), pooling=params.model.pooling)


def train_model(inputs: dict, progress: bool = True, on_metrics=None) -> FinetuneResult:
    """Runs the fine-tuning core on `finetune_inputs` (in every rank when distributed).

    Args:
        on_metrics: (step, {name: value}) as training goes (`tasks.finetune.OnMetrics`).
    """
    return finetune_model(inputs["base_model"], inputs["base_path"], inputs["train"], inputs["validation"],
                          inputs["labels"], inputs["config"], inputs["out_dir"], inputs["checkpoint_dir"],
                          inputs["data_key"], progress=progress, head=inputs["head"], pooling=inputs["pooling"],
                          on_metrics=on_metrics)


def finetune(params: Params, ws: Workspace, nproc: int = 1) -> FinetuneResult:
    """Fine-tunes in this process, its loss, learning rate and validation
    macro-F1 logged to the stage's run as training goes, or in `nproc` DDP
    processes (torchrun) when nproc > 1, their curve logged when they end."""
    settings = finetune_settings(params, ws)  # the tuned values when tuning is on
    with stage_run(params, ws, "finetune", asdict(settings), settings.method) as run:
        if nproc > 1:
            result = launch(params, ws.root, nproc)
            tracking.log_curves(run, training_curves(result))
        else:
            result = train_model(finetune_inputs(params, ws),
                                 on_metrics=lambda step, values: tracking.log_points(run, step, values))
        labels = project_labels(params, ws)
        temperature, abstention = calibrate_model(ws.challenger_dir,
                                                  labelled_rows(load_split(ws, "validation"), labels),
                                                  labels, params.model, params.evaluate.batch_size)
        summary = {k: v for k, v in asdict(result).items() if k not in {"model_dir", "history", "curve"}}
        summary["temperature"] = temperature
        tracking.set_stage_tags(run, {"training_precision": result.precision})  # bf16 | fp32 products
        write_json(ws.finetune_metrics, plotdata.finetune_headline(summary))
        plotdata.write_csv(ws.training_plot, ("epoch", "step", "val_macro_f1"),
                           plotdata.training_rows(result.history))
        tracking.log_stage_metrics(run, summary)
        data = load_data_version(ws)
        tracking.log_dataset([run.run_id, run.pipeline_id], pd.read_parquet(ws.splits), data.md5, data.path,
                             Path(data.source).name, "training")
    resumed = f", resumed at step {result.resumed_from_step}" if result.resumed_from_step else ""
    tuned = ", tuned settings" if settings != params.finetune else ""
    say("finetune", f"{result.steps} steps in {result.seconds:.0f}s ({result.train_examples_per_s:.1f} ex/s, "
                    f"{result.precision} products), "
                    f"best validation macro-F1 {result.best_val_macro_f1:.4f}{resumed}{tuned}; temperature "
                    f"{temperature:.2f}, {abstention.rule}")
    return result


def training_curves(result: FinetuneResult) -> dict[str, list[tuple[int, float]]]:
    """Loss and learning rate per logged step, validation macro-F1 per epoch (at its step)."""
    return {"loss": [(p["step"], p["loss"]) for p in result.curve],
            "learning_rate": [(p["step"], p["learning_rate"]) for p in result.curve],
            "val_macro_f1": [(h["step"], h["val_macro_f1"]) for h in result.history]}


def new_test_rows(reference: pd.DataFrame, test: pd.DataFrame) -> int:
    """Test rows whose text the champion's data version (`reference`, its splits) did not
    hold: with stable splits every other test row was a test row for the champion too."""
    from tuneloop.tasks.validate import normalise_text

    known = set(normalise_text(reference["text"].astype(str)))
    return int((~normalise_text(test["text"].astype(str)).isin(known)).sum())


def champion_test_rows(params: Params, ws: Workspace, champion, test: pd.DataFrame, evaluation: dict) -> np.ndarray:
    """Which test rows were test rows of the champion's data version too (none without a
    champion): the earlier rows of the regression set. Records `new_test_rows` in `evaluation`."""
    if champion is None:
        return np.zeros(len(test), dtype=bool)
    reference = pd.read_parquet(registry.download_reference(params.mlflow.model_name, champion.version,
                                                            ws.models_cache))
    evaluation["new_test_rows"] = new_test_rows(reference, test)
    return earlier_test_rows(test["text"], reference)


def champion_candidate(params: Params, ws: Workspace):
    """The registry's current champion as an evaluation candidate, or None.

    Raises:
        IntegrityError: its files or its base model differ from the hashes it recorded.
    """
    tracking.configure_tracking(params.mlflow, ws.root)
    champion = registry.alias_version(params.mlflow.model_name, registry.CHAMPION)
    if champion is None:
        return None
    # the champion's own recorded base model, verified: params.model.base may have moved on since
    model_dir, base = registry.verified_version(params.mlflow.model_name, champion.version, ws.models_cache,
                                                params.model.base)
    return classifier_candidate("champion", f"champion (v{champion.version})", model_dir,
                                str(base) if base else None, params.evaluate.batch_size, version=champion.version,
                                precision="fp32")


def evaluate(params: Params, ws: Workspace) -> dict:
    """Scores base probe, champion and challenger on the same test rows and
    writes the side-by-side report."""
    with stage_run(params, ws, "evaluate") as run:
        return score_candidates(params, ws, run)


def score_candidates(params: Params, ws: Workspace, run: tracking.StageRun) -> dict:
    """The evaluate stage's work, logged to its open run."""
    test = load_split(ws, "test")
    trained = read_json(ws.finetune_metrics)
    check_probe_model(params, ws)
    base = base_model(params, ws)
    candidates = [classifier_candidate(PROBE, "base model + linear probe", ws.probe_dir, base,
                                       params.evaluate.batch_size, precision="fp32")]
    champion = champion_candidate(params, ws)
    candidates += [champion] if champion else []
    settings = finetune_settings(params, ws)
    method = settings.method + (", tuned" if settings != params.finetune else "")
    candidates.append(classifier_candidate(
        "challenger", f"challenger ({method}, this run)", ws.challenger_dir, base,
        params.evaluate.batch_size, train_val_gap=trained["train_macro_f1"] - trained["best_val_macro_f1"],
        precision="fp32"))
    labels = project_labels(params, ws)
    extra = (read_regression_file(ws.root / params.evaluate.regression_file, labels)
             if params.evaluate.regression_file else None)  # refused before any model scores
    evaluation, predictions = evaluate_models(candidates, test, labels, params.evaluate, load_data_version(ws).md5)
    if params.model.scoring_precision != "fp32":  # may the version register score in it? (opt-in)
        check_precision(params, ws, base, test, labels, evaluation, predictions)
    evaluation["challenger_files"] = integrity.folder_manifest(ws.challenger_dir)  # what register may upload
    evaluation["probe_files"] = integrity.folder_manifest(ws.probe_dir)
    earlier = champion_test_rows(params, ws, champion, test, evaluation)
    evaluation["regression"], regression = evaluate_regression(candidates, test, predictions, earlier, extra, labels)
    tuned = tuning_record(params, ws)
    if tuned:
        evaluation["tuning"] = tuned  # the report's Tuning section
    write_json(ws.evaluation, evaluation)
    ws.test_predictions.parent.mkdir(parents=True, exist_ok=True)
    predictions.to_parquet(ws.test_predictions, index=False)
    regression.to_parquet(ws.regression_predictions, index=False)
    headline = plotdata.evaluation_headline(evaluation)
    write_json(ws.evaluation_metrics, headline)
    write_plot_data(ws, evaluation, predictions)
    pictures = write_evaluation_plots(evaluation, ws.evaluation_plots)  # PNGs for the MLflow UI
    tracking.log_stage_metrics(run, headline)
    tracking.log_stage_artifacts(run, [ws.evaluation, *pictures])
    say("evaluate", ", ".join(f"{k} macro-F1 {m['macro_f1']:.4f}"
                              + (f" ({m['answers_kept']:.1%} of answers kept under perturbation)"
                                 if "answers_kept" in m else "") for k, m in headline.items())
        + f" on {evaluation['test_rows']} test rows"
        + (f" ({evaluation['new_test_rows']} new since the champion's data)" if "new_test_rows" in evaluation else "")
        + f"; details {ws.evaluation}")
    return evaluation


def check_precision(params: Params, ws: Workspace, base: str, test: pd.DataFrame, labels: Sequence[str],
                    evaluation: dict, predictions: pd.DataFrame) -> None:
    """Scores the two candidates register may upload (challenger, probe) again in
    `model.scoring_precision`; each one's verdict goes into its evaluation entry."""
    precision = params.model.scoring_precision
    for key, folder in ((CHALLENGER, ws.challenger_dir), (PROBE, ws.probe_dir)):
        candidate = classifier_candidate(key, key, folder, base, params.evaluate.batch_size, precision=precision)
        checked = score_precision(candidate, test, labels, predictions[key].to_numpy(), precision)
        evaluation["models"][key]["scoring_precision"] = checked
        say("evaluate", f"{key} {'may' if checked['allowed'] else 'may not'} score in {precision}: "
                        + "; ".join(checked["reasons"]))


def check_probe_model(params: Params, ws: Workspace) -> None:
    """Raises TuneloopError when models/probe/ is not a complete probe model (a
    baseline stage of an older tuneloop wrote only its weights) or was fitted on
    another pooling than `model.pooling` now asks for."""
    from tuneloop.model.classifier import META_FILE

    if not (ws.probe_dir / META_FILE).exists():
        raise TuneloopError(f"{ws.probe_dir} holds no complete probe model: run `tuneloop baseline` again")
    check_probe_pooling(ws.probe_dir, resolve_pooling(params.model.pooling, resolve_model_path(base_model(params, ws))))


def write_plot_data(ws: Workspace, evaluation: dict, predictions: pd.DataFrame) -> None:
    """The challenger's confusion pairs and reliability bins, for `dvc plots`."""
    challenger = evaluation["models"]["challenger"]
    plotdata.write_csv(ws.confusion_plot, ("actual", "predicted"), plotdata.confusion_rows(
        predictions["y_true"], predictions["challenger"], evaluation["labels"]))
    plotdata.write_csv(ws.calibration_plot, ("confidence", "accuracy", "rows"),
                       plotdata.calibration_rows(challenger["reliability"]))


def gate(params: Params, ws: Workspace) -> Decision:
    with stage_run(params, ws, "gate") as run:
        evaluation = read_json(ws.evaluation)
        frame = pd.read_parquet(ws.test_predictions)
        predictions = {column: frame[column].to_numpy() for column in frame.columns}
        if ws.regression_predictions.exists():  # an evaluation from before the forgetting check has none
            regression = pd.read_parquet(ws.regression_predictions)
            predictions.update({f"{REGRESSION_PREFIX}{c}": regression[c].to_numpy() for c in regression.columns})
        decision = decide_promotion(evaluation, predictions, params.gate)
        write_json(ws.decision, {**decision.to_dict(), "outcome": outcome(decision, evaluation, params.gate.metric)})
        write_json(ws.gate_metrics, {"promote": int(decision.yes)})
        evaluation["gate"] = decision.to_dict()  # the report shows the decision and its reasons
        write_evaluation_report(evaluation, ws.evaluation_report)
        tracking.log_stage_metrics(run, {"promote": int(decision.yes)})
        tracking.log_stage_artifacts(run, [ws.decision, ws.evaluation_report])
    runlog.publish_gate(decision.yes, list(decision.reasons), evaluation)
    verdict = f"PROMOTE {decision.choice}" if decision.yes else "REJECT"
    say("gate", f"{verdict}: {outcome(decision, evaluation, params.gate.metric)}"
        + "".join(f"\n      {r}" for r in decision.reasons))
    return decision


def registered_candidate(decision: dict) -> str:
    """What the register stage uploads: the gate's choice, else the rejected challenger."""
    return decision.get("candidate") or CHALLENGER


def candidate_dir(ws: Workspace, candidate: str) -> Path:
    return ws.probe_dir if candidate == PROBE else ws.challenger_dir


# sections a version's `params` tag leaves out first when the whole does not fit one tag: they
# say how the model is served and watched, not how it was made (the pipeline run keeps every setting)
PARAMS_TAG_OMITTABLE = ("monitor", "serve", "triggers", "tune")


def params_tags(values: dict) -> dict[str, str]:
    """The settings as the version's `params` tag: compact JSON that always parses,
    within the registry's tag limit; sections of PARAMS_TAG_OMITTABLE are left out
    (named in `params.omitted`) only when the whole does not fit."""
    kept, omitted = dict(values), []
    text = json.dumps(kept, sort_keys=True, separators=(",", ":"))
    for section in PARAMS_TAG_OMITTABLE:
        if len(text) <= registry.MAX_TAG:
            break
        if kept.pop(section, None) is not None:
            omitted.append(section)
            text = json.dumps(kept, sort_keys=True, separators=(",", ":"))
    if len(text) > registry.MAX_TAG:
        raise TuneloopError(f"the settings take {len(text)} characters as JSON, more than a registry tag holds "
                            f"({registry.MAX_TAG}) even without {', '.join(PARAMS_TAG_OMITTABLE)}")
    return {"params": text, **({"params.omitted": ",".join(omitted)} if omitted else {})}


def version_tags(params: Params, ws: Workspace, candidate: str = CHALLENGER) -> dict[str, str]:
    """What made this model: data, code, base model, settings, which candidate it is and its test metrics."""
    data = load_data_version(ws)
    base = base_model(params, ws)
    base_path = resolve_model_path(base)
    scored = read_json(ws.evaluation)["models"][candidate]
    tags = {
        "data.md5": data.md5, "data.size": str(data.size), "data.path": data.path, "data.source": data.source,
        "git.commit": git_commit(ws), "base_model.name": base,
        "base_model.sha256": integrity.base_weights_sha256(base_path),  # no path: it names this machine
        **params_tags(params.model_dump(mode="json", by_alias=True)),
        "candidate": candidate, "method": read_meta(candidate_dir(ws, candidate))["method"],
    }
    tags.update({f"test.{k}": f"{scored[k]:.6f}" for k in ("accuracy", "macro_f1", "ece", "latency_ms_per_example")})
    if scored.get("ece_uncalibrated") is not None:
        tags["test.ece_uncalibrated"] = f"{scored['ece_uncalibrated']:.6f}"
    tags["scoring_precision"] = allowed_precision(scored)
    if params.baseline.candidates:
        tags.update(base_choice_tag(ws))
    if candidate == CHALLENGER:
        tags.update(tuning_tags(params, ws))
    return tags


def allowed_precision(scored: dict) -> str:
    """The precision a candidate's version may score in: the evaluate stage's check, else fp32."""
    checked = scored.get("scoring_precision") or {}
    return checked["precision"] if checked.get("allowed") else "fp32"


def tuning_tags(params: Params, ws: Workspace) -> dict[str, str]:
    """The tuned settings a version trained with, and their study ({} when not tuned)."""
    record = tuning_record(params, ws)
    if record is None:
        return {}
    return {"tuned_params": json.dumps(record["best_params"], sort_keys=True), "tune.study": record["study_name"],
            "tune.best_val_macro_f1": f"{record['best_value']:.6f}"}


def register(params: Params, ws: Workspace) -> dict:
    """Registers the challenger; moves `champion` only if the gate passed.

    Run again after being cut off (the MLflow server lost, the process
    killed), it finishes the job: a version left incomplete is completed, a
    complete one is not registered twice, and the gate's decision is applied
    once. `champion` moves only to a complete version.

    Raises:
        RegistryUnavailable: the MLflow server did not answer; running the stage again finishes it.
    """
    decision = read_json(ws.decision)
    name = params.mlflow.model_name
    with registry.reachable(f"registering a version of {name}", "run `tuneloop register` again to finish it "
                            "(an unfinished version is never served)"):
        tracking.configure_tracking(params.mlflow, ws.root)
        candidate = registered_candidate(decision)
        with stage_run(params, ws, "register") as run:
            check_candidate_unchanged(ws, candidate)
            key = registry.registration_key(read_json(ws.evaluation), decision)
            plan = registry.plan_registration(registry.list_versions(name), key)
            if plan.action == "create":
                info = create_version(params, ws, run.pipeline_id, key, candidate)
            else:
                say("register", plan.reason)
                if plan.version is None:
                    raise TuneloopError(f"registering {name}: the plan to {plan.action} names no version")
                info = registry.finish_version(name, plan.version, ws.splits) if plan.action == "resume" \
                    else registry.get_version(name, plan.version)
            shadowed = apply_decision(name, info, decision, params.gate.promote_via_shadow)
            champion = registry.alias_version(name, registry.CHAMPION)
            result = {"model": name, "version": info.version, "promoted": decision["promote"], "shadow": shadowed,
                      "candidate": candidate, "champion": champion.version if champion else None,
                      "reasons": decision["reasons"], "outcome": decision.get("outcome")}
            write_json(ws.registration, {"version": int(info.version), "champion": int(result["champion"] or 0)})
            registry.log_audit_table(name, run.run_id)  # the registry's audit trail, readable in the run's UI
        finish_run(ws, "FINISHED", "promoted" if decision["promote"] else "rejected", version=info.version)
    what = "the base probe" if candidate == PROBE else "the fine-tuned challenger"
    verdict = "made the shadow (`tuneloop monitor` decides on live traffic)" if shadowed else \
        "promoted to champion" if decision["promote"] else "rejected"
    say("register", f"{name} version {info.version} {verdict}; "
                    f"champion is version {result['champion']} (version {info.version} holds {what})")
    return result


def create_version(params: Params, ws: Workspace, run_id: str, key: str,
                   candidate: str = CHALLENGER) -> registry.VersionInfo:
    """The candidate (the challenger, or the base probe the gate chose) packaged as
    an MLflow model (with its model card) and registered with its tags and, as
    drift monitoring's reference data, the split it learned from."""
    import tempfile

    from tuneloop.model.classifier import needs_base

    folder = candidate_dir(ws, candidate)
    tags = version_tags(params, ws, candidate)
    base = tags["base_model.name"]  # the baseline's choice when baseline.candidates are listed
    on_base = needs_base(folder)
    scored = read_json(ws.evaluation)["models"][candidate]
    card = mlflow_model.CardFacts(params.mlflow.model_name, tags["data.md5"], tags["data.path"],
                                  mlflow_model.base_description(base, on_base),
                                  tags["base_model.sha256"], tags["git.commit"],
                                  {k.split(".", 1)[1]: float(v) for k, v in tags.items() if k.startswith("test.")},
                                  mlflow_model.calibration_notes(scored),
                                  mlflow_model.base_choice_notes(json.loads(tags.get("base_model.candidates", "[]")),
                                                                 base))
    with tempfile.TemporaryDirectory(prefix="tuneloop-package-") as scratch:
        packaged = mlflow_model.save_version_model(
            folder, base, resolve_model_path(base) if on_base else None, card,
            Path(scratch) / "model", Path(scratch), tags["scoring_precision"])
        description = (packaged / "README.md").read_text()
        trained_by = tracking.last_stage_run(ws, "baseline" if candidate == PROBE else "finetune", tags["data.md5"])
        return registry.create_version(params.mlflow.model_name, run_id, packaged, tags, ws.splits, key, description,
                                       trained_by)


def apply_decision(name: str, info: registry.VersionInfo, decision: dict, via_shadow: bool = False) -> bool:
    """The gate's decision on a complete version, whatever part of it an
    interrupted registration already applied (see `registry.promotion_steps`).
    With `via_shadow` (gate.promote_via_shadow) a passing version gets `shadow`,
    not `champion`, while there is a champion to shadow.

    Returns:
        True when the version became the shadow.
    """
    champion = registry.alias_version(name, registry.CHAMPION)
    if via_shadow and decision["promote"] and not info.tags.get("decision") and champion is not None \
            and champion.version != info.version:
        registry.set_shadow(name, info.version, "gate passed: " + "; ".join(decision["reasons"]))
        registry.client().set_model_version_tag(name, info.version, "decision", "shadow")  # last: applied
        return True
    audited = any(e["action"] == "promote" and e["to"] == info.version for e in registry.audit_trail(name))
    why = "gate passed: " + "; ".join(decision["reasons"])
    for step in registry.promotion_steps(decision["promote"], info.tags.get("decision"),
                                         champion.version if champion else None, info.version, audited):
        if step == "move champion":
            registry.move_champion(name, info.version, "promote", why)
        elif step == "record audit":  # the alias moved but the server was lost before its audit entry
            previous = registry.alias_version(name, registry.PREVIOUS)
            registry.record_audit(name, "promote", previous.version if previous else None, info.version, why)
        elif step == "tag promoted":
            registry.client().set_model_version_tag(name, info.version, "decision", "promoted")
        else:
            registry.reject_version(name, info.version, decision["reasons"])
    return info.tags.get("decision") == "shadow"  # a re-run after the shadow was set


def check_candidate_unchanged(ws: Workspace, candidate: str = CHALLENGER) -> None:
    """The model about to be registered must be the one evaluate scored
    (another run writing models/ meanwhile would otherwise slip in).

    Raises:
        IntegrityError: naming every changed file.
    """
    evaluated = read_json(ws.evaluation).get("probe_files" if candidate == PROBE else "challenger_files")
    if evaluated is not None:
        what = "the probe" if candidate == PROBE else "the challenger"
        integrity.check_folder(candidate_dir(ws, candidate), evaluated, f"{what} evaluate scored")


def finish_run(ws: Workspace, status: str, outcome: str, version: str | None = None) -> None:
    """Closes the pipeline's MLflow run with its outcome, for `tuneloop status`."""
    client = registry.client()
    run_id = tracking.recorded_run_id(ws)
    client.set_tag(run_id, "tuneloop.outcome", outcome)
    if version:
        client.set_tag(run_id, "tuneloop.version", version)
        data_md5 = client.get_run(run_id).data.tags.get("data.md5")
        client.update_run(run_id, name=tracking.run_name("retrain", data_md5, f"{outcome} v{version}"))
    tracking.end_pipeline_run(ws, status)
