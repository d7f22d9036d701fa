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

from tuneloop.plumbing.tracking import start_pipeline_run
from tuneloop.service.serve import ChampionFollower, registry_loader, registry_lookup
from tuneloop.tasks import registry
from tuneloop.tasks.finetune import FinetuneConfig, finetune
from tuneloop.tasks.registry import CHAMPION, PREVIOUS, RollbackError, alias_version, audit_trail, move_champion
from tuneloop.values.workspace import Workspace

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


def registry_follower(name: str, tiny_bert, tmp_path) -> ChampionFollower:
    """A follower of `name`'s champion that loads versions into tmp_path/cache and polls by hand."""
    return ChampionFollower(name, str(tiny_bert), registry_lookup(name),
                            registry_loader(name, tmp_path / "cache", str(tiny_bert), "cpu"), poll_seconds=60)


def test_follower_serves_promotions_and_rollbacks_and_never_a_broken_version(
        three_versions, tiny_bert, tmp_path) -> None:
    name = three_versions
    follower = registry_follower(name, tiny_bert, tmp_path)
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


def test_follower_never_serves_a_version_whose_registration_did_not_finish(
        three_versions, tiny_bert, tmp_path) -> None:
    name = three_versions
    follower = registry_follower(name, tiny_bert, tmp_path)
    assert follower.check() and follower.served.version == "2"
    client = registry.client()
    client.set_model_version_tag(name, "1", registry.REGISTRATION_TAG, registry.INCOMPLETE)  # cut off part-way
    client.set_registered_model_alias(name, CHAMPION, "1")  # by hand, around move_champion's check
    assert follower.check() is False and follower.served.version == "2" and follower.failed_version == "1"
    assert "version 1 was not switched to (version 2 keeps serving): IncompleteVersion" in follower.last_error
    assert not (tmp_path / "cache" / "1").exists()


def refused_rollback(name: str, mlflow_sandbox, tmp_path) -> str:
    """`tuneloop rollback` to `previous`, which must be refused with champion and
    previous as they were; returns what the command printed."""
    from tuneloop.cli import app

    root = project(tmp_path / "project", mlflow_sandbox, name)
    result = CliRunner().invoke(app, ["rollback", "--root", str(root)])
    assert result.exit_code == 2
    assert "rollback refused, the registry is unchanged" in result.output
    assert aliases(name) == ("2", "1")
    return result.output


def test_rollback_command_refuses_a_version_whose_registration_did_not_finish(
        three_versions, mlflow_sandbox, tmp_path) -> None:
    registry.client().set_model_version_tag(three_versions, "1", registry.REGISTRATION_TAG, registry.INCOMPLETE)
    output = refused_rollback(three_versions, mlflow_sandbox, tmp_path)
    assert "version 1 of" in output and "is an unfinished registration" in output


# --- verified before serving, on the version's own base model ----------------------------------


def registered_folder(name: str, version: str) -> Path:
    from urllib.parse import urlparse

    return Path(urlparse(registry.get_version(name, version).source).path)


def flip_byte(path: Path, at: int = 0) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def test_follower_refuses_a_version_whose_registered_weights_changed_and_keeps_serving(
        three_versions, tiny_bert, tmp_path) -> None:
    name = three_versions
    follower = registry_follower(name, tiny_bert, tmp_path)
    assert follower.check() and follower.served.version == "2"
    flip_byte(registered_folder(name, "1") / "adapter_model.safetensors", at=-10)  # in the tensor data: still loads
    registry.rollback(name, why="test")
    assert follower.check() is False
    assert follower.served.version == "2" and follower.failed_version == "1"
    assert "version 1 was not switched to (version 2 keeps serving): IntegrityError" in follower.last_error
    assert "adapter_model.safetensors: sha256" in follower.last_error


def test_rollback_to_a_version_whose_files_changed_is_refused_and_the_champion_stays(
        three_versions, mlflow_sandbox, tmp_path) -> None:
    flip_byte(registered_folder(three_versions, "1") / "adapter_model.safetensors", at=-10)
    output = refused_rollback(three_versions, mlflow_sandbox, tmp_path)
    assert "version 1 of" in output and "adapter_model.safetensors: sha256" in output


@pytest.fixture(scope="module")
def other_bert(tmp_path_factory) -> Path:
    """Another tiny BERT (other random weights): what params.model.base says today."""
    from tiny_model import build_tiny_bert

    return build_tiny_bert(tmp_path_factory.mktemp("other-bert"), seed=1)


def base_tags(base: Path, name: str = "tiny") -> dict[str, str]:
    from tuneloop.plumbing.integrity import base_weights_sha256

    return {"base_model.name": name, "base_model.path": str(base), "base_model.sha256": base_weights_sha256(base)}


def test_a_lora_version_serves_on_the_base_model_it_recorded_not_on_params_base(
        mlflow_sandbox, mlflow_model_name, model_dirs, tiny_bert, other_bert, tmp_path) -> None:
    from tuneloop.model.classifier import load_classifier, predict_proba

    name, texts = mlflow_model_name, ["the film was great", "the plot was awful really"]
    workspace = Workspace(Path(tempfile.mkdtemp(dir=tmp_path)))
    run_id = start_pipeline_run(mlflow_sandbox.config(model_name=name), workspace, {})
    version = registry.create_version(name, run_id, model_dirs["good"], base_tags(tiny_bert)).version
    served = registry_loader(name, tmp_path / "cache", str(other_bert), "cpu")(version)
    trained_on = predict_proba(load_classifier(model_dirs["good"], str(tiny_bert), "cpu"), texts)
    on_params_base = predict_proba(load_classifier(model_dirs["good"], str(other_bert), "cpu"), texts)
    assert predict_proba(served, texts) == pytest.approx(trained_on, abs=1e-6)
    assert not predict_proba(served, texts) == pytest.approx(on_params_base, abs=1e-3)


@pytest.mark.parametrize("case, error, message", [
    ("base weights changed", "IntegrityError", "was trained on base model 'tiny' with weights sha256"),
    ("base not on this machine", "FileNotFoundError", "the base model this version was trained on is not on this "
                                                      "machine: name '/nowhere/tiny'"),
])
def test_a_version_whose_base_model_changed_or_is_missing_never_serves(
        mlflow_sandbox, mlflow_model_name, model_dirs, tiny_bert, other_bert, tmp_path, case, error, message) -> None:
    name = mlflow_model_name
    tags = base_tags(tiny_bert)
    if case == "base weights changed":
        tags["base_model.path"] = str(other_bert)  # the recorded folder now holds other weights
    else:
        tags.update({"base_model.name": "/nowhere/tiny", "base_model.path": "/nowhere/tiny"})
    workspace = Workspace(Path(tempfile.mkdtemp(dir=tmp_path)))
    run_id = start_pipeline_run(mlflow_sandbox.config(model_name=name), workspace, {})
    registry.create_version(name, run_id, model_dirs["good"], tags)
    move_champion(name, "1", "promote", "first")
    follower = registry_follower(name, tiny_bert, tmp_path)
    assert follower.check() is False and follower.served is None
    assert f"version 1 was not switched to (nothing is served): {error}: " in follower.last_error
    assert message in follower.last_error
