"""bf16 scoring, opt-in (`model.scoring_precision: bf16`): allowed per version only when
its test answers agree with fp32's, carried by the registered version, and used only
where the machine multiplies bf16 in hardware."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tuneloop.model import classifier as classifier_module
from tuneloop.model.classifier import META_FILE, load_classifier, predict_logits
from tuneloop.pipeline.params import parse_params
from tuneloop.plumbing.integrity import folder_manifest
from tuneloop.plumbing.mlflow_model import portable_folder
from tuneloop.plumbing.tracking import start_pipeline_run
from tuneloop.service.serve import registry_loader
from tuneloop.tasks import registry
from tuneloop.tasks.evaluate import precision_check
from tuneloop.tasks.finetune import FinetuneConfig, finetune
from tuneloop.tasks.ingest import DataVersion
from tuneloop.values.workspace import Workspace, write_json

TEXTS = ["the film was great", "the plot was awful really", "this movie was boring", "fine"]


@pytest.fixture(scope="module")
def trained(tiny_bert, toy_task, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("precision")
    config = FinetuneConfig(epochs=1, max_steps=4, learning_rate=1e-2, batch_size=16, lora_r=8, max_length=32)
    return finetune("tiny", tiny_bert, toy_task["train"], toy_task["validation"], toy_task["labels"], config,
                    out / "model", out / "checkpoints", "precision", progress=False).model_dir


# rows whose fp32 answer is wrong, rows whose bf16 answer is wrong (1,000 rows, two labels)
@pytest.mark.parametrize("wrong_fp32, wrong_bf16, agreement, allowed, failing", [
    ((), (), "100.00%", True, []),  # identical answers
    ((), range(3), "99.70%", True, []),  # 3 right answers turned wrong: macro-F1 -0.003
    (range(4), range(4, 8), "99.20%", False, ["agreement"]),  # 8 answers changed, macro-F1 the same
    ((), range(20), "98.00%", False, ["agreement", "macro_f1"]),  # macro-F1 -0.02
])
def test_bf16_is_allowed_only_when_995_of_1000_answers_agree_and_macro_f1_stays_within_0_005(
        wrong_fp32, wrong_bf16, agreement: str, allowed: bool, failing: list[str]) -> None:
    y_true = np.arange(1000) % 2
    fp32, bf16 = y_true.copy(), y_true.copy()
    fp32[list(wrong_fp32)] = 1 - fp32[list(wrong_fp32)]
    bf16[list(wrong_bf16)] = 1 - bf16[list(wrong_bf16)]
    verdict = precision_check(fp32, bf16, y_true, 2, "bf16")
    assert verdict.yes is allowed
    assert [c.name for c in verdict.checks if not c.passed] == failing
    assert verdict.reasons[0].endswith(f"{agreement} of 1000 test answers equal fp32's (at least 99.5%)")


def test_a_bf16_classifier_runs_its_products_in_bf16_and_returns_float32_logits_close_to_fp32(
        trained, tiny_bert) -> None:
    fp32 = predict_logits(load_classifier(trained, str(tiny_bert), "cpu", precision="fp32"), TEXTS)
    bf16 = predict_logits(load_classifier(trained, str(tiny_bert), "cpu", precision="bf16"), TEXTS)
    assert bf16.dtype == np.float32
    assert not np.array_equal(fp32, bf16)  # bf16 rounding happened
    assert np.abs(fp32 - bf16).max() < 0.1


@pytest.mark.parametrize("allowed, native, expected", [
    ("bf16", True, "bf16"), ("bf16", False, "fp32"), (None, True, "fp32")])
def test_a_folder_allowed_bf16_scores_in_bf16_only_where_the_hardware_multiplies_bf16(
        trained, tiny_bert, tmp_path, monkeypatch, allowed, native, expected) -> None:
    folder = portable_folder(trained, tmp_path / "copy", str(tiny_bert), allowed or "fp32")
    meta = json.loads((folder / META_FILE).read_text())
    assert meta.get("scoring_precision") == allowed
    monkeypatch.setattr(classifier_module, "bf16_native", lambda device: native)
    assert load_classifier(folder, str(tiny_bert), "cpu").precision == expected


def test_a_version_registered_after_bf16_agreed_carries_it_and_serves_in_bf16(
        trained, tiny_bert, toy_task, tmp_path, mlflow_sandbox, mlflow_model_name, monkeypatch) -> None:
    from tuneloop.pipeline import stages

    ws = Workspace(tmp_path / "project")
    texts, labels = toy_task["validation"]
    ws.splits.parent.mkdir(parents=True)
    pd.DataFrame({"text": texts, "label": labels, "split": "test"}).to_parquet(ws.splits)
    write_json(ws.data_version, asdict(DataVersion("e" * 32, 1, "data/raw/x.csv", "x.csv", 64, 0)))
    params = parse_params({"model": {"base": str(tiny_bert), "scoring_precision": "bf16"},
                           "validate": {"labels": ["negative", "positive"]},
                           "mlflow": {"tracking_uri": mlflow_sandbox.tracking_uri,
                                      "experiment": mlflow_sandbox.experiment, "model_name": mlflow_model_name}})
    start_pipeline_run(params.mlflow, ws, {"data.md5": "e" * 32})
    import shutil

    monkeypatch.setattr(classifier_module, "bf16_native", lambda device: True)
    for allowed, version in ((True, "1"), (False, "2")):
        shutil.rmtree(ws.challenger_dir, ignore_errors=True)
        shutil.copytree(trained, ws.challenger_dir)
        if not allowed:  # another challenger: a new registration
            meta = json.loads((ws.challenger_dir / META_FILE).read_text())
            (ws.challenger_dir / META_FILE).write_text(json.dumps({**meta, "seed": 99}))
        checked = {"precision": "bf16", "allowed": allowed, "reasons": ["test"], "latency_ms_per_example": 1.0}
        scores = {"accuracy": 0.9, "macro_f1": 0.9, "ece": 0.05, "latency_ms_per_example": 1.0,
                  "scoring_precision": checked}
        write_json(ws.evaluation, {"models": {"challenger": scores}, "challenger_files": folder_manifest(
            ws.challenger_dir)})
        write_json(ws.decision, {"promote": True, "reasons": ["test"]})
        assert stages.register(params, ws)["version"] == version
        tag = registry.get_version(mlflow_model_name, version).tags["scoring_precision"]
        served = registry_loader(mlflow_model_name, tmp_path / "cache", str(tiny_bert), "cpu")(version)
        assert (tag, served.precision) == (("bf16", "bf16") if allowed else ("fp32", "fp32"))


@pytest.mark.parametrize("allowed, note", [
    (True, "scores in bf16 where the machine multiplies bf16 in hardware, in fp32 elsewhere (99.70% of 1000 "
           "test answers equal fp32's (at least 99.5%); test macro-F1 0.9970 in bf16, 1.0000 in fp32 (at most "
           "0.005 apart))"),
    (False, "scores in fp32: bf16 was asked for and refused (99.70% of 1000 test answers equal fp32's (at least "
            "99.5%); test macro-F1 0.9970 in bf16, 1.0000 in fp32 (at most 0.005 apart))"),
])
def test_the_model_card_says_which_precision_the_version_scores_in_and_why(allowed: bool, note: str) -> None:
    from tuneloop.plumbing.mlflow_model import calibration_notes

    reasons = ["PASS 99.70% of 1000 test answers equal fp32's (at least 99.5%)",
               "PASS test macro-F1 0.9970 in bf16, 1.0000 in fp32 (at most 0.005 apart)"]
    scored = {"scoring_precision": {"precision": "bf16", "allowed": allowed, "reasons": reasons}}
    assert calibration_notes(scored) == (note,)
