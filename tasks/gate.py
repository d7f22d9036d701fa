"""gate: the promotion decision, a pure function of the evaluation and params.

Every check contributes a reason, passed or not, so a "no" always says why and
a "yes" says what it was based on.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tuneloop.tasks.evaluate import SLICE_PREFIX
from tuneloop.tasks.metrics import interval_position, metric_function, paired_bootstrap


@dataclass(frozen=True)
class GateConfig:
    metric: str = "macro_f1"  # the main metric every comparison uses
    # Margins on the main metric. >= 0: the challenger must be better (CI above zero);
    # < 0: it may be at most that much worse (non-inferiority, CI above the margin).
    min_gain_over_base: float = 0.01  # fine-tuning must buy at least this over the frozen-encoder probe
    min_gain_over_champion: float = 0.0  # >0 avoids churning the champion for noise-level gains
    bootstrap_samples: int = 1000
    confidence: float = 0.95  # the CI of the paired difference must exclude zero at this level
    max_slice_regression: float = 0.05  # no slice may lose more than this against the reference
    min_slice_rows: int = 30  # smaller slices are too noisy to block a promotion
    max_latency_ms: float = 50.0  # per example, batch scoring on the evaluation machine
    seed: int = 0
    __pydantic_config__ = {"extra": "forbid"}

    def __post_init__(self) -> None:
        if self.metric not in {"macro_f1", "accuracy"}:
            raise ValueError(f"gate.metric must be 'macro_f1' or 'accuracy', got {self.metric!r}")


@dataclass(frozen=True)
class Check:
    name: str
    passed: bool
    reason: str


@dataclass(frozen=True)
class Decision:
    promote: bool
    checks: tuple[Check, ...]

    @property
    def reasons(self) -> list[str]:
        return [("PASS " if c.passed else "FAIL ") + c.reason for c in self.checks]

    def to_dict(self) -> dict:
        return {"promote": self.promote, "reasons": self.reasons,
                "checks": [{"name": c.name, "passed": c.passed, "reason": c.reason} for c in self.checks]}


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
    passed = ci["diff"] >= min_gain and ci["low"] > floor
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
        A Decision whose checks all passed when `promote` is True.
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
    return Decision(all(c.passed for c in checks), tuple(checks))
