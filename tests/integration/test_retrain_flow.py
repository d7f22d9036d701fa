"""The whole retraining flow through the real CLI, Prefect (ephemeral), MLflow
(SQLite), DVC (local remote) and the real all-MiniLM-L6-v2, on a few hundred rows."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
MOVIES = REPO / "data" / "vader_sentiment" / "movie_reviews.csv"
TUNELOOP = [sys.executable, "-m", "tuneloop.cli"]


def tuneloop(project: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in {"MLFLOW_TRACKING_URI", "PREFECT_API_URL"}}
    env.update(GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@e", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@e")
    return subprocess.run([*TUNELOOP, *args, "--root", str(project)], cwd=project, env=env,
                          capture_output=True, text=True, timeout=900)


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def write_params(project: Path, name: str, source: str, split_column: str | None = None) -> None:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["ingest"].update(source=source, split_column=split_column)
    params["validate"]["min_rows_per_class"] = 20
    params["finetune"].update(epochs=1, batch_size=16, max_length=64, min_steps=0, min_examples_per_class=0)
    # 35 optimizer steps on a few hundred rows cannot beat the probe with
    # confidence, so the base comparison is opened wide (non-inferiority margin
    # -1, any slice change allowed): these tests prove the flow's mechanics. The
    # champion comparison keeps asking for a real gain; quality is measured on
    # the full default run.
    params["gate"].update(min_gain_over_base=-1.0, max_slice_regression=1.0)
    params["model"]["scoring_precision"] = "bf16"  # evaluate checks it, register records the verdict
    (project / name).write_text(yaml.safe_dump(params, sort_keys=False))


def git(project: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=project, capture_output=True, text=True, check=True,
                          env={**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@e",
                               "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@e"}).stdout.strip()


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A git project with 700 movie reviews and params for them, run twice."""
    root = tmp_path_factory.mktemp("project")
    sample = pd.read_csv(MOVIES).sample(700, random_state=3)
    sample.to_csv(root / "reviews.csv", index=False)
    write_params(root, "params.yaml", "reviews.csv")
    (root / ".gitignore").write_text("mlflow.db\nmlartifacts/\nmodels/\nreports/\nmetrics/\nstate/\ndata/prepared/\n"
                                     "data/split/\n.dvc-remote/\n")
    git(root, "init", "-q")
    git(root, "add", ".")
    git(root, "commit", "-qm", "project")
    return root


@pytest.fixture(scope="module")
def first_run(project):
    return tuneloop(project, "run")


@pytest.fixture(scope="module")
def second_run(project, first_run):
    return tuneloop(project, "run")


def status(project: Path) -> dict:
    result = tuneloop(project, "status", "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def registry_versions(project: Path) -> list[dict]:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    found = client.search_model_versions("name = 'tuneloop-sentiment'")
    return sorted(({"version": v.version, "tags": v.tags, "aliases": v.aliases} for v in found),
                  key=lambda v: int(v["version"]))


def test_first_run_prints_a_line_per_stage_and_registers_a_champion(project, first_run):
    assert first_run.returncode == 0, first_run.stderr[-3000:]
    from tuneloop.pipeline.stages import STAGES

    for number, stage in enumerate(STAGES, start=1):
        assert f"[{number}/{len(STAGES)}] {stage}:" in first_run.stdout
    assert "version 1 promoted to champion" in first_run.stdout
    assert "Traceback" not in first_run.stderr
    assert (project / "state" / "prefect-server.log").exists()  # the ephemeral server's output, not the terminal's
    assert (project / "reports" / "evaluation.html").exists()
    assert (project / "reports" / "validation" / "index.html").exists()


def test_champion_carries_its_lineage_in_registry_tags(project, first_run):
    info = status(project)
    assert info["champion"]["version"] == "1"
    assert info["champion"]["data_md5"] == md5(project / "reviews.csv")
    assert 0.0 < info["champion"]["test"]["macro_f1"] <= 1.0
    tags = registry_versions(project)[0]["tags"]
    # `-dirty` is honest here: the first ingest initialised DVC and staged .dvc/
    assert tags["git.commit"].split("-")[0] == git(project, "rev-parse", "HEAD")
    assert tags["base_model.name"] == "all-MiniLM-L6-v2"
    assert len(tags["base_model.sha256"]) == 64
    assert json.loads(tags["params"])["finetune"]["epochs"] == 1
    assert info["last_run"]["outcome"] == "promoted"


def test_bf16_scoring_is_checked_on_the_test_rows_and_the_version_scores_as_the_check_said(project, first_run):
    evaluation = json.loads((project / "reports" / "evaluation.json").read_text())
    for key in ("challenger", "base_probe"):
        checked = evaluation["models"][key]["scoring_precision"]
        assert checked["precision"] == "bf16" and len(checked["reasons"]) == 2
        agreement = float(checked["reasons"][0].split("%")[0].split()[-1]) / 100
        assert checked["allowed"] == (agreement >= 0.995 and checked["reasons"][1].startswith("PASS"))
        assert f"{key} {'may' if checked['allowed'] else 'may not'} score in bf16:" in first_run.stdout
    allowed = evaluation["models"]["challenger"]["scoring_precision"]["allowed"]
    assert registry_versions(project)[0]["tags"]["scoring_precision"] == ("bf16" if allowed else "fp32")


def test_evaluation_scores_base_and_challenger_on_the_same_test_rows(project, first_run):
    evaluation = json.loads((project / "reports" / "evaluation.json").read_text())
    assert set(evaluation["models"]) == {"base_probe", "challenger"}
    predictions = pd.read_parquet(project / "reports" / "test_predictions.parquet")
    assert len(predictions) == evaluation["test_rows"]
    for model in evaluation["models"].values():
        assert sum(map(sum, model["confusion_matrix"])) == evaluation["test_rows"]
    decision = json.loads((project / "reports" / "gate.json").read_text())
    forgetting = next(c for c in decision["checks"] if c["name"] == "forgetting")
    assert forgetting["passed"] and "no champion yet" in forgetting["reason"]


def test_rerun_on_unchanged_data_promotes_nothing_and_says_why(project, second_run):
    assert second_run.returncode == 0, second_run.stderr[-3000:]
    assert "version 2 rejected" in second_run.stdout
    decision = json.loads((project / "reports" / "gate.json").read_text())
    assert decision["promote"] is False
    champion_check = next(c for c in decision["checks"] if c["name"] == "beats_champion")
    assert champion_check["passed"] is False and "includes zero" in champion_check["reason"]
    versions = registry_versions(project)
    assert versions[1]["tags"]["decision"] == "rejected"
    assert "beats" not in versions[1]["tags"]["reasons"] or "FAIL" in versions[1]["tags"]["reasons"]
    assert status(project)["champion"]["version"] == "1"
    # the same data version: identical test rows, so the comparison is paired
    assert versions[0]["tags"]["data.md5"] == versions[1]["tags"]["data.md5"]
    evaluation = json.loads((project / "reports" / "evaluation.json").read_text())
    assert evaluation["new_test_rows"] == 0
    # every test row was a test row of the champion's data: the whole split is the regression set,
    # its answers the test rows' own
    assert evaluation["regression"]["domains"] == {"earlier test rows": evaluation["test_rows"]}
    regression = pd.read_parquet(project / "reports" / "regression_predictions.parquet")
    predictions = pd.read_parquet(project / "reports" / "test_predictions.parquet")
    assert regression["row"].tolist() == predictions["row"].tolist()
    assert regression["challenger"].tolist() == predictions["challenger"].tolist()
    forgetting = next(c for c in decision["checks"] if c["name"] == "forgetting")
    assert f"on {evaluation['test_rows']} regression rows (earlier test rows" in forgetting["reason"]


def test_bad_data_stops_at_validation_and_leaves_the_registry_as_it_was(project, second_run):
    before = registry_versions(project)
    rows = pd.read_csv(project / "reviews.csv").head(200).assign(split="train")
    rows.loc[rows.index[:40], "split"] = "test"
    leaked = rows.iloc[[0]].assign(split="train")  # a test row copied into train
    rows.loc[rows.index[50], "label"] = "positve"  # unknown label
    rows.loc[rows.index[60], "text"] = ""  # empty text
    pd.concat([rows, leaked]).to_csv(project / "bad.csv", index=False)
    write_params(project, "bad_params.yaml", "bad.csv", split_column="split")
    result = tuneloop(project, "run", "--params", "bad_params.yaml")
    assert result.returncode == 2
    assert "registry is unchanged" in result.stderr
    for rule, row in (("label_set", "51"), ("non_empty_text", "61"), ("split_leakage", "1")):
        line = next(out for out in result.stderr.splitlines() if f"- {rule}:" in out)
        assert f"row {row} (" in line or f"rows {row} (" in line, line
    assert "] split:" not in result.stdout  # stopped before the split stage
    assert registry_versions(project) == before
    output = result.stdout + result.stderr
    assert "Traceback" not in output  # one clear message, not Prefect's task and flow tracebacks
    assert sum("- label_set:" in line for line in output.splitlines()) == 1


def test_a_declared_split_without_train_rows_stops_at_validation_with_one_message(project, second_run):
    before = registry_versions(project)
    rows = pd.read_csv(project / "reviews.csv").head(300)
    rows["split"] = ["validation", "test"] * 150
    rows.to_csv(project / "no_train.csv", index=False)
    write_params(project, "no_train.yaml", "no_train.csv", split_column="split")
    result = tuneloop(project, "run", "--params", "no_train.yaml")
    assert result.returncode == 2
    assert "no row is a train row" in result.stderr and "Traceback" not in result.stdout + result.stderr
    assert "] split:" not in result.stdout and "] baseline:" not in result.stdout  # no compute spent
    assert registry_versions(project) == before
    debug = tuneloop(project, "validate", "--params", "no_train.yaml", "--debug")
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "SplitError" in debug.stderr


def test_changed_data_retrains_and_restore_brings_back_version_1_exact_bytes(project, second_run, tmp_path):
    original = (project / "reviews.csv").read_bytes()
    frame = pd.read_csv(project / "reviews.csv")
    pd.concat([frame, pd.read_csv(MOVIES).sample(100, random_state=9)]).to_csv(project / "reviews.csv", index=False)
    result = tuneloop(project, "run")
    assert result.returncode == 0, result.stderr[-3000:]
    newest = registry_versions(project)[-1]
    assert newest["tags"]["data.md5"] == md5(project / "reviews.csv") != hashlib.md5(original).hexdigest()
    # stable splits: only the added rows can be new test rows (about 10 of the 100)
    evaluation = json.loads((project / "reports" / "evaluation.json").read_text())
    assert 0 < evaluation["new_test_rows"] <= 30 and "new since the champion's data" in result.stdout
    # the other test rows were the champion's test rows: the regression set the gate checks forgetting on
    assert evaluation["regression"]["rows"] == evaluation["test_rows"] - evaluation["new_test_rows"]
    shutil.rmtree(project / ".dvc" / "cache")  # the bytes must come from the DVC remote
    restored = tuneloop(project, "restore-data", "1", "--out", str(tmp_path / "v1"))
    assert restored.returncode == 0, restored.stderr[-3000:]
    assert (tmp_path / "v1" / "reviews.csv").read_bytes() == original
