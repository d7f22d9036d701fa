"""Tests for the validate stage: every rule, its severity, its messages and its offline page.

Each frame is validated once (module-scoped fixtures) because a run through
Great Expectations costs about half a second, plus a few seconds to import it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pytest

from tuneloop.tasks.validate import (
    RULES,
    DataValidationError,
    RuleResult,
    ValidateConfig,
    ValidationReport,
    check_report,
    normalise_text,
    validate_dataset,
)

POSITIVE = [
    "a joyful ride", "warm and witty", "beautifully shot", "a clever script",
    "superb acting", "moving and honest", "great fun throughout", "a real delight",
]
NEGATIVE = [
    "a tedious mess", "flat and lifeless", "badly edited", "a dull script",
    "wooden acting", "painfully slow", "loud and empty", "a real chore",
]
# small enough that the clean frame (8 per class) passes the class rules
CONFIG = ValidateConfig(labels=("negative", "positive"), min_rows_per_class=3, max_class_imbalance=3.0)


def clean_records() -> list[tuple[int, str, str, str]]:
    """Returns (row, text, label, split): 8 distinct texts per class, rows 1..16, no leakage."""
    splits = ["train"] * 6 + ["validation", "test"]
    records = [(i + 1, t, "positive", s) for i, (t, s) in enumerate(zip(POSITIVE, splits))]
    records += [(i + 9, t, "negative", s) for i, (t, s) in enumerate(zip(NEGATIVE, splits))]
    return records


def make_frame(records: list[tuple[int, str, str, str]]) -> pd.DataFrame:
    """Builds the stage's input frame, with an extra slice column validation must ignore."""
    frame = pd.DataFrame(records, columns=["row", "text", "label", "split"])
    frame["source"] = "unit-test"
    return frame


def rule(report: ValidationReport, name: str) -> RuleResult:
    """Returns the result of one rule from a report."""
    (result,) = [r for r in report.results if r.rule == name]
    return result


# Offending rows get row numbers far from the clean ones (1..16), so the tests
# also prove that messages use the `row` column, not the frame position.
DIRTY_RECORDS = [
    (901, "this one is fine", "positve", "train"),
    (902, "so-so, really", "meh", "train"),
    (903, "", "negative", "train"),
    (904, "   ", "positive", "train"),
    (905, "x" * 2001, "negative", "train"),
    (906, "a joyful ride", "positive", "train"),  # same text as row 1
    (907, "Great movie!", "positive", "train"),
    (908, "great   movie", "positive", "test"),  # row 907 after normalising
    (909, "write to jane.doe@example.com for tickets", "negative", "train"),
    (910, "call me on 555-123-4567 about it", "negative", "train"),
    (911, "paid with 4111 1111 1111 1111 sadly", "negative", "train"),
    (912, "superb acting", "positive", "validation"),  # exact text of train row 5
    (913, "ok", "negative", "train"),
]


@pytest.fixture(scope="module")
def clean_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("clean_docs")


@pytest.fixture(scope="module")
def clean_report(clean_dir: Path) -> ValidationReport:
    return validate_dataset(make_frame(clean_records()), CONFIG, clean_dir)


@pytest.fixture(scope="module")
def dirty_report(tmp_path_factory: pytest.TempPathFactory) -> ValidationReport:
    frame = make_frame(clean_records() + DIRTY_RECORDS)
    return validate_dataset(frame, CONFIG, tmp_path_factory.mktemp("dirty_docs"))


@pytest.fixture(scope="module")
def warnings_only_frame() -> pd.DataFrame:
    return make_frame(clean_records() + [
        (950, "a tedious mess", "negative", "train"),  # same text as row 9
        (951, "mail bob@example.org for the screener", "positive", "train"),
    ])


@pytest.fixture(scope="module")
def warnings_only_report(
    warnings_only_frame: pd.DataFrame, tmp_path_factory: pytest.TempPathFactory
) -> ValidationReport:
    return validate_dataset(warnings_only_frame, CONFIG, tmp_path_factory.mktemp("warn_docs"))


@pytest.fixture(scope="module")
def skewed_frame() -> pd.DataFrame:
    """8 positive rows against 2 negative ones: a 4.0x imbalance."""
    return make_frame([r for r in clean_records() if r[2] == "positive"] + [
        (31, "a tedious mess", "negative", "train"),
        (32, "flat and lifeless", "negative", "test"),
    ])


# --- clean data --------------------------------------------------------------


def test_clean_data_passes_every_rule(clean_report: ValidationReport) -> None:
    assert [r.rule for r in clean_report.results] == list(RULES)
    assert [r.rule for r in clean_report.results if not r.passed] == []
    assert clean_report.errors == ()
    assert clean_report.warnings == ()
    assert all(r.example_rows == () for r in clean_report.results)


def test_check_report_passes_clean_data(clean_report: ValidationReport) -> None:
    assert check_report(clean_report) is None


def external_references(html: str) -> list[str]:
    """src= / href= of scripts, stylesheets and images that load from the internet."""
    return re.findall(r"<(?:script|link|img)[^>]*(?:src|href)=[\"']?(?:https?:)?//[^\"' >]+", html)


def remote_loads(folder: Path) -> dict[str, list[str]]:
    """Every page under `folder` (relative name) with what it loads from the internet."""
    return {str(page.relative_to(folder)): external_references(page.read_text(errors="replace"))
            for page in sorted(folder.rglob("*.htm*"))}


def test_no_page_under_the_report_folder_loads_anything_from_the_internet(
    clean_report: ValidationReport, clean_dir: Path
) -> None:
    assert remote_loads(clean_dir) == {"index.html": []}  # GX's Data Docs (CDN scripts and styles) are not built
    assert sorted(p.name for p in clean_dir.iterdir()) == ["index.html"]


def test_data_docs_an_older_tuneloop_left_in_the_report_folder_are_removed(tmp_path: Path) -> None:
    stale = tmp_path / "gx" / "index.html"
    stale.parent.mkdir()
    stale.write_text('<script src="https://cdn.jsdelivr.net/npm/jquery.min.js"></script>')
    assert remote_loads(tmp_path) == {"gx/index.html": ["<script src=\"https://cdn.jsdelivr.net/npm/jquery.min.js"]}
    validate_dataset(make_frame(clean_records()), CONFIG, tmp_path)
    assert remote_loads(tmp_path) == {"index.html": []}


def test_validation_page_is_self_contained_and_lists_every_rule(
    clean_report: ValidationReport, clean_dir: Path
) -> None:
    assert clean_report.page == clean_dir.resolve() / "index.html"
    html = clean_report.page.read_text()
    assert external_references(html) == []
    assert "Status: Passed</p>" in html
    assert all(f"<td>{name}</td>" in html for name in RULES)
    assert "<a " not in html  # no link to Data Docs or anywhere else


def test_a_failed_warning_only_rule_reads_passed_with_warnings_as_the_flow_went_on(
    warnings_only_report: ValidationReport,
) -> None:
    html = warnings_only_report.page.read_text()
    assert check_report(warnings_only_report) is None  # the flow goes on
    assert "Status: Passed with warnings" in html and "Status: Failed" not in html
    assert html.count('<td class="warning">warning</td>') == 2  # duplicate_texts and pii
    assert external_references(html) == []


def test_a_failed_error_rule_reads_failed(dirty_report: ValidationReport) -> None:
    assert "Status: Failed</p>" in dirty_report.page.read_text()


def test_report_to_dict_is_json_with_verdicts(clean_report: ValidationReport) -> None:
    summary = json.loads(json.dumps(clean_report.to_dict()))
    assert summary["passed"] is True
    assert summary["errors"] == [] and summary["warnings"] == []
    assert [r["rule"] for r in summary["rules"]] == list(RULES)
    assert summary["page"] == str(clean_report.page)


# --- row rules -----------------------------------------------------------------


def test_unknown_label_fails_label_set_naming_rows_and_values(dirty_report: ValidationReport) -> None:
    result = rule(dirty_report, "label_set")
    assert (result.passed, result.severity) == (False, "error")
    assert result.example_rows == (901, 902)
    assert result.message == (
        "label_set: 2 rows have a label outside ['negative', 'positive']: "
        "rows 901 ('positve'), 902 ('meh')"
    )


def test_empty_and_whitespace_texts_fail_non_empty_text(dirty_report: ValidationReport) -> None:
    result = rule(dirty_report, "non_empty_text")
    assert (result.passed, result.severity) == (False, "error")
    assert result.example_rows == (903, 904)
    assert result.message.startswith("non_empty_text: 2 rows have an empty or whitespace-only text")


def test_too_long_and_too_short_texts_fail_text_length(dirty_report: ValidationReport) -> None:
    result = rule(dirty_report, "text_length")
    assert (result.passed, result.severity) == (False, "error")
    # blank texts are non_empty_text's business, not reported twice
    assert result.example_rows == (905, 913)
    assert "905 (2001 chars: 'xxx" in result.message
    assert "913 (2 chars: 'ok')" in result.message
    assert len(result.message) < 250  # the 2001-char text is cut to an excerpt


def test_exact_duplicate_texts_are_a_warning_by_default(dirty_report: ValidationReport) -> None:
    result = rule(dirty_report, "duplicate_texts")
    assert (result.passed, result.severity) == (False, "warning")
    assert result.example_rows == (906, 912)
    assert "906 ('a joyful ride' = row 1)" in result.message
    assert result in dirty_report.warnings
    assert "duplicate_texts" not in {r.rule for r in dirty_report.errors}


def test_eval_rows_repeating_train_text_fail_split_leakage(dirty_report: ValidationReport) -> None:
    result = rule(dirty_report, "split_leakage")
    assert (result.passed, result.severity) == (False, "error")
    # 908 matches train row 907 only after normalising; 912 matches row 5 exactly
    assert result.example_rows == (908, 912)
    assert "908 ('great   movie' ~ train row 907)" in result.message
    assert "912 ('superb acting' ~ train row 5)" in result.message


def test_email_phone_and_card_number_give_a_pii_warning(dirty_report: ValidationReport) -> None:
    result = rule(dirty_report, "pii")
    assert (result.passed, result.severity) == (False, "warning")
    assert result.example_rows == (909, 910, 911)
    assert "909 (email: " in result.message
    assert "910 (phone: " in result.message
    assert "911 (card: " in result.message


def test_check_report_raises_naming_failed_error_rules_and_rows(dirty_report: ValidationReport) -> None:
    with pytest.raises(DataValidationError) as caught:
        check_report(dirty_report)
    text = str(caught.value)
    assert caught.value.report is dirty_report
    assert {r.rule for r in dirty_report.errors} == {
        "label_set", "non_empty_text", "text_length", "split_leakage"
    }
    for expected in ("label_set", "901 ('positve')", "split_leakage", "908", "non_empty_text", "903"):
        assert expected in text
    assert "duplicate_texts" not in text and "pii" not in text  # warnings do not block
    assert dirty_report.to_dict()["passed"] is False


def test_missing_text_column_fails_schema_and_skips_text_rules(tmp_path: Path) -> None:
    frame = make_frame(clean_records()).drop(columns=["text"])
    report = validate_dataset(frame, CONFIG, tmp_path)
    assert rule(report, "schema").message == "schema: column 'text' is missing"
    assert not rule(report, "non_empty_text").passed
    assert "not checked" in rule(report, "pii").message
    assert rule(report, "label_set").passed


def test_null_and_non_string_texts_fail_schema(tmp_path: Path) -> None:
    frame = make_frame(clean_records() + [(40, None, "positive", "train"), (41, 42, "negative", "train")])
    result = rule(validate_dataset(frame, CONFIG, tmp_path), "schema")
    assert (result.passed, result.severity) == (False, "error")
    assert set(result.example_rows) == {40, 41}
    assert "row 41 (int 42)" in result.message and "1 row has no text (null): row 40" in result.message


def test_a_declared_split_outside_train_validation_test_fails_schema_naming_rows(tmp_path: Path) -> None:
    frame = make_frame(clean_records() + [(60, "an unseen text", "positive", "tset"),
                                          (61, "another one", "negative", "")])
    result = rule(validate_dataset(frame, CONFIG, tmp_path), "schema")
    assert (result.passed, result.severity) == (False, "error")
    assert set(result.example_rows) == {60, 61}
    assert "declare a split outside ['train', 'validation', 'test']" in result.message
    assert "60 (split 'tset': 'an unseen text'), 61 (split '':" in result.message


def test_without_split_near_duplicates_are_not_leakage(tmp_path: Path) -> None:
    frame = make_frame(clean_records() + [(50, "Great movie!", "positive", None),
                                          (51, "great movie", "positive", None)])
    report = validate_dataset(frame.drop(columns=["split"]), CONFIG, tmp_path)
    assert rule(report, "split_leakage").passed
    assert rule(report, "duplicate_texts").passed  # not exact duplicates


# --- class rules ---------------------------------------------------------------


def test_class_under_minimum_fails_min_rows_per_class(skewed_frame: pd.DataFrame, tmp_path: Path) -> None:
    config = ValidateConfig(min_rows_per_class=3, max_class_imbalance=10.0)
    report = validate_dataset(skewed_frame, config, tmp_path)
    result = rule(report, "min_rows_per_class")
    assert (result.passed, result.severity) == (False, "error")
    assert result.message == "min_rows_per_class: 1 class has fewer than 3 rows: 'negative' (2 rows)"
    assert rule(report, "class_imbalance").passed  # 4.0x is within 10x


def test_imbalance_beyond_bound_fails_class_imbalance(skewed_frame: pd.DataFrame, tmp_path: Path) -> None:
    config = ValidateConfig(min_rows_per_class=2, max_class_imbalance=3.0)
    report = validate_dataset(skewed_frame, config, tmp_path)
    result = rule(report, "class_imbalance")
    assert (result.passed, result.severity) == (False, "error")
    assert "smallest class 'negative' (2 rows)" in result.message
    assert "'positive' (8 rows, 4.0x)" in result.message
    assert rule(report, "min_rows_per_class").passed


# --- severities ----------------------------------------------------------------


def test_check_report_passes_when_only_warnings_failed(warnings_only_report: ValidationReport) -> None:
    assert warnings_only_report.errors == ()
    assert {r.rule for r in warnings_only_report.warnings} == {"duplicate_texts", "pii"}
    assert rule(warnings_only_report, "duplicate_texts").example_rows == (950,)
    assert rule(warnings_only_report, "pii").example_rows == (951,)
    assert check_report(warnings_only_report) is None


def test_severity_override_turns_duplicate_warning_into_error(
    warnings_only_frame: pd.DataFrame, tmp_path: Path
) -> None:
    config = ValidateConfig(min_rows_per_class=3, max_class_imbalance=3.0,
                            severity={"duplicate_texts": "error"})
    report = validate_dataset(warnings_only_frame, config, tmp_path)
    assert [r.rule for r in report.errors] == ["duplicate_texts"]
    assert [r.rule for r in report.warnings] == ["pii"]
    with pytest.raises(DataValidationError, match=r"duplicate_texts: .*950 \('a tedious mess' = row 9\)"):
        check_report(report)


# --- config --------------------------------------------------------------------


def test_unknown_rule_in_severity_raises_value_error() -> None:
    with pytest.raises(ValueError, match="'dupes'"):
        ValidateConfig(severity={"dupes": "warning"})


def test_severity_other_than_error_or_warning_raises_value_error() -> None:
    with pytest.raises(ValueError, match="'fatal'"):
        ValidateConfig(severity={"pii": "fatal"})


def test_invalid_pii_regex_raises_value_error() -> None:
    with pytest.raises(ValueError, match="'broken'"):
        ValidateConfig(pii_patterns={"broken": "(unclosed"})


def test_partial_severity_keeps_defaults_for_other_rules() -> None:
    config = ValidateConfig(severity={"pii": "error"})
    assert config.severity["pii"] == "error"
    assert config.severity["duplicate_texts"] == "warning"
    assert config.severity["label_set"] == "error"
    assert set(config.severity) == set(RULES)


def test_normalise_text_ignores_case_punctuation_and_spacing() -> None:
    texts = pd.Series(["Great movie!", "great   movie", " GREAT, movie. "])
    assert normalise_text(texts).tolist() == ["great movie"] * 3


def test_labels_auto_takes_the_datas_labels_and_a_new_label_must_still_have_enough_rows(tmp_path: Path) -> None:
    from dataclasses import replace

    auto = replace(CONFIG, labels="auto")
    records = clean_records() + [(70 + i, f"set an alarm number {i}", "alarm", "train") for i in range(8)]
    report = validate_dataset(make_frame(records), auto, tmp_path / "auto")
    assert rule(report, "label_set").passed and not report.errors  # a third class, 8 rows: a new intent
    few = clean_records() + [(80, "set an alarm", "alarm", "train")]
    report = validate_dataset(make_frame(few), auto, tmp_path / "few")
    assert [r.rule for r in report.errors] == ["min_rows_per_class", "class_imbalance"]  # 8 vs 1 rows
    assert "'alarm' (1 rows)" in rule(report, "min_rows_per_class").message


def test_missing_value_marks_are_not_texts(tmp_path: Path) -> None:
    records = clean_records() + [(990, "NaN", "positive", "train"), (991, " null ", "negative", "train"),
                                 (992, "N/A", "positive", "train")]
    report = validate_dataset(make_frame(records), CONFIG, tmp_path)
    assert rule(report, "non_empty_text").example_rows == (990, 991, 992)
