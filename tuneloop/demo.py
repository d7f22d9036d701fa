"""`tuneloop demo`: the production story on the shipped data, step by step.

train on movie reviews → serve → send tweets (with their true labels as
feedback) → the monitor sees drift → retraining on the labelled tweets → gate →
the new version becomes the shadow: it scores live tweets beside the champion
without answering anyone → the monitor judges it on those same labelled rows and
promotes it, followed by the service → a deliberately bad version forced to
champion → the monitor sees its live macro-F1 drop and rolls back, followed by
the service → the bad version tried again as a shadow, on traffic without
labels: the monitor discards it. Everything runs locally: Prefect ephemeral,
MLflow on SQLite, the service on 127.0.0.1, in a workspace folder of its own.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pandas as pd
import yaml

DATA = Path(__file__).resolve().parents[1] / "data" / "vader_sentiment"
MARKER = ".tuneloop-demo"  # written into every workspace the demo creates: only those are ever deleted
SHADOW_ROWS = 100  # texts each shadow step sends (tweets, then movie reviews): its baking window


@dataclass
class Story:
    """Prints each step with the seconds since the demo started."""

    started: float = field(default_factory=time.perf_counter)

    def step(self, name: str, detail: str) -> None:
        print(f"\n=== [{time.perf_counter() - self.started:6.0f}s] {name}: {detail}", flush=True)


def demo_params(project_params: Path, workspace: Path, movies: Path, port: int) -> Path:
    """The project's params with the demo's data, a fast follow interval and a
    monitor window sized for the traffic the demo sends."""
    params = yaml.safe_load(project_params.read_text())
    params["ingest"]["source"] = str(movies)
    params["serve"].update(port=port, poll_seconds=1.0)
    params["triggers"]["min_new_labelled_rows"] = 200
    params.setdefault("shadow", {}).update(min_rows=SHADOW_ROWS, min_hours=0.0,  # a baking window the demo fills
                                           min_labelled_rows=SHADOW_ROWS)
    params["gate"]["promote_via_shadow"] = True  # a retrained version first proves itself on live tweets
    path = workspace / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def sample(domain: str, rows: int, seed: int) -> pd.DataFrame:
    """`rows` labelled (not neutral) texts of a shipped domain.

    Raises:
        DemoError: the domain has fewer.
    """
    frame = pd.read_csv(DATA / f"{domain}.csv")
    frame = frame[frame["label"] != "neutral"]
    if rows > len(frame):
        raise DemoError(f"the demo sends {rows} {domain} (--tweets + {SHADOW_ROWS} for the shadow + "
                        f"--later-tweets) but {len(frame)} are shipped: ask for fewer")
    return frame.sample(rows, random_state=seed)


def start_service(workspace: Path, port: int) -> subprocess.Popen:
    log = (workspace / "serve.log").open("w")
    return subprocess.Popen([sys.executable, "-m", "tuneloop.cli", "serve", "--root", str(workspace),
                             "--port", str(port)], stdout=log, stderr=subprocess.STDOUT, cwd=workspace)


def wait_for_version(url: str, version: str, timeout: float = 120.0) -> float:
    """Seconds until the service reports `version` (raises on timeout)."""
    started = time.perf_counter()
    while time.perf_counter() - started < timeout:
        try:
            if httpx.get(f"{url}/version", timeout=5).json().get("version") == version:
                return time.perf_counter() - started
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.2)
    raise TimeoutError(f"the service did not serve version {version} within {timeout:.0f}s")


def send(url: str, frame: pd.DataFrame, feedback: bool = True, batch: int = 64) -> float:
    """Predicts every text and, with `feedback`, feeds back its true label; returns
    the champion's live accuracy. Requests carry `batch` texts (64: the default
    serve.max_batch)."""
    correct = 0
    for start in range(0, len(frame), batch):
        chunk = frame.iloc[start : start + batch]
        answer = httpx.post(f"{url}/predict", json={"texts": chunk["text"].tolist()}, timeout=60).json()
        labels = chunk["label"].tolist()
        correct += sum(p["label"] == y for p, y in zip(answer["predictions"], labels))
        if feedback:
            httpx.post(f"{url}/feedback", json={"request_id": answer["request_id"], "labels": labels}, timeout=30)
    return correct / max(1, len(frame))


def force_bad_version(model_name: str, workspace: Path, experiment: str) -> str:
    """Registers the champion with its classifier head negated (every
    prediction flips) and forces it to champion, bypassing the gate, as a
    botched manual deploy would.

    Returns:
        The bad version's number.
    """
    import mlflow
    from safetensors.torch import load_file, save_file

    from tuneloop.model.classifier import HEAD_FILE
    from tuneloop.tasks import registry
    from tuneloop.values.workspace import Workspace

    champion = registry.alias_version(model_name, registry.CHAMPION)
    if champion is None:
        raise DemoError(f"{model_name} has no champion to copy")
    source = registry.download_version(model_name, champion.version, Workspace(workspace).models_cache)
    root = source.parent.parent if source.parent.name == "artifacts" else source  # the whole MLflow model
    bad = Workspace(workspace).demo_bad_model
    shutil.rmtree(bad, ignore_errors=True)
    shutil.copytree(root, bad)
    weights = bad / source.relative_to(root) / HEAD_FILE
    tensors = {k: -v for k, v in load_file(str(weights)).items()}
    save_file(tensors, str(weights))
    client = mlflow.MlflowClient()
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise DemoError(f"no MLflow experiment {experiment!r}")
    experiment_id = found.experiment_id
    run = client.create_run(experiment_id, tags={"tuneloop.outcome": "forced (demo)"})
    lineage = {k: v for k, v in champion.tags.items()  # its lineage; it was never evaluated
               if not k.startswith(("test.", "live.")) and k != "reasons"}
    info = registry.create_version(model_name, run.info.run_id, bad,
                                   {**lineage, "decision": "forced", "demo": "classifier head negated"})
    client.set_terminated(run.info.run_id)
    registry.move_champion(model_name, info.version, "forced", "demo: a deliberately bad version, gate bypassed")
    return info.version


def wait_for_shadow(url: str, version: str, timeout: float = 120.0) -> None:
    """Returns once the service scores `version` beside the champion (raises on timeout)."""
    started = time.perf_counter()
    while time.perf_counter() - started < timeout:
        try:
            if httpx.get(f"{url}/health", timeout=5).json().get("shadow") == version:
                return
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.2)
    raise TimeoutError(f"the service did not load shadow version {version} within {timeout:.0f}s")


def shadow_agreement(store, shadow: str, champion: str, rows: int, timeout: float = 120.0) -> int:
    """Waits until the shadow has logged its answer to `rows` of the champion's; returns
    how many of them it gave the champion's label."""
    started = time.perf_counter()
    while len(pairs := store.shadow_pairs(shadow, champion)) < rows:
        if time.perf_counter() - started > timeout:
            raise DemoError(f"the shadow logged {len(pairs)} of {rows} answers within {timeout:.0f}s")
        time.sleep(0.2)
    return int((pairs["shadow_label"] == pairs["champion_label"]).sum())


def summary_table(model_name: str) -> str:
    """Versions, their gate decisions and shadow outcomes, test and live metrics, and the aliases."""
    from tuneloop.tasks import registry

    lines = [f"{'version':>7}  {'decision':<10} {'shadow':<10} {'data':<8} {'test macro-F1':>13} "
             f"{'live macro-F1':>13}  aliases"]
    for v in registry.list_versions(model_name):
        test = v.tags.get("test.macro_f1")
        live = v.tags.get("live.macro_f1")
        lines.append(f"{v.version:>7}  {v.tags.get('decision', '-'):<10} {v.tags.get('shadow.outcome', '-'):<10} "
                     f"{v.tags.get('data.md5', '')[:8]:<8} "
                     f"{float(test) if test else float('nan'):>13.4f} {float(live) if live else float('nan'):>13.4f}"
                     f"  {','.join(v.aliases)}")
    moves = (f"{e['action']} {e['from']}->{e['to']}" for e in registry.audit_trail(model_name))
    lines.append("alias moves: " + "; ".join(moves))
    return "\n".join(lines)


def estimate_line(monitored: dict) -> str:
    """The window's live accuracy (from feedback labels) beside the one estimated from the
    calibrated confidences alone, as the monitor measured them."""
    live, estimated = monitored.get("live") or {}, (monitored.get("estimated") or {}).get("metrics") or {}
    said = []
    if live.get("accuracy") is not None:
        said.append(f"live accuracy {live['accuracy']:.3f} on {live['labelled_rows']} labelled rows")
    if estimated.get("accuracy") is not None:
        said.append(f"estimated without labels {estimated['accuracy']:.3f} "
                    f"[{estimated['accuracy_low']:.3f}, {estimated['accuracy_high']:.3f}]")
    return "; ".join(said) or "no live or estimated accuracy in this window"


class DemoError(RuntimeError):
    """A step of the story did not happen as it should."""


def workspace_refusal(workspace: Path, project: Path) -> str | None:
    """Why `workspace` may not be (re)created by the demo, or None.

    The demo deletes its workspace to start fresh, so it only ever deletes a
    folder holding its marker file, or an empty one; never the project or a
    folder containing it.
    """
    workspace, project = workspace.resolve(), project.resolve()
    if workspace == project or project in workspace.parents or workspace in project.parents:
        return f"--workspace {workspace} overlaps the project {project}: the demo is a project of its own"
    if workspace.exists() and not workspace.is_dir():
        return f"--workspace {workspace} is a file, not a folder"
    if workspace.is_dir() and any(workspace.iterdir()) and not (workspace / MARKER).is_file():
        return (f"--workspace {workspace} is not empty and was not created by the demo (no {MARKER} file): "
                "it is left untouched; pass a new or empty folder")
    return None


def fresh_workspace(workspace: Path, project: Path) -> Path:
    """Deletes a workspace the demo made before (never anything else) and makes it anew, marked.

    Raises:
        DemoError: naming why the folder is refused; nothing was deleted.
    """
    refusal = workspace_refusal(workspace, project)
    if refusal:
        raise DemoError(refusal)
    if (workspace / MARKER).is_file():
        shutil.rmtree(workspace)  # a fresh registry every time
    workspace.mkdir(parents=True, exist_ok=True)
    (workspace / MARKER).write_text("created by `tuneloop demo`; the demo may delete this folder\n")
    return workspace


def follow_seconds(url: str, model_name: str, version: str) -> float:
    """How long the service took to serve `version` after the alias moved:
    its load time minus the audit trail's time of the move."""
    from datetime import datetime

    from tuneloop.tasks import registry

    wait_for_version(url, version)
    moved = [e for e in registry.audit_trail(model_name) if e["to"] == str(version)][-1]["at"]
    loaded = httpx.get(f"{url}/version", timeout=5).json()["loaded_at"]
    return (datetime.fromisoformat(loaded) - datetime.fromisoformat(moved)).total_seconds()


def run_demo(project: Path, workspace: Path, movies: int, tweets: int, later_tweets: int) -> str:
    """Plays the story; returns the closing summary table."""
    from tuneloop.flows.monitor import monitor_flow, shadow_line
    from tuneloop.flows.retrain import retrain_flow
    from tuneloop.pipeline.monitoring import prediction_store
    from tuneloop.pipeline.params import load_params
    from tuneloop.plumbing.tracking import configure_tracking
    from tuneloop.tasks import registry
    from tuneloop.values.workspace import Workspace

    shifted = sample("tweets", tweets + SHADOW_ROWS + later_tweets, seed=1)  # refused before any work
    story = Story()
    workspace.mkdir(parents=True, exist_ok=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    all_movies = pd.read_csv(DATA / "movie_reviews.csv")
    movie_rows = all_movies.sample(movies, random_state=0) if 0 < movies < len(all_movies) else all_movies
    movie_rows.to_csv(workspace / "movie_reviews.csv", index=False)
    movies = len(movie_rows)
    demo_params(project / "params.yaml", workspace, workspace / "movie_reviews.csv", port)
    params = load_params(workspace / "params.yaml")
    name = params.mlflow.model_name
    story.step("1 train", f"retraining flow on {movies} movie reviews")
    first = retrain_flow(params_path="params.yaml", root=str(workspace))
    if not first["promoted"]:
        raise DemoError("the first model was not promoted: " + "; ".join(first["reasons"]))
    configure_tracking(params.mlflow, workspace)
    service = start_service(workspace, port)
    try:
        wait_for_version(url, first["version"], timeout=300)
        store = prediction_store(params, Workspace(workspace))  # the service made it
        story.step("2 serve", f"{url} serves version {first['version']}")
        live, baking, later = (shifted.iloc[:tweets], shifted.iloc[tweets : tweets + SHADOW_ROWS],
                               shifted.iloc[tweets + SHADOW_ROWS :])
        accuracy = send(url, live)
        story.step("3 traffic", f"{tweets} tweets served by v{first['version']} (live accuracy {accuracy:.3f}); "
                                "their true labels sent to /feedback")
        monitored = monitor_flow(params_path="params.yaml", root=str(workspace))
        story.step("4 monitor", f"drift status {monitored['drift']['status']}: "
                                + "; ".join(monitored["drift"]["reasons"]) + f" | {estimate_line(monitored)}")
        retraining = monitored["retraining"]
        result = (retraining.get("request") or {}).get("result")
        if not retraining["requested"] or result is None:
            raise DemoError("drift did not start retraining: " + "; ".join(retraining["reasons"]))
        if not result.get("shadow"):
            raise DemoError(f"version {result['version']} did not become the shadow: " + "; ".join(result["reasons"]))
        champion, challenger = first["version"], result["version"]
        story.step("5 retrain + gate", f"version {challenger} passed the gate and became the shadow of "
                                       f"v{champion}: " + "; ".join(result["reasons"]))
        wait_for_shadow(url, challenger)
        accuracy = send(url, baking)
        agreed = shadow_agreement(store, challenger, champion, len(baking))
        story.step("6 shadow on live tweets", f"{len(baking)} more tweets answered by v{champion} alone (live "
                                              f"accuracy {accuracy:.3f}), labels fed back; v{challenger} scored "
                                              f"each beside it and agreed on {agreed}")
        monitored = monitor_flow(params_path="params.yaml", root=str(workspace))
        shadow = monitored.get("shadow") or {}
        if shadow.get("verdict") != "promote":
            raise DemoError(f"shadow v{challenger} was not promoted: "
                            + "; ".join(shadow.get("reasons", ["no verdict"])))
        seconds = follow_seconds(url, name, challenger)
        story.step("7 shadow promoted", shadow_line(shadow) + f"; served {seconds:.1f}s after the alias moved")
        good = challenger
        bad = force_bad_version(name, workspace, params.mlflow.experiment)
        seconds = follow_seconds(url, name, bad)
        story.step("8 bad version forced", f"v{bad} (classifier head negated) forced to champion, gate bypassed; "
                                           f"served {seconds:.1f}s later")
        accuracy = send(url, later)
        story.step("9 traffic",
                   f"{later_tweets} more tweets served by v{bad} (live accuracy {accuracy:.3f}), labels fed back")
        monitored = monitor_flow(params_path="params.yaml", root=str(workspace))
        rollback = monitored["rollback"]
        if not rollback["rolled_back"]:
            raise DemoError("the bad version was not rolled back: " + "; ".join(rollback["reasons"]))
        if rollback["to"] != good:
            raise DemoError(f"the bad version was rolled back to v{rollback['to']}, not to v{good}")
        seconds = follow_seconds(url, name, rollback["to"])
        story.step("10 automatic rollback", f"v{bad} -> v{rollback['to']}: " + "; ".join(rollback["reasons"])
                   + f"; served {seconds:.1f}s after the alias moved")
        registry.set_shadow(name, bad, "demo: the bad version tried again, as a shadow")
        wait_for_shadow(url, bad)
        send(url, all_movies.sample(SHADOW_ROWS, random_state=2), feedback=False)
        agreed = shadow_agreement(store, bad, good, SHADOW_ROWS)
        monitored = monitor_flow(params_path="params.yaml", root=str(workspace))
        shadow = monitored.get("shadow") or {}
        if shadow.get("verdict") != "discard":
            raise DemoError("the bad shadow was not discarded: " + "; ".join(shadow.get("reasons", ["no verdict"])))
        story.step("11 shadow without labels", f"v{bad} as the shadow of v{good}: {SHADOW_ROWS} movie reviews "
                                               f"answered by v{good} alone, no labels; v{bad} agreed on {agreed}; "
                                               + shadow_line(shadow))
    finally:
        service.terminate()
        service.wait(timeout=30)
    table = summary_table(name)
    story.step("done", f"in {time.perf_counter() - story.started:.0f}s")
    return table
