"""rollback: should the previous champion serve again?

The previous champion is re-scored on the champion's labelled live rows, so the
two models are compared on identical inputs; the decision is a pure function
returning its reasons, like the gate, and a champion that was itself restored
is never rolled back automatically, so two versions never flap.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

from tuneloop.model.metrics import interval_position
from tuneloop.tasks.feedback import encode
from tuneloop.values.config import MonitorConfig
from tuneloop.values.decision import Check, Decision, clears

ROLLBACK_ACTIONS = ("rollback", "auto-rollback")  # how a champion arrives when it was restored


@dataclass(frozen=True)
class LiveComparison:
    """Champion and previous champion scored on the same labelled live rows."""

    metric: str
    rows: int
    champion: float
    previous: float
    low: float  # confidence interval of previous - champion (paired bootstrap)
    high: float
    previous_version: str


def compare_live(true: Iterable[str], champion: Iterable[str], previous: Iterable[str], labels: Sequence[str],
                 previous_version: str, config: MonitorConfig) -> LiveComparison:
    """Both models' metric on the same labelled rows, with a paired bootstrap
    interval of previous - champion."""
    from tuneloop.model.metrics import metric_function, paired_bootstrap

    y_true, y_champion, y_previous = (encode(column, labels) for column in (true, champion, previous))
    score = metric_function(config.rollback_metric, len(labels) + 1)
    ci = paired_bootstrap(y_true, y_previous, y_champion, score, config.bootstrap_samples, config.confidence,
                          config.seed)
    return LiveComparison(config.rollback_metric, len(y_true), score(y_true, y_champion), score(y_true, y_previous),
                          ci["low"], ci["high"], str(previous_version))


def rollback_blocker(config: MonitorConfig, labelled: int, previous_version: str | None,
                     champion_arrival: str | None) -> str | None:
    """Why no rollback can happen before the models are compared, or None.
    These checks are cheap; the comparison costs a model load."""
    if not config.auto_rollback:
        return "auto_rollback is off"
    if previous_version is None:
        return "no previous champion to roll back to"
    if champion_arrival in ROLLBACK_ACTIONS:
        return f"the champion arrived by {champion_arrival}; a restored champion is not rolled back automatically"
    if labelled < config.min_labelled_rows:
        return (f"{labelled} labelled live rows, fewer than min_labelled_rows {config.min_labelled_rows}: "
                "no rollback verdict")
    return None


def decide_rollback(config: MonitorConfig, labelled: int, previous_version: str | None,
                    champion_arrival: str | None, comparison: LiveComparison | None) -> Decision:
    """Roll back when the previous champion beats the champion on the same
    labelled live rows by at least the margin, with its interval above zero.

    Args:
        labelled: the window's labelled rows (the champion's live evidence).
        previous_version: the `previous` alias, None when unset.
        champion_arrival: the audit action that made the champion (`promote`,
            `forced`, `rollback`, ...). A champion that was itself restored by a
            rollback is not rolled back again automatically, so two versions never flap.
        comparison: both models on those rows; None when not computed.
    """
    blocker = rollback_blocker(config, labelled, previous_version, champion_arrival)
    if blocker is not None:
        return Decision("rollback", False, note=blocker)
    if comparison is None:
        return Decision("rollback", False,
                        note=f"previous champion v{previous_version} was not scored on the live rows")
    gap = comparison.previous - comparison.champion
    level = int(round(config.confidence * 100))
    worse = clears(gap, comparison.low, config.rollback_margin)
    reason = (f"live {comparison.metric} on {comparison.rows} labelled rows: champion {comparison.champion:.4f}, "
              f"previous (v{comparison.previous_version}) {comparison.previous:.4f}; previous is better by "
              f"{gap:+.4f} (rollback at >= {config.rollback_margin:+.4f}), {level}% CI "
              f"[{comparison.low:+.4f}, {comparison.high:+.4f}] {interval_position(comparison.low, comparison.high)}")
    return Decision("rollback", worse, (Check("previous_better", worse, reason),), marks=("", ""))


def arrival_action(trail: Sequence[dict], version: str) -> str | None:
    """The action of the newest audit entry that moved `champion` to `version`."""
    moves = [entry["action"] for entry in trail if entry.get("to") == str(version)]
    return moves[-1] if moves else None
