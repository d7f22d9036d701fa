"""The register stage as `dvc repro` calls it: versions registered one after
another without a fresh ingest each keep their own files, verified, and serve."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

import pandas as pd
import pytest

from tuneloop.model.classifier import load_classifier, predict_proba
from tuneloop.pipeline.params import parse_params
from tuneloop.plumbing.integrity import IntegrityError, folder_manifest
from tuneloop.plumbing.mlflow_model import REWRITTEN
from tuneloop.plumbing.tracking import start_pipeline_run
from tuneloop.service.serve import registry_loader
from tuneloop.tasks import registry
from tuneloop.tasks.finetune import FinetuneConfig, finetune
from tuneloop.tasks.ingest import DataVersion
from tuneloop.values.workspace import Workspace, write_json

FAST = FinetuneConfig(epochs=1, max_steps=4, learning_rate=1e-2, batch_size=16, lora_r=8, max_length=32)
TEXTS = ["the film was great", "the plot was awful really", "this movie was boring"]


@pytest.fixture(scope="module")
def challengers(tiny_bert, toy_task, tmp_path_factory) -> list[Path]:
    """Two tiny LoRA models, as two finetune runs with different settings would leave them."""
    out = tmp_path_factory.mktemp("challengers")
    return [finetune("tiny", tiny_bert, toy_task["train"], toy_task["validation"], toy_task["labels"],
                     FinetuneConfig(**{**asdict(FAST), "seed": seed}), out / f"seed{seed}", out / "checkpoints",
                     "register", progress=False).model_dir for seed in (1, 2)]


def evaluated(ws: Workspace, challenger: Path, promote: bool) -> None:
    """What finetune, evaluate and gate leave in the workspace for register."""
    shutil.rmtree(ws.challenger_dir, ignore_errors=True)
    shutil.copytree(challenger, ws.challenger_dir)
    scores = {"accuracy": 0.9, "macro_f1": 0.9, "ece": 0.05, "latency_ms_per_example": 1.0}
    write_json(ws.evaluation, {"models": {"challenger": scores},
                               "challenger_files": folder_manifest(ws.challenger_dir)})
    write_json(ws.decision, {"promote": promote, "reasons": ["test"]})


@pytest.fixture
def workspace(tmp_path, toy_task, mlflow_sandbox) -> Workspace:
    """A workspace after ingest (one pipeline run opened) and split."""
    ws = Workspace(tmp_path)
    texts, labels = toy_task["validation"]
    ws.splits.parent.mkdir(parents=True)
    pd.DataFrame({"text": texts, "label": labels, "split": "test"}).to_parquet(ws.splits)
    write_json(ws.data_version, asdict(DataVersion("e" * 32, 1, "data/raw/x.csv", "x.csv", 64, 0)))
    return ws


def trained_files(manifest: dict[str, str]) -> dict[str, str]:
    """The files packaging leaves byte-identical (it makes base paths portable and drops PEFT's blank card)."""
    return {path: sha for path, sha in manifest.items() if path not in REWRITTEN}


def stage_params(tiny_bert, sandbox, name: str):
    return parse_params({"model": {"base": str(tiny_bert)}, "validate": {"labels": ["negative", "positive"]},
                         "mlflow": {"tracking_uri": sandbox.tracking_uri, "experiment": sandbox.experiment,
                                    "model_name": name}})


def test_two_versions_registered_without_a_fresh_ingest_keep_their_own_files_and_both_serve(
        workspace, challengers, tiny_bert, mlflow_sandbox, mlflow_model_name, tmp_path) -> None:
    from tuneloop.pipeline import stages

    params = stage_params(tiny_bert, mlflow_sandbox, mlflow_model_name)
    first_pipeline = start_pipeline_run(params.mlflow, workspace, {"data.md5": "e" * 32})  # ingest, once
    evaluated(workspace, challengers[0], promote=True)
    first = stages.register(params, workspace)
    evaluated(workspace, challengers[1], promote=False)  # params changed: finetune, evaluate, gate again
    second = stages.register(params, workspace)
    assert (first["version"], second["version"], second["champion"]) == ("1", "2", "1")

    name = mlflow_model_name
    v1, v2 = registry.get_version(name, "1"), registry.get_version(name, "2")
    for version, challenger in (("1", challengers[0]), ("2", challengers[1])):  # weights byte-identical to the trained
        downloaded = folder_manifest(registry.download_version(name, version, tmp_path / "cache"))
        assert trained_files(downloaded) == trained_files(folder_manifest(challenger))
    served = registry_loader(name, tmp_path / "serve-cache", "/params/base/moved/on", "cpu")("1")
    expected = predict_proba(load_classifier(challengers[0], str(tiny_bert), "cpu"), TEXTS)
    assert predict_proba(served, TEXTS) == pytest.approx(expected, abs=1e-6)

    client = registry.client()
    parents = [client.get_run(v.run_id).data.tags["mlflow.parentRunId"] for v in (v1, v2)]
    assert parents[0] == first_pipeline != parents[1]  # the ended pipeline run is not reused
    assert client.get_run(parents[1]).data.tags["tuneloop.continues"] == first_pipeline
    assert client.get_run(first_pipeline).data.tags["tuneloop.version"] == "1"
    assert client.get_run(parents[1]).data.tags["tuneloop.version"] == "2"


def test_each_register_run_shows_the_audit_trail_as_a_table_with_one_row_per_event(
        workspace, challengers, tiny_bert, mlflow_sandbox, mlflow_model_name, tmp_path) -> None:
    from tuneloop.pipeline import stages

    params = stage_params(tiny_bert, mlflow_sandbox, mlflow_model_name)
    start_pipeline_run(params.mlflow, workspace, {"data.md5": "e" * 32})
    for challenger in challengers:  # two versions, each promoted
        evaluated(workspace, challenger, promote=True)
        stages.register(params, workspace)
    client = registry.client()
    pipelines = {client.get_run(v.run_id).data.tags["mlflow.parentRunId"]
                 for v in registry.list_versions(mlflow_model_name)}
    runs = [run for run in client.search_runs([mlflow_sandbox.experiment_id], "tags.`tuneloop.stage` = 'register'",
                                              order_by=["start_time ASC"])
            if run.data.tags["mlflow.parentRunId"] in pipelines and "tuneloop.model" not in run.data.tags]
    tables = [json.loads(Path(registry.client().download_artifacts(run.info.run_id, registry.AUDIT_TABLE,
                                                                   str(tmp_path))).read_text()) for run in runs]
    assert [run.info.status for run in runs] == ["FINISHED", "FINISHED"]
    assert [table["columns"] for table in tables] == [["time", "action", "version", "from", "to", "reason"]] * 2
    trail = registry.audit_trail(mlflow_model_name)
    assert tables[1]["data"] == [[trail[0]["at"], "promote", "1", None, "1", "gate passed: test"],
                                 [trail[1]["at"], "promote", "2", "1", "2", "gate passed: test"]]
    assert tables[0]["data"] == tables[1]["data"][:1]  # the first run's table: the trail as it stood then
    tags = registry.client().get_registered_model(mlflow_model_name).tags
    assert len([k for k in tags if k.startswith("audit.")]) == 2  # the tags the code reads stay


def test_register_refuses_a_challenger_that_changed_after_evaluate_scored_it(
        workspace, challengers, tiny_bert, mlflow_sandbox, mlflow_model_name) -> None:
    from tuneloop.pipeline import stages

    params = stage_params(tiny_bert, mlflow_sandbox, mlflow_model_name)
    start_pipeline_run(params.mlflow, workspace, {})
    evaluated(workspace, challengers[0], promote=True)
    shutil.copy(challengers[1] / "adapter_model.safetensors", workspace.challenger_dir)  # another run's finetune
    with pytest.raises(IntegrityError, match="the challenger evaluate scored .* adapter_model.safetensors: sha256"):
        stages.register(params, workspace)
    assert registry.list_versions(mlflow_model_name) == []


def test_registering_the_same_evaluated_challenger_again_adds_no_version(
        workspace, challengers, tiny_bert, mlflow_sandbox, mlflow_model_name) -> None:
    from tuneloop.pipeline import stages

    params = stage_params(tiny_bert, mlflow_sandbox, mlflow_model_name)
    start_pipeline_run(params.mlflow, workspace, {"data.md5": "e" * 32})
    evaluated(workspace, challengers[0], promote=True)
    first, again = stages.register(params, workspace), stages.register(params, workspace)
    assert first == again and first["version"] == "1"
    assert [v.version for v in registry.list_versions(mlflow_model_name)] == ["1"]
    assert [(e["action"], e["to"]) for e in registry.audit_trail(mlflow_model_name)] == [("promote", "1")]


def test_a_registration_cut_off_after_its_version_was_created_is_finished_by_the_next_run(
        workspace, challengers, tiny_bert, mlflow_sandbox, mlflow_model_name, monkeypatch, tmp_path) -> None:
    import requests
    from mlflow import MlflowClient

    from tuneloop.pipeline import stages

    name = mlflow_model_name
    params = stage_params(tiny_bert, mlflow_sandbox, name)
    start_pipeline_run(params.mlflow, workspace, {"data.md5": "e" * 32})
    evaluated(workspace, challengers[0], promote=True)

    def lost(*args, **kwargs):  # the reference upload, right after the version was created
        raise requests.exceptions.ConnectionError("[Errno 111] Connection refused")

    with monkeypatch.context() as patch:
        patch.setattr(MlflowClient, "log_artifact", lost)
        with pytest.raises(registry.RegistryUnavailable, match="run `tuneloop register` again to finish it"):
            stages.register(params, workspace)
    (left,) = registry.list_versions(name)
    assert left.tags[registry.REGISTRATION_TAG] == "incomplete" and registry.alias_version(name, "champion") is None

    result = stages.register(params, workspace)
    (done,) = registry.list_versions(name)
    assert (result["version"], result["champion"], done.version) == ("1", "1", "1")
    assert done.tags[registry.REGISTRATION_TAG] == "complete" and done.tags["decision"] == "promoted"
    assert registry.download_reference(name, "1", tmp_path / "cache").exists()  # monitoring's reference data
    assert registry.client().get_run(done.run_id).info.status == "FINISHED"


def test_the_versions_params_tag_is_whole_json_within_the_tag_limit_for_the_shipped_settings() -> None:
    """The shipped params.yaml outgrew the tag (4,929 characters as spaced JSON against 4,900):
    the tag was cut mid-JSON and no longer parsed."""
    from tuneloop.pipeline.params import load_params
    from tuneloop.pipeline.stages import params_tags

    values = load_params(Path(__file__).resolve().parents[2] / "params.yaml").model_dump(mode="json", by_alias=True)
    tags = params_tags(values)
    assert len(tags["params"]) <= registry.MAX_TAG and json.loads(tags["params"]) == values
    assert "params.omitted" not in tags


def test_settings_too_long_for_one_tag_leave_out_the_serving_sections_first_and_say_so() -> None:
    from tuneloop.pipeline.stages import params_tags

    values = {"finetune": {"epochs": 2}, "monitor": {"note": "m" * 3000}, "serve": {"note": "s" * 3000}}
    tags = params_tags(values)
    assert json.loads(tags["params"]) == {"finetune": {"epochs": 2}, "serve": {"note": "s" * 3000}}
    assert tags["params.omitted"] == "monitor"
