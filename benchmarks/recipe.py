"""The default recipe on real data, as a new user runs it: probe vs champion.

    .venv/bin/python -m benchmarks.recipe              # three runs, about 15 minutes on 2 cores
    .venv/bin/python -m benchmarks.recipe --only hwu64

Each case is a fresh project in a temporary folder, made and run with the real
CLI (`tuneloop init DATA DIR`, then `tuneloop run`; the movie reviews use the
shipped params.yaml), so the numbers include everything a user waits for:

- hwu64: 64 home-assistant intents, tuneloop's own split (no split column);
- hwu64-folds: the same file with the authors' folds as a split column
  (folds 1-8 train, 9 validation, 10 test);
- movies: the shipped VADER movie reviews with the shipped params.yaml;
- movies-97-3: the first 3,000 movie reviews without the neutral ones (2,889
  positive, 98 negative), `tuneloop init` defaults: the imbalanced case.

Prints a table (test macro-F1 and accuracy of the validation-tuned probe and of
the champion on the same test rows, the gain's bootstrap interval, the whole
run's wall time, fine-tuning's examples/s) and writes
benchmarks/results/recipe-<date>.json. Not a test: nothing here asserts.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from benchmarks.measure import machine

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
HWU64 = ROOT.parent / "shared" / "datasets" / "hwu64" / "hwu64.csv"
CASES = ("hwu64", "hwu64-folds", "movies", "movies-97-3")


def tuneloop(folder: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in {"MLFLOW_TRACKING_URI", "PREFECT_API_URL"}}
    return subprocess.run([sys.executable, "-m", "tuneloop.cli", *args], cwd=folder, env=env,
                          capture_output=True, text=True)


def hwu64_with_folds(target: Path) -> Path:
    frame = pd.read_csv(HWU64)
    fold = frame["fold"].str.replace("KFold_", "").astype(int)
    frame["split"] = ["train" if f <= 8 else "validation" if f == 9 else "test" for f in fold]
    frame.drop(columns="fold").to_csv(target, index=False)
    return target


def movies_97_3(target: Path) -> Path:
    frame = pd.read_csv(ROOT / "data" / "vader_sentiment" / "movie_reviews.csv", nrows=3000)
    frame[frame["label"] != "neutral"].drop(columns="score").to_csv(target, index=False)
    return target


def prepare(case: str, folder: Path) -> None:
    """A project folder for the case, as a user would make it."""
    if case == "movies":
        folder.mkdir(parents=True)
        shutil.copytree(ROOT / "data" / "vader_sentiment", folder / "data" / "vader_sentiment")
        shutil.copy(ROOT / "params.yaml", folder / "params.yaml")
        shutil.copy(ROOT / "dvc.yaml", folder / "dvc.yaml")
        subprocess.run(["git", "init", "-q"], cwd=folder, check=True)
        return
    data = HWU64 if case == "hwu64" else movies_97_3(folder.parent / f"{case}.csv") if case == "movies-97-3" \
        else hwu64_with_folds(folder.parent / f"{case}.csv")
    done = tuneloop(folder.parent, "init", str(data), str(folder))
    if done.returncode != 0:
        raise RuntimeError(f"init failed: {done.stderr[-2000:]}")


def measure(case: str, scratch: Path) -> dict:
    folder = scratch / case
    prepare(case, folder)
    started = time.perf_counter()
    done = tuneloop(folder, "run")
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        return {"case": case, "error": (done.stdout + done.stderr)[-3000:]}
    evaluation = json.loads((folder / "reports" / "evaluation.json").read_text())  # metrics/ holds headlines only
    finetune = json.loads((folder / "metrics" / "finetune.json").read_text())
    trained = finetune_line(done.stdout + done.stderr)
    gate = json.loads((folder / "reports" / "gate.json").read_text())
    base = next(c for c in gate["checks"] if c["name"] == "beats_base")
    found = re.search(r"gain ([+-][\d.]+) .*CI \[([+-][\d.]+), ([+-][\d.]+)\]", base["reason"])
    models = evaluation["models"]
    chosen = gate.get("candidate")  # challenger or base_probe; None: nothing promoted
    return {
        "case": case, "test_rows": evaluation["test_rows"], "labels": len(evaluation["labels"]),
        "probe": {k: models["base_probe"][k] for k in ("macro_f1", "accuracy")},
        "challenger": {k: models["challenger"][k] for k in ("macro_f1", "accuracy")},
        "champion": {k: models[chosen][k] for k in ("macro_f1", "accuracy")} if chosen else None,
        "champion_is": chosen,
        "gain": float(found.group(1)), "ci": [float(found.group(2)), float(found.group(3))],
        "promoted": gate["promote"], "gate_reason": base["reason"],
        "run_seconds": seconds, "finetune_seconds": float(trained.group(2)) if trained else float("nan"),
        "epochs": finetune["epochs_run"], "steps": int(trained.group(1)) if trained else None,
        "train_examples_per_s": float(trained.group(3)) if trained else float("nan"),
    }


def finetune_line(output: str) -> re.Match | None:
    """The finetune stage's line: "N steps in Xs (Y ex/s, fp32 products), ..." (groups: steps, seconds, ex/s)."""
    return re.search(r"finetune\W.*?(\d+) steps in (\d+)s \(([\d.]+) ex/s[,)]", output)


def table(results: list[dict]) -> str:
    lines = ["| data | labels | test rows | probe macro-F1 / acc | challenger macro-F1 / acc | gain [95% CI] | "
             "champion | run | fine-tuning |", "|---|---:|---:|---|---|---|---|---:|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['case']} | failed: {r['error'][-200:]!r} |")
            continue
        ci = f"[{r['ci'][0]:+.4f}, {r['ci'][1]:+.4f}]" if r.get("ci") else ""
        lines.append(
            f"| {r['case']} | {r['labels']} | {r['test_rows']} | {r['probe']['macro_f1']:.4f} / "
            f"{r['probe']['accuracy']:.4f} | {r['challenger']['macro_f1']:.4f} / {r['challenger']['accuracy']:.4f} | "
            f"{r['gain']:+.4f} {ci} | {r['champion_is'] or 'none'} | {r['run_seconds'] / 60:.1f} min | "
            f"{r['epochs']} epochs, {r['finetune_seconds']:.0f} s, {r['train_examples_per_s']:.0f} ex/s |")
    return "\n".join(lines)


def run_cases(name: str, cases: list[str], measure_case, table_of) -> None:
    """Measures each case in a scratch folder, one table row as each finishes, then the
    whole table and benchmarks/results/<name>-<date>.json."""
    where = machine()
    results = []
    with tempfile.TemporaryDirectory(prefix=f"tuneloop-{name}-") as scratch:
        for case in cases:
            results.append(measure_case(case, Path(scratch)))
            print(table_of(results[-1:]).splitlines()[-1], flush=True)
    print(f"\n{where['cpu']}, {where['cores']} cores, torch {where['torch']}\n\n{table_of(results)}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{name}-{datetime.now(timezone.utc):%Y-%m-%d}.json"
    out.write_text(json.dumps({"machine": where, "results": results}, indent=2) + "\n")
    print(f"\nwritten to {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=CASES, action="append")
    cases = parser.parse_args().only or list(CASES)
    if not HWU64.exists():
        cases = [c for c in cases if not c.startswith("hwu64")]
    run_cases("recipe", cases, measure, table)


if __name__ == "__main__":
    main()
