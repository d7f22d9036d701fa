"""The validation stage's own page, `reports/validation/index.html`: every
rule's verdict on one self-contained page (no scripts, no stylesheets from the
internet), with the status the flow acted on. It replaces Great Expectations'
Data Docs, which load their scripts and styles from a CDN, so offline they list
no results, and which call a run with a failed warning-only rule "Failed"
although the flow went on."""

from __future__ import annotations

from html import escape
from pathlib import Path
from typing import Sequence

STYLE = """body{font-family:system-ui,sans-serif;margin:2rem;max-width:70rem;color:#222}
table{border-collapse:collapse;width:100%}th,td{border-bottom:1px solid #ddd;padding:.4rem .6rem;
text-align:left;vertical-align:top}.passed{color:#176f2c}.warning{color:#8a5a00}.failed{color:#b00020}
.status{font-size:1.3rem;font-weight:600}"""


def overall_status(passed: Sequence[bool], severities: Sequence[str]) -> str:
    """"Passed", "Passed with warnings" (only warning rules failed: the flow went on) or "Failed"."""
    failed = [severity for ok, severity in zip(passed, severities) if not ok]
    if "error" in failed:
        return "Failed"
    return "Passed with warnings" if failed else "Passed"


def verdict(passed: bool, severity: str) -> tuple[str, str]:
    """(text, css class) of one rule's row."""
    if passed:
        return "passed", "passed"
    return ("warning", "warning") if severity == "warning" else ("failed", "failed")


def render_validation_page(rules: Sequence[dict], rows: int) -> str:
    """The page's HTML.

    Args:
        rules: ValidationReport.to_dict()["rules"]: rule, severity, passed, message, example_rows.
        rows: the rows validated.
    """
    status = overall_status([r["passed"] for r in rules], [r["severity"] for r in rules])
    css = {"Passed": "passed", "Passed with warnings": "warning", "Failed": "failed"}[status]
    body = []
    for rule in rules:
        text, kind = verdict(rule["passed"], rule["severity"])
        examples = ", ".join(map(str, rule["example_rows"])) or "-"
        body.append(f"<tr><td>{escape(rule['rule'])}</td><td>{escape(rule['severity'])}</td>"
                    f"<td class=\"{kind}\">{text}</td><td>{escape(rule['message'])}</td><td>{examples}</td></tr>")
    return (f"<!doctype html><html><head><meta charset=\"utf-8\"><title>Data validation: {status}</title>"
            f"<style>{STYLE}</style></head><body><h1>Data validation</h1>"
            f"<p class=\"status {css}\">Status: {status}</p><p>{rows} rows, {len(rules)} rules. "
            "A failed <em>error</em> rule stops the flow before training; a failed <em>warning</em> rule is "
            "reported and the flow goes on.</p>"
            "<table><thead><tr><th>rule</th><th>severity</th><th>result</th><th>what was found</th>"
            f"<th>example rows</th></tr></thead><tbody>{''.join(body)}</tbody></table></body></html>")


def write_validation_page(path: Path, rules: Sequence[dict], rows: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_validation_page(rules, rows), encoding="utf-8")
    return path
