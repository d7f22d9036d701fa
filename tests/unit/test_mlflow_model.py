"""Every registered version is a standard MLflow model: `mlflow.pyfunc` loads
the champion by alias and answers like `tuneloop serve`, and nothing in it
names a path of the machine that registered it."""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

import pandas as pd
import pytest

from tuneloop.model.classifier import load_classifier, score_texts
from tuneloop.pipeline.params import parse_params
from tuneloop.plumbing import tracking
from tuneloop.plumbing.integrity import folder_manifest
from tuneloop.plumbing.tracking import start_pipeline_run
from tuneloop.tasks import registry
from tuneloop.tasks.finetune import FinetuneConfig, finetune
from tuneloop.tasks.ingest import DataVersion
from tuneloop.values.workspace import Workspace, write_json

FAST = FinetuneConfig(epochs=1, max_steps=4, learning_rate=1e-2, batch_size=16, lora_r=8, max_length=32)
TEXTS = ["the film was great", "the plot was awful really", "this movie was boring"]
SCORES = {"accuracy": 0.9, "macro_f1": 0.875, "ece": 0.05, "latency_ms_per_example": 1.0}


@pytest.fixture(scope="module")
def champion(tiny_bert, toy_task, mlflow_sandbox, tmp_path_factory) -> dict:
    """A tiny LoRA challenger registered and promoted by the register stage."""
    from tuneloop.pipeline import stages

    root = tmp_path_factory.mktemp("project")
    ws = Workspace(root)
    trained = finetune("tiny", tiny_bert, toy_task["train"], toy_task["validation"], toy_task["labels"], FAST,
                       root / "trained", root / "checkpoints", "pyfunc", progress=False).model_dir
    ws.splits.parent.mkdir(parents=True)
    texts, labels = toy_task["validation"]
    pd.DataFrame({"text": texts, "label": labels, "split": "test"}).to_parquet(ws.splits)
    write_json(ws.data_version, asdict(DataVersion("e" * 32, 1, "data/raw/x.csv", "x.csv", 64, 0)))
    shutil.copytree(trained, ws.challenger_dir)
    write_json(ws.evaluation, {"models": {"challenger": SCORES},
                               "challenger_files": folder_manifest(ws.challenger_dir)})
    write_json(ws.decision, {"promote": True, "reasons": ["test"]})
    name = "tl-pyfunc-champion"
    params = parse_params({"model": {"base": str(tiny_bert)}, "validate": {"labels": ["negative", "positive"]},
                           "mlflow": {"tracking_uri": mlflow_sandbox.tracking_uri,
                                      "experiment": mlflow_sandbox.experiment, "model_name": name}})
    start_pipeline_run(params.mlflow, ws, {"data.md5": "e" * 32, "mlflow.source.type": "JOB"})
    with tracking.stage_run(ws, "finetune") as training:  # the run that trained it, as the finetune stage opens it
        pass
    stages.register(params, ws)
    return {"name": name, "trained": trained, "base": tiny_bert, "training_run": training.run_id}


def test_the_champion_loads_as_an_mlflow_pyfunc_model_and_answers_like_tuneloop_serve(champion) -> None:
    import mlflow

    model = mlflow.pyfunc.load_model(f"models:/{champion['name']}@champion")
    answer = model.predict(pd.DataFrame({"text": TEXTS}))

    expected = score_texts(load_classifier(champion["trained"], str(champion["base"]), "cpu"), TEXTS)
    assert list(answer.columns) == ["label", "confidence", "probabilities", "abstained"]
    assert answer["label"].tolist() == [s.label for s in expected]
    assert answer["abstained"].tolist() == [s.abstained for s in expected]
    assert set(answer["label"]) <= {"negative", "positive"}
    assert answer["confidence"].tolist() == pytest.approx([s.confidence for s in expected], abs=1e-6)
    assert [sum(p.values()) for p in answer["probabilities"]] == pytest.approx([1.0] * 3, abs=1e-5)


def test_a_version_records_signature_input_example_requirements_and_a_model_card(champion, tmp_path) -> None:
    import mlflow
    from mlflow.models import Model

    root = Path(mlflow.artifacts.download_artifacts(f"models:/{champion['name']}/1", dst_path=str(tmp_path)))
    mlmodel = Model.load(str(root / "MLmodel"))
    assert mlmodel.signature.inputs.input_names() == ["text"]
    assert mlmodel.signature.outputs.input_names() == ["label", "confidence", "probabilities", "abstained"]
    assert json.loads((root / "input_example.json").read_text())["columns"] == ["text"]
    requirements = (root / "requirements.txt").read_text().split()
    assert {r.split("==")[0] for r in requirements} >= {"mlflow", "torch", "transformers", "peft", "safetensors"}
    card = (root / "README.md").read_text()
    assert "e" * 32 in card and "| macro_f1 | 0.8750 |" in card and "## Limits" in card
    assert (root / "artifacts" / "base_model" / "config.json").exists()  # a local base travels with the model
    assert registry.get_version(champion["name"], "1").tags.get("base_model.path") is None


def test_a_registered_version_names_no_path_of_the_machine_that_registered_it(champion, tmp_path) -> None:
    import mlflow

    root = Path(mlflow.artifacts.download_artifacts(f"models:/{champion['name']}/1", dst_path=str(tmp_path)))
    local = (str(champion["base"]), str(champion["trained"]), sys.prefix, "file://", tempfile.gettempdir())
    named = {f"{path.relative_to(root)}: {needle}" for path in root.rglob("*")
             if path.is_file() and path.suffix in {".json", ".yaml", ".txt", ".md", ""}
             for needle in local if needle in path.read_text(errors="replace")}
    assert named == set()


def test_a_versions_run_is_named_after_it_and_carries_the_pipelines_source_tags(champion) -> None:
    run = registry.client().get_run(registry.get_version(champion["name"], "1").run_id)
    assert run.info.run_name == f"register {champion['name']} v1"
    assert (run.data.tags["mlflow.source.type"], run.data.tags["data.md5"]) == ("JOB", "e" * 32)


def test_a_version_is_an_mlflow_3_logged_model_of_its_training_run_with_its_test_metrics(champion, tmp_path) -> None:
    import mlflow
    from mlflow.models import Model

    version = registry.client().get_model_version(champion["name"], "1")
    root = Path(mlflow.artifacts.download_artifacts(f"models:/{champion['name']}/1", dst_path=str(tmp_path)))
    model_id = Model.load(str(root / "MLmodel")).model_id
    logged = registry.client().get_logged_model(model_id)
    assert version.source == logged.artifact_location  # the version is the logged model's files
    assert (logged.source_run_id, logged.status.name) == (champion["training_run"], "READY")
    for run_id in (champion["training_run"], version.run_id):  # the runs table's Models column, both rows
        assert [o.model_id for o in registry.client().get_run(run_id).outputs.model_outputs] == [model_id]
    assert {m.key: m.value for m in logged.metrics} == pytest.approx({f"test.{k}": v for k, v in SCORES.items()})
