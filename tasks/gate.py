"""gate: the promotion decision, a pure function of the evaluation and params.

Every check contributes a reason, passed or not, so a "no" always says why and
a "yes" says what it was based on.
"""

from __future__ import annotations

import numpy as np

from tuneloop.tasks.evaluate import SLICE_PREFIX
from tuneloop.tasks.metrics import interval_position, metric_function, paired_bootstrap
from tuneloop.tasks.config import GateConfig
from tuneloop.tasks.decision import Check, Decision, all_of, clears


def compare(name: str, other: str, evaluation: dict, predictions: dict[str, np.ndarray],
            min_gain: float, config: GateConfig) -> Check:
    """Challenger vs `other`: the gain clears `min_gain` and its paired
    bootstrap interval lies above zero."""
    n_classes = len(evaluation["labels"])
    score = metric_function(config.metric, n_classes)
    ci = paired_bootstrap(predictions["y_true"], predictions["challenger"], predictions[other], score,
                          config.bootstrap_samples, config.confidence, config.seed)
    ours = evaluation["models"]["challenger"][config.metric]
    theirs = evaluation["models"][other][config.metric]
    # A non-negative margin asks for superiority: the CI must lie above zero. A
    # negative one asks for non-inferiority: the CI must lie above the margin.
    floor = min(0.0, min_gain)
    passed = clears(ci["diff"], ci["low"], min_gain)
    level = int(round(config.confidence * 100))
    reason = (f"challenger {config.metric} {ours:.4f} vs {other} {theirs:.4f}: gain {ci['diff']:+.4f} "
              f"(needs >= {min_gain:+.4f}), {level}% CI [{ci['low']:+.4f}, {ci['high']:+.4f}] "
              f"{interval_position(ci['low'], ci['high'], floor)}")
    return Check(name, passed, reason)


def check_slices(evaluation: dict, reference: str, config: GateConfig,
                 predictions: dict[str, np.ndarray] | None = None) -> Check:
    """No slice value with enough rows loses more than the tolerance against
    the reference model (the champion, else the base probe). Where the per-row
    predictions carry the slices (`slice:<column>`), a loss counts only when the
    slice's own paired bootstrap interval lies below zero: a 30-row slice of a
    many-class task moves by more than the tolerance by chance alone."""
    ours = evaluation["models"]["challenger"].get("slices", {})
    theirs = evaluation["models"][reference].get("slices", {})
    score = metric_function(config.metric, len(evaluation["labels"])) if "labels" in evaluation else None
    worst, noise = [], []
    for column, values in ours.items():
        members = (predictions or {}).get(f"{SLICE_PREFIX}{column}")
        for value, stats in values.items():
            ref = theirs.get(column, {}).get(value)
            if ref is None or stats["rows"] < config.min_slice_rows:
                continue
            drop = ref[config.metric] - stats[config.metric]
            if drop <= config.max_slice_regression:
                continue
            said = f"{column}={value} {stats[config.metric]:.4f} vs {ref[config.metric]:.4f}"
            if members is not None and score is not None:
                rows = members == value
                ci = paired_bootstrap(predictions["y_true"][rows], predictions["challenger"][rows],
                                      predictions[reference][rows], score, config.bootstrap_samples,
                                      config.confidence, config.seed)
                if ci["high"] >= 0:
                    noise.append(f"{said} (CI [{ci['low']:+.4f}, {ci['high']:+.4f}] includes zero)")
                    continue
                said += f" (CI [{ci['low']:+.4f}, {ci['high']:+.4f}])"
            worst.append(said)
    within = f"; within noise: {'; '.join(noise)}" if noise else ""
    if worst:
        return Check("slices", False, f"slices regress by more than {config.max_slice_regression} "
                     f"against {reference}: " + "; ".join(worst) + within)
    return Check("slices", True, f"no slice with >= {config.min_slice_rows} rows regresses by more "
                 f"than {config.max_slice_regression} against {reference}{within}")


def check_latency(evaluation: dict, config: GateConfig) -> Check:
    latency = evaluation["models"]["challenger"]["latency_ms_per_example"]
    passed = latency <= config.max_latency_ms
    return Check("latency", passed, f"latency {latency:.2f} ms/example "
                 f"{'within' if passed else 'over'} the budget of {config.max_latency_ms} ms")


def decide_promotion(evaluation: dict, predictions: dict[str, np.ndarray], config: GateConfig) -> Decision:
    """Decides whether the challenger replaces the champion.

    Args:
        evaluation: the evaluate stage's output; models `base_probe`,
            `challenger` and, when there is one, `champion`.
        predictions: predicted label indices on the same test rows for each of
            those models, plus `y_true`.

    Returns:
        A `promote` Decision: yes when every check passed.
    """
    has_champion = "champion" in evaluation["models"]
    checks = [compare("beats_base", "base_probe", evaluation, predictions, config.min_gain_over_base, config)]
    if has_champion:
        checks.append(compare("beats_champion", "champion", evaluation, predictions,
                              config.min_gain_over_champion, config))
    else:
        checks.append(Check("beats_champion", True, "no champion yet: the first passing model becomes champion"))
    checks.append(check_slices(evaluation, "champion" if has_champion else "base_probe", config, predictions))
    checks.append(check_latency(evaluation, config))
    return all_of("promote", checks)
