"""Validate stage: data-quality rules checked by Great Expectations.

Every rule is a real GX expectation (or a few) run through a Checkpoint on an
ephemeral context; tuneloop's own page (`validation_page`) shows the verdicts.
GX's Data Docs are not built: they load their scripts and styles from a CDN,
so offline (where tuneloop runs) they show a blank page. What GX cannot express directly (text
length after stripping, duplicates, split leakage, per-class counts) is first
computed into derived columns on a copy of the frame, and GX checks those.

Two frames are validated, each by its own Checkpoint: one row per example
(row rules, failures named by source row) and one row per configured label
(class-count rules, failures named by label). A Checkpoint passes the same
batch parameters and result format to all of its validation definitions, so
two frames with different key columns need two Checkpoints.

Great Expectations is imported inside the functions that use it: importing it
takes seconds, and importing this module must stay cheap.
"""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, cast

import pandas as pd
import regex

from tuneloop.tasks.validation_page import write_validation_page
from tuneloop.values.config import RULES, ValidateConfig
from tuneloop.values.errors import TuneloopError

# what spreadsheets and exports write for a missing value: never a text to learn from
MISSING_TEXTS = frozenset({"nan", "none", "null", "n/a", "#n/a", "<na>"})
SPLITS: tuple[str, ...] = ("train", "validation", "test")
EVAL_SPLITS: tuple[str, ...] = ("validation", "test")

# The whole PII scan of a data version gets this long. The patterns run on the `regex` engine,
# which honours a timeout: a pattern that backtracks catastrophically (`(a|aa)+$`) stops
# validate, named, instead of hanging it. The shipped patterns scan 10,000 texts in about a second.
PII_SECONDS = 60.0

_MAX_EXAMPLES = 5
_EXCERPT_CHARS = 60
# Which source columns each rule reads; a rule whose columns are missing
# cannot be checked (schema reports the missing column itself).
_RULE_COLUMNS: dict[str, tuple[str, ...]] = {
    "non_empty_text": ("text",),
    "text_length": ("text",),
    "label_set": ("label",),
    "min_rows_per_class": ("label",),
    "class_imbalance": ("label",),
    "duplicate_texts": ("text",),
    "split_leakage": ("text",),
    "pii": ("text",),
}


@dataclass(frozen=True)
class RuleResult:
    """One rule's verdict; `message` is meant to be read by a person."""

    rule: str
    severity: str  # "error" | "warning"
    passed: bool
    message: str
    example_rows: tuple[int, ...]  # up to 5 source row numbers


@dataclass(frozen=True)
class ValidationReport:
    """Every rule's verdict, in RULES order, and where its page is."""

    results: tuple[RuleResult, ...]
    page: Path | None  # index.html: tuneloop's offline validation page

    @property
    def errors(self) -> tuple[RuleResult, ...]:
        """Failed rules that block the pipeline."""
        return tuple(r for r in self.results if not r.passed and r.severity == "error")

    @property
    def warnings(self) -> tuple[RuleResult, ...]:
        """Failed rules that are only reported."""
        return tuple(r for r in self.results if not r.passed and r.severity == "warning")

    def to_dict(self) -> dict[str, Any]:
        """Returns a JSON-able summary: passed, errors, warnings (rule names), rules."""
        return {
            "passed": not self.errors,
            "errors": [r.rule for r in self.errors],
            "warnings": [r.rule for r in self.warnings],
            "rules": [
                {
                    "rule": r.rule,
                    "severity": r.severity,
                    "passed": r.passed,
                    "message": r.message,
                    "example_rows": list(r.example_rows),
                }
                for r in self.results
            ],
            "page": str(self.page) if self.page else None,
        }


class PatternTimeout(TuneloopError, ValueError):
    """A `validate.pii_patterns` regex ran out of time; nothing was decided."""


class DataValidationError(TuneloopError, ValueError):
    """Raised when a blocking rule fails; str() lists every failed error rule with its message and rows."""

    def __init__(self, report: ValidationReport) -> None:
        self.report = report
        lines = [f"data validation failed: {len(report.errors)} blocking rule(s) failed"]
        lines += [f"  - {r.message}" for r in report.errors]
        if report.page is not None:
            lines.append(f"  report: {report.page}")
        super().__init__("\n".join(lines))


def validate_dataset(frame: pd.DataFrame, config: ValidateConfig, report_dir: Path) -> ValidationReport:
    """Runs every rule through Great Expectations; writes tuneloop's offline
    page (index.html).

    Args:
        frame: columns `row` (1-based source row), `text`, `label`, optionally
            `split`; other columns are ignored. Without `row`, rows are
            numbered 1..n in frame order.
        config: thresholds, PII patterns and rule severities.
        report_dir: the page is written here (created if needed).

    Returns:
        The report, one RuleResult per rule in RULES order, with the path of
        the validation page (index.html).

    Does not raise on failed rules; see check_report.
    """
    if config.labels == "auto":  # the data's own label set: label_set has nothing to refuse
        labels = sorted(frame["label"].dropna().unique().tolist()) if "label" in frame.columns else []
        config = replace(config, labels=tuple(labels))
    rows = _rows_frame(frame, config.pii_patterns)
    classes = _class_frame(frame, cast(tuple[str, ...], config.labels))  # "auto" is replaced just above
    report_dir = Path(report_dir).resolve()
    report_dir.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(report_dir / "gx", ignore_errors=True)  # Data Docs an older tuneloop built: blank offline
    context = _gx_context()
    row_checks = _row_expectations(config, set(frame.columns))
    class_checks = _class_expectations(config, classes) if "label" in frame.columns else []
    gx_results = _run_checkpoint(context, "rows", rows, row_checks, keys=["row"])
    if class_checks:
        gx_results += _run_checkpoint(context, "classes", classes, class_checks, keys=["label", "rows"])
    texts = dict(zip(rows["row"], frame["text"])) if "text" in frame.columns else {}
    results = tuple(
        _rule_result(rule, config, [r for r in gx_results if _rule_of(r) == rule], texts, set(frame.columns))
        for rule in RULES
    )
    page = report_dir / "index.html"
    report = ValidationReport(results=results, page=page)
    write_validation_page(page, report.to_dict()["rules"], len(frame))
    return report


def check_report(report: ValidationReport) -> None:
    """Lets the pipeline go on only if no error-severity rule failed.

    Raises:
        DataValidationError: naming every failed error rule and its example rows.
    """
    if report.errors:
        raise DataValidationError(report)


# --- derived frames ---------------------------------------------------------


def _rows_frame(frame: pd.DataFrame, pii_patterns: dict[str, str] | None = None) -> pd.DataFrame:
    """Returns a fresh frame: row, text, label, split plus the derived columns.

    Derived columns hold the value GX checks, null where the row is fine or
    the rule does not apply (GX map expectations skip nulls):
    text_stripped, text_chars (null for blank texts, which only
    non_empty_text reports), duplicate_of (earlier row with the same text),
    leaked_from (train row whose text a validation/test row repeats),
    pii (the names of the PII patterns a text matches).

    Raises:
        PatternTimeout: a PII pattern ran past PII_SECONDS.
    """
    n = len(frame)
    rows = pd.DataFrame(index=pd.RangeIndex(n))
    rows["row"] = frame["row"].to_numpy() if "row" in frame.columns else range(1, n + 1)
    source: dict[str, pd.Series] = {}
    for column in ("text", "label", "split"):
        # object dtype: GX's per-value type check only runs on object columns
        values = frame[column].to_numpy(dtype=object) if column in frame.columns else [None] * n
        source[column] = pd.Series(values, index=rows.index, dtype=object)
        if column in frame.columns:  # absent columns stay absent: schema checks for them
            rows[column] = source[column]
    text = source["text"].map(lambda v: v if isinstance(v, str) else None).astype(object)
    stripped = text.str.strip()
    stripped = stripped.where(~stripped.str.lower().isin(MISSING_TEXTS), "")  # "NaN" is no text
    blank = stripped.eq("") | stripped.isna()
    rows["text_stripped"] = stripped
    rows["text_chars"] = text.str.len().where(~blank)
    rows["duplicate_of"] = _duplicate_of(text.where(~blank), rows["row"])
    rows["leaked_from"] = leaked_from(text.where(~blank), source["split"], rows["row"])
    if pii_patterns and "text" in frame.columns:
        rows["pii"] = pii_matches(text, pii_patterns, rows["row"])
    return rows


def pii_matches(texts: pd.Series, patterns: dict[str, str], rows: pd.Series,
                seconds: float = PII_SECONDS) -> pd.Series:
    """For each text, the names of the PII patterns it matches ("email, phone"),
    None for none. All searches share one time budget of `seconds`.

    Raises:
        PatternTimeout: naming the pattern and the row it was searching when the budget ran out.
    """
    compiled = {name: regex.compile(pattern) for name, pattern in patterns.items()}
    deadline = time.monotonic() + seconds
    found: list[str | None] = []
    for text, row in zip(texts, rows):
        names = []
        for name, pattern in compiled.items() if isinstance(text, str) else ():
            try:
                if pattern.search(text, timeout=max(deadline - time.monotonic(), 1e-6)):
                    names.append(name)
            except TimeoutError:
                raise PatternTimeout(f"validate.pii_patterns[{name!r}] ran past the {seconds:g} s the PII check "
                                     f"may take (searching row {row}): it backtracks catastrophically on some "
                                     "texts; rewrite it without nested repeats such as (a+)+ or (a|aa)+") from None
        found.append(", ".join(names) or None)
    return pd.Series(found, index=texts.index, dtype=object)


def normalise_text(text: pd.Series) -> pd.Series:
    """Lowercases, drops punctuation and collapses whitespace ("Great movie!" -> "great movie")."""
    return (
        text.str.lower()
        .str.replace(r"[^\w\s]", "", regex=True)
        .str.replace(r"\s+", " ", regex=True)
        .str.strip()
    )


def _first_row_by_key(key: pd.Series, row: pd.Series) -> dict[Any, int]:
    """Maps each non-null key to the first source row that has it."""
    firsts = pd.DataFrame({"key": key, "row": row}).dropna(subset=["key"]).drop_duplicates("key")
    return dict(zip(firsts["key"], firsts["row"]))


def _duplicate_of(text: pd.Series, row: pd.Series) -> pd.Series:
    """For every repeat of an earlier row's exact text, that earlier row; else None."""
    first = _first_row_by_key(text, row)
    repeat = text.notna() & text.duplicated(keep="first")
    return _row_numbers(text.map(first).where(repeat))


def leaked_from(text: pd.Series, split: pd.Series, row: pd.Series) -> pd.Series:
    """For validation/test rows whose text is also in train, the train row; else None.

    Matches the exact text first, then the normalised text, so "great   movie"
    in test is caught by "Great movie!" in train.
    """
    is_train = split.eq("train")
    is_eval = split.isin(EVAL_SPLITS)
    if not (is_train.any() and is_eval.any()):
        return pd.Series([None] * len(text), index=text.index, dtype=object)
    norm = normalise_text(text)
    norm = norm.mask(norm.eq(""))  # punctuation-only texts match nothing
    exact = text[is_eval].map(_first_row_by_key(text[is_train], row[is_train]))
    normal = norm[is_eval].map(_first_row_by_key(norm[is_train], row[is_train]))
    return _row_numbers(exact.fillna(normal).reindex(text.index))


def _row_numbers(values: pd.Series) -> pd.Series:
    """Returns row numbers as Python ints in an object column, None where missing."""
    return pd.Series(
        [None if pd.isna(v) else int(v) for v in values], index=values.index, dtype=object
    )


def _class_frame(frame: pd.DataFrame, labels: tuple[str, ...]) -> pd.DataFrame:
    """One row per configured label: its row count and its size relative to the smallest class.

    A ratio against an empty class is infinite (NaN for the empty class
    itself, which GX skips); min_rows_per_class reports the empty class.
    """
    has_label = "label" in frame.columns
    counts = frame["label"].value_counts(dropna=True) if has_label else pd.Series(dtype=object)
    sizes = [int(counts.get(label, 0)) for label in labels]
    smallest = min(sizes, default=0)
    ratios = [size / smallest if smallest else (math.inf if size else math.nan) for size in sizes]
    return pd.DataFrame({"label": list(labels), "rows": sizes, "ratio_to_smallest": ratios})


# --- expectations -----------------------------------------------------------


def _expect(name: str, rule: str, config: ValidateConfig, problem: str, **kwargs: Any) -> Any:
    """Builds GX expectation `name` tagged with its rule and the phrase used in messages.

    `problem` completes "<count> <unit>s ...", e.g. "have an empty text";
    `unit` ("row" or "class") may be passed in kwargs and defaults to "row".
    """
    import great_expectations as gx

    unit = kwargs.pop("unit", "row")
    severity = "critical" if config.severity[rule] == "error" else "warning"
    meta = {"rule": rule, "problem": problem, "unit": unit}
    return getattr(gx.expectations, name)(meta=meta, severity=severity, **kwargs)


def _row_expectations(config: ValidateConfig, columns: set[str]) -> list[Any]:
    """Returns the expectations on the rows frame for every rule whose columns exist."""
    c = config
    checks = [
        _expect("ExpectColumnToExist", "schema", c, f"column {col!r} is missing", column=col)
        for col in ("text", "label")
    ]
    if "text" in columns:
        checks += [
            _expect("ExpectColumnValuesToNotBeNull", "schema", c, "have no text (null)", column="text"),
            _expect("ExpectColumnValuesToBeOfType", "schema", c, "have a text that is not a string",
                    column="text", type_="str"),
            _expect("ExpectColumnValueLengthsToBeBetween", "non_empty_text", c,
                    "have an empty or whitespace-only text (or a missing-value mark: NaN, None, null, N/A)",
                    column="text_stripped", min_value=1),
            _expect("ExpectColumnValuesToBeBetween", "text_length", c,
                    f"have a text outside {c.min_text_chars}..{c.max_text_chars} characters",
                    column="text_chars", min_value=c.min_text_chars, max_value=c.max_text_chars),
            _expect("ExpectColumnValuesToBeNull", "duplicate_texts", c,
                    "repeat the exact text of an earlier row", column="duplicate_of"),
            _expect("ExpectColumnValuesToBeNull", "split_leakage", c,
                    "have a validation/test text that is also in train (exact or normalised)",
                    column="leaked_from"),
        ]
        if c.pii_patterns:  # matched beforehand under a time budget (pii_matches), not by GX's own regex
            checks.append(_expect("ExpectColumnValuesToBeNull", "pii", c,
                                  f"contain personal data ({', '.join(c.pii_patterns)})", column="pii"))
    if "split" in columns:
        checks.append(_expect("ExpectColumnValuesToBeInSet", "schema", c,
                              f"declare a split outside {list(SPLITS)}", column="split", value_set=list(SPLITS)))
    if "label" in columns:
        labels = cast(tuple[str, ...], c.labels)  # validate_dataset replaced "auto" by the data's labels
        checks += [
            _expect("ExpectColumnValuesToNotBeNull", "schema", c, "have no label (null)", column="label"),
            _expect("ExpectColumnValuesToBeInSet", "label_set", c,
                    f"have a label outside {list(labels)}", column="label", value_set=list(labels)),
        ]
    return checks


def _class_expectations(config: ValidateConfig, classes: pd.DataFrame) -> list[Any]:
    """Returns the expectations on the class-count frame (one row per configured label)."""
    c = config
    smallest = classes.loc[classes["rows"].idxmin()] if len(classes) else None
    against = f" {smallest['label']!r} ({smallest['rows']} rows)" if smallest is not None else ""
    return [
        _expect("ExpectColumnValuesToBeBetween", "min_rows_per_class", c,
                f"have fewer than {c.min_rows_per_class} rows", unit="class",
                column="rows", min_value=c.min_rows_per_class),
        _expect("ExpectColumnValuesToBeBetween", "class_imbalance", c,
                f"are more than {c.max_class_imbalance:g}x the size of the smallest class{against}",
                unit="class", column="ratio_to_smallest", max_value=c.max_class_imbalance),
    ]


# --- running GX -------------------------------------------------------------


def _gx_context() -> Any:
    """Returns an ephemeral GX context that writes no files (no Data Docs site), progress bars off."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    project = DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(),
        progress_bars=ProgressBarsConfig(globally=False),
        data_docs_sites={},
    )
    return gx.get_context(mode="ephemeral", project_config=project)


def _run_checkpoint(
    context: Any, name: str, frame: pd.DataFrame, expectations: list[Any], keys: list[str]
) -> list[Any]:
    """Validates `frame` against `expectations` in a Checkpoint (no actions: nothing is written).

    Args:
        keys: columns that name a failing record; GX returns them with the
            value for up to _MAX_EXAMPLES unexpected records per expectation.

    Returns:
        The ExpectationValidationResults, in no particular order.
    """
    import great_expectations as gx

    asset = context.data_sources.add_pandas(name).add_dataframe_asset(name)
    batch = asset.add_batch_definition_whole_dataframe(name)
    suite = context.suites.add(gx.ExpectationSuite(name=name, expectations=expectations))
    definition = context.validation_definitions.add(gx.ValidationDefinition(name=name, data=batch, suite=suite))
    checkpoint = context.checkpoints.add(gx.Checkpoint(
        name=name,
        validation_definitions=[definition],
        actions=[],
        result_format={
            "result_format": "SUMMARY",
            "unexpected_index_column_names": keys,
            "partial_unexpected_count": _MAX_EXAMPLES,
            "return_unexpected_index_query": False,  # the pandas query lists every failing index
        },
    ))
    outcome = checkpoint.run(batch_parameters={"dataframe": frame})
    return [result for run in outcome.run_results.values() for result in run.results]


# --- GX results -> rule results ----------------------------------------------


def _rule_of(result: Any) -> str | None:
    """Returns the rule an ExpectationValidationResult checks (from its meta)."""
    return (result.expectation_config.meta or {}).get("rule")


def _rule_result(
    rule: str, config: ValidateConfig, gx_results: list[Any], texts: dict[Any, Any], columns: set[str]
) -> RuleResult:
    """Folds the GX results of one rule into a RuleResult with a readable message."""
    severity = config.severity[rule]
    missing = [c for c in _RULE_COLUMNS.get(rule, ()) if c not in columns]
    if missing:
        message = f"{rule}: not checked, column {missing[0]!r} is missing (see schema)"
        return RuleResult(rule, severity, False, message, ())
    if not gx_results:  # only pii without patterns
        return RuleResult(rule, severity, True, f"{rule}: nothing to check", ())
    failed = sorted((r for r in gx_results if not r.success), key=_failure_order)
    if not failed:
        return RuleResult(rule, severity, True, f"{rule}: passed", ())
    parts, rows = [], []
    for result in failed:
        part, example_rows = _describe_failure(rule, result, texts, config)
        parts.append(part)
        rows += [r for r in example_rows if r not in rows]
    return RuleResult(rule, severity, False, f"{rule}: " + "; ".join(parts), tuple(rows[:_MAX_EXAMPLES]))


def _failure_order(result: Any) -> tuple[int, str]:
    """Sorts a rule's failures: missing columns first, then by expectation type."""
    kind = result.expectation_config.type
    return (0 if kind == "expect_column_to_exist" else 1, kind)


def _describe_failure(
    rule: str, result: Any, texts: dict[Any, Any], config: ValidateConfig
) -> tuple[str, list[int]]:
    """Returns "<count> <units> <problem>: <examples>" for one failed expectation, and its example rows."""
    meta = result.expectation_config.meta
    error = _exception_message(result.exception_info or {})
    if error is not None:
        return f"could not be checked: {error}", []
    details = result.result or {}
    count = details.get("unexpected_count")
    if count is None:  # table-level expectation, e.g. a missing column
        return meta["problem"], []
    entries = details.get("partial_unexpected_index_list") or []
    subject = _agree(count, meta["unit"], meta["problem"])
    if meta["unit"] == "class":
        shown = [f"{e['label']!r} ({_class_detail(rule, e)})" for e in entries]
        return f"{subject}: {', '.join(shown)}{_more(count, len(shown))}", []
    rows = [int(e["row"]) for e in entries]
    shown = [f"{row} ({_row_detail(rule, e, texts.get(e['row']), config)})" for row, e in zip(rows, entries)]
    label = "row" if len(shown) == 1 else "rows"
    return f"{subject}: {label} {', '.join(shown)}{_more(count, len(shown))}", rows


def _exception_message(info: dict[str, Any]) -> str | None:
    """Returns the message of an exception GX caught while checking, else None.

    GX reports it either flat or keyed by the metric that failed.
    """
    for entry in [info, *info.values()]:
        if isinstance(entry, dict) and entry.get("raised_exception"):
            return str(entry.get("exception_message"))
    return None


def _agree(count: int, unit: str, problem: str) -> str:
    """Returns "1 row has ..." / "2 rows have ..." from a plural-verb phrase."""
    if count != 1:
        return f"{count} {'classes' if unit == 'class' else unit + 's'} {problem}"
    verb, _, rest = problem.partition(" ")
    singular = {"have": "has", "are": "is"}.get(verb, verb + "s")
    return f"1 {unit} {singular} {rest}"


def _more(count: int, shown: int) -> str:
    """Returns a note that only the first examples are listed, when there are more."""
    return f" (first {shown} of {count})" if count > shown else ""


def _class_detail(rule: str, entry: dict[str, Any]) -> str:
    """Short description of a failing class for messages."""
    ratio = entry.get("ratio_to_smallest")
    if rule == "class_imbalance" and ratio is not None and math.isfinite(ratio):
        return f"{entry['rows']} rows, {ratio:.1f}x"
    return f"{entry['rows']} rows"


def _row_detail(rule: str, entry: dict[str, Any], text: Any, config: ValidateConfig) -> str:
    """Short description of a failing row: the offending value or a text excerpt."""
    details: dict[str, Callable[[], str]] = {
        "label_set": lambda: repr(entry.get("label")),
        "text_length": lambda: f"{int(entry['text_chars'])} chars: {_excerpt(text)}",
        "duplicate_texts": lambda: f"{_excerpt(text)} = row {entry['duplicate_of']}",
        "split_leakage": lambda: f"{_excerpt(text)} ~ train row {entry['leaked_from']}",
        "pii": lambda: f"{entry.get('pii') or 'pii'}: {_excerpt(text)}",
    }
    if rule in details:
        return details[rule]()
    if rule == "schema" and "split" in entry:
        return f"split {entry['split']!r}: {_excerpt(text)}"
    if rule == "schema" and text is not None and not isinstance(text, str):
        return f"{type(text).__name__} {text!r}"
    return _excerpt(text)


def _excerpt(text: Any) -> str:
    """Returns the value quoted and cut to ~60 characters; repr keeps it on one line."""
    if text is None or (isinstance(text, float) and math.isnan(text)):
        return "null"
    text = str(text)
    # Whitespace is kept as is: it is what tells "great   movie" from "great movie".
    return repr(text[: _EXCERPT_CHARS - 3] + "...") if len(text) > _EXCERPT_CHARS else repr(text)
