"""dvc.yaml tells the truth: every stage depends on each project module its
`tuneloop <stage>` command runs (so `dvc repro` reruns a stage whose code
changed), and every file a stage writes is declared by that stage alone.

The modules a stage runs are found statically: the stage's function in
tuneloop/pipeline/stages.py, the stages.py helpers it calls, the project modules those
name, and every project module those import (anywhere in the file, lazily
too). tuneloop/cli.py and tuneloop/pipeline/params.py are left out: they parse the
command line and validate params.yaml for every stage alike, and params
changes are DVC `params:` dependencies already.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from tuneloop.pipeline.stages import STAGES

REPO = Path(__file__).resolve().parents[2]
PACKAGES = {"tuneloop.tasks": "tasks", "tuneloop.flows": "flows", "tuneloop": "tuneloop"}
NOT_STAGE_CODE = {"tuneloop/cli.py", "tuneloop/pipeline/params.py"}


def module_file(name: str) -> str | None:
    """tuneloop.tasks.split -> tasks/split.py; None for a module outside the project."""
    for package, folder in PACKAGES.items():
        if name.startswith(package + "."):
            path = f"{folder}/{name[len(package) + 1:].replace('.', '/')}.py"
            return path if (REPO / path).exists() else None
    return None


def imported_files(tree: ast.AST) -> dict[str, str]:
    """Every name a tree imports from a project module -> that module's file."""
    names = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                submodule = module_file(f"{node.module}.{alias.name}")  # from tuneloop.tasks import split
                target = submodule or module_file(node.module) or (
                    f"{PACKAGES[node.module]}/__init__.py" if node.module in PACKAGES else None)
                if target:
                    names[alias.asname or alias.name] = target
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if module_file(alias.name):
                    names[alias.asname or alias.name] = module_file(alias.name)
    return names


def module_closure(files: set[str]) -> set[str]:
    """The files and every project module they import, recursively."""
    seen, todo = set(), list(files)
    while todo:
        path = todo.pop()
        if path in seen or path.endswith("__init__.py") or path in NOT_STAGE_CODE:
            continue
        seen.add(path)
        todo += imported_files(ast.parse((REPO / path).read_text())).values()
    return seen


def stage_files(stage: str) -> set[str]:
    """The project files `tuneloop <stage>` runs, from its function in tuneloop/pipeline/stages.py."""
    tree = ast.parse((REPO / "tuneloop" / "pipeline" / "stages.py").read_text())
    functions = {node.name: node for node in tree.body if isinstance(node, ast.FunctionDef)}
    top_imports = imported_files(ast.Module(body=[n for n in tree.body if not isinstance(n, ast.FunctionDef)],
                                            type_ignores=[]))
    reached, seen, todo = set(), set(), [stage]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        body = functions[name]
        names = {node.id for node in ast.walk(body) if isinstance(node, ast.Name)}
        todo += [n for n in names if n in functions]
        local = imported_files(body)
        reached |= {path for n, path in {**top_imports, **local}.items() if n in names or n in local}
    return module_closure(reached) | {"tuneloop/pipeline/stages.py"}


def declared(stage: dict, kind: str) -> list[str]:
    return [next(iter(entry)) if isinstance(entry, dict) else entry for entry in stage.get(kind, [])]


PIPELINE = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


@pytest.mark.parametrize("stage", STAGES)
def test_each_stage_depends_on_exactly_the_project_modules_its_command_runs(stage: str) -> None:
    deps = {d for d in declared(PIPELINE[stage], "deps") if d.endswith(".py")}
    assert deps == stage_files(stage), (
        f"dvc.yaml stage {stage!r}: add {sorted(stage_files(stage) - deps)}, drop {sorted(deps - stage_files(stage))}")


def test_the_stage_walk_follows_helpers_and_lazy_imports() -> None:
    # finetune -> start_head (a stages.py helper) -> baseline.probe_head; classifier imports fastpath lazily
    assert {"tasks/baseline.py", "tuneloop/model/classifier.py", "tuneloop/model/fastpath.py",
            "tuneloop/model/metrics.py"} <= stage_files("finetune")
    assert "tasks/tune.py" not in stage_files("ingest")


def test_every_output_is_declared_by_one_stage_only() -> None:
    owners: dict[str, list[str]] = {}
    for name, stage in PIPELINE.items():
        for kind in ("outs", "metrics", "plots"):
            for path in declared(stage, kind):
                owners.setdefault(path, []).append(name)
    assert {path: names for path, names in owners.items() if len(names) > 1} == {}
    assert owners["reports/evaluation.html"] == ["gate"]  # the one stage that writes it
