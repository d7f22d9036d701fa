"""Rollback and the follower against a real (SQLite) MLflow registry: `tuneloop
rollback` and registry.rollback move the alias in one audited step or change
nothing, and the service's loader follows the alias, refusing a broken version.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from tasks import registry
from tasks.finetune import FinetuneConfig, finetune
from tasks.registry import CHAMPION, PREVIOUS, RollbackError, alias_version, audit_trail, move_champion
from tasks.serve import ChampionFollower, registry_loader, registry_lookup
from tasks.tracking import start_pipeline_run
from tasks.workspace import Workspace

FAST = FinetuneConfig(epochs=1, max_steps=4, learning_rate=1e-2, batch_size=16, lora_r=8, max_length=32)


@pytest.fixture(scope="module")
def model_dirs(tiny_bert, toy_task, tmp_path_factory) -> dict[str, Path]:
    """A working tiny LoRA model and a copy whose adapter weights are garbage."""
    out = tmp_path_factory.mktemp("serve-registry")
    good = finetune("tiny", tiny_bert, toy_task["train"], toy_task["validation"], toy_task["labels"], FAST,
                    out / "good", out / "checkpoints", "serve", progress=False).model_dir
    broken = shutil.copytree(good, out / "broken")
    (broken / "adapter_model.safetensors").write_bytes(b"these are not tensors")
    return {"good": good, "broken": broken}


def register(sandbox, name: str, folder: Path, tmp_path: Path) -> str:
    """One pipeline run per version: versions of one run would share its `model` artefact folder."""
    workspace = Workspace(Path(tempfile.mkdtemp(dir=tmp_path)))
    run_id = start_pipeline_run(sandbox.config(model_name=name), workspace, {"data.md5": "0" * 32})
    return registry.create_version(name, run_id, folder, {}).version


@pytest.fixture
def three_versions(mlflow_sandbox, mlflow_model_name, model_dirs, tmp_path) -> str:
    """Versions 1 and 2 (good) and 3 (broken); 1 is champion, then 2 with 1 as previous."""
    name = mlflow_model_name
    for kind in ("good", "good", "broken"):
        register(mlflow_sandbox, name, model_dirs[kind], tmp_path)
    move_champion(name, "1", "promote", "first")
    move_champion(name, "2", "promote", "better")
    return name


def aliases(name: str) -> tuple[str | None, str | None]:
    champion, previous = alias_version(name, CHAMPION), alias_version(name, PREVIOUS)
    return (champion.version if champion else None, previous.version if previous else None)


# --- registry.rollback ---------------------------------------------------------------------------


def test_rollback_moves_champion_to_previous_in_one_audited_step(three_versions) -> None:
    name = three_versions
    entry = registry.rollback(name, why="v2 misbehaves in production")
    assert (entry["action"], entry["from"], entry["to"], entry["why"]) == (
        "rollback", "2", "1", "v2 misbehaves in production")
    assert aliases(name) == ("1", "2")  # the version left becomes previous: rolling forward is one more step
    assert audit_trail(name)[-1] == entry
    registry.rollback(name, why="fixed upstream")
    assert aliases(name) == ("2", "1")


def test_rollback_to_a_named_version(three_versions) -> None:
    entry = registry.rollback(three_versions, to_version="3", why="operator's choice")
    assert (entry["from"], entry["to"]) == ("2", "3")
    assert aliases(three_versions) == ("3", "2")


@pytest.mark.parametrize("setup, to_version, message", [
    ("none", None, "has no champion to roll back from"),
    ("champion only", None, "has no `previous` version to roll back to; name one with --to VERSION"),
    ("two", "9", "has no version 9"),
    ("two", "2", "version 2 of .* already is the champion"),
])
def test_refused_rollback_names_the_reason_and_changes_nothing(
        mlflow_sandbox, mlflow_model_name, model_dirs, tmp_path, setup, to_version, message) -> None:
    name = mlflow_model_name
    register(mlflow_sandbox, name, model_dirs["good"], tmp_path)
    register(mlflow_sandbox, name, model_dirs["good"], tmp_path)
    if setup != "none":
        move_champion(name, "1", "promote", "first")
    if setup == "two":
        move_champion(name, "2", "promote", "second")
    before = (aliases(name), audit_trail(name))
    with pytest.raises(RollbackError, match=message):
        registry.rollback(name, to_version=to_version)
    assert (aliases(name), audit_trail(name)) == before


# --- tuneloop rollback --------------------------------------------------------------------------


def project(root: Path, sandbox, name: str) -> Path:
    """A project folder whose params.yaml points at the sandbox registry."""
    root.mkdir()
    params = {"mlflow": {"tracking_uri": sandbox.tracking_uri, "experiment": sandbox.experiment, "model_name": name}}
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return root


def test_rollback_command_prints_from_and_to_and_records_why(three_versions, mlflow_sandbox, tmp_path) -> None:
    from tuneloop.cli import app

    root = project(tmp_path / "project", mlflow_sandbox, three_versions)
    result = CliRunner().invoke(app, ["rollback", "--why", "canary errors", "--root", str(root)])
    assert result.exit_code == 0, result.output
    assert f"{three_versions}: champion rolled back from version 2 to version 1 (canary errors)" in result.output
    assert aliases(three_versions) == ("1", "2")
    assert audit_trail(three_versions)[-1]["why"] == "canary errors"


def test_rollback_command_refuses_an_unknown_version_and_leaves_the_registry(
        three_versions, mlflow_sandbox, tmp_path) -> None:
    from tuneloop.cli import app

    root = project(tmp_path / "project", mlflow_sandbox, three_versions)
    result = CliRunner().invoke(app, ["rollback", "--to", "42", "--root", str(root)])
    assert result.exit_code == 2
    assert "rollback refused, the registry is unchanged" in result.output and "has no version 42" in result.output
    assert aliases(three_versions) == ("2", "1")


# --- the follower on the registry ---------------------------------------------------------------


def test_follower_serves_promotions_and_rollbacks_and_never_a_broken_version(
        three_versions, tiny_bert, tmp_path) -> None:
    name = three_versions
    follower = ChampionFollower(name, str(tiny_bert), registry_lookup(name),
                                registry_loader(name, tmp_path / "cache", str(tiny_bert), "cpu"), poll_seconds=60)
    assert follower.check() and follower.served.version == "2"
    registry.rollback(name, why="test")
    assert follower.check() and follower.served.version == "1"
    move_champion(name, "3", "promote", "a broken version slips through")
    assert follower.check() is False
    assert follower.served.version == "1"
    assert follower.failed_version == "3"
    assert "version 3 was not switched to (version 1 keeps serving)" in follower.last_error
    registry.rollback(name, why="3 cannot load")  # back to 1: still serving, nothing to load
    assert follower.check() is False and follower.served.version == "1" and follower.failed_version is None
