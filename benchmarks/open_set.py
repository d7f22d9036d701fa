"""Does the champion say "none of these"? HWU64 with intents the model never saw.

    .venv/bin/python -m benchmarks.open_set                 # two runs, about 15 minutes on 2 cores
    .venv/bin/python -m benchmarks.open_set --only no-oos-label

Eleven of HWU64's 64 intents (every sixth in sorted order) are taken out of
the training file. Each case is a fresh project made and run with the real CLI
(`tuneloop init FILE DIR`, then `tuneloop run`, init's defaults), and its
champion is then loaded as any MLflow user would (`mlflow.pyfunc.load_model
("models:/NAME@champion")`) and asked about:

- the project's own test rows (in-scope: intents it learned), and
- every row of the intents it never saw (out-of-scope by construction).

Cases:
- no-oos-label: the file holds the 53 other intents only; the model abstains
  on its least confident answers (`model.abstain_max_accuracy_drop`).
- oos-label: 5 of the 11 intents are in the file relabelled `oos` (a data set
  with an out-of-scope class, as CLINC150 or banking sets have); `init`
  proposes `model.out_of_scope_label: oos`; the other 6 intents stay unseen.

Reported per case: recall of unseen-intent rows (share answered
`abstained: true`) and in-scope accuracy (an abstention counts as wrong), each
with the validation-chosen threshold and without it (the top label only, which
in the oos-label case abstains when `oos` wins). Not a test: nothing asserts.
Writes benchmarks/results/open-set-<date>.json.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import numpy as np
import pandas as pd

from benchmarks.recipe import HWU64, run_cases, tuneloop

CASES = ("no-oos-label", "oos-label")


def held_out(labels: list[str]) -> tuple[list[str], list[str]]:
    """(relabelled oos in the oos-label case, never seen in either case): every sixth intent."""
    out = [label for i, label in enumerate(sorted(labels)) if i % 6 == 3]
    return out[:5], out[5:]


def case_file(case: str, target: Path) -> tuple[Path, pd.DataFrame]:
    """The training file for the case and the rows of intents it never saw."""
    frame = pd.read_csv(HWU64).drop(columns="fold")
    as_oos, unseen = held_out(frame["label"].unique().tolist())
    hidden = frame["label"].isin(unseen if case == "oos-label" else as_oos + unseen)
    kept = frame[~hidden].copy()
    if case == "oos-label":
        kept.loc[kept["label"].isin(as_oos), "label"] = "oos"
    kept.to_csv(target, index=False)
    return target, frame[hidden]


def ask(folder: Path, texts: list[str]) -> pd.DataFrame:
    """The champion's answers, loaded from the project's registry as a standard MLflow model."""
    import mlflow
    import yaml

    name = (yaml.safe_load((folder / "params.yaml").read_text()).get("mlflow") or {}).get("model_name") or "tuneloop"
    mlflow.set_tracking_uri(f"sqlite:///{folder / 'mlflow.db'}")
    model = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    return model.predict(pd.DataFrame({"text": texts}))


def scores(answers: pd.DataFrame, truth: list[str], oos: str | None) -> dict:
    """In-scope accuracy and unseen-intent recall, with the threshold and with the top label only."""
    truth = np.array(truth)
    top = answers["label"].to_numpy()
    held = answers["abstained"].to_numpy(dtype=bool)
    unseen = truth == "__unseen__"
    inside = ~unseen & (truth != (oos or "__none__"))
    top_abstains = top == oos if oos else np.zeros(len(top), dtype=bool)
    out = {
        "in_scope_rows": int(inside.sum()), "unseen_rows": int(unseen.sum()),
        "in_scope_accuracy": float(((top == truth) & ~held)[inside].mean()),
        "in_scope_accuracy_top_label": float(((top == truth) & ~top_abstains)[inside].mean()),
        "unseen_recall": float(held[unseen].mean()),
        "unseen_recall_top_label": float(top_abstains[unseen].mean()),
        "unseen_confidence_median": float(np.median(answers["confidence"].to_numpy()[unseen])),
    }
    if oos:
        known = truth == oos  # test rows of the oos class it learned
        out.update(known_oos_rows=int(known.sum()), known_oos_recall=float(held[known].mean()),
                   known_oos_recall_top_label=float(top_abstains[known].mean()))
    return out


def measure(case: str, scratch: Path) -> dict:
    data, unseen = case_file(case, scratch / f"{case}.csv")
    folder = scratch / case
    done = tuneloop(scratch, "init", str(data), str(folder))
    if done.returncode != 0:
        return {"case": case, "error": (done.stdout + done.stderr)[-3000:]}
    oos = re.search(r"^\s*out_of_scope_label:\s*(\S+)", (folder / "params.yaml").read_text(), re.M)
    oos_label = oos.group(1) if oos and oos.group(1) != "null" else None
    started = time.perf_counter()
    done = tuneloop(folder, "run")
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        return {"case": case, "error": (done.stdout + done.stderr)[-3000:]}
    splits = pd.read_parquet(folder / "data" / "split" / "splits.parquet")
    test = splits[splits["split"] == "test"]
    texts = test["text"].tolist() + unseen["text"].tolist()
    truth = test["label"].astype(str).tolist() + ["__unseen__"] * len(unseen)
    answers = ask(folder, texts)
    gate = json.loads((folder / "reports" / "gate.json").read_text())
    stage_lines = [line for line in done.stdout.splitlines() if "finetune:" in line or "baseline:" in line]
    failed = [c["reason"] for c in gate.get("checks", []) if not c.get("passed", True)]
    return {"case": case, "out_of_scope_label": oos_label, "champion_is": gate.get("candidate"),
            "gate_failures": failed,
            "unseen_intents": sorted(unseen["label"].unique().tolist()), "run_seconds": seconds,
            "stage_lines": stage_lines, **scores(answers, truth, oos_label)}


def table(results: list[dict]) -> str:
    lines = ["| case | champion | unseen-intent rows caught: threshold / top label only | in-scope accuracy: "
             "threshold / top label only | learned-oos test rows caught | run |",
             "|---|---|---|---|---|---:|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['case']} | failed: {r['error'][-200:]!r} |")
            continue
        known = (f"{r['known_oos_recall']:.3f} / {r['known_oos_recall_top_label']:.3f} ({r['known_oos_rows']})"
                 if "known_oos_recall" in r else "-")
        lines.append(f"| {r['case']} | {r['champion_is']} | {r['unseen_recall']:.3f} / "
                     f"{r['unseen_recall_top_label']:.3f} ({r['unseen_rows']} rows) | {r['in_scope_accuracy']:.4f} / "
                     f"{r['in_scope_accuracy_top_label']:.4f} ({r['in_scope_rows']} rows) | {known} | "
                     f"{r['run_seconds'] / 60:.1f} min |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=CASES, action="append")
    run_cases("open-set", parser.parse_args().only or list(CASES), measure, table)


if __name__ == "__main__":
    main()
