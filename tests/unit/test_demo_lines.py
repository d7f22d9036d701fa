"""What the demo prints beside the monitor's decision (live accuracy and its label-free estimate),
and the traffic it can send."""

from __future__ import annotations

import pytest

from tuneloop.demo import DemoError, estimate_line, sample


def test_the_monitor_step_shows_live_accuracy_beside_the_estimate_without_labels() -> None:
    monitored = {"live": {"labelled_rows": 120, "accuracy": 0.6417, "macro_f1": 0.61},
                 "estimated": {"metrics": {"rows": 120, "accuracy": 0.7021, "accuracy_low": 0.6333,
                                           "accuracy_high": 0.7667}}}
    assert estimate_line(monitored) == ("live accuracy 0.642 on 120 labelled rows; "
                                        "estimated without labels 0.702 [0.633, 0.767]")


def test_a_window_without_feedback_still_shows_the_estimate() -> None:
    monitored = {"live": {"labelled_rows": 0, "accuracy": None, "macro_f1": None},
                 "estimated": {"metrics": {"rows": 80, "accuracy": 0.9, "accuracy_low": 0.85, "accuracy_high": 0.95}}}
    assert estimate_line(monitored) == "estimated without labels 0.900 [0.850, 0.950]"
    assert estimate_line({"live": {}, "estimated": {"metrics": None}}) == "no live or estimated accuracy in this window"


def test_asking_for_more_tweets_than_ship_is_refused_naming_both_counts() -> None:
    assert len(sample("tweets", 3760, seed=1)) == 3760  # the defaults: 3,500 + 100 for the shadow + 160
    with pytest.raises(DemoError, match=r"^the demo sends 5000 tweets \(--tweets \+ 100 for the shadow \+ "
                                        r"--later-tweets\) but 4196 are shipped: ask for fewer$"):
        sample("tweets", 5000, seed=1)
