"""The promotion gate as a table of scenarios: which candidate wins (the fine-tuned
challenger, the base probe, or none), who is compared with whom, and why.

Each scenario is built from prediction arrays on the same 200 test rows, and
the evaluation dict's headline and slice metrics are computed from those same
predictions, so the numbers the gate prints agree with the ones it bootstraps.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest

from tuneloop.model.metrics import accuracy, macro_f1
from tuneloop.tasks.evaluate import regression_scores
from tuneloop.tasks.gate import (
    Decision,
    GateConfig,
    check_forgetting,
    check_robustness,
    decide_promotion,
    holm,
    outcome,
)

N_ROWS = 200
CHECKS = ["beats_base", "beats_champion", "slices", "robustness", "forgetting", "latency"]
FIRST_PROBE = ["probe_first_champion", "probe_latency"]
LATER_PROBE = ["probe_beats_champion", "probe_slices", "probe_robustness", "probe_forgetting", "probe_latency"]


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
    choice: str | None  # the candidate promoted: challenger, base_probe, or None (nothing)
    failing: set[str] = field(default_factory=set)
    says: dict[str, str] = field(default_factory=dict)  # check name -> text its reason must contain
    config: dict = field(default_factory=dict)  # GateConfig overrides


CASES = {
    "no_champion_challenger_clearly_beats_probe_promotes_the_challenger": Case(
        dict(challenger_wrong=spread(4), probe_wrong=spread(50)),
        choice="challenger",
        says={"beats_base": "gain +0.2", "beats_champion": "no champion yet"},
    ),
    "no_champion_challenger_equal_to_probe_makes_the_probe_the_first_champion": Case(
        dict(challenger_wrong=spread(30), probe_wrong=spread(30)),
        choice="base_probe", failing={"beats_base"},
        says={"beats_base": "includes zero", "probe_first_champion": "becomes the first champion"},
    ),
    "no_champion_fine_tuned_or_nothing_rejects_when_the_challenger_does_not_beat_the_probe": Case(
        dict(challenger_wrong=spread(30), probe_wrong=spread(30)),
        choice=None, failing={"beats_base"}, config={"probe_can_win": False},
    ),
    "no_champion_challenger_clearly_worse_than_probe_says_the_ci_lies_below_zero": Case(
        dict(challenger_wrong=spread(60), probe_wrong=spread(10)),
        choice="base_probe", failing={"beats_base", "slices"},  # worse everywhere, the short slice too
        says={"beats_base": "lies below zero"},
    ),
    "a_small_but_certain_gain_over_the_probe_promotes_the_challenger_at_the_default_margin": Case(
        # right everywhere the probe is, plus 6 rows: a real but small gain (banking77's +0.0076 case)
        dict(challenger_wrong=spread(20)[:14], probe_wrong=spread(20)),
        choice="challenger", says={"beats_base": "needs >= +0.0000"},
    ),
    "a_gain_over_the_probe_below_the_users_margin_leaves_the_probe_champion": Case(
        dict(challenger_wrong=spread(20)[:14], probe_wrong=spread(20)),
        choice="base_probe", failing={"beats_base"},
        says={"beats_base": "needs >= +0.0500"},
        config={"min_gain_over_base": 0.05},
    ),
    "challenger_beats_probe_but_not_champion_and_probe_neither_promotes_nothing": Case(
        dict(challenger_wrong=spread(14), probe_wrong=spread(60), champion_wrong=spread(10)),
        choice=None, failing={"beats_champion", "probe_beats_champion", "probe_slices"},
        says={"beats_champion": "vs champion", "probe_beats_champion": "base_probe macro_f1"},
    ),
    "champion_beaten_by_the_probe_alone_promotes_the_probe": Case(
        # a fine-tune that went wrong, a probe on new data that beats the old champion
        dict(challenger_wrong=spread(80), probe_wrong=spread(4), champion_wrong=spread(40)),
        choice="base_probe", failing={"beats_base", "beats_champion", "slices"},
        says={"probe_beats_champion": "lies above zero", "probe_slices": "against champion"},
    ),
    "slice_regressing_beyond_tolerance_rejects_the_challenger_naming_the_slice": Case(
        # better overall, but 8 of the 40 short rows newly wrong
        dict(challenger_wrong=spread(8, 0, 40), probe_wrong=spread(60, 40, 200), short_rows=40),
        choice="base_probe", failing={"slices"},
        says={"slices": "length_bucket=short"},
    ),
    "tiny_slice_below_min_slice_rows_regressing_is_ignored": Case(
        # the same regression on a 20-row slice (min_slice_rows is 30) does not block
        dict(challenger_wrong=spread(4, 0, 20), probe_wrong=spread(60, 20, 200), short_rows=20),
        choice="challenger",
        says={"slices": "1 slice values with >= 30 rows"},
    ),
    "latency_over_budget_rejects_naming_latency": Case(
        dict(challenger_wrong=spread(4), probe_wrong=spread(50), latency_ms=80.0),
        choice=None, failing={"latency", "probe_latency"},
        says={"latency": "challenger latency 80.00 ms/example over the budget of 50.0 ms"},
    ),
    "champion_beaten_on_every_check_promotes_the_challenger": Case(
        dict(challenger_wrong=spread(4), probe_wrong=spread(60), champion_wrong=spread(40)),
        choice="challenger",
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
    assert decision.yes is (case.choice is not None)
    assert decision.choice == case.choice
    assert {name for name, c in checks.items() if not c.passed} == case.failing
    for name, text in case.says.items():
        assert text in checks[name].reason, checks[name].reason


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_every_decision_gives_one_pass_or_fail_reason_per_check(case: Case) -> None:
    decision = decide(case)
    names = [c.name for c in decision.checks]
    has_champion = case.inputs.get("champion_wrong") is not None
    probe = LATER_PROBE if has_champion else FIRST_PROBE
    considered = decision.choice != "challenger" and case.config.get("probe_can_win", True)
    assert names == CHECKS + (probe if considered else [])
    reasons = decision.reasons[1:] if decision.note else decision.reasons
    assert len(reasons) == len(names)
    for check, reason in zip(decision.checks, reasons):
        assert reason == ("PASS " if check.passed else "FAIL ") + check.reason
    as_dict = decision.to_dict()
    assert as_dict["promote"] is decision.yes and as_dict["reasons"] == decision.reasons
    assert as_dict.get("candidate") == decision.choice


def test_the_outcome_line_names_the_winner_the_gain_and_what_to_try() -> None:
    evaluation, predictions = build_case(challenger_wrong=spread(30), probe_wrong=spread(30))
    decision = decide_promotion(evaluation, predictions, GateConfig(bootstrap_samples=200))
    said = outcome(decision, evaluation, "macro_f1")
    assert said.startswith("the base probe (frozen base model + fitted head) won with macro_f1 0.8500")
    assert "(+0.0000)" in said and "tuneloop run --tune" in said
    evaluation, predictions = build_case(challenger_wrong=spread(4), probe_wrong=spread(50))
    decision = decide_promotion(evaluation, predictions, GateConfig(bootstrap_samples=200))
    assert outcome(decision, evaluation, "macro_f1") == (
        "the fine-tuned challenger won: macro_f1 0.9800 vs the probe's 0.7500 (+0.2300)")


def test_slice_check_compares_against_base_probe_when_there_is_no_champion() -> None:
    decision = decide(CASES["slice_regressing_beyond_tolerance_rejects_the_challenger_naming_the_slice"])
    (slices,) = [c for c in decision.checks if c.name == "slices"]
    assert "against base_probe" in slices.reason
    assert "length_bucket=short 0.8000 vs 1.0000 (40 rows)" in slices.reason  # challenger vs reference, accuracy
    assert "length_bucket=long" not in slices.reason


def test_gate_can_decide_on_accuracy() -> None:
    evaluation, predictions = build_case(challenger_wrong=spread(4), probe_wrong=spread(50))
    decision = decide_promotion(evaluation, predictions, GateConfig(metric="accuracy", bootstrap_samples=200))
    assert decision.yes is True
    assert decision.checks[0].reason.startswith("challenger accuracy 0.9800 vs base_probe 0.7500")


def test_gate_config_rejects_an_unknown_metric() -> None:
    with pytest.raises(ValueError, match="gate.metric must be 'macro_f1' or 'accuracy', got 'auc'"):
        GateConfig(metric="auc")
    with pytest.raises(ValueError, match="gate.slice_metric must be"):
        GateConfig(slice_metric="auc")


def test_a_slice_drop_within_its_own_noise_does_not_block_and_is_named() -> None:
    # 2 of 31 rows of a slice flip against the probe: over the tolerance of 0.05, but McNemar's
    # exact test on 2 discordant rows gives p = 0.25
    evaluation, predictions = build_case(challenger_wrong=[0, 1], probe_wrong=spread(60, 31, 200), short_rows=31)
    slice_of = np.where(np.arange(N_ROWS) < 31, "short", "long")
    without = decide_promotion(evaluation, predictions, GateConfig())
    assert not next(c for c in without.checks if c.name == "slices").passed  # aggregates alone: a regression
    with_rows = decide_promotion(evaluation, {**predictions, "slice:length_bucket": slice_of}, GateConfig())
    (slices,) = [c for c in with_rows.checks if c.name == "slices"]
    assert slices.passed and "within noise: length_bucket=short" in slices.reason and "p=0.25" in slices.reason


def test_a_slice_drop_beyond_its_noise_still_blocks_with_its_p_value() -> None:
    evaluation, predictions = build_case(challenger_wrong=spread(8, 0, 40), probe_wrong=spread(60, 40, 200),
                                         short_rows=40)
    slice_of = np.where(np.arange(N_ROWS) < 40, "short", "long")
    decision = decide_promotion(evaluation, {**predictions, "slice:length_bucket": slice_of}, GateConfig())
    (slices,) = [c for c in decision.checks if c.name == "slices"]
    assert not slices.passed and "length_bucket=short 0.8000" in slices.reason and "p=0.0039" in slices.reason


def many_slices_case(regressed: int | None, seed: int) -> tuple[dict, dict]:
    """28 slices of 60 rows (64 classes, like HWU64's scenarios and folds), both models
    ~90% right with independent errors; in slice `regressed`, if any, the challenger
    is wrong on 20 more rows."""
    rng = np.random.default_rng(seed)
    rows, n_slices, n_classes = 60, 28, 64
    y = rng.integers(0, n_classes, rows * n_slices)
    slice_of = np.repeat([f"s{i:02d}" for i in range(n_slices)], rows)

    def noisy(rate: float) -> np.ndarray:
        wrong = rng.random(len(y)) < rate
        return np.where(wrong, (y + rng.integers(1, n_classes, len(y))) % n_classes, y)

    pred = {"base_probe": noisy(0.10), "challenger": noisy(0.08)}
    if regressed is not None:
        inside = np.flatnonzero(slice_of == f"s{regressed:02d}")[:20]
        pred["challenger"][inside] = (y[inside] + 1) % n_classes
    models = {}
    for key, p in pred.items():
        slices = {f"s{i:02d}": {"rows": rows,
                                "accuracy": accuracy(y[slice_of == f"s{i:02d}"], p[slice_of == f"s{i:02d}"]),
                                "macro_f1": macro_f1(y[slice_of == f"s{i:02d}"], p[slice_of == f"s{i:02d}"], n_classes)}
                  for i in range(n_slices)}
        models[key] = {"accuracy": accuracy(y, p), "macro_f1": macro_f1(y, p, n_classes),
                       "latency_ms_per_example": 1.0, "slices": {"group": slices}}
    evaluation = {"labels": [str(i) for i in range(n_classes)], "models": models}
    return evaluation, {"y_true": y, **pred, "slice:group": slice_of}


@pytest.mark.parametrize("seed", range(6))
def test_many_noisy_slices_without_a_real_regression_never_block(seed: int) -> None:
    evaluation, predictions = many_slices_case(None, seed)
    decision = decide_promotion(evaluation, predictions, GateConfig(bootstrap_samples=200))
    (slices,) = [c for c in decision.checks if c.name == "slices"]
    assert slices.passed, slices.reason
    assert "28 slice values with >= 30 rows, Holm-corrected at 95%" in slices.reason


@pytest.mark.parametrize("seed", range(3))
def test_one_real_slice_regression_among_many_noisy_slices_still_blocks(seed: int) -> None:
    evaluation, predictions = many_slices_case(5, seed)
    decision = decide_promotion(evaluation, predictions, GateConfig(bootstrap_samples=200))
    (slices,) = [c for c in decision.checks if c.name == "slices"]
    assert not slices.passed and "group=s05" in slices.reason, slices.reason
    assert "group=s04" not in slices.reason.split("within noise")[0]


def test_holm_keeps_the_family_wise_error_and_rejects_in_step_down_order() -> None:
    assert holm([0.01, 0.04, 0.03, 0.5], 0.05) == [True, False, False, False]  # 0.01 <= .05/4; 0.03 > .05/3
    assert holm([0.001, 0.012, 0.02], 0.05) == [True, True, True]  # .001<=.0167, .012<=.025, .02<=.05
    assert holm([], 0.05) == []


# --- robustness: answers kept under perturbation, challenger against champion (or probe) ------

PERTURBED = 8  # perturbations per row: each row keeps 0..8 of its answers


def kept(lost_rows: int, lost_each: int = PERTURBED, sampled: int = N_ROWS) -> np.ndarray:
    """Per test row, the perturbations whose answer matched the clean one: all 8, but
    `lost_each` fewer on `lost_rows` rows spread over the sample; NaN past `sampled` rows."""
    out = np.full(N_ROWS, float(PERTURBED))
    out[spread(lost_rows, 0, sampled)] -= lost_each if lost_rows else 0
    out[sampled:] = np.nan
    return out


def with_robustness(case: tuple[dict, dict], **columns: np.ndarray) -> tuple[dict, dict]:
    """The gate's inputs with robustness scores: `model=kept(...)` per-row columns."""
    evaluation, predictions = case
    evaluation = {**evaluation, "robustness": {"rows": N_ROWS, "perturbations": [f"p{i}" for i in range(PERTURBED)]}}
    return evaluation, {**predictions, **{f"unchanged:{key}": values for key, values in columns.items()}}


@dataclass(frozen=True)
class RobustCase:
    challenger: np.ndarray | None
    reference: np.ndarray | None
    passed: bool
    says: str
    champion: bool = True


ROBUST_CASES = {
    "as_robust_as_the_champion_passes": RobustCase(
        kept(10, 2), kept(10, 2), True, "keeps 0.9875 of its answers under 8 perturbations vs champion 0.9875"),
    "a_little_less_robust_within_the_margin_passes": RobustCase(
        kept(8, 2), kept(0), True, "-0.0100 (may drop 0.02)"),
    "clearly_less_robust_than_the_champion_fails": RobustCase(
        kept(100, 4), kept(0), False, "-0.2500 (may drop 0.02), 95% CI [-0.2"),
    "a_drop_beyond_the_margin_whose_interval_includes_it_passes": RobustCase(
        kept(6), kept(0), True, "-0.0300 (may drop 0.02), 95% CI"),
    "no_champion_compares_with_the_base_probe": RobustCase(
        kept(100, 4), kept(0), False, "vs base_probe 1.0000 (200 rows)", champion=False),
    "rows_outside_the_robustness_sample_are_left_out": RobustCase(
        kept(50, 4, sampled=100), kept(0, sampled=100), False, "(100 rows)"),
    "no_robustness_scores_passes_saying_so": RobustCase(None, None, True, "robustness not measured"),
}


@pytest.mark.parametrize("case", list(ROBUST_CASES.values()), ids=list(ROBUST_CASES))
def test_robustness_check(case: RobustCase) -> None:
    reference = "champion" if case.champion else "base_probe"
    inputs = build_case(spread(4), spread(50), spread(40) if case.champion else None)
    columns = {} if case.challenger is None else {"challenger": case.challenger, reference: case.reference}
    evaluation, predictions = with_robustness(inputs, **columns) if columns else inputs
    check = check_robustness(evaluation, predictions, "challenger", reference, GateConfig(bootstrap_samples=400))
    assert check.name == "robustness"
    assert check.passed is case.passed, check.reason
    assert case.says in check.reason, check.reason


def test_a_drop_beyond_the_margin_with_an_interval_reaching_it_says_it_includes_the_margin() -> None:
    evaluation, predictions = with_robustness(build_case(spread(4), spread(50), spread(40)),
                                              challenger=kept(6), champion=kept(0))
    check = check_robustness(evaluation, predictions, "challenger", "champion", GateConfig(bootstrap_samples=400))
    assert check.passed and check.reason.endswith("includes -0.0200")
    clear = check_robustness(*with_robustness(build_case(spread(4), spread(50), spread(40)),
                                              challenger=kept(100, 4), champion=kept(0)),
                             "challenger", "champion", GateConfig(bootstrap_samples=400))
    assert not clear.passed and clear.reason.endswith("lies below -0.0200")


def test_a_clearly_less_robust_challenger_is_not_promoted_and_the_probe_is_judged_the_same_way() -> None:
    evaluation, predictions = with_robustness(build_case(spread(4), spread(4), spread(40)),
                                              challenger=kept(100, 4), champion=kept(0), base_probe=kept(0))
    decision = decide_promotion(evaluation, predictions, GateConfig(bootstrap_samples=400))
    failing = {c.name for c in decision.checks if not c.passed}
    assert "robustness" in failing and decision.choice == "base_probe"
    assert decision.check("probe_robustness").passed
    assert [c.name for c in decision.checks] == CHECKS + LATER_PROBE
    assert decision.to_dict()["checks"][3] == {"name": "robustness", "passed": False,
                                               "reason": decision.check("robustness").reason}


def test_a_larger_allowed_drop_lets_the_less_robust_challenger_through() -> None:
    evaluation, predictions = with_robustness(build_case(spread(4), spread(50), spread(40)),
                                              challenger=kept(100, 4), champion=kept(0))
    check = check_robustness(evaluation, predictions, "challenger", "champion",
                             GateConfig(bootstrap_samples=400, max_robustness_drop=0.3))
    assert check.passed and "lies above -0.3000" in check.reason


# --- forgetting: the regression set (earlier test rows, regression file), challenger against champion ---

REGRESSION_ROWS, EARLIER_ROWS = 100, 60  # rows 0..59 were test rows before; 60..99 come from the file


def with_regression(case: tuple[dict, dict], **wrong: np.ndarray) -> tuple[dict, dict]:
    """The gate's inputs with a regression set on which each `model=rows` gets those rows wrong,
    its scores computed by the evaluate stage's own `regression_scores`."""
    evaluation, predictions = case
    y = np.arange(REGRESSION_ROWS) % 2
    domains = np.where(np.arange(REGRESSION_ROWS) < EARLIER_ROWS, "earlier test rows", "regression file")
    answers = {key: predictions_with_errors(y, np.asarray(rows, dtype=int)) for key, rows in wrong.items()}
    regression = {"rows": REGRESSION_ROWS, "models": {key: regression_scores(y, pred, domains, 2)
                                                      for key, pred in answers.items()}}
    return ({**evaluation, "regression": regression},
            {**predictions, "regression:y_true": y, **{f"regression:{k}": v for k, v in answers.items()}})


@dataclass(frozen=True)
class ForgettingCase:
    challenger: np.ndarray | None  # its wrong rows on the regression set; None: no regression set
    champion: np.ndarray | None
    passed: bool
    says: str
    has_champion: bool = True
    config: dict = field(default_factory=dict)


FORGETTING_CASES = {
    "remembering_as_much_as_the_champion_passes": ForgettingCase(
        spread(5, 0, REGRESSION_ROWS), spread(5, 0, REGRESSION_ROWS), True,
        "challenger accuracy 0.9500 vs champion 0.9500 on 100 regression rows"),
    "forgetting_the_old_rows_beyond_the_tolerance_fails_naming_each_domain": ForgettingCase(
        spread(30, 0, EARLIER_ROWS), spread(2, 0, REGRESSION_ROWS), False,
        "(earlier test rows 0.5000 vs 0.9833 (60 rows); regression file 1.0000 vs 0.9750 (40 rows)): -0.2800 "
        "(may drop 0.02), 95% CI"),
    "a_drop_within_the_tolerance_passes": ForgettingCase(
        [3], [], True, "-0.0100 (may drop 0.02)"),
    "a_drop_beyond_the_tolerance_within_noise_passes": ForgettingCase(
        spread(3, 0, REGRESSION_ROWS), [], True, "-0.0300 (may drop 0.02), 95% CI [-0.0700, -0.0100] includes -0.0200"),
    "forgetting_the_regression_files_domain_fails": ForgettingCase(
        spread(15, EARLIER_ROWS, REGRESSION_ROWS), [], False, "regression file 0.6250 vs 1.0000 (40 rows)"),
    "a_wider_tolerance_lets_the_same_drop_pass": ForgettingCase(
        spread(15, EARLIER_ROWS, REGRESSION_ROWS), [], True, "-0.1500 (may drop 0.3)",
        config={"max_forgetting": 0.3}),
    "macro_f1_as_the_slice_metric_is_used_on_the_regression_set": ForgettingCase(
        # wrong on 30 negative rows: accuracy 0.70, F1 40/70 and 100/130
        np.arange(0, EARLIER_ROWS, 2), [], False, "challenger macro_f1 0.6703 vs champion 1.0000",
        config={"slice_metric": "macro_f1"}),
    "no_champion_has_nothing_to_forget": ForgettingCase(
        spread(30, 0, EARLIER_ROWS), spread(30, 0, EARLIER_ROWS), True, "no champion yet", has_champion=False),
    "no_earlier_rows_and_no_file_pass": ForgettingCase(
        None, None, True, "no earlier test rows and no evaluate.regression_file"),
}


@pytest.mark.parametrize("case", list(FORGETTING_CASES.values()), ids=list(FORGETTING_CASES))
def test_forgetting_check(case: ForgettingCase) -> None:
    inputs = build_case(challenger_wrong=spread(4), probe_wrong=spread(50),
                        champion_wrong=spread(40) if case.has_champion else None)
    if case.challenger is not None:
        models = {"challenger": case.challenger, **({"champion": case.champion} if case.has_champion else {})}
        inputs = with_regression(inputs, **models)
    check = check_forgetting(*inputs, "challenger", GateConfig(bootstrap_samples=400, **case.config))
    assert check.name == "forgetting"
    assert check.passed is case.passed, check.reason
    assert case.says in check.reason, check.reason


def test_a_challenger_that_forgets_is_not_promoted_though_it_beats_the_champion_on_the_test_rows() -> None:
    case = build_case(challenger_wrong=spread(4), probe_wrong=spread(60), champion_wrong=spread(40))
    remembered = decide_promotion(*with_regression(case, challenger=[], champion=[], base_probe=[]), GateConfig())
    assert remembered.choice == "challenger"
    evaluation, predictions = with_regression(case, challenger=spread(30, 0, EARLIER_ROWS), champion=[],
                                              base_probe=[])
    decision = decide_promotion(evaluation, predictions, GateConfig())
    assert decision.choice is None
    assert {c.name for c in decision.checks if not c.passed} == {"forgetting", "probe_beats_champion",
                                                                 "probe_slices"}
    assert [c.name for c in decision.checks] == CHECKS + LATER_PROBE
    assert decision.to_dict()["checks"][4]["name"] == "forgetting"
    assert decision.check("probe_forgetting").passed
