"""Every import of the installed name can be followed by tools, not only by Python.

tasks/ and flows/ are installed as tuneloop.tasks and tuneloop.flows. setuptools
maps them with an import hook, which Python follows and editors do not; the links
tuneloop/tasks and tuneloop/flows put them in the tree itself. jedi (the engine
behind most editors' go-to-definition) is asked to follow a sample of imports, one
per floor, from a file of an editor opened on the checkout, with this environment
(a fresh `pip install -e .`) as its interpreter. pyright reads the same links in
`.ci/run` (an import it cannot resolve is an error there).
"""

from __future__ import annotations

import subprocess
import sys
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
    probe = "import tuneloop.tasks, tuneloop.flows; print(tuneloop.tasks.__path__[0], tuneloop.flows.__path__[0])"
    done = subprocess.run([sys.executable, "-S", "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    tasks, flows = done.stdout.split()
    assert (Path(tasks).resolve(), Path(flows).resolve()) == (REPO / "tasks", REPO / "flows")


def test_the_links_are_the_only_way_into_tasks_and_flows_inside_tuneloop() -> None:
    """tuneloop/tasks and tuneloop/flows point at the top-level folders; nothing else is linked."""
    links = sorted(p.name for p in (REPO / "tuneloop").iterdir() if p.is_symlink())
    assert links == ["flows", "tasks"]
    assert (REPO / "tuneloop" / "tasks").resolve() == REPO / "tasks"
    assert (REPO / "tuneloop" / "flows").resolve() == REPO / "flows"
