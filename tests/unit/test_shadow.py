"""Shadow challengers without a service: the decision as a table, the stats of paired
answers (macro-F1 of both on the same labelled rows, with a paired interval), and the
store's shadow table beside the champion's rows (which stay exactly as they were)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pandas as pd
import pytest
import sqlalchemy as sa

from tuneloop.pipeline.params import ParamsError, parse_params
from tuneloop.service.store import PREDICTIONS, Prediction, PredictionStore
from tuneloop.tasks.shadow import DISCARD, PROMOTE, WAIT, ShadowStats, shadow_decision, shadow_stats
from tuneloop.values.config import ShadowConfig

SETTINGS = ShadowConfig(min_rows=200, min_hours=24.0, min_agreement=0.9, min_mean_confidence=0.6,
                        min_labelled_rows=100, max_f1_drop=0.02)
FULL = ShadowStats(rows=500, hours=30.0, agreement=0.95, mean_confidence=0.8)
LABELLED = ShadowStats(rows=500, hours=30.0, agreement=0.95, mean_confidence=0.8, labelled=150,
                       champion_f1=0.85, shadow_f1=0.87, low=-0.01, high=0.05)


@pytest.mark.parametrize("stats, verdict, said", [
    (ShadowStats(120, 30.0, 0.99, 0.9), WAIT, ["WAIT 120 paired predictions of the 200 needed (shadow.min_rows)"]),
    (ShadowStats(500, 3.0, 0.99, 0.9), WAIT, ["WAIT 3.0 h of the 24 h needed (shadow.min_hours)"]),
    (ShadowStats(0, 0.5, None, None), WAIT, ["WAIT 0 paired predictions of the 200 needed (shadow.min_rows)",
                                             "WAIT 0.5 h of the 24 h needed (shadow.min_hours)"]),
    (FULL, PROMOTE, ["PASS agrees with the champion on 0.9500 of 500 rows (needs >= 0.9)",
                     "PASS mean confidence 0.8000 (needs >= 0.6)",
                     "PASS 0 labelled rows, fewer than 100 (shadow.min_labelled_rows): macro-F1 not judged"]),
    (ShadowStats(500, 30.0, 0.9, 0.6), PROMOTE, None),  # exactly at both floors
    (ShadowStats(500, 30.0, 0.85, 0.8), DISCARD,
     ["FAIL agrees with the champion on 0.8500 of 500 rows (needs >= 0.9)"]),
    (ShadowStats(500, 30.0, 0.95, 0.55), DISCARD, ["FAIL mean confidence 0.5500 (needs >= 0.6)"]),
    (LABELLED, PROMOTE, ["PASS macro-F1 on 150 labelled rows: shadow 0.8700 vs champion 0.8500: +0.0200 "
                         "(may drop 0.02), 95% CI [-0.0100, +0.0500] lies above -0.0200"]),
    # worse by 0.01, within the allowed drop: noise, not a reason to discard
    (ShadowStats(500, 30.0, 0.95, 0.8, 150, 0.85, 0.84, -0.05, 0.02), PROMOTE, None),
    # clearly worse: more than the allowed drop, the whole interval below minus it
    (ShadowStats(500, 30.0, 0.95, 0.8, 150, 0.85, 0.78, -0.11, -0.03), DISCARD,
     ["FAIL macro-F1 on 150 labelled rows: shadow 0.7800 vs champion 0.8500: -0.0700 (may drop 0.02), "
      "95% CI [-0.1100, -0.0300] lies below -0.0200"]),
    # worse beyond the drop on its point, but the interval reaches above minus it: not sure enough
    (ShadowStats(500, 30.0, 0.95, 0.8, 150, 0.85, 0.80, -0.09, 0.01), PROMOTE, None),
    # labels judge: a shadow better than a weak champion disagrees with it where it is wrong, and
    # low agreement or confidence no longer discards it ...
    (ShadowStats(500, 30.0, 0.74, 0.55, 150, 0.62, 0.86, 0.15, 0.33), PROMOTE,
     ["PASS agrees with the champion on 0.7400 of 500 rows (needs >= 0.9) (not binding: 150 labelled rows "
      "judge macro-F1)", "PASS mean confidence 0.5500 (needs >= 0.6) (not binding: 150 labelled rows judge "
      "macro-F1)"]),
    # ... while a clearly worse one is discarded whatever it agrees on
    (ShadowStats(500, 30.0, 0.74, 0.8, 150, 0.86, 0.62, -0.33, -0.15), DISCARD, None),
])
def test_shadow_decision_waits_for_its_window_then_promotes_or_discards_with_every_reason(
        stats: ShadowStats, verdict: str, said: list[str] | None) -> None:
    got, reasons = shadow_decision(stats, SETTINGS)
    assert got == verdict
    if verdict != WAIT:
        assert len(reasons) == 3 and all(r.startswith(("PASS ", "FAIL ")) for r in reasons)
        assert all(r.startswith("PASS ") for r in reasons) == (verdict == PROMOTE)
    for reason in said or ():
        assert reason in reasons


def test_zero_hours_and_rows_alone_make_the_window() -> None:
    assert shadow_decision(ShadowStats(200, 0.0, 1.0, 1.0), ShadowConfig(min_hours=0.0))[0] == PROMOTE


def pairs(champion: list[str], shadow: list[str], true: list[str | None], confidence: float = 0.9) -> pd.DataFrame:
    return pd.DataFrame({"champion_label": champion, "shadow_label": shadow, "true_label": true,
                         "shadow_confidence": [confidence] * len(champion)})


def test_stats_measure_agreement_confidence_and_both_f1s_on_the_same_labelled_rows() -> None:
    start = datetime(2026, 1, 1, tzinfo=timezone.utc)
    true = ["positive", "negative"] * 50
    champion = ["positive"] * 100  # right on half
    shadow = list(true)  # right on every row
    config = ShadowConfig(min_labelled_rows=50, bootstrap_samples=200)
    stats = shadow_stats(pairs(champion, shadow, true, 0.7), ("negative", "positive"), start,
                         start + timedelta(hours=6), config)
    assert (stats.rows, stats.hours, stats.agreement, stats.mean_confidence, stats.labelled) == (
        100, 6.0, 0.5, pytest.approx(0.7), 100)
    assert stats.shadow_f1 == 1.0 and stats.champion_f1 == pytest.approx(1 / 3)  # F1 0.667 and 0 over 2 classes
    assert 0 < stats.low <= stats.high  # clearly better on these rows


def test_stats_leave_macro_f1_out_below_min_labelled_rows_and_ignore_unknown_labels() -> None:
    start = datetime(2026, 1, 1, tzinfo=timezone.utc)
    true = ["positive"] * 10 + ["maybe"] * 10 + [None] * 80
    stats = shadow_stats(pairs(["positive"] * 100, ["positive"] * 90 + ["negative"] * 10, true),
                         ("negative", "positive"), start, start, ShadowConfig(min_labelled_rows=20))
    assert (stats.agreement, stats.labelled, stats.shadow_f1, stats.low) == (0.9, 10, None, None)
    empty = shadow_stats(pairs([], [], []), ("negative", "positive"), start, start, ShadowConfig())
    assert (empty.rows, empty.agreement, empty.mean_confidence) == (0, None, None)


@pytest.mark.parametrize("key, value, said", [
    ("min_agreement", 1.5, "shadow.min_agreement must be at least 0 and at most 1, got 1.5"),
    ("min_rows", 0, "shadow.min_rows must be at least 1, got 0"),
    ("max_f1_drop", -0.1, "shadow.max_f1_drop must be at least 0 and at most 1, got -0.1"),
    ("confidence", 1.0, "shadow.confidence must be above 0 and below 1, got 1.0"),
])
def test_shadow_settings_out_of_range_are_refused_naming_them(key: str, value, said: str) -> None:
    with pytest.raises(ParamsError) as error:
        parse_params({"shadow": {key: value}})
    assert said in str(error.value)


def test_promote_via_shadow_is_off_unless_asked() -> None:
    assert parse_params({}).gate.promote_via_shadow is False
    assert parse_params({"gate": {"promote_via_shadow": True}}).gate.promote_via_shadow is True


# --- the store -------------------------------------------------------------------------------------


def champion_row(request_id: str, item: int, label: str, ts: datetime) -> Prediction:
    return Prediction(request_id, item, f"text {request_id} {item}", label, 0.8,
                      {"negative": 0.2, "positive": 0.8} if label == "positive" else {"negative": 0.8, "positive": 0.2},
                      "1", ts=ts)


def test_shadow_answers_are_logged_beside_the_champions_and_paired_by_request_and_item(tmp_path) -> None:
    store = PredictionStore(f"sqlite:///{tmp_path}/predictions.db")
    now = datetime.now(timezone.utc)
    store.log([champion_row("a", 0, "positive", now), champion_row("a", 1, "negative", now),
               champion_row("b", 0, "positive", now)])
    before = store.window().drop(columns=["id"]).astype(str).values.tolist()
    written = store.log_shadow([Prediction("a", 0, "", "positive", 0.9, {"negative": 0.1, "positive": 0.9}, "2"),
                                Prediction("a", 1, "", "positive", 0.6, {"negative": 0.4, "positive": 0.6}, "2")])
    assert written == 2
    assert store.window().drop(columns=["id"]).astype(str).values.tolist() == before  # champion rows untouched
    assert store.count() == 3
    store.attach_feedback("a", ["positive", "negative"])
    got = store.shadow_pairs("2", "1")
    assert got[["request_id", "item", "champion_label", "shadow_label", "shadow_confidence", "true_label"]
               ].values.tolist() == [["a", 0, "positive", "positive", 0.9, "positive"],
                                     ["a", 1, "negative", "positive", 0.6, "negative"]]
    assert store.shadow_pairs("2", "other champion").empty and store.shadow_pairs("3", "1").empty
    assert store.shadow_pairs("2", "1", start=now + timedelta(seconds=1)).empty
    assert store.shadow("a")["model_version"].tolist() == ["2", "2"]
    assert store.purge(now + timedelta(seconds=1)) == 3 and store.shadow("a").empty  # retention covers both


def test_a_store_made_before_shadows_gets_the_shadow_table_and_keeps_its_rows(tmp_path) -> None:
    url = f"sqlite:///{tmp_path}/old.db"
    engine = sa.create_engine(url)
    PREDICTIONS.create(engine)  # the old store: the predictions table alone
    with engine.begin() as conn:
        conn.execute(PREDICTIONS.insert(), [{"request_id": "old", "item": 0, "ts": datetime.now(timezone.utc),
                                             "text": "kept", "label": "positive", "confidence": 0.7,
                                             "probabilities": "{}", "model_version": "1"}])
    assert "shadow_predictions" not in sa.inspect(engine).get_table_names()
    store = PredictionStore(url)
    assert "shadow_predictions" in sa.inspect(store.engine).get_table_names()
    store.log_shadow([Prediction("old", 0, "", "negative", 0.6, {"negative": 0.6, "positive": 0.4}, "2")])
    assert store.shadow_pairs("2", "1")[["champion_label", "shadow_label"]].values.tolist() == [
        ["positive", "negative"]]
    assert store.request("old")["text"].tolist() == ["kept"]


# --- the follower ------------------------------------------------------------------------------------


def test_the_follower_loads_the_shadow_beside_the_champion_and_a_broken_one_never_touches_the_champion() -> None:
    from tuneloop.service.serve import ChampionFollower

    alias = {"champion": "1", "shadow": None}
    loads: list[str] = []

    def load(version: str):
        loads.append(version)
        if version == "3":
            raise ValueError("corrupt weights")
        return f"model {version}"

    follower = ChampionFollower("m", "base", lambda: alias["champion"], load, 60.0, lambda: alias["shadow"])
    follower.check()
    assert (follower.served.version, follower.shadow) == ("1", None)
    alias["shadow"] = "2"
    assert follower.check() is False  # the champion did not change
    assert (follower.served.version, follower.shadow.version, follower.shadow.classifier) == ("1", "2", "model 2")
    alias["shadow"] = "3"
    follower.check()
    follower.check()
    assert (follower.served.version, follower.shadow, follower.failed_shadow) == ("1", None, "3")
    assert loads.count("3") == 1 and "shadow version 3 was not loaded" in follower.last_error
    alias["shadow"] = None
    follower.check()
    assert follower.shadow is None and follower.failed_shadow is None and follower.status()["shadow"] is None


def test_a_shadow_alias_that_cannot_be_read_keeps_the_champion_serving() -> None:
    from tuneloop.service.serve import ChampionFollower

    def down() -> str:
        raise ConnectionError("registry unreachable")

    follower = ChampionFollower("m", "base", lambda: "1", lambda version: f"model {version}", 60.0, down)
    assert follower.check() is True
    assert follower.served.version == "1" and "reading the `shadow` alias failed" in follower.last_error


def test_the_monitor_says_one_line_per_shadow_outcome() -> None:
    from tuneloop.flows.monitor import shadow_line

    assert shadow_line({"shadow": None, "verdict": None, "reasons": []}) == "no shadow version"
    assert shadow_line({"shadow": "2", "verdict": "wait", "reasons": ["WAIT 3 rows", "WAIT 1 h"]}) == \
        "shadow v2 waiting: WAIT 3 rows; WAIT 1 h"
    assert shadow_line({"shadow": "2", "verdict": "promote", "reasons": ["PASS a"]}) == \
        "shadow v2 PROMOTED to champion: PASS a"
    assert shadow_line({"shadow": "2", "verdict": "discard", "reasons": ["FAIL b"]}) == "shadow v2 DISCARDED: FAIL b"


def test_a_shadow_promoted_in_this_run_leaves_retraining_to_its_own_window_but_a_rollback_does_not() -> None:
    from tuneloop.flows.monitor import replaced_champion
    from tuneloop.tasks.triggers import decide_retraining

    triggers = parse_params({}).triggers
    promoted = {"rollback": {"rolled_back": False}, "shadow": {"shadow": "2", "verdict": "promote"}}
    rolled_back = {"rollback": {"rolled_back": True, "to": "1"}, "shadow": None}
    waiting = {"rollback": {"rolled_back": False}, "shadow": {"shadow": "2", "verdict": "wait"}}
    assert replaced_champion("1", promoted) == "v1 -> v2, shadow promoted"
    assert replaced_champion("2", rolled_back) is None and replaced_champion("1", waiting) is None
    assert decide_retraining(500, drift_significant=True, config=triggers).yes
    decision = decide_retraining(500, drift_significant=True, config=triggers, replaced="v1 -> v2, shadow promoted")
    assert not decision.yes
    assert "the champion was replaced in this run (v1 -> v2, shadow promoted): the new champion's own window " \
           "decides" in decision.reasons[-1]
