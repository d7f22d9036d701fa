"""Shadow challengers on a real (SQLite) MLflow registry: `tuneloop shadow VERSION`
sets the alias (audited) or refuses in one line changing nothing; a passing gate
with gate.promote_via_shadow gives the challenger `shadow`, not `champion`; the
monitor's shadow step reads the store's paired answers and promotes (the old
champion becomes `previous`) or discards (alias removed, version tagged with the
reasons), each audited, or waits."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from tuneloop.pipeline import monitoring
from tuneloop.pipeline.params import parse_params
from tuneloop.pipeline.stages import apply_decision
from tuneloop.plumbing.tracking import start_pipeline_run
from tuneloop.service.store import Prediction, PredictionStore
from tuneloop.tasks import registry
from tuneloop.tasks.registry import CHAMPION, PREVIOUS, SHADOW, alias_version, audit_trail, create_version
from tuneloop.values.workspace import Workspace

MODEL_FILES = {"tuneloop.json": json.dumps({"method": "lora", "max_length": 128}),
               "labels.json": json.dumps(["negative", "positive"]), "adapter_model.safetensors": "not weights"}
LABELS = ("negative", "positive")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("shadow-challenger")
    for name, content in MODEL_FILES.items():
        (folder / name).write_text(content)
    return folder


@pytest.fixture
def versions(mlflow_sandbox, mlflow_model_name, model_dir, tmp_path) -> str:
    """Versions 1, 2 and 3; 1 is the champion."""
    run_id = start_pipeline_run(mlflow_sandbox.config(model_name=mlflow_model_name), Workspace(tmp_path / "run"),
                                {"data.md5": "0" * 32})
    for _ in range(3):
        create_version(mlflow_model_name, run_id, model_dir, {})
    registry.move_champion(mlflow_model_name, "1", "promote", "first")
    return mlflow_model_name


def aliases(name: str) -> dict[str, str | None]:
    return {alias: (info.version if (info := alias_version(name, alias)) else None)
            for alias in (CHAMPION, PREVIOUS, SHADOW)}


def project(root: Path, sandbox, name: str, **sections) -> Path:
    root.mkdir(exist_ok=True)
    params = {"mlflow": {"tracking_uri": sandbox.tracking_uri, "experiment": sandbox.experiment, "model_name": name},
              "validate": {"labels": list(LABELS)},
              "serve": {"store_url": f"sqlite:///{root}/predictions.db"}, **sections}
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return root


# --- tuneloop shadow VERSION --------------------------------------------------------------------


def test_shadow_command_sets_the_alias_with_an_audit_entry(versions, mlflow_sandbox, tmp_path) -> None:
    from tuneloop.cli import app

    root = project(tmp_path / "p", mlflow_sandbox, versions)
    result = CliRunner().invoke(app, ["shadow", "2", "--why", "try the new data", "--root", str(root)])
    assert result.exit_code == 0, result.output
    assert f"{versions}: version 2 is the shadow" in result.output
    assert aliases(versions) == {CHAMPION: "1", PREVIOUS: None, SHADOW: "2"}
    entry = audit_trail(versions)[-1]
    assert (entry["action"], entry["from"], entry["to"], entry["why"]) == ("shadow", None, "2", "try the new data")
    status = CliRunner().invoke(app, ["status", "--root", str(root)])
    assert any(line.startswith("shadow ") and line.endswith(" version 2 (`tuneloop monitor` decides)")
               for line in status.output.splitlines()), status.output
    result = CliRunner().invoke(app, ["shadow", "3", "--root", str(root)])
    assert result.exit_code == 0 and "(was version 2)" in result.output
    assert aliases(versions)[SHADOW] == "3" and audit_trail(versions)[-1]["from"] == "2"


@pytest.mark.parametrize("version, said", [
    ("42", "has no version 42"),
    ("1", "version 1 of {name} already is the champion"),
    ("two", "a version is a positive whole number"),
])
def test_shadow_command_refuses_an_unknown_version_or_the_champion_in_one_line_changing_nothing(
        versions, mlflow_sandbox, tmp_path, version: str, said: str) -> None:
    from tuneloop.cli import app

    root = project(tmp_path / "p", mlflow_sandbox, versions)
    trail = audit_trail(versions)
    result = CliRunner().invoke(app, ["shadow", version, "--root", str(root)])
    assert result.exit_code == 2
    assert "shadow refused, the registry is unchanged" in result.output and said.format(name=versions) in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert aliases(versions) == {CHAMPION: "1", PREVIOUS: None, SHADOW: None} and audit_trail(versions) == trail


# --- the gate's decision with gate.promote_via_shadow ------------------------------------------------


def test_a_passing_challenger_becomes_the_shadow_once_and_the_champion_stays(versions) -> None:
    decision = {"promote": True, "reasons": ["PASS beats the champion"]}
    assert apply_decision(versions, registry.get_version(versions, "2"), decision, via_shadow=True) is True
    assert aliases(versions) == {CHAMPION: "1", PREVIOUS: None, SHADOW: "2"}
    assert registry.get_version(versions, "2").tags["decision"] == "shadow"
    trail = audit_trail(versions)
    assert apply_decision(versions, registry.get_version(versions, "2"), decision, via_shadow=True) is True
    assert audit_trail(versions) == trail  # a re-run of register changes nothing
    assert apply_decision(versions, registry.get_version(versions, "3"), decision, via_shadow=False) is False
    assert aliases(versions)[CHAMPION] == "3"  # off: promoted directly, as before


# --- the monitor's shadow step --------------------------------------------------------------------


def traffic(store: PredictionStore, rows: int, agree: bool, confidence: float, labelled: int = 0) -> None:
    """`rows` champion (v1) predictions the shadow (v2) also answered, the first `labelled` with feedback."""
    now = datetime.now(timezone.utc)
    for i in range(rows):
        label = LABELS[i % 2]
        other = label if agree else LABELS[(i + 1) % 2]
        store.log([Prediction(f"r{i}", 0, f"text {i}", label, 0.8, {label: 0.8}, "1", ts=now + timedelta(seconds=i))])
        store.log_shadow([Prediction(f"r{i}", 0, "", other, confidence, {other: confidence}, "2")])
        if i < labelled:
            store.attach_feedback(f"r{i}", [label])


def params_for(root: Path, sandbox, name: str, **shadow):
    raw = yaml.safe_load(project(root, sandbox, name, shadow={"min_hours": 0.0, "min_rows": 40,
                                                               "min_labelled_rows": 20, "bootstrap_samples": 200,
                                                               **shadow}).joinpath("params.yaml").read_text())
    return parse_params(raw), Workspace(root)


def judged(name: str, sandbox, root: Path, rows: int, agree: bool, labelled: int = 0, **shadow) -> dict:
    """v2 made the shadow of v1, `rows` paired answers logged, then the monitor's shadow step."""
    registry.set_shadow(name, "2", "try it")
    params, workspace = params_for(root, sandbox, name, **shadow)
    traffic(monitoring.prediction_store(params, workspace), rows, agree=agree, confidence=0.9, labelled=labelled)
    return monitoring.check_shadow(params, workspace, "1")


def test_monitor_promotes_a_shadow_that_agrees_and_is_sure_the_old_champion_becoming_previous(
        versions, mlflow_sandbox, tmp_path) -> None:
    result = judged(versions, mlflow_sandbox, tmp_path / "p", 60, agree=True, labelled=30)
    assert result["verdict"] == "promote", result["reasons"]
    assert result["stats"]["rows"] == 60 and result["stats"]["agreement"] == 1.0
    assert result["stats"]["labelled"] == 30 and result["stats"]["shadow_f1"] == result["stats"]["champion_f1"] == 1.0
    assert aliases(versions) == {CHAMPION: "2", PREVIOUS: "1", SHADOW: None}
    entry = audit_trail(versions)[-1]
    assert (entry["action"], entry["from"], entry["to"]) == ("shadow-promote", "1", "2")
    assert "PASS agrees with the champion on 1.0000 of 60 rows" in entry["why"]
    assert registry.get_version(versions, "2").tags["shadow.outcome"] == "promoted"


def test_monitor_discards_a_shadow_that_disagrees_tagging_it_with_the_reasons(
        versions, mlflow_sandbox, tmp_path) -> None:
    result = judged(versions, mlflow_sandbox, tmp_path / "p", 60, agree=False)  # no labels
    assert result["verdict"] == "discard"
    assert "FAIL agrees with the champion on 0.0000 of 60 rows (needs >= 0.9)" in result["reasons"]
    assert aliases(versions) == {CHAMPION: "1", PREVIOUS: None, SHADOW: None}
    tags = registry.get_version(versions, "2").tags
    assert tags["shadow.outcome"] == "discarded" and "FAIL agrees with the champion" in tags["shadow.reasons"]
    entry = audit_trail(versions)[-1]
    assert (entry["action"], entry["to"]) == ("shadow-discard", "2") and "FAIL agrees" in entry["why"]


def test_with_labels_the_monitor_discards_a_shadow_that_is_clearly_worse_on_them(
        versions, mlflow_sandbox, tmp_path) -> None:
    result = judged(versions, mlflow_sandbox, tmp_path / "p", 60, agree=False, labelled=30)
    assert result["verdict"] == "discard"
    assert "PASS agrees with the champion on 0.0000 of 60 rows (needs >= 0.9) (not binding: 30 labelled rows " \
           "judge macro-F1)" in result["reasons"]
    assert any(r.startswith("FAIL macro-F1 on 30 labelled rows: shadow 0.0000 vs champion 1.0000")
               for r in result["reasons"])
    assert "FAIL macro-F1" in registry.get_version(versions, "2").tags["shadow.reasons"]


def test_monitor_waits_for_the_baking_window_and_changes_nothing(versions, mlflow_sandbox, tmp_path) -> None:
    registry.set_shadow(versions, "2", "try it")
    params, workspace = params_for(tmp_path / "p", mlflow_sandbox, versions, min_hours=24.0)
    traffic(monitoring.prediction_store(params, workspace), 10, agree=True, confidence=0.9)
    trail = audit_trail(versions)
    result = monitoring.check_shadow(params, workspace, "1")
    assert result["verdict"] == "wait"
    assert result["reasons"][0] == "WAIT 10 paired predictions of the 40 needed (shadow.min_rows)"
    assert result["reasons"][1].startswith("WAIT 0.0 h of the 24 h needed")
    assert aliases(versions) == {CHAMPION: "1", PREVIOUS: None, SHADOW: "2"} and audit_trail(versions) == trail
    assert monitoring.check_shadow(params, workspace, "1")["verdict"] == "wait"


def test_a_shadow_made_champion_another_way_stops_being_the_shadow(versions) -> None:
    registry.set_shadow(versions, "2", "try it")
    registry.rollback(versions, to_version="2", why="operator's choice")
    assert aliases(versions) == {CHAMPION: "2", PREVIOUS: "1", SHADOW: None}


def test_without_a_shadow_the_monitor_says_so(versions, mlflow_sandbox, tmp_path) -> None:
    params, workspace = params_for(tmp_path / "p", mlflow_sandbox, versions)
    assert monitoring.check_shadow(params, workspace, "1") == {"shadow": None, "verdict": None,
                                                             "reasons": ["no shadow version"], "stats": None}
