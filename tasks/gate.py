"""gate: the promotion decision, a pure function of the evaluation and params.

Two candidates can become champion: the fine-tuned challenger, and the base
probe (the frozen base model with its fitted head, a complete model too).

- The challenger wins when it beats the probe with confidence (the paired
  bootstrap interval of the gain above zero, and the gain at least
  `min_gain_over_base`), beats the champion the same way when there is one, no
  slice regresses significantly, it is not clearly less robust to perturbed
  text than the champion (the probe when there is none), it has not clearly
  forgotten what the champion knew (the regression set: earlier test rows and
  `evaluate.regression_file`), and it is fast enough.
- Otherwise, with `probe_can_win`, the probe wins: on a first run outright (so
  a first run on valid data always ends with a servable champion), later only
  if it beats the champion by the same rules.

Every check contributes a reason, passed or not, so a "no" always says why and
a "yes" says what it was based on; `Decision.choice` names the winner.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from tuneloop.model.metrics import interval_position, metric_function, paired_bootstrap
from tuneloop.tasks.evaluate import REGRESSION_PREFIX, ROBUST_PREFIX, SLICE_PREFIX
from tuneloop.values.config import GateConfig
from tuneloop.values.decision import Check, Decision, clears

CHALLENGER, PROBE, CHAMPION = "challenger", "base_probe", "champion"
NAMES = {CHALLENGER: "the fine-tuned challenger", PROBE: "the base probe (frozen base model + fitted head)"}


def compare(name: str, model: str, other: str, evaluation: dict, predictions: dict[str, np.ndarray],
            min_gain: float, config: GateConfig) -> Check:
    """`model` vs `other`: the gain clears `min_gain` and its paired bootstrap
    interval lies above zero (or above a negative margin: non-inferiority)."""
    n_classes = len(evaluation["labels"])
    score = metric_function(config.metric, n_classes)
    ci = paired_bootstrap(predictions["y_true"], predictions[model], predictions[other], score,
                          config.bootstrap_samples, config.confidence, config.seed)
    ours = evaluation["models"][model][config.metric]
    theirs = evaluation["models"][other][config.metric]
    floor = min(0.0, min_gain)
    passed = clears(ci["diff"], ci["low"], min_gain)
    level = int(round(config.confidence * 100))
    reason = (f"{model} {config.metric} {ours:.4f} vs {other} {theirs:.4f}: gain {ci['diff']:+.4f} "
              f"(needs >= {min_gain:+.4f}), {level}% CI [{ci['low']:+.4f}, {ci['high']:+.4f}] "
              f"{interval_position(ci['low'], ci['high'], floor)}")
    return Check(name, passed, reason)


def slice_p_value(y: np.ndarray, ours: np.ndarray, theirs: np.ndarray, config: GateConfig,
                  n_classes: int) -> float:
    """One-sided p-value of "ours is worse than theirs on these rows".

    Accuracy: McNemar's exact test on the rows only one model gets right
    (binomial, p = 1/2). Macro-F1: the share of paired bootstrap draws whose
    difference is not below zero.
    """
    from scipy import stats

    if config.slice_metric == "accuracy":
        lost = int(((theirs == y) & (ours != y)).sum())
        won = int(((ours == y) & (theirs != y)).sum())
        return float(stats.binomtest(lost, lost + won, 0.5, alternative="greater").pvalue) if lost + won else 1.0
    score = metric_function("macro_f1", n_classes)
    ci = paired_bootstrap(y, ours, theirs, score, config.bootstrap_samples, config.confidence, config.seed)
    return ci["p_not_below_zero"]


def holm(p_values: list[float], alpha: float) -> list[bool]:
    """Holm's step-down correction: which hypotheses are rejected, keeping the
    chance of any false rejection among all of them at most `alpha`."""
    rejected = [False] * len(p_values)
    for rank, i in enumerate(sorted(range(len(p_values)), key=lambda i: p_values[i])):
        if p_values[i] > alpha / (len(p_values) - rank):
            break
        rejected[i] = True
    return rejected


def check_slices(evaluation: dict, model: str, reference: str, config: GateConfig,
                 predictions: dict[str, np.ndarray] | None = None) -> Check:
    """No slice value with enough rows regresses against the reference model: a
    slice fails when it loses more than `max_slice_regression` on `slice_metric`
    AND that loss is significant after Holm's correction over every slice value
    tested (tens of small slices would otherwise give a false alarm by chance).
    Without per-row slice values, a loss beyond the tolerance fails on its own."""
    ours = evaluation["models"][model].get("slices", {})
    theirs = evaluation["models"][reference].get("slices", {})
    metric, n_classes = config.slice_metric, len(evaluation.get("labels", ()))
    tested: list[tuple[str, float, float | None]] = []  # (said, drop, p-value)
    for column, values in ours.items():
        members = (predictions or {}).get(f"{SLICE_PREFIX}{column}")
        for value, stats in values.items():
            ref = theirs.get(column, {}).get(value)
            if ref is None or stats["rows"] < config.min_slice_rows:
                continue
            said = f"{column}={value} {stats[metric]:.4f} vs {ref[metric]:.4f} ({stats['rows']} rows"
            p = None
            if predictions is not None and members is not None:
                rows = members == value
                p = slice_p_value(predictions["y_true"][rows], predictions[model][rows], predictions[reference][rows],
                                  config, n_classes)
            tested.append((said, ref[metric] - stats[metric], p))
    alpha = 1.0 - config.confidence
    significant = holm([p if p is not None else 0.0 for _, _, p in tested], alpha)
    worst, noise = [], []
    for (said, drop, p), sure in zip(tested, significant):
        if drop <= config.max_slice_regression:
            continue
        shown = said + (f", p={p:.3g})" if p is not None else ")")
        (worst if sure else noise).append(shown)
    how = (f"{metric}, {len(tested)} slice values with >= {config.min_slice_rows} rows, Holm-corrected at "
           f"{int(round(config.confidence * 100))}%")
    within = f"; within noise: {'; '.join(noise)}" if noise else ""
    if worst:
        return Check("slices", False, f"slices regress by more than {config.max_slice_regression} against "
                     f"{reference} ({how}): " + "; ".join(worst) + within)
    return Check("slices", True, f"no slice regresses significantly by more than {config.max_slice_regression} "
                 f"against {reference} ({how}){within}")


def consistency_score(perturbations: int) -> Callable[[np.ndarray, np.ndarray], float]:
    """The share of answers kept from per-row counts of perturbations survived (out of
    `perturbations`), with the `.batched` form paired_bootstrap uses; the labels are unused."""
    scorer = lambda _, kept: float(np.mean(kept)) / perturbations  # noqa: E731
    scorer.batched = lambda _, kept: kept.mean(axis=-1) / perturbations
    return scorer


def check_robustness(evaluation: dict, predictions: dict[str, np.ndarray], model: str, reference: str,
                     config: GateConfig) -> Check:
    """`model` keeps its answers under perturbation about as often as `reference`: it fails only
    when its share of answers kept is lower by more than `max_robustness_drop` and the paired
    bootstrap interval of the difference lies wholly below minus that margin (clearly less robust).
    Passes, saying so, when the evaluation has no robustness scores (evaluate.robustness_rows: 0)."""
    ours, theirs = predictions.get(f"{ROBUST_PREFIX}{model}"), predictions.get(f"{ROBUST_PREFIX}{reference}")
    perturbations = len(evaluation.get("robustness", {}).get("perturbations", ()))
    if ours is None or theirs is None or not perturbations:
        return Check("robustness", True, f"robustness not measured for {model} and {reference} "
                     "(evaluate.robustness_rows: 0 or no perturbations)")
    rows = ~(np.isnan(ours.astype(float)) | np.isnan(theirs.astype(float)))
    if not rows.any():
        return Check("robustness", True, f"robustness not measured: no row scored for both {model} and {reference}")
    ci = paired_bootstrap(np.zeros(int(rows.sum())), ours[rows], theirs[rows], consistency_score(perturbations),
                          config.bootstrap_samples, config.confidence, config.seed)
    margin = -config.max_robustness_drop
    passed = not (ci["diff"] < margin and ci["high"] < margin)
    kept = {name: float(np.mean(values[rows])) / perturbations for name, values in ((model, ours), (reference, theirs))}
    level = int(round(config.confidence * 100))
    reason = (f"{model} keeps {kept[model]:.4f} of its answers under {perturbations} perturbations vs {reference} "
              f"{kept[reference]:.4f} ({int(rows.sum())} rows): {ci['diff']:+.4f} (may drop "
              f"{config.max_robustness_drop}), {level}% CI [{ci['low']:+.4f}, {ci['high']:+.4f}] "
              f"{interval_position(ci['low'], ci['high'], margin)}")
    return Check("robustness", passed, reason)


def check_forgetting(evaluation: dict, predictions: dict[str, np.ndarray], model: str, config: GateConfig) -> Check:
    """`model` keeps what the champion knew: on the regression set (the test rows that were test
    rows of the champion's data version, and `evaluate.regression_file`) it fails only when its
    `slice_metric` is lower than the champion's by more than `max_forgetting` and the paired
    bootstrap interval of the difference lies wholly below minus that margin. Passes, saying
    why, when there is no champion or the set has no rows."""
    if CHAMPION not in evaluation["models"]:
        return Check("forgetting", True, "no champion yet: nothing learned before to forget")
    scores = evaluation.get("regression", {}).get("models", {})
    y = predictions.get(f"{REGRESSION_PREFIX}y_true")
    if y is None or not len(y) or model not in scores or CHAMPION not in scores:
        return Check("forgetting", True, "no earlier test rows and no evaluate.regression_file: nothing to regress on")
    metric = config.slice_metric
    ci = paired_bootstrap(y, predictions[f"{REGRESSION_PREFIX}{model}"], predictions[f"{REGRESSION_PREFIX}{CHAMPION}"],
                          metric_function(metric, len(evaluation["labels"])), config.bootstrap_samples,
                          config.confidence, config.seed)
    margin = -config.max_forgetting
    passed = not (ci["diff"] < margin and ci["high"] < margin)
    ours, theirs = scores[model], scores[CHAMPION]
    domains = "; ".join(f"{name} {stats[metric]:.4f} vs {theirs['domains'][name][metric]:.4f} ({stats['rows']} rows)"
                        for name, stats in ours["domains"].items() if name in theirs["domains"])
    level = int(round(config.confidence * 100))
    reason = (f"{model} {metric} {ours[metric]:.4f} vs {CHAMPION} {theirs[metric]:.4f} on {len(y)} regression rows "
              f"({domains}): {ci['diff']:+.4f} (may drop {config.max_forgetting}), {level}% CI "
              f"[{ci['low']:+.4f}, {ci['high']:+.4f}] {interval_position(ci['low'], ci['high'], margin)}")
    return Check("forgetting", passed, reason)


def check_latency(evaluation: dict, model: str, config: GateConfig) -> Check:
    latency = evaluation["models"][model]["latency_ms_per_example"]
    passed = latency <= config.max_latency_ms
    return Check("latency", passed, f"{model} latency {latency:.2f} ms/example "
                 f"{'within' if passed else 'over'} the budget of {config.max_latency_ms} ms")


def challenger_checks(evaluation: dict, predictions: dict[str, np.ndarray], config: GateConfig) -> list[Check]:
    """The fine-tuned challenger against the probe, the champion (if any), its slices, robustness,
    forgetting and latency."""
    has_champion = CHAMPION in evaluation["models"]
    checks = [compare("beats_base", CHALLENGER, PROBE, evaluation, predictions, config.min_gain_over_base, config)]
    if has_champion:
        checks.append(compare("beats_champion", CHALLENGER, CHAMPION, evaluation, predictions,
                              config.min_gain_over_champion, config))
    else:
        checks.append(Check("beats_champion", True, "no champion yet: the first passing model becomes champion"))
    reference = CHAMPION if has_champion else PROBE
    checks.append(check_slices(evaluation, CHALLENGER, reference, config, predictions))
    checks.append(check_robustness(evaluation, predictions, CHALLENGER, reference, config))
    checks.append(check_forgetting(evaluation, predictions, CHALLENGER, config))
    checks.append(check_latency(evaluation, CHALLENGER, config))
    return checks


def probe_checks(evaluation: dict, predictions: dict[str, np.ndarray], config: GateConfig) -> list[Check]:
    """The base probe as the fallback: the first champion outright, later only if it beats the champion."""
    def named(check: Check) -> Check:
        return Check(f"probe_{check.name}", check.passed, check.reason)

    if CHAMPION not in evaluation["models"]:
        first = Check("probe_first_champion", True, "no champion yet and the fine-tuned challenger did not clear its "
                      "checks: the base probe is a complete model and becomes the first champion")
        return [first, named(check_latency(evaluation, PROBE, config))]
    return [named(compare("beats_champion", PROBE, CHAMPION, evaluation, predictions,
                          config.min_gain_over_champion, config)),
            named(check_slices(evaluation, PROBE, CHAMPION, config, predictions)),
            named(check_robustness(evaluation, predictions, PROBE, CHAMPION, config)),
            named(check_forgetting(evaluation, predictions, PROBE, config)),
            named(check_latency(evaluation, PROBE, config))]


def decide_promotion(evaluation: dict, predictions: dict[str, np.ndarray], config: GateConfig) -> Decision:
    """Decides which candidate, if any, replaces the champion.

    Args:
        evaluation: the evaluate stage's output; models `base_probe`,
            `challenger` and, when there is one, `champion`.
        predictions: predicted label indices on the same test rows for each of
            those models, plus `y_true` (and `slice:<column>` values per row); the
            regression set's `regression:y_true` and `regression:<model>` answers.

    Returns:
        A `promote` Decision: `choice` is `challenger` or `base_probe` when yes;
        its checks are the challenger's, then the probe's when it was considered.
    """
    checks = challenger_checks(evaluation, predictions, config)
    if all(c.passed for c in checks):
        return Decision("promote", True, tuple(checks), choice=CHALLENGER)
    if not config.probe_can_win:
        return Decision("promote", False, tuple(checks),
                        note="the fine-tuned challenger did not clear its checks (gate.probe_can_win: false)")
    fallback = probe_checks(evaluation, predictions, config)
    if all(c.passed for c in fallback):
        return Decision("promote", True, tuple(checks + fallback), choice=PROBE,
                        note="the fine-tuned challenger did not clear its checks; the base probe did")
    return Decision("promote", False, tuple(checks + fallback),
                    note="neither the fine-tuned challenger nor the base probe cleared its checks")


def outcome(decision: Decision, evaluation: dict, metric: str) -> str:
    """The run's result in one sentence: which candidate won, by how much, and what to try next."""
    models = evaluation["models"]
    challenger, probe = models[CHALLENGER][metric], models[PROBE][metric]
    gain = f"{metric} {challenger:.4f} vs the probe's {probe:.4f} ({challenger - probe:+.4f})"
    if decision.choice == CHALLENGER:
        return f"{NAMES[CHALLENGER]} won: {gain}"
    advice = ("to try: more epochs (finetune.epochs or min_examples_per_class), `tuneloop run --tune`, "
              "or finetune.method: full")
    if decision.choice == PROBE:
        return f"{NAMES[PROBE]} won with {metric} {probe:.4f}; the fine-tuned challenger did not beat it with " \
               f"confidence ({gain}); {advice}"
    kept = f"champion (v{models[CHAMPION].get('version')}) stays" if CHAMPION in models else "no champion"
    return f"nothing promoted, {kept}: the fine-tuned challenger scored {gain}; {advice}"
