"""shadow: should the version behind `shadow` replace the champion, on live traffic?

The service scores every request the champion answers with the shadow version
too, off the request path, and logs both answers under one request id. Once the
baking window is full (`shadow.min_rows` paired answers over `shadow.min_hours`),
the shadow is judged on those same rows: without enough feedback labels, by how
often it agrees with the champion and how sure it is; with them, by both models'
macro-F1 on the same labelled rows with a paired bootstrap interval of the
difference (agreement and confidence are then reported, not binding). The
decision is a pure function returning its reasons, tested as a table.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime

import pandas as pd

from tuneloop.model.metrics import interval_position, macro_f1, paired_bootstrap
from tuneloop.tasks.feedback import encode
from tuneloop.values.config import ShadowConfig
from tuneloop.values.decision import TOLERANCE, Check

PROMOTE, DISCARD, WAIT = "promote", "discard", "wait"


@dataclass(frozen=True)
class ShadowStats:
    """The shadow beside the champion on the same live requests."""

    rows: int  # champion predictions the shadow also scored
    hours: float  # since the shadow alias was set
    agreement: float | None  # share of those rows where both gave the same label
    mean_confidence: float | None  # the shadow's mean calibrated confidence on them
    labelled: int = 0  # paired rows with a feedback label
    champion_f1: float | None = None  # macro-F1 on the labelled rows (None: too few to judge)
    shadow_f1: float | None = None
    low: float | None = None  # paired bootstrap interval of shadow - champion macro-F1
    high: float | None = None


def shadow_stats(pairs: pd.DataFrame, labels: tuple[str, ...], started_at: datetime, now: datetime,
                 config: ShadowConfig) -> ShadowStats:
    """The stats of paired answers (`shadow_label`, `shadow_confidence`, `champion_label`,
    `true_label` columns, one row per champion prediction the shadow scored).

    Macro-F1 and its interval are computed only with at least `min_labelled_rows`
    rows labelled with one of `labels`."""
    hours = max(0.0, (now - started_at).total_seconds() / 3600)
    if pairs.empty:
        return ShadowStats(0, hours, None, None)
    agreement = float((pairs["shadow_label"] == pairs["champion_label"]).mean())
    stats = ShadowStats(len(pairs), hours, agreement, float(pairs["shadow_confidence"].mean()))
    labelled = pairs[pairs["true_label"].isin(list(labels))]
    if len(labelled) < config.min_labelled_rows:
        return replace(stats, labelled=len(labelled))
    y, ours, theirs = (encode(labelled[c].tolist(), labels) for c in ("true_label", "shadow_label", "champion_label"))
    classes = len(labels) + 1

    def score(t, p):
        return macro_f1(t, p, classes)

    ci = paired_bootstrap(y, ours, theirs, score, config.bootstrap_samples, config.confidence, config.seed)
    return replace(stats, labelled=len(labelled), champion_f1=score(y, theirs), shadow_f1=score(y, ours),
                   low=ci["low"], high=ci["high"])


def window_missing(stats: ShadowStats, config: ShadowConfig) -> list[str]:
    """What the baking window still lacks (empty: it is full)."""
    missing = []
    if stats.rows < config.min_rows:
        missing.append(f"{stats.rows} paired predictions of the {config.min_rows} needed (shadow.min_rows)")
    if stats.hours < config.min_hours:
        missing.append(f"{stats.hours:.1f} h of the {config.min_hours:g} h needed (shadow.min_hours)")
    return missing


def macro_f1_check(stats: ShadowStats, config: ShadowConfig) -> tuple[Check, bool]:
    """The labelled rows' check, and whether it judges: with fewer than
    `min_labelled_rows` labels (no macro-F1 in `stats`) it passes without judging."""
    if stats.shadow_f1 is None or stats.champion_f1 is None or stats.low is None or stats.high is None:
        return Check("macro_f1", True, f"{stats.labelled} labelled rows, fewer than {config.min_labelled_rows} "
                                       "(shadow.min_labelled_rows): macro-F1 not judged"), False
    gain, margin = stats.shadow_f1 - stats.champion_f1, -config.max_f1_drop
    level = int(round(config.confidence * 100))
    clearly_worse = gain < margin - TOLERANCE and stats.high < margin  # as the gate's forgetting check
    return Check("macro_f1", not clearly_worse,
                 f"macro-F1 on {stats.labelled} labelled rows: shadow {stats.shadow_f1:.4f} vs champion "
                 f"{stats.champion_f1:.4f}: {gain:+.4f} (may drop {config.max_f1_drop}), {level}% CI "
                 f"[{stats.low:+.4f}, {stats.high:+.4f}] {interval_position(stats.low, stats.high, margin)}"), True


def shadow_checks(stats: ShadowStats, config: ShadowConfig) -> list[Check]:
    """Agreement and confidence judge a shadow without labels; with enough labels,
    macro-F1 against the champion on the same rows judges it, and agreement and
    confidence are reported but do not bind (a better model disagrees with a
    worse champion exactly where the champion is wrong)."""
    f1_check, judged = macro_f1_check(stats, config)
    agreement, confidence = stats.agreement or 0.0, stats.mean_confidence or 0.0
    said = f" (not binding: {stats.labelled} labelled rows judge macro-F1)" if judged else ""
    return [Check("agreement", judged or agreement >= config.min_agreement,
                  f"agrees with the champion on {agreement:.4f} of {stats.rows} rows "
                  f"(needs >= {config.min_agreement}){said}"),
            Check("confidence", judged or confidence >= config.min_mean_confidence,
                  f"mean confidence {confidence:.4f} (needs >= {config.min_mean_confidence}){said}"),
            f1_check]


def shadow_decision(stats: ShadowStats, config: ShadowConfig) -> tuple[str, list[str]]:
    """Promote, discard or wait for the shadow version.

    Returns:
        (verdict, reasons): `wait` with what the baking window lacks; else
        `promote` when every check passed, `discard` when one failed, with every
        check's reason marked PASS or FAIL.
    """
    missing = window_missing(stats, config)
    if missing:
        return WAIT, [f"WAIT {reason}" for reason in missing]
    checks = shadow_checks(stats, config)
    reasons = [("PASS " if c.passed else "FAIL ") + c.reason for c in checks]
    return (PROMOTE if all(c.passed for c in checks) else DISCARD), reasons
