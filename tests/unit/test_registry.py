"""The model registry: versions, the champion/previous aliases, rejections, the audit trail, status.

All tests share one temporary SQLite MLflow (`mlflow_sandbox`, one per module)
and each uses its own registered-model name (`mlflow_model_name`).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import requests
from mlflow.exceptions import MlflowException

from tuneloop.plumbing.integrity import MANIFEST_TAG, IntegrityError
from tuneloop.plumbing.tracking import start_pipeline_run
from tuneloop.tasks import registry
from tuneloop.tasks.registry import (
    CHAMPION,
    MAX_TAG,
    PREVIOUS,
    alias_version,
    audit_trail,
    create_version,
    download_version,
    get_version,
    list_versions,
    model_status,
    move_champion,
    reject_version,
)
from tuneloop.values.workspace import Workspace

MODEL_FILES = {
    "tuneloop.json": json.dumps({"method": "lora", "max_length": 128}),
    "labels.json": json.dumps(["negative", "positive"]),
    "adapter_model.safetensors": "not really weights",
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder shaped like the finetune stage's output."""
    folder = tmp_path_factory.mktemp("challenger")
    for name, content in MODEL_FILES.items():
        (folder / name).write_text(content)
    return folder


@pytest.fixture(scope="module")
def pipeline_run_id(mlflow_sandbox, tmp_path_factory: pytest.TempPathFactory) -> str:
    """One pipeline run whose artefacts hold the registered versions' model folders."""
    return start_pipeline_run(mlflow_sandbox.config(), Workspace(tmp_path_factory.mktemp("run_ws")),
                              {"data.md5": "0" * 32})


def register(name: str, run_id: str, model_dir: Path, count: int) -> list[str]:
    """Registers `count` versions of the same folder; returns their version numbers."""
    return [create_version(name, run_id, model_dir, {"n": str(i)}).version for i in range(count)]


def test_create_version_registers_version_one_with_its_tags(
    mlflow_sandbox, pipeline_run_id: str, model_dir: Path, mlflow_model_name: str
) -> None:
    tags = {"data.md5": "a" * 32, "test.macro_f1": 0.875, "base_model.name": "all-MiniLM-L6-v2"}
    info = create_version(mlflow_model_name, pipeline_run_id, model_dir, tags)
    assert info.version == "1"
    assert registry.client().get_run(info.run_id).data.tags["mlflow.parentRunId"] == pipeline_run_id
    assert {k: v for k, v in info.tags.items() if k != MANIFEST_TAG} == {
        "data.md5": "a" * 32, "test.macro_f1": "0.875", "base_model.name": "all-MiniLM-L6-v2",
        "tuneloop.registration": "complete"}
    assert json.loads(info.tags[MANIFEST_TAG]) == {
        name: hashlib.sha256(text.encode()).hexdigest() for name, text in MODEL_FILES.items()}
    assert info.aliases == ()
    assert info.source.endswith(f"{info.run_id}/artifacts/model")
    assert get_version(mlflow_model_name, "1") == info
    second = create_version(mlflow_model_name, pipeline_run_id, model_dir, {})
    assert second.version == "2"
    assert second.run_id != info.run_id  # one version, one run, one artefact folder
    assert [v.version for v in list_versions(mlflow_model_name)] == ["1", "2"]


def test_create_version_truncates_overlong_tag_values(
    mlflow_sandbox, pipeline_run_id: str, model_dir: Path, mlflow_model_name: str
) -> None:
    info = create_version(mlflow_model_name, pipeline_run_id, model_dir, {"params": "x" * 6000})
    assert info.tags["params"] == "x" * MAX_TAG


def test_download_version_returns_a_folder_with_the_model_files(
    mlflow_sandbox, pipeline_run_id: str, model_dir: Path, mlflow_model_name: str, tmp_path: Path
) -> None:
    (version,) = register(mlflow_model_name, pipeline_run_id, model_dir, 1)
    folder = download_version(mlflow_model_name, version, tmp_path / "cache")
    assert folder == tmp_path / "cache" / version / "model"
    assert {p.name: p.read_text() for p in folder.iterdir()} == MODEL_FILES
    # a second call reuses the downloaded folder
    assert download_version(mlflow_model_name, version, tmp_path / "cache") == folder


def test_move_champion_sets_champion_then_demotes_it_to_previous(
    mlflow_sandbox, pipeline_run_id: str, model_dir: Path, mlflow_model_name: str
) -> None:
    name = mlflow_model_name
    register(name, pipeline_run_id, model_dir, 2)
    assert alias_version(name, CHAMPION) is None
    first = move_champion(name, "1", "promote", "gate passed")
    assert (first["from"], first["to"]) == (None, "1")
    assert alias_version(name, CHAMPION).version == "1"
    assert alias_version(name, PREVIOUS) is None
    second = move_champion(name, "2", "promote", "gate passed again")
    assert (second["from"], second["to"]) == ("1", "2")
    assert alias_version(name, CHAMPION).version == "2"
    assert alias_version(name, PREVIOUS).version == "1"
    assert get_version(name, "2").aliases == (CHAMPION,)
    assert get_version(name, "1").aliases == (PREVIOUS,)
    assert [v.aliases for v in list_versions(name)] == [(PREVIOUS,), (CHAMPION,)]


def test_moving_champion_to_the_current_champion_raises(
    mlflow_sandbox, pipeline_run_id: str, model_dir: Path, mlflow_model_name: str
) -> None:
    name = mlflow_model_name
    register(name, pipeline_run_id, model_dir, 1)
    move_champion(name, "1", "promote", "first")
    with pytest.raises(ValueError, match="version 1 of .* is already the champion"):
        move_champion(name, "1", "promote", "again")
    assert len(audit_trail(name)) == 1  # the refused move is not recorded


def test_reject_version_tags_decision_and_reasons_and_leaves_champion(
    mlflow_sandbox, pipeline_run_id: str, model_dir: Path, mlflow_model_name: str
) -> None:
    name = mlflow_model_name
    register(name, pipeline_run_id, model_dir, 2)
    move_champion(name, "1", "promote", "first")
    reasons = ["FAIL challenger macro_f1 0.80 vs champion 0.82", "PASS latency 2.00 ms/example"]
    reject_version(name, "2", reasons)
    tags = get_version(name, "2").tags
    assert tags["decision"] == "rejected"
    assert tags["rejected"] == "true"
    assert tags["reasons"] == "\n".join(reasons)
    assert alias_version(name, CHAMPION).version == "1"
    assert alias_version(name, PREVIOUS) is None
    assert get_version(name, "2").aliases == ()


def test_audit_trail_records_each_move_in_order_with_from_to_and_why(
    mlflow_sandbox, pipeline_run_id: str, model_dir: Path, mlflow_model_name: str
) -> None:
    name = mlflow_model_name
    register(name, pipeline_run_id, model_dir, 3)
    move_champion(name, "1", "promote", "first model")
    move_champion(name, "3", "promote", "v3 beat v1")
    move_champion(name, "1", "rollback", "v3 misbehaved in production")
    trail = audit_trail(name)
    assert [(e["action"], e["from"], e["to"], e["why"]) for e in trail] == [
        ("promote", None, "1", "first model"),
        ("promote", "1", "3", "v3 beat v1"),
        ("rollback", "3", "1", "v3 misbehaved in production"),
    ]
    stamps = [e["at"] for e in trail]
    assert stamps == sorted(stamps) and len(set(stamps)) == 3
    assert alias_version(name, PREVIOUS).version == "3"


def test_model_status_reports_champion_data_metrics_and_last_run_outcome(
    mlflow_sandbox, model_dir: Path, mlflow_model_name: str, tmp_path: Path
) -> None:
    name = mlflow_model_name
    config = mlflow_sandbox.config(experiment="status-test", model_name=name)  # its own experiment: its last run
    workspace = Workspace(tmp_path)
    run_id = start_pipeline_run(config, workspace, {"data.md5": "d" * 32, "git.commit": "abc123"})
    tags = {"data.md5": "d" * 32, "data.size": "1234", "test.macro_f1": "0.8512", "test.accuracy": "0.86",
            "base_model.name": "all-MiniLM-L6-v2"}
    first = create_version(name, run_id, model_dir, tags)
    create_version(name, run_id, model_dir, {**tags, "test.macro_f1": "0.9"})
    move_champion(name, "1", "promote", "first")
    client = registry.client()
    client.set_tag(run_id, "tuneloop.outcome", "promoted")
    client.set_tag(run_id, "tuneloop.version", "1")
    client.set_terminated(run_id, status="FINISHED")

    status = model_status(name, "status-test")
    assert status["model"] == name
    assert status["champion"] == {
        "version": "1", "data_md5": "d" * 32, "test": {"macro_f1": 0.8512, "accuracy": 0.86}, "run_id": first.run_id,
    }
    assert status["previous"] is None
    assert status["versions"] == 2
    assert status["last_run"] == {"run_id": run_id, "status": "FINISHED", "outcome": "promoted",
                                  "version": "1", "data_md5": "d" * 32}
    assert json.loads(workspace.run_state.read_text())["run_id"] == run_id


def test_model_status_without_champion_or_runs(mlflow_sandbox, mlflow_model_name: str) -> None:
    from tuneloop.plumbing.tracking import configure_tracking

    configure_tracking(mlflow_sandbox.config(experiment="empty-test"), mlflow_sandbox.root)
    status = model_status(mlflow_model_name, "empty-test")
    assert status == {"model": mlflow_model_name, "champion": None, "previous": None, "shadow": None, "versions": 0,
                      "incomplete": [], "last_run": None}


# --- one version, one artefact folder; files checked on every download --------------------------


def registered_folder(info) -> Path:
    """Where the local artefact store keeps a version's model files."""
    from urllib.parse import urlparse

    return Path(urlparse(info.source).path)


def flip_byte(path: Path, at: int = 0) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def test_registering_again_in_the_same_pipeline_run_never_touches_an_earlier_versions_files(
    mlflow_sandbox, pipeline_run_id: str, model_dir: Path, mlflow_model_name: str, tmp_path: Path
) -> None:
    retrained = tmp_path / "retrained"
    retrained.mkdir()
    for name, content in {**MODEL_FILES, "adapter_model.safetensors": "other weights"}.items():
        (retrained / name).write_text(content)
    first = create_version(mlflow_model_name, pipeline_run_id, model_dir, {})
    second = create_version(mlflow_model_name, pipeline_run_id, retrained, {})  # no new ingest, same pipeline run
    assert first.source != second.source
    folder = download_version(mlflow_model_name, first.version, tmp_path / "cache")
    assert {p.name: p.read_text() for p in folder.iterdir()} == MODEL_FILES


def test_one_flipped_byte_in_a_registered_weight_file_is_refused_on_download(
    mlflow_sandbox, pipeline_run_id: str, model_dir: Path, mlflow_model_name: str, tmp_path: Path
) -> None:
    info = create_version(mlflow_model_name, pipeline_run_id, model_dir, {})
    flip_byte(registered_folder(info) / "adapter_model.safetensors")
    with pytest.raises(IntegrityError, match=f"version 1 of {mlflow_model_name} as registered .* refusing to "
                                             "load it: adapter_model.safetensors: sha256"):
        download_version(mlflow_model_name, info.version, tmp_path / "cache")


def test_another_model_put_in_the_cache_under_a_version_number_is_refused(
    mlflow_sandbox, pipeline_run_id: str, model_dir: Path, mlflow_model_name: str, tmp_path: Path
) -> None:
    info = create_version(mlflow_model_name, pipeline_run_id, model_dir, {})
    folder = download_version(mlflow_model_name, info.version, tmp_path / "cache")
    (folder / "adapter_model.safetensors").write_text("a different adapter")
    with pytest.raises(IntegrityError, match="the cached copy of version 1 .* adapter_model.safetensors: sha256"):
        download_version(mlflow_model_name, info.version, tmp_path / "cache")


def test_a_version_registered_without_hashes_still_downloads_with_a_warning(
    mlflow_sandbox, pipeline_run_id: str, model_dir: Path, mlflow_model_name: str, tmp_path: Path, caplog
) -> None:
    info = create_version(mlflow_model_name, pipeline_run_id, model_dir, {})
    registry.client().delete_model_version_tag(mlflow_model_name, info.version, MANIFEST_TAG)  # as older code left it
    folder = download_version(mlflow_model_name, info.version, tmp_path / "cache")
    assert (folder / "labels.json").read_text() == MODEL_FILES["labels.json"]
    assert "records no file hashes" in caplog.text


# --- registrations cut off part-way: incomplete versions, resuming, a lost server ----------------


def info(version: str, key: str | None, state: str | None) -> registry.VersionInfo:
    tags = {**({registry.KEY_TAG: key} if key else {}), **({registry.REGISTRATION_TAG: state} if state else {})}
    return registry.VersionInfo(version, None, "", tags, ())


@pytest.mark.parametrize("versions, action, version", [
    ([], "create", None),
    ([info("1", "other", "complete")], "create", None),  # another challenger's version
    ([info("1", None, None)], "create", None),  # registered before keys existed
    ([info("1", "k", "incomplete")], "resume", "1"),
    ([info("1", "k", "incomplete"), info("2", "k", "incomplete")], "resume", "2"),
    ([info("1", "k", "complete")], "finish", "1"),
    ([info("1", "k", "incomplete"), info("2", "k", "complete")], "finish", "2"),
    ([info("1", "k", "complete"), info("2", "k", "incomplete")], "finish", "1"),  # never a second complete one
])
def test_plan_registration_resumes_or_keeps_what_an_earlier_attempt_left(versions, action, version) -> None:
    plan = registry.plan_registration(versions, "k")
    assert (plan.action, plan.version) == (action, version)
    assert plan.reason


@pytest.mark.parametrize("promote, decided, champion, audited, steps", [
    (True, None, "1", False, ["move champion", "tag promoted"]),  # nothing applied yet
    (True, None, None, False, ["move champion", "tag promoted"]),  # the first champion
    (True, None, "2", False, ["record audit", "tag promoted"]),  # cut off after the alias moved, before its audit
    (True, None, "2", True, ["tag promoted"]),  # cut off before the decision tag
    (True, "promoted", "1", True, []),  # applied, then rolled back: a re-run must not undo the rollback
    (False, None, "1", False, ["reject"]),
    (False, "rejected", "1", False, []),
])
def test_promotion_steps_apply_the_gates_decision_exactly_once(promote, decided, champion, audited, steps) -> None:
    assert registry.promotion_steps(promote, decided, champion, "2", audited) == steps


def raised_from(inner: BaseException, outer: BaseException) -> BaseException:
    """`outer` as raised while handling `inner` (how MLflow wraps a requests error)."""
    try:
        try:
            raise inner
        except BaseException:
            raise outer
    except BaseException as error:
        return error


@pytest.mark.parametrize("error, lost, problem", [
    (raised_from(requests.exceptions.ConnectionError("[Errno 111] Connection refused"),
                 MlflowException("API request failed")), True, "connection refused"),
    (requests.exceptions.ReadTimeout("read timed out"), True, "timed out"),
    (ConnectionResetError("reset by peer"), True, "connection lost"),
    (MlflowException("RESOURCE_DOES_NOT_EXIST: no version 9"), False, None),
    (ValueError("bad tag"), False, None),
])
def test_unreachable_tells_a_lost_server_from_a_refusal(error, lost, problem) -> None:
    assert registry.unreachable(error) is lost
    if lost:
        assert registry.server_problem(error) == problem


def test_registration_key_changes_with_the_evaluation_or_the_decision() -> None:
    evaluation, decision = {"challenger_files": {"a": "1"}, "models": {}}, {"promote": True, "reasons": ["x"]}
    key = registry.registration_key(evaluation, decision)
    assert key == registry.registration_key(json.loads(json.dumps(evaluation)), dict(decision))
    assert key != registry.registration_key({**evaluation, "challenger_files": {"a": "2"}}, decision)
    assert key != registry.registration_key(evaluation, {**decision, "promote": False})


def test_an_incomplete_version_is_never_downloaded_promoted_or_rolled_back_to(
    mlflow_sandbox, pipeline_run_id: str, model_dir: Path, mlflow_model_name: str, tmp_path: Path
) -> None:
    name = mlflow_model_name
    register(name, pipeline_run_id, model_dir, 2)
    move_champion(name, "1", "promote", "first")
    registry.client().set_model_version_tag(name, "2", registry.REGISTRATION_TAG, registry.INCOMPLETE)  # cut off
    with pytest.raises(registry.IncompleteVersion, match="version 2 of .* is an unfinished registration"):
        download_version(name, "2", tmp_path / "cache")
    assert not (tmp_path / "cache" / "2").exists()  # refused before any download
    with pytest.raises(registry.IncompleteVersion):
        move_champion(name, "2", "promote", "gate passed")
    with pytest.raises(registry.RollbackError, match="version 2 of .* is an unfinished registration, version 1 "
                                                     "stays champion"):
        registry.rollback(name, to_version="2")
    assert alias_version(name, CHAMPION).version == "1" and alias_version(name, PREVIOUS) is None
    assert [e["to"] for e in audit_trail(name)] == ["1"]
    assert model_status(name, mlflow_sandbox.experiment)["incomplete"] == ["2"]


def test_a_lost_server_is_not_read_as_no_champion(mlflow_sandbox, mlflow_model_name: str, monkeypatch) -> None:
    from mlflow import MlflowClient

    def refused(*args, **kwargs):  # as MLflow fails once its retries are spent
        raise raised_from(requests.exceptions.ConnectionError("[Errno 111] Connection refused"),
                          MlflowException("API request to http://127.0.0.1:5000/... failed"))

    monkeypatch.setattr(MlflowClient, "get_model_version_by_alias", refused)
    with pytest.raises(registry.RegistryUnavailable,
                       match=r"did not answer while reading the champion \(connection refused\)"):
        with registry.reachable("reading the champion"):
            alias_version(mlflow_model_name, CHAMPION)
