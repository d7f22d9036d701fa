"""The monitor flow end to end: two tiny-BERT versions in a SQLite MLflow
registry, the champion's predictions logged into a SQLite prediction store,
real Prefect (ephemeral).

Version 1 learned the toy task; version 2 is the same model with its label
names swapped (every answer flipped) and was promoted over it, as a botched
deploy would be. Its window holds toy sentences with feedback labels and
unlabelled tweets, against a reference of toy training sentences. The flow must
write Evidently's HTML, log its numbers to MLflow and onto the version, see the
drift, roll back to version 1 with an audit entry saying why, and ask for
retraining with the labelled rows exported. Run again through the CLI, the
restored champion has too little traffic for a verdict and is left alone.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd
import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ helpers (tiny_model)

from tiny_model import build_tiny_bert, sentiment_rows  # noqa: E402

from tuneloop.plumbing.tracking import start_pipeline_run  # noqa: E402
from tuneloop.service.store import Prediction, PredictionStore  # noqa: E402
from tuneloop.tasks import registry  # noqa: E402
from tuneloop.tasks.drift import MonitorConfig, classifier_predictor  # noqa: E402
from tuneloop.tasks.finetune import FinetuneConfig, finetune  # noqa: E402
from tuneloop.tasks.registry import CHAMPION, PREVIOUS, alias_version, audit_trail, move_champion  # noqa: E402
from tuneloop.values.workspace import Workspace  # noqa: E402

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
TWEETS = REPO / "data" / "vader_sentiment" / "tweets.csv"
LABELS = ["negative", "positive"]
FAST = FinetuneConfig(epochs=3, learning_rate=1e-2, batch_size=16, lora_r=8, max_length=32, min_steps=0,
                      min_examples_per_class=0)
TOY_ROWS, TWEET_ROWS, OLD_ROWS = 150, 150, 20


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> Path:
    return build_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="module")
def model_dirs(tiny_bert, tmp_path_factory) -> dict[str, Path]:
    """A tiny LoRA model that learned the toy task, and a copy with its label names swapped."""
    out = tmp_path_factory.mktemp("monitor-models")
    good = finetune("tiny", tiny_bert, sentiment_rows(256, seed=0), sentiment_rows(64, seed=1), LABELS, FAST,
                    out / "good", out / "checkpoints", "monitor", progress=False).model_dir
    flipped = shutil.copytree(good, out / "flipped")
    (flipped / "labels.json").write_text(json.dumps(LABELS[::-1]))  # same weights, every answer flipped
    return {"good": good, "flipped": flipped}


def register(sandbox, name: str, folder: Path, splits: Path, tmp: Path) -> str:
    """One pipeline run per version, with the reference splits the register stage logs."""
    run_id = start_pipeline_run(sandbox.config(model_name=name), Workspace(Path(tempfile.mkdtemp(dir=tmp))),
                                {"data.md5": "0" * 32})
    version = registry.create_version(name, run_id, folder, {"test.macro_f1": "0.95"}).version
    registry.client().log_artifact(run_id, str(splits), artifact_path=registry.REFERENCE_DIR)
    return version


def write_params(project: Path, sandbox, name: str, tiny_bert: Path) -> None:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["model"]["base"] = str(tiny_bert)
    params["mlflow"].update(tracking_uri=sandbox.tracking_uri, experiment=sandbox.experiment, model_name=name)
    params["serve"]["store_url"] = f"sqlite:///{project / 'state' / 'predictions.db'}"
    params["triggers"]["min_new_labelled_rows"] = 100
    params["monitor"].update(window_hours=None, min_rows=100, sample_rows=200, min_labelled_rows=50, max_length=32,
                             bootstrap_samples=300)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def log_traffic(store: PredictionStore, predict, version: str, texts: list[str], prefix: str) -> None:
    labels, confidences = predict(texts)
    store.log(Prediction(f"{prefix}-{i}", 0, text, label, float(conf), {label: float(conf)}, version)
              for i, (text, label, conf) in enumerate(zip(texts, labels, confidences)))


@pytest.fixture(scope="module")
def project(mlflow_sandbox, model_dirs, tiny_bert, tmp_path_factory) -> dict:
    """v1 (good) promoted, then v2 (flipped) promoted over it; traffic logged for both."""
    root = tmp_path_factory.mktemp("monitor-project")
    name = "tl-monitor-flow"
    texts, ys = sentiment_rows(256, seed=0)
    splits = root / "splits.parquet"
    pd.DataFrame({"row": range(256), "text": texts, "label": [LABELS[y] for y in ys], "split": "train"}
                 ).to_parquet(splits, index=False)
    for kind in ("good", "flipped"):
        register(mlflow_sandbox, name, model_dirs[kind], splits, root)
    move_champion(name, "1", "promote", "gate passed")
    move_champion(name, "2", "promote", "gate passed")
    write_params(root, mlflow_sandbox, name, tiny_bert)

    (root / "state").mkdir()
    store = PredictionStore(f"sqlite:///{root / 'state' / 'predictions.db'}")
    config = MonitorConfig(max_length=32, device="cpu")
    old, _ = sentiment_rows(OLD_ROWS, seed=9)
    log_traffic(store, classifier_predictor(model_dirs["good"], str(tiny_bert), config), "1", old, "old")
    toy, toy_y = sentiment_rows(TOY_ROWS, seed=5)
    tweets = pd.read_csv(TWEETS).sample(TWEET_ROWS, random_state=0)["text"].tolist()
    flipped = classifier_predictor(model_dirs["flipped"], str(tiny_bert), config)
    log_traffic(store, flipped, "2", toy, "toy")
    log_traffic(store, flipped, "2", tweets, "tweet")
    for i, y in enumerate(toy_y):
        store.attach_feedback(f"toy-{i}", [LABELS[y]])
    return {"root": root, "name": name}


@pytest.fixture(scope="module")
def monitored(project):
    """One in-process run of the flow; the retraining request is recorded, not run."""
    from tuneloop.flows.monitor import monitor_flow

    requests = []
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("PREFECT_API_URL", raising=False)
        patch.setattr("tuneloop.flows.monitor.request_retraining",
                      lambda workspace, params_path, model_name, reason: requests.append(reason) or {"mode": "test"})
        result = monitor_flow(params_path="params.yaml", root=str(project["root"]))
    return result, requests


def test_window_holds_only_the_champions_predictions_with_their_feedback(monitored) -> None:
    result, _ = monitored
    assert result["champion"] == "2"
    assert result["window_rows"] == TOY_ROWS + TWEET_ROWS
    assert result["live"]["labelled_rows"] == TOY_ROWS
    assert result["live"]["macro_f1"] < 0.3  # every answer flipped on a task the weights learned


def test_the_window_is_estimated_without_labels_and_compared_only_with_a_recorded_test_accuracy(monitored) -> None:
    result, _ = monitored
    estimated = result["estimated"]
    assert estimated["metrics"]["rows"] == TOY_ROWS + TWEET_ROWS
    assert 0.5 <= estimated["metrics"]["accuracy_low"] <= estimated["metrics"]["accuracy"] <= 1.0
    assert estimated["reference_accuracy"] is None and estimated["drop"] is False  # registered without test.accuracy
    assert "the champion has no test accuracy to compare with" in estimated["reasons"][0]


def test_evidently_html_report_is_written_under_reports_monitor(monitored, project) -> None:
    result, _ = monitored
    report = Path(result["report"])
    assert report.parent == project["root"] / "reports" / "monitor"
    assert report.name.endswith("-v2.html")
    html = report.read_text()
    assert "Drift in embeddings 'text_embedding'" in html and "Drift in column 'confidence'" in html


def test_tweets_among_toy_sentences_are_significant_drift(monitored) -> None:
    result, _ = monitored
    drift = result["drift"]
    print("\nintegration drift:", json.dumps(drift["metrics"], indent=1))
    assert drift["status"] == "drift"
    assert drift["metrics"]["embedding_auc"] >= 0.6
    assert drift["metrics"]["descriptor_share"] >= 0.5
    assert any(r.startswith("DRIFT embeddings") for r in drift["reasons"])


def test_worse_new_champion_is_rolled_back_with_an_audited_reason(monitored, project) -> None:
    result, _ = monitored
    rollback = result["rollback"]
    assert rollback["rolled_back"] and (rollback["from"], rollback["to"]) == ("2", "1")
    assert rollback["comparison"]["previous"] - rollback["comparison"]["champion"] > 0.5
    name = project["name"]
    assert alias_version(name, CHAMPION).version == "1"
    assert alias_version(name, PREVIOUS).version == "2"
    last = audit_trail(name)[-1]
    assert (last["action"], last["from"], last["to"]) == ("auto-rollback", "2", "1")
    assert "live macro_f1 on 150 labelled rows" in last["why"] and "lies above zero" in last["why"]


def test_numbers_are_logged_to_mlflow_and_onto_the_version(monitored, project, mlflow_sandbox) -> None:
    result, _ = monitored
    client = registry.client()
    run = client.get_run(result["run_id"])
    assert client.get_experiment(run.info.experiment_id).name == f"{mlflow_sandbox.experiment}-monitor"
    assert run.data.tags["model_version"] == "2" and run.data.tags["drift.status"] == "drift"
    assert run.data.metrics["live.macro_f1"] == pytest.approx(result["live"]["macro_f1"])
    assert run.data.metrics["drift.embedding_auc"] == pytest.approx(result["drift"]["metrics"]["embedding_auc"])
    assert run.data.metrics["window_rows"] == TOY_ROWS + TWEET_ROWS
    assert run.data.metrics["estimated.accuracy"] == pytest.approx(result["estimated"]["metrics"]["accuracy"])
    artifacts = {a.path for a in client.list_artifacts(result["run_id"], "monitor")}
    assert {"monitor/summary.json", f"monitor/{Path(result['report']).name}"} <= artifacts
    tags = registry.get_version(project["name"], "2").tags
    assert float(tags["live.macro_f1"]) == pytest.approx(result["live"]["macro_f1"])
    assert tags["drift.status"] == "drift" and tags["monitor.run_id"] == result["run_id"]
    assert float(tags["estimated.macro_f1"]) == pytest.approx(result["estimated"]["metrics"]["macro_f1"], abs=1e-6)


def test_drift_with_enough_new_labels_exports_them_and_requests_retraining(monitored, project) -> None:
    result, requests = monitored
    retraining = result["retraining"]
    assert retraining["requested"] and retraining["new_labelled_rows"] == TOY_ROWS
    exported = pd.read_csv(retraining["exported"])
    assert Path(retraining["exported"]).parent == project["root"] / "data" / "incoming"
    assert list(exported.columns) == ["text", "label", "labelled_by"] and len(exported) == TOY_ROWS
    assert requests == [f"significant drift; {TOY_ROWS} new labelled rows exported to "
                        f"{Path(retraining['exported']).name}"]


def test_cli_leaves_the_restored_champion_alone_without_enough_traffic(monitored, project) -> None:
    env = {k: v for k, v in os.environ.items() if k not in {"MLFLOW_TRACKING_URI", "PREFECT_API_URL"}}
    done = subprocess.run([sys.executable, "-m", "tuneloop.cli", "monitor", "--json", "--root", str(project["root"])],
                          cwd=project["root"], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(done.stdout[done.stdout.index("{\n"):])
    assert (result["champion"], result["window_rows"]) == ("1", OLD_ROWS)
    assert result["drift"]["status"] == "insufficient data" and result["report"] is None
    assert not result["rollback"]["rolled_back"]
    assert "arrived by auto-rollback" in result["rollback"]["reasons"][0]
    assert not result["retraining"]["requested"]
    assert alias_version(project["name"], CHAMPION).version == "1"
