"""Recording a stage in dvc.lock: only where a DVC pipeline declares it, and a
DVC refusal is said, not raised (the stage's work already stands)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from tuneloop.tasks.dvclock import record_stage


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


def test_nothing_is_recorded_without_a_pipeline_or_for_an_undeclared_stage(tmp_path: Path) -> None:
    assert record_stage(tmp_path, "count") is False
    root = dvc_project(tmp_path, "in.txt")
    assert record_stage(root, "ingest") is False and not (root / "dvc.lock").exists()


def test_a_missing_dependency_is_said_not_raised(tmp_path: Path, capsys) -> None:
    root = dvc_project(tmp_path, "missing.txt")
    (root / "out.txt").write_text("0\n")
    assert record_stage(root, "count") is False
    assert "dvc.lock not updated for stage count" in capsys.readouterr().out
