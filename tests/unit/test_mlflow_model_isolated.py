"""A registered version loads and answers where tuneloop is not installed.

Each flavour the register stage packages (LoRA on a local base it carries,
full fine-tuning, the base model's linear probe when it is the champion) is
loaded with `mlflow.pyfunc.load_model("models:/...")` in
a fresh Python where `import tuneloop` fails (`tests/isolated_python.py`), and
must answer what tuneloop's own scorer answers. The model's `code/` is derived
from its entry file's imports, so a module the scorer starts importing is
carried without anyone listing it. A version packaged before that (only
classifier, fastpath and mlflow_model under `code/`) still loads where
tuneloop is installed.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from isolated_python import isolated_environment, isolated_python, tuneloop_importable

from tuneloop.model.classifier import load_classifier, score_texts
from tuneloop.plumbing import mlflow_model
from tuneloop.plumbing.tracking import start_pipeline_run
from tuneloop.tasks import registry
from tuneloop.tasks.finetune import FinetuneConfig, finetune
from tuneloop.values.workspace import Workspace

TEXTS = ["the film was great", "the plot was awful really", "this movie was boring"]
FLAVOURS = {"lora": FinetuneConfig(epochs=1, max_steps=4, learning_rate=1e-2, batch_size=16, lora_r=8, max_length=32),
            "full": FinetuneConfig(method="full", epochs=1, max_steps=4, learning_rate=1e-3, batch_size=16,
                                   max_length=32),
            "probe": None}
NAME = "tl-isolated"
OLD_LAYOUT = ("classifier.py", "fastpath.py", "mlflow_model.py")  # what code/tuneloop/tasks held before 2026-12-05
# code/ and the entry file of a version packaged before the folders became floors (2026-12-07): every
# module under tuneloop/tasks/, the entry file importing tuneloop.tasks.mlflow_model
BEFORE_FOLDERS = Path(__file__).resolve().parents[1] / "fixtures" / "code-before-folders.zip"

LOAD_AND_PREDICT = """
import importlib.util, json, sys
report = {"tuneloop_importable": importlib.util.find_spec("tuneloop") is not None}
import mlflow, pandas as pd
mlflow.set_tracking_uri(sys.argv[1])
answer = mlflow.pyfunc.load_model(sys.argv[2]).predict(pd.DataFrame({"text": json.loads(sys.argv[3])}))
report.update(labels=answer["label"].tolist(), confidence=answer["confidence"].tolist(),
              modules={m.__name__: m.__file__ for m in list(sys.modules.values())
                       if m.__name__.startswith("tuneloop") and getattr(m, "__file__", None)})
print("REPORT " + json.dumps(report))
"""


@pytest.fixture(scope="module")
def versions(tiny_bert, toy_task, mlflow_sandbox, tmp_path_factory) -> dict:
    """One registered version per flavour, plus a LoRA version packaged the old way."""
    tmp = tmp_path_factory.mktemp("isolated")
    card = mlflow_model.CardFacts(NAME, "0" * 32, "x.csv", "tiny", "0" * 64, "unknown", {"macro_f1": 0.5})
    run_id = start_pipeline_run(mlflow_sandbox.config(model_name=NAME), Workspace(tmp), {"data.md5": "0" * 32})
    found = {}
    for flavour, config in FLAVOURS.items():
        if config is None:
            trained = probe_model(tiny_bert, toy_task, tmp / flavour / "trained")
        else:
            trained = finetune("tiny", tiny_bert, toy_task["train"], toy_task["validation"], toy_task["labels"],
                               config, tmp / flavour / "trained", tmp / flavour / "checkpoints", flavour,
                               progress=False).model_dir
        base = tiny_bert if flavour in ("lora", "probe") else None
        packaged = mlflow_model.save_version_model(trained, str(tiny_bert), base, card, tmp / flavour / "model",
                                                   tmp / flavour / "scratch")
        found[flavour] = {"version": registry.create_version(NAME, run_id, packaged, {}).version,
                          "expected": score_texts(load_classifier(trained, str(tiny_bert), "cpu"), TEXTS),
                          "packaged": packaged}
    before = repackaged(found["lora"]["packaged"], tmp / "before folders" / "model")
    found["before folders"] = {**found["lora"], "packaged": before,
                               "version": registry.create_version(NAME, run_id, before, {}).version}
    old = repackaged(found["lora"]["packaged"], tmp / "old" / "model")
    tasks = old / "code" / "tuneloop" / "tasks"
    for path in tasks.iterdir():
        if path.name not in OLD_LAYOUT:
            path.unlink()
    (tasks / "__init__.py").write_text('"""The scoring modules of tuneloop, carried by an MLflow model."""\n')
    found["old layout"] = {**found["lora"], "version": registry.create_version(NAME, run_id, old, {}).version,
                           "packaged": old}
    return {"uri": mlflow_sandbox.tracking_uri, "flavours": found, "tmp": tmp}


def repackaged(packaged: Path, out: Path) -> Path:
    """A copy of `packaged` whose code/ and entry file are those a version got before the move."""
    import zipfile

    copy = Path(shutil.copytree(packaged, out))
    shutil.rmtree(copy / "code")
    with zipfile.ZipFile(BEFORE_FOLDERS) as archive:
        archive.extractall(copy)
    assert (copy / mlflow_model.ENTRY_FILE).read_text().count("from tuneloop.tasks.mlflow_model import") == 1
    return copy


def probe_model(tiny_bert: Path, task: dict, out: Path) -> Path:
    """The base model's probe as the baseline stage saves it: head, tokenizer, calibration."""
    import numpy as np

    from tuneloop.model.calibration import calibrate
    from tuneloop.tasks.baseline import embed, fit_probe, load_encoder, save_probe_model
    from tuneloop.values.config import BaselineConfig, ModelConfig

    encoder, tokenizer = load_encoder(tiny_bert, "cpu")
    settings = BaselineConfig(max_length=32)
    (train_texts, train_y), (val_texts, val_y) = task["train"], task["validation"]
    probe = fit_probe(embed(encoder, tokenizer, train_texts, settings, "mean", progress=False), np.array(train_y),
                      task["labels"], 1.0, 200)
    logits = probe.logits(embed(encoder, tokenizer, val_texts, settings, "mean", progress=False))
    temperature, abstention = calibrate(logits, np.array(val_y), task["labels"], ModelConfig())
    out.mkdir(parents=True)
    save_probe_model(probe, out, tokenizer, str(tiny_bert), "mean", 32, temperature, abstention)
    return out


def load_and_predict(python: Path, uri: str, version: str, cwd: Path) -> subprocess.CompletedProcess:
    env = isolated_environment(python.parent.parent) if python != Path(sys.executable) else None
    return subprocess.run([str(python), "-c", LOAD_AND_PREDICT, uri, f"models:/{NAME}/{version}", json.dumps(TEXTS)],
                          cwd=cwd, capture_output=True, text=True, timeout=600, env=env)


def report(done: subprocess.CompletedProcess) -> dict:
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(next(line for line in done.stdout.splitlines() if line.startswith("REPORT "))[7:])


@pytest.fixture(scope="module")
def bare_python(tmp_path_factory) -> Path:
    return isolated_python(tmp_path_factory.mktemp("bare") / "venv")


def test_tuneloop_cannot_be_imported_in_the_bare_python(bare_python, tmp_path) -> None:
    done = tuneloop_importable(bare_python, tmp_path)
    assert done.returncode == 1 and "No module named 'tuneloop'" in done.stderr
    assert tuneloop_importable(Path(sys.executable), tmp_path).returncode == 0  # while here it can


@pytest.mark.parametrize("flavour", list(FLAVOURS))
def test_each_flavour_loads_and_predicts_where_tuneloop_is_not_installed(versions, bare_python, flavour,
                                                                         tmp_path) -> None:
    version = versions["flavours"][flavour]
    answer = report(load_and_predict(bare_python, versions["uri"], version["version"], tmp_path))

    assert answer["tuneloop_importable"] is False
    assert answer["labels"] == [s.label for s in version["expected"]]
    assert answer["confidence"] == pytest.approx([s.confidence for s in version["expected"]], abs=1e-5)
    # every tuneloop module that ran came from the model's own code/ folder
    assert answer["modules"] and all("/code/tuneloop/" in path for path in answer["modules"].values())
    assert "tuneloop.values.config" in answer["modules"] and "tuneloop.values.labels" in answer["modules"]


@pytest.mark.parametrize("where", ["tuneloop not installed", "tuneloop installed"])
def test_a_version_packaged_before_the_folders_became_floors_loads_its_own_code(versions, bare_python, where,
                                                                                 tmp_path) -> None:
    """Its entry file imports tuneloop.tasks.mlflow_model, which this tuneloop no longer has: the
    version's own code/ (first on sys.path) answers, installed tuneloop or not."""
    before = versions["flavours"]["before folders"]
    python = bare_python if where == "tuneloop not installed" else Path(sys.executable)
    answer = report(load_and_predict(python, versions["uri"], before["version"], tmp_path))

    assert answer["tuneloop_importable"] is (where == "tuneloop installed")
    assert answer["labels"] == [s.label for s in before["expected"]]
    assert answer["confidence"] == pytest.approx([s.confidence for s in before["expected"]], abs=1e-5)
    assert "tuneloop.tasks.mlflow_model" in answer["modules"] and "tuneloop.values.config" not in answer["modules"]
    assert all("/code/tuneloop/" in path for path in answer["modules"].values())


def test_a_version_packaged_before_the_bundle_was_derived_still_loads_where_tuneloop_is_installed(
        versions, bare_python, tmp_path) -> None:
    old = versions["flavours"]["old layout"]
    answer = report(load_and_predict(Path(sys.executable), versions["uri"], old["version"], tmp_path))

    assert answer["tuneloop_importable"] is True
    assert answer["labels"] == [s.label for s in old["expected"]]
    # and it is the defect this test file guards against: without tuneloop it cannot load
    bare = load_and_predict(bare_python, versions["uri"], old["version"], tmp_path)
    assert bare.returncode != 0 and re.search(r"No module named 'tuneloop\.tasks\.(config|calibration)'", bare.stderr)


def test_the_bundle_is_what_the_entry_file_imports_and_nothing_that_orchestrates() -> None:
    bundled = mlflow_model.bundled_modules(mlflow_model.ENTRY_SOURCE)
    carried = set(bundled)
    assert {"tuneloop", "tuneloop.plumbing", "tuneloop.plumbing.mlflow_model", "tuneloop.model.classifier",
            "tuneloop.model.fastpath", "tuneloop.values.config", "tuneloop.values.labels"} <= carried
    # each carried module's own tuneloop imports are carried too: the set is closed
    for name, source in bundled.items():
        package = name if source.name == "__init__.py" else name.rpartition(".")[0]
        imported = {m for m in mlflow_model.imported_names(source.read_text(), package) if m.startswith("tuneloop")}
        assert {m for m in imported if mlflow_model.module_spec(m) is not None} <= carried, name
    # no stage, tracking or orchestration module rides along (they import Prefect, DVC, MLflow's client)
    for name, source in bundled.items():
        third_party = {m.split(".")[0] for m in mlflow_model.imported_names(source.read_text())}
        assert not third_party & {"prefect", "dvc", "great_expectations", "optuna", "evidently", "fastapi"}, name
        assert "mlflow" not in third_party or name == "tuneloop.plumbing.mlflow_model", name


def test_a_module_the_scorer_starts_importing_is_carried_without_being_listed(tmp_path) -> None:
    package = tmp_path / "pkgx"
    (package / "inner").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "inner" / "__init__.py").write_text("")
    (package / "inner" / "entry.py").write_text("from pkgx.inner import core\n")
    (package / "inner" / "core.py").write_text("def f():\n    from . import calibration\n    return calibration\n")
    (package / "inner" / "calibration.py").write_text("from typing import TYPE_CHECKING\n"
                                                      "if TYPE_CHECKING:\n    from pkgx import heavy\n")
    (package / "heavy.py").write_text("import prefect\n")
    sys.path.insert(0, str(tmp_path))
    try:
        found = mlflow_model.bundled_modules("from pkgx.inner.entry import *\n", package="pkgx")
    finally:
        sys.path.remove(str(tmp_path))
    assert set(found) == {"pkgx", "pkgx.inner", "pkgx.inner.entry", "pkgx.inner.core", "pkgx.inner.calibration"}


def test_the_bundle_carries_every_file_in_its_package_place(versions) -> None:
    code = versions["flavours"]["full"]["packaged"] / "code" / "tuneloop"
    carried = sorted(str(p.relative_to(code)) for p in code.rglob("*.py"))
    assert carried == sorted(["__init__.py", "model/__init__.py", "model/calibration.py", "model/classifier.py",
                              "model/fastpath.py", "plumbing/__init__.py", "plumbing/mlflow_model.py",
                              "values/__init__.py", "values/config.py", "values/labels.py"])
