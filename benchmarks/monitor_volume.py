"""`tuneloop monitor` at volume: wall time and peak memory over 10k, 100k and 1M logged predictions.

    .venv/bin/python -m benchmarks.monitor_volume --project DIR          # a project with a champion
    .venv/bin/python -m benchmarks.monitor_volume --project DIR --rows 10000 100000

For each size a fresh SQLite prediction store is filled with that many
predictions of the champion, logged over the last 23 hours (the project's test
texts, cycled, with the champion's own answers to them, so nothing drifts), 1%
of them with feedback labels. Then the real CLI runs, as a cron job would:
`tuneloop monitor` with the store in `$TUNELOOP_STORE_URL`, the window bounded
by time only (`monitor.window_rows=null`: every row is in it) and retraining
off (`ingest.incoming_dir=null`). Measured: the command's wall time and the
peak RSS of its process tree (sampled every 50 ms), twice per size: the first
run scores and embeds the champion's reference sample, the second reads it
from the cache. Writes benchmarks/results/monitor-volume-<date>.json. Not a
test: nothing asserts.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

from benchmarks.measure import machine

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
BIN = Path(sys.executable).parent
CHUNK = 50_000


def champion_answers(project: Path) -> tuple[str, list[str], list[str], list[float]]:
    """The champion's version and its answers on the project's test texts."""
    import mlflow
    import pandas as pd
    import yaml

    name = yaml.safe_load((project / "params.yaml").read_text())["mlflow"]["model_name"]
    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    version = mlflow.MlflowClient().get_model_version_by_alias(name, "champion").version
    splits = pd.read_parquet(project / "data" / "split" / "splits.parquet")
    texts = splits.loc[splits["split"] == "test", "text"].astype(str).tolist()
    answers = mlflow.pyfunc.load_model(f"models:/{name}@champion").predict(pd.DataFrame({"text": texts}))
    return str(version), texts, answers["label"].tolist(), answers["confidence"].astype(float).tolist()


def fill_store(url: str, rows: int, version: str, texts, labels, confidences) -> None:
    """`rows` predictions over the last 23 hours, every 100th with a feedback label (its own answer)."""
    import sqlalchemy as sa

    from tuneloop.service.store import PREDICTIONS, PredictionStore

    store = PredictionStore(url)
    now = datetime.now(timezone.utc)
    step = timedelta(hours=23) / rows
    n = len(texts)
    with store.engine.begin() as conn:
        for start in range(0, rows, CHUNK):
            batch = []
            for i in range(start, min(rows, start + CHUNK)):
                j = i % n
                labelled = i % 100 == 0
                batch.append({"request_id": f"r{i}", "item": 0, "ts": now - step * (rows - i), "text": texts[j],
                              "label": labels[j], "confidence": confidences[j],
                              "probabilities": json.dumps({labels[j]: confidences[j]}), "model_version": version,
                              "abstained": False, "true_label": labels[j] if labelled else None,
                              "feedback_ts": now if labelled else None, "feedback_by": "bench" if labelled else None})
            conn.execute(sa.insert(PREDICTIONS), batch)


def tree_rss(process) -> int:
    import psutil

    try:
        parent = psutil.Process(process.pid)
        return sum(p.memory_info().rss for p in [parent, *parent.children(recursive=True)])
    except psutil.Error:
        return 0


def timed_monitor(project: Path, url: str) -> dict:
    """One `tuneloop monitor` run: wall seconds, peak RSS of its process tree, its last lines."""
    env = {**os.environ, "TUNELOOP_STORE_URL": url}
    argv = [str(BIN / "tuneloop"), "monitor", "--root", str(project), "--set", "monitor.window_rows=null",
            "--set", "ingest.incoming_dir=null"]
    peak, started = 0, time.perf_counter()
    process = subprocess.Popen(argv, cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.extend(process.stdout), daemon=True)
    reader.start()
    while process.poll() is None:
        peak = max(peak, tree_rss(process))
        time.sleep(0.05)
    reader.join(5)
    seconds = time.perf_counter() - started
    lines = [line.rstrip() for line in output if line.startswith("[monitor]")]
    return {"seconds": seconds, "peak_rss_mib": peak / 2**20, "returncode": process.returncode,
            "lines": lines[:2] if process.returncode == 0 else [line.rstrip() for line in output[-15:]]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--project", type=Path, required=True, help="a project folder with a champion")
    parser.add_argument("--rows", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    args = parser.parse_args()
    project = args.project.resolve()
    version, texts, labels, confidences = champion_answers(project)
    results = []
    with tempfile.TemporaryDirectory(prefix="tuneloop-monitor-volume-") as scratch:
        for rows in args.rows:
            url = f"sqlite:///{scratch}/predictions-{rows}.db"
            started = time.perf_counter()
            fill_store(url, rows, version, texts, labels, confidences)
            fill = time.perf_counter() - started
            for cache in (project / "state" / "registry_cache").glob("reference-*.parquet"):
                cache.unlink()  # the first run pays for the reference sample
            runs = [timed_monitor(project, url) for _ in range(2)]
            size = Path(f"{scratch}/predictions-{rows}.db").stat().st_size / 2**20
            results.append({"rows": rows, "store_mib": size, "fill_seconds": fill, "runs": runs})
            print(f"{rows:>9,} rows ({size:.0f} MiB store): " + "; ".join(
                f"{r['seconds']:.1f} s, peak RSS {r['peak_rss_mib']:.0f} MiB (rc {r['returncode']})" for r in runs),
                flush=True)
            for line in runs[0]["lines"]:
                print("    " + line)
    where = machine()
    lines = ["| logged predictions in the window | store | first run (reference scored) | cached reference "
             "| peak RSS |",
             "|---:|---:|---:|---:|---:|"]
    for r in results:
        first, second = r["runs"]
        lines.append(f"| {r['rows']:,} | {r['store_mib']:.0f} MiB | {first['seconds']:.1f} s | "
                     f"{second['seconds']:.1f} s | "
                     f"{max(first['peak_rss_mib'], second['peak_rss_mib']):.0f} MiB |")
    print(f"\n{where['cpu']}, {where['cores']} cores, torch {where['torch']}\n\n" + "\n".join(lines))
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"monitor-volume-{datetime.now(timezone.utc):%Y-%m-%d}.json"
    out.write_text(json.dumps({"machine": where, "results": results, "table": "\n".join(lines)}, indent=2) + "\n")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
