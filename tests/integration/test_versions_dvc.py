"""`tuneloop run`, then `dvc status`, `dvc metrics show`, `dvc plots show`,
`dvc repro` after a params change and `dvc exp run -S ...` through the real
CLI, DVC, MLflow (SQLite) and all-MiniLM-L6-v2 on a few hundred rows: DVC
agrees with the flow (nothing to rerun), each later run registers a new version
in a folder of its own, the champion's files stay byte-identical and every
version still verifies against its recorded hashes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import pandas as pd
import pytest
import yaml

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
MOVIES = REPO / "data" / "vader_sentiment" / "movie_reviews.csv"
GIT_USER = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@e", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@e"}


def run(project: Path, *command: str) -> subprocess.CompletedProcess:
    """A command in the project, with this interpreter's `tuneloop` and `dvc` first on PATH."""
    env = {k: v for k, v in os.environ.items() if k not in {"MLFLOW_TRACKING_URI", "PREFECT_API_URL"}}
    env.update(GIT_USER, PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}")
    return subprocess.run(list(command), cwd=project, env=env, capture_output=True, text=True, timeout=600)


def ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-3000:])
    return result.stdout


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A git + DVC project: 240 movie reviews, the repo's pipeline (without its code deps), small settings."""
    root = tmp_path_factory.mktemp("dvc-project")
    pd.read_csv(MOVIES).sample(240, random_state=5).to_csv(root / "reviews.csv", index=False)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["ingest"]["source"] = "reviews.csv"
    params["validate"]["min_rows_per_class"] = 20
    # 8 optimizer steps at most: these runs prove which files and runs each version gets, not quality
    params["finetune"].update(epochs=1, batch_size=16, max_length=64, max_steps=8)
    params["gate"].update(min_gain_over_base=-1.0, max_slice_regression=1.0, max_latency_ms=10_000.0)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    pipeline = yaml.safe_load((REPO / "dvc.yaml").read_text())
    for stage in pipeline["stages"].values():
        stage["deps"] = [d for d in stage["deps"] if not str(d).startswith(("tasks/", "tuneloop/"))]
    (root / "dvc.yaml").write_text(yaml.safe_dump(pipeline, sort_keys=False))
    (root / ".gitignore").write_text("mlflow.db\nmlartifacts/\nstate/\n.dvc-remote/\n/data/incoming/*\n"
                                     "!/data/incoming/.gitkeep\n")
    (root / "data" / "incoming").mkdir(parents=True)
    (root / "data" / "incoming" / ".gitkeep").touch()
    ok(run(root, "git", "init", "-q"))
    ok(run(root, sys.executable, "-m", "dvc", "init", "-q"))
    ok(run(root, "git", "add", "."))
    ok(run(root, "git", "commit", "-qm", "project"))
    return root


@pytest.fixture(scope="module")
def registry_of(project):
    """The project's registry, read in this process."""
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    yield mlflow.MlflowClient()
    mlflow.set_tracking_uri(None)


def version_files(client, version: str) -> dict[str, bytes]:
    folder = Path(urlparse(client.get_model_version("tuneloop-sentiment", version).source).path)
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def versions(client) -> list:
    return sorted(client.search_model_versions("name = 'tuneloop-sentiment'"), key=lambda v: int(v.version))


def numbers(found: list) -> list[str]:
    return [str(v.version) for v in found]


def set_seed(project: Path, seed: int) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["finetune"]["seed"] = seed
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def dvc(project: Path, *args: str) -> str:
    return ok(run(project, sys.executable, "-m", "dvc", *args))


def check_dvc_agrees_with_the_flow(project: Path) -> None:
    """After `tuneloop run`: nothing to rerun, small readable metrics, plots drawn."""
    assert "Data and pipelines are up to date" in dvc(project, "status")
    dry = dvc(project, "repro", "--dry")
    assert "Running stage" not in dry, dry
    shown = dvc(project, "metrics", "show")
    for column in ("challenger.macro_f1", "base_probe.macro_f1", "promote", "errors", "best_val_macro_f1"):
        assert column in shown, shown
    # one row per metrics file, about 19 columns (the file headers' width), not one 2,592-char line
    assert max(len(line) for line in shown.splitlines()) < 500, shown
    # each run commits its metrics and plots (so `dvc metrics diff HEAD~1` compares runs): tracked and clean
    tracked = ok(run(project, "git", "ls-files", "metrics", "plots"))
    assert set(tracked.splitlines()) >= {"metrics/evaluation.json", "plots/confusion.csv"}
    assert ok(run(project, "git", "status", "--porcelain", "metrics", "plots")).strip() == ""
    dvc(project, "plots", "show", "-o", "dvc_plots")
    page = (project / "dvc_plots" / "index.html").read_text()
    for title in ("Challenger on the test rows", "Challenger reliability", "Validation macro-F1 per epoch"):
        assert title in page


def test_dvc_agrees_with_tuneloop_run_and_repro_and_exp_run_register_new_versions_beside_an_untouched_champion(
        project, registry_of, tmp_path) -> None:
    from tuneloop.tasks import registry

    out = ok(run(project, sys.executable, "-m", "tuneloop.cli", "run"))  # the champion, by the Prefect flow
    assert "version 1 promoted to champion" in out, out[-3000:]
    check_dvc_agrees_with_the_flow(project)
    ok(run(project, "git", "add", "-A"))
    ok(run(project, "git", "commit", "-qm", "version 1"))  # dvc.lock, metrics/ and plots/ in git
    client = registry_of
    champion = client.get_model_version_by_alias("tuneloop-sentiment", "champion").version
    champion_files = version_files(client, champion)
    assert numbers(versions(client)) == ["1"]

    set_seed(project, 14)  # a params change: dvc repro reruns tune, finetune, evaluate, gate, register
    out = ok(run(project, sys.executable, "-m", "dvc", "repro"))
    assert "Running stage 'finetune'" in out
    assert "Running stage 'ingest'" not in out and "Running stage 'baseline'" not in out
    assert numbers(versions(client)) == ["1", "2"]
    assert version_files(client, champion) == champion_files

    ok(run(project, "git", "add", "-A"))
    ok(run(project, "git", "commit", "-qm", "seed 14"))
    ok(run(project, sys.executable, "-m", "dvc", "exp", "run", "-S", "finetune.epochs=2"))
    diff = dvc(project, "metrics", "diff")  # the experiment against the seed-14 commit
    assert "metrics/register.json  version   2       3" in diff, diff  # 8 steps either way: same scores
    assert "finetune.epochs" in dvc(project, "exp", "show", "--only-changed", "--no-pager")
    found = versions(client)
    assert numbers(found) == ["1", "2", "3"]
    assert version_files(client, champion) == champion_files
    assert client.get_model_version_by_alias("tuneloop-sentiment", "champion").version == champion
    assert len({v.source for v in found}) == 3 and len({v.run_id for v in found}) == 3
    assert [yaml.safe_load(v.tags["params"])["finetune"]["epochs"] for v in found] == [1, 1, 2]
    for v in found:  # every version still matches its recorded hashes, base model included
        model_dir, base = registry.verified_version("tuneloop-sentiment", v.version, tmp_path / "cache")
        assert base is not None and (model_dir / "adapter_model.safetensors").exists()

    # every finetune run is tracked in a run of its own with the settings it really ran with
    runs = client.search_runs([client.get_run(found[0].run_id).info.experiment_id],
                              filter_string="tags.`tuneloop.stage` = 'finetune'", order_by=["start_time ASC"])
    assert [(r.data.params["finetune.seed"], r.data.params["finetune.epochs"]) for r in runs] == [
        ("13", "1"), ("14", "1"), ("14", "2")]
