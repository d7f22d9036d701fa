"""Expectations on the real data the project ships (VADER, four domains)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from tuneloop.tasks.ingest import IngestConfig, canonicalize, read_table
from tuneloop.tasks.split import SplitConfig, split_dataset
from tuneloop.tasks.validate import ValidateConfig, validate_dataset, normalise_text

DATA = Path(__file__).resolve().parents[2] / "data" / "vader_sentiment"


def canonical(domain: str) -> pd.DataFrame:
    frame, _ = canonicalize(read_table(DATA / f"{domain}.csv"), IngestConfig(exclude_labels=("neutral",)))
    return frame


def test_licence_ships_with_the_data():
    assert "MIT License" in (DATA / "LICENSE.txt").read_text()


@pytest.mark.parametrize("domain", ["movie_reviews", "tweets", "nyt_editorials"])
def test_domain_passes_the_default_blocking_rules(domain, tmp_path):
    report = validate_dataset(canonical(domain), ValidateConfig(), tmp_path)
    assert report.errors == (), [r.message for r in report.errors]


def test_amazon_reviews_fail_text_length_on_their_three_one_character_rows(tmp_path):
    report = validate_dataset(canonical("amazon_reviews"), ValidateConfig(), tmp_path)
    assert [r.rule for r in report.errors] == ["text_length"]
    assert report.errors[0].example_rows == (2179, 2517, 2646)  # each is just "!"


def test_movie_reviews_only_warn_about_their_few_duplicates(tmp_path):
    report = validate_dataset(canonical("movie_reviews"), ValidateConfig(), tmp_path)
    assert [r.rule for r in report.warnings] == ["duplicate_texts"]
    assert len(report.warnings[0].example_rows) <= 5


def test_default_training_set_has_both_labels_nearly_balanced():
    counts = canonical("movie_reviews")["label"].value_counts()
    assert set(counts.index) == {"negative", "positive"}
    assert counts.min() / counts.max() > 0.95
    assert counts.sum() == 10_605 - 37  # the 37 neutral rows are excluded


def test_default_split_of_movie_reviews_has_no_leakage():
    frame = split_dataset(canonical("movie_reviews"), SplitConfig())
    norm = normalise_text(frame["text"])
    train = set(norm[frame["split"] == "train"])
    held_out = norm[frame["split"] != "train"]
    assert not held_out.isin(train).any()
    assert (frame["split"] == "test").mean() == pytest.approx(0.1, abs=0.01)
