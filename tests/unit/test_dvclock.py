"""Recording a stage in dvc.lock: only where a DVC pipeline declares it, and a
DVC refusal is said, not raised (the stage's work already stands)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tuneloop.plumbing.dvclock import record_stage


def dvc_project(root: Path, dep: str) -> Path:
    subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=root, check=True)
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"count": {
        "cmd": "wc -c in.txt > out.txt", "deps": [dep], "outs": [{"out.txt": {"cache": False}}]}}}))
    return root


def test_a_stage_is_recorded_with_its_deps_and_outs_hashed(tmp_path: Path) -> None:
    root = dvc_project(tmp_path, "in.txt")
    (root / "in.txt").write_text("abc\n")
    (root / "out.txt").write_text("4 in.txt\n")  # as if the flow had just run the stage
    assert record_stage(root, "count") is True
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]["count"]
    assert [d["path"] for d in lock["deps"]] == ["in.txt"] and [o["path"] for o in lock["outs"]] == ["out.txt"]
    status = subprocess.run([sys.executable, "-m", "dvc", "status"], cwd=root, capture_output=True, text=True)
    assert "up to date" in status.stdout


def test_recording_a_stage_leaves_the_process_working_folder_alone(tmp_path: Path, monkeypatch) -> None:
    """Other threads (Prefect's task runner, a server) share the process's working folder:
    it is never changed, not even for the call."""
    import os

    (tmp_path / "project").mkdir()
    root = dvc_project(tmp_path / "project", "in.txt")
    (root / "in.txt").write_text("abc\n")
    (root / "out.txt").write_text("4 in.txt\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    changes = []
    monkeypatch.setattr(os, "chdir", changes.append)  # a change is noted, not made
    assert record_stage(root, "count") is True
    assert changes == [] and Path.cwd() == elsewhere
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]["count"]
    assert [d["path"] for d in lock["deps"]] == ["in.txt"] and [o["path"] for o in lock["outs"]] == ["out.txt"]
    assert not (elsewhere / "dvc.lock").exists()


def test_nothing_is_recorded_without_a_pipeline_or_for_an_undeclared_stage(tmp_path: Path) -> None:
    assert record_stage(tmp_path, "count") is False
    root = dvc_project(tmp_path, "in.txt")
    assert record_stage(root, "ingest") is False and not (root / "dvc.lock").exists()


def test_a_missing_dependency_is_said_not_raised(tmp_path: Path, capsys) -> None:
    root = dvc_project(tmp_path, "missing.txt")
    (root / "out.txt").write_text("0\n")
    assert record_stage(root, "count") is False
    assert "dvc.lock not updated for stage count" in capsys.readouterr().out


def test_a_run_commits_the_files_it_owns_and_nothing_else_the_user_staged(tmp_path) -> None:
    import subprocess

    from tuneloop.plumbing.dvclock import commit_iteration

    def git(*args):
        return subprocess.run(["git", *args], cwd=tmp_path, capture_output=True, text=True, check=True).stdout

    git("init", "-q")
    git("config", "user.email", "t@example.org")
    git("config", "user.name", "t")
    (tmp_path / "params.yaml").write_text("finetune: {epochs: 1}\n")
    (tmp_path / "dvc.lock").write_text("schema: '2.0'\n")
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "evaluation.json").write_text('{"challenger": {"macro_f1": 0.8}}\n')
    (tmp_path / "data" / "raw").mkdir(parents=True)
    (tmp_path / "data" / "raw" / "reviews.csv.dvc").write_text("outs: []\n")
    (tmp_path / ".dvc").mkdir()
    (tmp_path / ".dvc" / "config").write_text("[core]\n    remote = tuneloop\n")  # init's remote: a clone pulls
    (tmp_path / ".dvc" / "config.local").write_text("[remote \"tuneloop\"]\n    secret_access_key = s\n")
    (tmp_path / "notes.txt").write_text("mine")
    git("add", "notes.txt")  # the user's own staged work stays staged, uncommitted

    said = commit_iteration(tmp_path, "tuneloop run: m v1 promoted, data 0123abcd")
    assert said.startswith("committed dvc.lock, params.yaml, metrics, .dvc/config, data/raw/reviews.csv.dvc as ")
    assert git("log", "--format=%s").strip() == "tuneloop run: m v1 promoted, data 0123abcd"
    assert sorted(git("show", "--name-only", "--format=", "HEAD").split()) == [
        ".dvc/config", "data/raw/reviews.csv.dvc", "dvc.lock", "metrics/evaluation.json", "params.yaml"]
    assert git("status", "--porcelain").splitlines() == ["A  notes.txt", "?? .dvc/config.local"]  # keys stay out
    assert commit_iteration(tmp_path, "again").startswith("nothing to commit")


def test_outside_a_git_repository_of_its_own_a_run_says_the_command_that_would_keep_it(tmp_path) -> None:
    from tuneloop.plumbing.dvclock import commit_iteration

    (tmp_path / "dvc.lock").write_text("schema: '2.0'\n")
    said = commit_iteration(tmp_path, "m")
    assert said == ("not a git repository of its own: to keep this run, `git init` and "
                    "git add dvc.lock && git commit -m 'm'")


@pytest.mark.parametrize("setting, flag, as_params_yaml, commits", [
    (True, None, True, True),  # shipped: a plain run commits
    (False, None, True, False),  # ingest.commit_iterations: false
    (False, True, True, True),  # --commit beats the setting
    (True, False, True, False),  # --no-commit beats it
    (True, True, False, False),  # --tune or --set: not params.yaml's values, never committed
])
def test_the_run_flag_beats_ingest_commit_iterations_and_only_params_yaml_runs_commit(
        setting: bool, flag: bool | None, as_params_yaml: bool, commits: bool) -> None:
    from tuneloop.plumbing.dvclock import commits_iteration

    assert commits_iteration(setting, flag, as_params_yaml) is commits
