"""The promotion gate as a table of scenarios: who is compared with whom, and why it says no.

Each scenario is built from prediction arrays on the same 200 test rows, and
the evaluation dict's headline and slice metrics are computed from those same
predictions, so the numbers the gate prints agree with the ones it bootstraps.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest

from tuneloop.tasks.gate import Decision, GateConfig, decide_promotion
from tuneloop.tasks.metrics import accuracy, macro_f1

N_ROWS = 200
CHECKS = ["beats_base", "beats_champion", "slices", "latency"]


def predictions_with_errors(y_true: np.ndarray, wrong: np.ndarray) -> np.ndarray:
    """y_true with the labels at the `wrong` rows flipped (binary labels)."""
    pred = y_true.copy()
    pred[wrong] ^= 1
    return pred


def model_entry(y_true: np.ndarray, pred: np.ndarray, short_rows: int, latency: float) -> dict:
    """One model's evaluation entry: headline metrics plus a `length_bucket`
    slice where the first `short_rows` rows are `short` and the rest `long`."""
    parts = {"short": slice(0, short_rows), "long": slice(short_rows, len(y_true))}
    return {
        "accuracy": accuracy(y_true, pred),
        "macro_f1": macro_f1(y_true, pred, 2),
        "latency_ms_per_example": latency,
        "slices": {"length_bucket": {
            name: {"rows": rows.stop - rows.start, "accuracy": accuracy(y_true[rows], pred[rows]),
                   "macro_f1": macro_f1(y_true[rows], pred[rows], 2)}
            for name, rows in parts.items()
        }},
    }


def build_case(challenger_wrong, probe_wrong, champion_wrong=None, short_rows: int = 40,
               latency_ms: float = 5.0) -> tuple[dict, dict[str, np.ndarray]]:
    """The gate's inputs: an evaluation dict and the per-model predicted labels.

    `*_wrong` are the test rows (indices into 0..199) each model gets wrong;
    `champion_wrong=None` means there is no champion yet.
    """
    y_true = np.arange(N_ROWS) % 2
    wrong = {"base_probe": probe_wrong, "challenger": challenger_wrong}
    if champion_wrong is not None:
        wrong["champion"] = champion_wrong
    predictions = {"y_true": y_true}
    models = {}
    for key, rows in wrong.items():
        predictions[key] = predictions_with_errors(y_true, np.asarray(rows, dtype=int))
        models[key] = model_entry(y_true, predictions[key], short_rows, latency_ms)
    evaluation = {"labels": ["negative", "positive"], "test_rows": N_ROWS, "models": models}
    return evaluation, predictions


def spread(count: int, start: int = 0, stop: int = N_ROWS) -> np.ndarray:
    """`count` error rows spread evenly over [start, stop)."""
    return np.linspace(start, stop - 1, count).round().astype(int)


@dataclass(frozen=True)
class Case:
    inputs: dict  # keyword arguments of build_case
    promote: bool
    failing: set[str] = field(default_factory=set)
    says: dict[str, str] = field(default_factory=dict)  # check name -> text its reason must contain
    config: dict = field(default_factory=dict)  # GateConfig overrides


CASES = {
    "no_champion_challenger_clearly_beats_probe_promotes": Case(
        dict(challenger_wrong=spread(4), probe_wrong=spread(50)),
        promote=True,
        says={"beats_base": "gain +0.2", "beats_champion": "no champion yet"},
    ),
    "challenger_equal_to_probe_rejects_because_ci_includes_zero": Case(
        dict(challenger_wrong=spread(30), probe_wrong=spread(30)),
        promote=False, failing={"beats_base"},
        says={"beats_base": "includes zero"},
    ),
    "challenger_clearly_worse_than_probe_says_the_ci_lies_below_zero": Case(
        dict(challenger_wrong=spread(60), probe_wrong=spread(10)),
        promote=False, failing={"beats_base", "slices"},  # worse everywhere, the short slice too
        says={"beats_base": "lies below zero"},
    ),
    "challenger_beats_probe_but_not_champion_rejects_naming_champion": Case(
        dict(challenger_wrong=spread(14), probe_wrong=spread(60), champion_wrong=spread(10)),
        promote=False, failing={"beats_champion"},
        says={"beats_champion": "vs champion", "beats_base": "needs >= +0.0100"},
    ),
    "gain_over_probe_below_min_gain_rejects": Case(
        # the challenger is right everywhere the probe is, plus 6 rows: a real but small gain
        dict(challenger_wrong=spread(20)[:14], probe_wrong=spread(20)),
        promote=False, failing={"beats_base"},
        says={"beats_base": "needs >= +0.0500"},
        config={"min_gain_over_base": 0.05},
    ),
    "slice_regressing_beyond_tolerance_rejects_naming_the_slice": Case(
        # better overall, but 8 of the 40 short rows newly wrong
        dict(challenger_wrong=spread(8, 0, 40), probe_wrong=spread(60, 40, 200), short_rows=40),
        promote=False, failing={"slices"},
        says={"slices": "length_bucket=short"},
    ),
    "tiny_slice_below_min_slice_rows_regressing_is_ignored": Case(
        # the same regression on a 20-row slice (min_slice_rows is 30) does not block
        dict(challenger_wrong=spread(4, 0, 20), probe_wrong=spread(60, 20, 200), short_rows=20),
        promote=True,
        says={"slices": "no slice with >= 30 rows regresses"},
    ),
    "latency_over_budget_rejects_naming_latency": Case(
        dict(challenger_wrong=spread(4), probe_wrong=spread(50), latency_ms=80.0),
        promote=False, failing={"latency"},
        says={"latency": "latency 80.00 ms/example over the budget of 50.0 ms"},
    ),
    "champion_beaten_on_every_check_promotes": Case(
        dict(challenger_wrong=spread(4), probe_wrong=spread(60), champion_wrong=spread(40)),
        promote=True,
        says={"beats_champion": "vs champion", "slices": "against champion"},
    ),
}


def decide(case: Case) -> Decision:
    evaluation, predictions = build_case(**case.inputs)
    return decide_promotion(evaluation, predictions, GateConfig(bootstrap_samples=400, **case.config))


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_decide_promotion(case: Case) -> None:
    decision = decide(case)
    checks = {c.name: c for c in decision.checks}
    assert decision.yes is case.promote
    assert {name for name, c in checks.items() if not c.passed} == case.failing
    for name, text in case.says.items():
        assert text in checks[name].reason, checks[name].reason


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_every_decision_gives_one_pass_or_fail_reason_per_check(case: Case) -> None:
    decision = decide(case)
    assert [c.name for c in decision.checks] == CHECKS
    assert len(decision.reasons) == 4
    for check, reason in zip(decision.checks, decision.reasons):
        assert reason == ("PASS " if check.passed else "FAIL ") + check.reason
    assert decision.yes is all(c.passed for c in decision.checks)
    as_dict = decision.to_dict()
    assert as_dict["promote"] is decision.yes and as_dict["reasons"] == decision.reasons
    assert [c["name"] for c in as_dict["checks"]] == CHECKS


def test_slice_check_compares_against_base_probe_when_there_is_no_champion() -> None:
    decision = decide(CASES["slice_regressing_beyond_tolerance_rejects_naming_the_slice"])
    (slices,) = [c for c in decision.checks if c.name == "slices"]
    assert "against base_probe" in slices.reason
    assert "length_bucket=short 0.8000 vs 1.0000" in slices.reason  # challenger vs reference on the slice
    assert "length_bucket=long" not in slices.reason


def test_gate_can_decide_on_accuracy() -> None:
    evaluation, predictions = build_case(challenger_wrong=spread(4), probe_wrong=spread(50))
    decision = decide_promotion(evaluation, predictions, GateConfig(metric="accuracy", bootstrap_samples=200))
    assert decision.yes is True
    assert decision.checks[0].reason.startswith("challenger accuracy 0.9800 vs base_probe 0.7500")


def test_gate_config_rejects_an_unknown_metric() -> None:
    with pytest.raises(ValueError, match="gate.metric must be 'macro_f1' or 'accuracy', got 'auc'"):
        GateConfig(metric="auc")


def test_a_slice_drop_within_its_own_bootstrap_noise_does_not_block_and_is_named() -> None:
    # 2 of 31 rows of a slice flip against the probe (0.935 vs 1.0 accuracy-like macro-F1): over the
    # tolerance of 0.05, but a 31-row slice's paired interval includes zero
    evaluation, predictions = build_case(challenger_wrong=[0, 1], probe_wrong=spread(60, 31, 200), short_rows=31)
    slice_of = np.where(np.arange(N_ROWS) < 31, "short", "long")
    without = decide_promotion(evaluation, predictions, GateConfig())
    assert not next(c for c in without.checks if c.name == "slices").passed  # aggregates alone: a regression
    with_rows = decide_promotion(evaluation, {**predictions, "slice:length_bucket": slice_of}, GateConfig())
    (slices,) = [c for c in with_rows.checks if c.name == "slices"]
    assert slices.passed and "within noise: length_bucket=short" in slices.reason and "includes zero" in slices.reason


def test_a_slice_drop_beyond_its_noise_still_blocks_with_its_interval() -> None:
    evaluation, predictions = build_case(challenger_wrong=spread(8, 0, 40), probe_wrong=spread(60, 40, 200),
                                         short_rows=40)
    slice_of = np.where(np.arange(N_ROWS) < 40, "short", "long")
    decision = decide_promotion(evaluation, {**predictions, "slice:length_bucket": slice_of}, GateConfig())
    (slices,) = [c for c in decision.checks if c.name == "slices"]
    assert not slices.passed and "length_bucket=short 0.8" in slices.reason and "(CI [" in slices.reason
