"""layout: the house's floors, read from the code itself (`tuneloop layout` prints them).

A module may import its own floor or any floor below it; `tests/unit/test_layout.py`
walks every import (at the top of a module or inside a function) against this map, so
the map printed here is the one the tests enforce and cannot drift from the tree.
"""

from __future__ import annotations

import ast
from pathlib import Path

import tuneloop.flows as flows
import tuneloop.tasks as tasks

PACKAGES = {"tuneloop": Path(__file__).parent, "tuneloop.flows": Path(flows.__file__).parent,
            "tuneloop.tasks": Path(tasks.__file__).parent}

# Floors, bottom up. tasks/ holds the stages and their helpers; the few modules below them are named.
BASE = {"config", "errors", "decision", "labels", "workspace"}  # plain values: settings, errors, decisions, paths
CORE = {"classifier", "fastpath", "metrics", "calibration"}  # the model: torch, transformers, peft, numpy, SciPy
ENTRY = {"cli", "demo", "init", "__main__", "distributed_finetune", "tune_worker",
         "layout"}  # commands and process entries
STAGE_IO = {"params", "stages", "monitoring", "launch", "tune_runs"}
FLOORS = ("base", "core", "tasks", "stage I/O", "flows", "entry")
MEANING = {"base": "plain values: settings, errors, decisions, paths",
           "core": "the model: torch, transformers, peft, numpy, SciPy; no orchestration",
           "tasks": "one module per stage and the stages' own helpers (tuneloop.tasks)",
           "stage I/O": "reads params, runs a stage, writes its outputs",
           "flows": "Prefect flows that only compose stages (tuneloop.flows)",
           "entry": "the CLI and process entry points"}


def floor_of(module: str) -> str:
    if module in {"tuneloop", "tuneloop.tasks"}:  # package files: a version string, a docstring
        return "base"
    package, _, name = module.rpartition(".")
    if package == "tuneloop.tasks":
        return "base" if name in BASE else "core" if name in CORE else "tasks"
    if module == "tuneloop.flows" or package == "tuneloop.flows":
        return "flows"
    if name in ENTRY:
        return "entry"
    if name not in STAGE_IO:
        raise LookupError(f"{module} is on no floor: add it to one in tuneloop/layout.py")
    return "stage I/O"


def modules() -> dict[str, Path]:
    """Every module of the installed name, by dotted name."""
    found = {}
    for package, folder in PACKAGES.items():
        for path in sorted(folder.glob("*.py")):
            found[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return found


def imports(module: str, path: Path, known: set[str]) -> set[str]:
    """The project modules `module` imports anywhere in its file."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        out.update(name for name in names if name in known and name != module)
    return out


def floors() -> dict[str, list[str]]:
    """Each floor, top down, with its modules."""
    by_floor: dict[str, list[str]] = {floor: [] for floor in reversed(FLOORS)}
    for module in modules():
        by_floor[floor_of(module)].append(module)
    return by_floor


def floor_table() -> str:
    """The floors as `tuneloop layout` prints them: top down, each with what it holds."""
    lines = ["imports run only downward: a module may import its own floor or any floor below it"]
    for floor, names in floors().items():
        lines.append(f"\n{floor} - {MEANING[floor]}")
        lines.extend(f"  {name}" for name in names)
    return "\n".join(lines)
