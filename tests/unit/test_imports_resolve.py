"""Every import of the installed name can be followed by tools, not only by Python.

tasks/ and flows/ are installed as tuneloop.tasks and tuneloop.flows. setuptools
maps them with an import hook, which Python follows and editors do not; the folders
tuneloop/tasks and tuneloop/flows hold a link to each of their files, so the packages
stand in the tree itself. jedi (the engine behind most editors' go-to-definition) is
asked to follow a sample of imports, one per floor, from a file of an editor opened on
the checkout, with this environment (a `pip install -e .`) as its interpreter. pyright
reads the same links in `.ci/run` (an import it cannot resolve is an error there).

The links are per file, not one link per folder: setuptools resolves links when it
writes an editable install's import hook, and a folder link would make it drop the
mapping of tuneloop.tasks to tasks/, which versions registered before 2026-12-05 need
(their code/ carries a partial tuneloop.tasks; test_mlflow_model_isolated.py).
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import jedi
import pytest

REPO = Path(__file__).resolve().parents[2]
# (the import line, the name on it to follow, the file that defines it, the definition's line's start)
SAMPLE = [
    ("from tuneloop.tasks.registry import create_version", "create_version", "tasks/registry.py",
     "def create_version("),
    ("from tuneloop.tasks.gate import decide_promotion", "decide_promotion", "tasks/gate.py", "def decide_promotion("),
    ("from tuneloop.flows.retrain import retrain_flow", "retrain_flow", "flows/retrain.py", "def retrain_flow("),
    ("from tuneloop.values.config import FinetuneConfig", "FinetuneConfig", "tuneloop/values/config.py",
     "class FinetuneConfig"),
    ("from tuneloop.model.classifier import score_texts", "score_texts", "tuneloop/model/classifier.py",
     "def score_texts("),
    ("from tuneloop.plumbing.tracking import start_pipeline_run", "start_pipeline_run",
     "tuneloop/plumbing/tracking.py", "def start_pipeline_run("),
    ("from tuneloop.service.serve import create_app", "create_app", "tuneloop/service/serve.py", "def create_app("),
    ("from tuneloop.pipeline.stages import stage_run", "stage_run", "tuneloop/pipeline/stages.py",
     "def stage_run("),
    ("import tuneloop.tasks.finetune", "finetune", "tasks/finetune.py", None),
]


@pytest.fixture(scope="module")
def environment():
    return jedi.create_environment(sys.executable, safe=False)


@pytest.mark.parametrize("line, name, defined_in, definition", SAMPLE, ids=[s[0].split()[1] for s in SAMPLE])
def test_go_to_definition_reaches_the_file_that_defines_the_name(line, name, defined_in, definition, environment):
    source = f"{line}\n"
    script = jedi.Script(source, path=REPO / "editor_scratch.py", project=jedi.Project(REPO), environment=environment)
    found = script.goto(1, source.rindex(name), follow_imports=True)
    assert found, f"jedi cannot follow `{line}`"
    assert found[0].module_path is not None
    assert Path(found[0].module_path).resolve() == (REPO / defined_in).resolve()
    if definition is not None:
        lines = (REPO / defined_in).read_text().splitlines()
        assert lines[found[0].line - 1].lstrip().startswith(definition)


def test_a_plain_checkout_imports_tasks_and_flows_under_the_installed_name(tmp_path) -> None:
    """Without site-packages (no editable hook), from the checkout's root, as `python -S` sees it."""
    probe = ("from importlib.util import find_spec as f; "
             "print(f('tuneloop.tasks.split').origin, f('tuneloop.flows.request').origin)")
    done = subprocess.run([sys.executable, "-S", "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    split, request = done.stdout.split()
    assert (Path(split).resolve(), Path(request).resolve()) == (REPO / "tasks" / "split.py",
                                                                REPO / "flows" / "request.py")


@pytest.mark.parametrize("package", ["tasks", "flows"])
def test_tuneloop_holds_a_link_to_every_module_of_tasks_and_flows_and_nothing_else(package: str) -> None:
    """A module added to tasks/ or flows/ needs its link: `ln -s ../../tasks/x.py tuneloop/tasks/x.py`."""
    linked = REPO / "tuneloop" / package
    assert linked.is_dir() and not linked.is_symlink()  # a folder link would drop setuptools' mapping
    entries = sorted(p.name for p in linked.iterdir() if p.name != "__pycache__")
    assert entries == sorted(p.name for p in (REPO / package).glob("*.py")), \
        f"tuneloop/{package} must link every {package}/*.py: ln -s ../../{package}/NAME.py tuneloop/{package}/NAME.py"
    for name in entries:
        link = linked / name
        assert link.is_symlink() and os.readlink(link) == f"../../{package}/{name}"


def test_a_fresh_editable_install_maps_tasks_and_flows_to_the_top_level_folders(tmp_path) -> None:
    """The import hook of `pip install -e .` (setuptools' editable wheel, built here from the
    tree) keeps tuneloop.tasks and tuneloop.flows mapped: what older versions' code/ relies on."""
    copy = tmp_path / "checkout"
    shutil.copytree(REPO, copy, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "data", "benchmarks", "tests", "mlruns", "mlartifacts", "*.db", "state", "models"))
    build = "import sys; from setuptools import build_meta; print(build_meta.build_editable(sys.argv[1]))"
    done = subprocess.run([sys.executable, "-c", build, str(tmp_path / "wheel")], cwd=copy, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    wheel = done.stdout.split()[-1]
    with zipfile.ZipFile(tmp_path / "wheel" / wheel) as archive:
        finder = next(archive.read(n).decode() for n in archive.namelist() if n.endswith("_finder.py"))
    mapping = ast.literal_eval(re.search(r"MAPPING: dict\[str, str\] = (\{.*?\})\n", finder).group(1))
    assert mapping == {"tuneloop": str(copy / "tuneloop"), "tuneloop.tasks": str(copy / "tasks"),
                       "tuneloop.flows": str(copy / "flows")}
