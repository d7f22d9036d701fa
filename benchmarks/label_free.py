"""Performance without labels: how close is the monitor's estimate on shifted domains?

    .venv/bin/python -m benchmarks.label_free --project DIR    # a movie-review champion; ~5 min on 2 cores

The champion of a project trained on the shipped movie reviews (`tuneloop run`
with the shipped params.yaml) is loaded as the monitor loads it (the registry's
hash-checked files, `load_classifier`, calibrated `predict_proba`) and scores:

- its own test rows (movie reviews: the training domain), and
- every row of the three other shipped domains: tweets, Amazon product reviews
  and NYT editorials (`data/vader_sentiment/`).

The champion knows `negative` and `positive` only; the few `neutral` rows
(human score exactly 0) are left out and counted. Per domain, the estimate
the monitor would report (`metrics.estimate_performance`: accuracy as the mean
calibrated top probability, macro-F1 of the expected confusion, 95% ranges of
the true scores were the probabilities calibrated) is put beside the true
accuracy and macro-F1 from the labels, with the calibration error (ECE) that
explains the gap, and the verdict `monitor.max_estimated_accuracy_drop` gives
against the champion's registered test accuracy. For the threshold's false
alarms, windows of `monitor.min_rows` rows are drawn (with replacement) from
the movie test rows and the quantiles of their estimated drop reported. Writes
benchmarks/results/label-free-<date>.json. Not a test: nothing asserts.
"""

from __future__ import annotations

import argparse
import json
from datetime import date
from pathlib import Path

import numpy as np
import pandas as pd

from benchmarks.measure import machine

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DATA = ROOT / "data" / "vader_sentiment"
SHIFTED = {"tweets": "tweets.csv", "amazon product reviews": "amazon_reviews.csv",
           "NYT editorials": "nyt_editorials.csv"}


def champion(project: Path):
    """The champion's classifier, its version and its registered test accuracy."""
    from tuneloop.model.classifier import load_classifier
    from tuneloop.pipeline.params import load_params
    from tuneloop.plumbing.tracking import configure_tracking
    from tuneloop.tasks import registry
    from tuneloop.values.workspace import Workspace

    params = load_params(project / "params.yaml")
    configure_tracking(params.mlflow, project)  # a copied project's mlflow.db is pointed at its folder first
    name = params.mlflow.model_name
    version = registry.alias_version(name, registry.CHAMPION)
    model_dir, base = registry.verified_version(name, version.version, Workspace(project).models_cache,
                                                fallback_base=params.model.base)
    classifier = load_classifier(model_dir, str(base) if base else params.model.base, "cpu")
    return classifier, version, params.monitor


def domains(project: Path, labels: list[str]) -> dict[str, tuple[pd.DataFrame, int]]:
    """Each domain's rows with a label the champion knows, and how many were left out."""
    splits = pd.read_parquet(project / "data" / "split" / "splits.parquet")
    frames = {"movie reviews (test split)": splits[splits["split"] == "test"]}
    frames.update({name: pd.read_csv(DATA / file) for name, file in SHIFTED.items()})
    out = {}
    for name, frame in frames.items():
        known = frame["label"].astype(str).isin(labels)
        out[name] = (frame.loc[known, ["text", "label"]].astype(str).reset_index(drop=True), int((~known).sum()))
    return out


def measure(classifier, rows: pd.DataFrame, samples: int) -> tuple[dict, np.ndarray]:
    """True scores from the labels beside the estimate from the probabilities alone,
    and the (rows, labels) probabilities."""
    from tuneloop.model.classifier import predict_proba
    from tuneloop.model.metrics import accuracy, estimate_performance, macro_f1, reliability

    probs = predict_proba(classifier, rows["text"].tolist(), batch_size=64, progress=True)  # (rows, labels)
    y = np.array([classifier.labels.index(label) for label in rows["label"]])
    predicted = probs.argmax(1)
    estimate = estimate_performance(probs, samples=samples)
    return {"rows": len(rows), "true_accuracy": accuracy(y, predicted),
            "true_macro_f1": macro_f1(y, predicted, len(classifier.labels)),
            "estimated": estimate.to_dict(), "ece": reliability(probs, y)["ece"],
            "positive_share_true": float(np.mean(rows["label"] == "positive")),
            "positive_share_predicted": float(np.mean(predicted == classifier.labels.index("positive")))}, probs


def in_domain_drops(probs: np.ndarray, reference: float, rows: int, draws: int = 5000, seed: int = 0) -> dict:
    """Quantiles of the estimated drop (test accuracy - mean top probability) over
    windows of `rows` training-domain predictions: what the threshold must clear."""
    rng = np.random.default_rng(seed)
    top = probs.max(1)
    drops = reference - top[rng.integers(0, len(top), (draws, rows))].mean(1)
    return {"window_rows": rows, "draws": draws,
            **{f"q{q}": float(np.quantile(drops, q / 100)) for q in (50, 90, 99, 99.9)}}


def verdicts(result: dict, reference: float, config) -> dict:
    """What the monitor would decide from the estimate, and what the labels say it should."""
    from tuneloop.model.metrics import EstimatedPerformance
    from tuneloop.tasks.drift import decide_estimated_drop

    estimate = EstimatedPerformance(**result["estimated"])
    decision = decide_estimated_drop(estimate, reference, result["rows"], config)
    limit = config.max_estimated_accuracy_drop
    return {"estimated_drop": decision.yes, "true_drop": bool(reference - result["true_accuracy"] > limit),
            "reason": decision.reasons}


def table(results: dict, reference: float) -> str:
    lines = [f"| domain (rows) | accuracy: true / estimated [95% range] | macro-F1: true / estimated [95% range] | "
             f"ECE | retrain? estimate / truth (test accuracy {reference:.3f}) |", "|---|---|---|---:|---|"]
    for name, r in results.items():
        e = r["estimated"]
        dropped = f", {r['neutral_left_out']} neutral left out" if r["neutral_left_out"] else ""
        lines.append(
            f"| {name} ({r['rows']:,}{dropped}) "
            f"| {r['true_accuracy']:.3f} / {e['accuracy']:.3f} [{e['accuracy_low']:.3f}-{e['accuracy_high']:.3f}] "
            f"| {r['true_macro_f1']:.3f} / {e['macro_f1']:.3f} [{e['macro_f1_low']:.3f}-{e['macro_f1_high']:.3f}] "
            f"| {r['ece']:.3f} | {'yes' if r['estimated_drop'] else 'no'} / {'yes' if r['true_drop'] else 'no'} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--project", type=Path, required=True, help="a project whose champion learned movie reviews")
    parser.add_argument("--samples", type=int, default=1000, help="label sets drawn for the ranges")
    args = parser.parse_args()
    project = args.project.resolve()
    about = machine()
    classifier, version, config = champion(project)
    reference = float(version.tags["test.accuracy"])
    results, false_alarms = {}, None
    for name, (rows, left_out) in domains(project, classifier.labels).items():
        print(f"[label-free] {name}: {len(rows)} rows", flush=True)
        result, probs = measure(classifier, rows, args.samples)
        results[name] = {**result, "neutral_left_out": left_out, **verdicts(result, reference, config)}
        if false_alarms is None:  # the first domain: the champion's own test rows
            false_alarms = in_domain_drops(probs, reference, config.min_rows)
    shown = table(results, reference)
    print(shown)
    print(f"[label-free] estimated drop over {false_alarms['draws']} in-domain windows of "
          f"{false_alarms['window_rows']} rows: median {false_alarms['q50']:.3f}, 99th percentile "
          f"{false_alarms['q99']:.3f}, 99.9th {false_alarms['q99.9']:.3f}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"label-free-{date.today():%Y-%m-%d}.json"
    path.write_text(json.dumps({
        "machine": about, "date": f"{date.today():%Y-%m-%d}", "champion_version": version.version,
        "champion_labels": classifier.labels, "champion_test_accuracy": reference,
        "max_estimated_accuracy_drop": config.max_estimated_accuracy_drop, "samples": args.samples,
        "domains": results, "in_domain_windows": false_alarms, "table": shown}, indent=2))
    print(f"[label-free] results: {path}")


if __name__ == "__main__":
    main()
