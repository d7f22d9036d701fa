"""layout: the house's floors, read from its folders (`tuneloop layout` prints them).

Each floor is one folder (one package); a module's floor is the folder it sits in,
and what a floor holds is the first line of its `__init__.py`. A module may import
its own floor or any floor below it: `tests/unit/test_layout.py` walks every import
(at the top of a module or inside a function) against this order, so the map printed
here is the one the tests enforce and cannot drift from the tree.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

# The floors, bottom up, by package. tasks/ and flows/ are installed as tuneloop.tasks and
# tuneloop.flows (pyproject.toml; tuneloop/tasks and tuneloop/flows link their files for tools);
# every other floor is a folder of tuneloop/, and the modules directly in tuneloop/ are the entry points.
FLOORS = ("tuneloop.values", "tuneloop.model", "tuneloop.plumbing", "tuneloop.tasks", "tuneloop.service",
          "tuneloop.pipeline", "tuneloop.flows", "tuneloop")
ENTRY = "tuneloop"
# Old names kept for MLflow versions registered before 2026-12-05: their code/ carries only
# classifier, fastpath and mlflow_model and imports these from the installed tuneloop.tasks.
LEGACY = {"tuneloop.tasks.config": "tuneloop.values.config", "tuneloop.tasks.labels": "tuneloop.values.labels",
          "tuneloop.tasks.calibration": "tuneloop.model.calibration"}


def name(floor: str) -> str:
    """A floor's short name: its folder's name; the entry points' floor is `entry`."""
    return "entry" if floor == ENTRY else floor.rpartition(".")[2]


def folder(package: str) -> Path:
    return Path(importlib.import_module(package).__file__ or "").resolve().parent


def packages() -> dict[str, Path]:
    """Every package of the installed name, found in the tree: tuneloop/ and each folder below it
    with an `__init__.py`, each at the folder its files really are (tuneloop/tasks and
    tuneloop/flows hold links to the files of the top-level tasks/ and flows/)."""
    root = folder(ENTRY)
    return {ENTRY: root, **{f"{ENTRY}.{init.parent.name}": init.resolve().parent
                            for init in sorted(root.glob("*/__init__.py"))}}


def floor_of(module: str) -> str:
    """The floor (package) a module sits in; a package's own `__init__` sits on its floor."""
    package = module if module in packages() else module.rpartition(".")[0]
    if package not in FLOORS:
        raise LookupError(f"{module} is on no floor: its folder {package} is not in FLOORS (tuneloop/layout.py)")
    return package


def meaning(floor: str) -> str:
    """What a floor holds: the first line of its package docstring (the top package's says
    what tuneloop is, so the entry floor says what its loose modules are)."""
    if floor == ENTRY:
        return "the CLI and the processes it starts (tuneloop/*.py)"
    doc = ast.get_docstring(ast.parse((packages()[floor] / "__init__.py").read_text())) or ""
    return doc.splitlines()[0] if doc else ""


def modules() -> dict[str, Path]:
    """Every module of the installed name, by dotted name."""
    found = {}
    for package, path in packages().items():
        for source in sorted(path.glob("*.py")):
            found[package if source.stem == "__init__" else f"{package}.{source.stem}"] = source
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
    """The floors as `tuneloop layout` prints them: top down, each with its folder and what it holds."""
    lines = ["imports run only downward: a module may import its own floor or any floor below it"]
    for floor, names in floors().items():
        where = packages()[floor].relative_to(packages()[ENTRY].parent)
        lines.append(f"\n{name(floor)} - {where}/: {meaning(floor)}")
        lines.extend(f"  {module}" + ("  (old name of " + LEGACY[module] + ")" if module in LEGACY else "")
                     for module in names)
    return "\n".join(lines)
