"""The evaluation stage's side-by-side HTML report.

One self-contained file: every plot is embedded as a base64 PNG, so the report
can be attached to a registry run or mailed around without its directory.
Matplotlib is imported inside the plotting functions and used through
`matplotlib.figure.Figure` only: importing this module does no work, and no
global pyplot/backend state is touched, so it is safe inside Prefect workers.
"""

from __future__ import annotations

import base64
import html
import io
import math
import textwrap
from pathlib import Path
from typing import Any, Callable, Sequence, cast

MISSING = "—"

# One colour per model column, reused in every chart so a model keeps its colour.
_PALETTE = ["#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860"]

_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif;
       margin: 2rem auto; max-width: 1400px; padding: 0 1.5rem; color: #222; line-height: 1.4; }
h1 { font-size: 1.6rem; margin-bottom: .3rem; }
h2 { font-size: 1.2rem; margin-top: 2.2rem; border-bottom: 1px solid #ddd; padding-bottom: .3rem; }
h3 { font-size: 1rem; margin: .2rem 0 .5rem; }
.meta { color: #555; margin: .2rem 0; }
code { background: #f3f3f3; padding: 0 .3rem; border-radius: 3px; font-size: .9em; }
table { border-collapse: collapse; margin: .5rem 0; font-size: .92rem; }
th, td { border: 1px solid #e1e1e1; padding: .35rem .7rem; text-align: right; }
th { background: #f6f7f9; }
td.label, th.label { text-align: left; }
td.hint { color: #888; text-align: center; }
tbody tr:nth-child(even) { background: #fbfbfb; }
.badge { display: inline-block; padding: .2rem .7rem; border-radius: 1rem; color: #fff;
         font-weight: 600; font-size: .9rem; }
.badge.pass { background: #2e8b57; }
.badge.fail { background: #c0392b; }
.gate { margin: 1rem 0; padding: .8rem 1rem; border-radius: 6px; border: 1px solid #ddd; background: #fafafa; }
.gate ul { margin: .5rem 0 0 0; }
.row { display: flex; flex-wrap: wrap; gap: 1.5rem; align-items: flex-start; }
/* equal-width cells that shrink rather than wrap, so up to four heatmaps sit side by side */
.grid { display: flex; flex-wrap: wrap; gap: 1rem; align-items: flex-end; }
.grid > * { flex: 1 1 280px; max-width: 440px; }
.grid img { width: 100%; }
.card { border: 1px solid #e6e6e6; border-radius: 6px; padding: .7rem 1rem; background: #fff; }
figure { margin: 0; }
img { max-width: 100%; height: auto; }
.note { color: #777; font-style: italic; }
"""


def figure_to_data_uri(fig: Any, dpi: int = 110) -> str:
    """Returns `fig` rendered as a PNG `data:image/png;base64,...` URI.

    Works for any matplotlib Figure, with or without pyplot; the figure is
    left open (a pyplot caller still owns closing it).
    """
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight", facecolor="white")
    encoded = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f"data:image/png;base64,{encoded}"


def _is_missing(value: Any) -> bool:
    """True for None and NaN, the two ways JSON-ish metrics say 'not measured'."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def _fmt(value: Any, spec: str = ".3f") -> str:
    """Formats a number with `spec`, or returns the missing marker; never raises."""
    if _is_missing(value):
        return MISSING
    try:
        return format(value, spec)
    except (TypeError, ValueError):
        return str(value)


def _esc(value: Any) -> str:
    """HTML-escapes anything, rendering None as the missing marker."""
    return MISSING if _is_missing(value) else html.escape(str(value))


def _display_name(key: str, model: dict) -> str:
    """The model's display name, falling back to its key."""
    return str(model.get("name") or key)


def _wrap(text: str, width: int = 34) -> str:
    """Wraps long display names so plot titles and legends do not overflow."""
    return "\n".join(textwrap.wrap(text, width)) or text


def _img(uri: str, alt: str) -> str:
    """An <img> tag for a data URI."""
    return f'<img src="{uri}" alt="{html.escape(alt)}">'


def _header_html(evaluation: dict, title: str) -> str:
    """The title, data version, test-row count and (if any) the gate decision."""
    parts = [
        f"<h1>{_esc(title)}</h1>",
        f'<p class="meta">Data version: <code>{_esc(evaluation.get("data_version"))}</code></p>',
        f'<p class="meta">Test rows: <b>{_esc(evaluation.get("test_rows"))}</b>'
        + (f' ({_esc(evaluation["new_test_rows"])} new since the champion\'s data version)'
           if "new_test_rows" in evaluation else "") + ' &middot; '
        f'Labels: {", ".join(_esc(label) for label in evaluation.get("labels") or []) or MISSING}</p>',
    ]
    gate = evaluation.get("gate")
    if gate:
        parts.append(_gate_html(gate))
    return "\n".join(parts)


def _gate_html(gate: dict) -> str:
    """A green/red badge for the promotion decision followed by every reason."""
    promote = bool(gate.get("promote"))
    badge = (
        '<span class="badge pass">PROMOTE</span>'
        if promote
        else '<span class="badge fail">DO NOT PROMOTE</span>'
    )
    reasons = gate.get("reasons") or []
    items = "".join(f"<li>{_esc(reason)}</li>" for reason in reasons)
    body = f"<ul>{items}</ul>" if items else '<p class="note">No reasons given.</p>'
    said = f"<p><b>{_esc(gate['outcome'])}</b></p>" if gate.get("outcome") else ""
    return f'<div class="gate"><b>Promotion gate:</b> {badge}{said}{body}</div>'


# (label, key, format, direction hint, score for "best": higher score is better, or None)
_MetricRow = tuple[str, str, str, str, Callable[[float], float] | None]
_METRIC_ROWS: list[_MetricRow] = [
    ("Accuracy", "accuracy", ".3f", "↑", lambda v: v),
    ("Macro-F1", "macro_f1", ".3f", "↑", lambda v: v),
    ("ECE (calibrated)", "ece", ".3f", "↓", lambda v: -v),
    ("ECE before calibration", "ece_uncalibrated", ".3f", "↓", lambda v: -v),
    ("Temperature", "temperature", ".3f", "", None),
    ("Latency (ms/example)", "latency_ms_per_example", ".2f", "↓", lambda v: -v),
    ("Size (MB)", "model_size_mb", ".2f", "↓", lambda v: -v),
    # A gap of either sign is drift away from a well-fitted model, so closest to 0 wins.
    ("Train−val gap (macro-F1)", "train_val_gap", "+.3f", "→0", lambda v: -abs(v)),
    ("Registry version", "version", "", "", None),
]


_NEWER_ROWS = {"ece_uncalibrated", "temperature"}


def _best_columns(values: Sequence[Any], score: Callable[[float], float] | None) -> set[int]:
    """Indices of the best numeric values (all ties); empty unless two or more are comparable."""
    if score is None:
        return set()
    scored = {i: score(float(v)) for i, v in enumerate(values)
              if isinstance(v, (int, float)) and not isinstance(v, bool) and not _is_missing(v)}
    if len(scored) < 2:
        return set()
    top = max(scored.values())
    return {i for i, s in scored.items() if math.isclose(s, top, rel_tol=1e-9, abs_tol=1e-12)}


def _metric_cell(value: Any, spec: str, bold: bool) -> str:
    """One table cell, formatted, bold when it is the row's best."""
    text = html.escape(_fmt(value, spec)) if spec else _esc(value)
    return f"<td><b>{text}</b></td>" if bold else f"<td>{text}</td>"


def _metrics_table_html(models: dict[str, dict]) -> str:
    """The side-by-side table: one column per model, best value per row in bold."""
    header = "".join(f"<th>{_esc(_display_name(k, m))}</th>" for k, m in models.items())
    rows = []
    for label, key, spec, hint, score in _METRIC_ROWS:
        values = [m.get(key) for m in models.values()]
        if key in _NEWER_ROWS and all(_is_missing(v) for v in values):
            continue  # an evaluation from before calibration: no empty rows
        best = _best_columns(values, score)
        cells = "".join(_metric_cell(v, spec, i in best) for i, v in enumerate(values))
        rows.append(f'<tr><td class="label">{_esc(label)}</td>'
                    f'<td class="hint">{_esc(hint) if hint else ""}</td>{cells}</tr>')
    return (
        '<table><thead><tr><th class="label">Metric</th><th>better</th>'
        f"{header}</tr></thead><tbody>{''.join(rows)}</tbody></table>"
    )


# (label, key in the model's `abstention` entry, format)
_ABSTENTION_ROWS = [
    ("Threshold (calibrated confidence)", "threshold", ".3f"),
    ("Abstained (test rows)", "abstained", "d"),
    ("Coverage", "coverage", ".3f"),
    ("Selective accuracy", "selective_accuracy", ".3f"),
    ("Accuracy without abstaining", "accuracy_without_threshold", ".3f"),
    ("Out-of-scope recall", "oos_recall", ".3f"),
    ("Out-of-scope precision", "oos_precision", ".3f"),
    ("In-scope accuracy", "in_scope_accuracy", ".3f"),
    ("In-scope accuracy without threshold", "in_scope_accuracy_without_threshold", ".3f"),
]


def _abstention_html(models: dict[str, dict]) -> str:
    """What each model's "none of these" does on the test rows, and how its threshold was chosen."""
    entries: dict[str, dict] = {k: m["abstention"] for k, m in models.items() if m.get("abstention")}
    if not entries:
        return '<p class="note">No model here abstains (registered before abstention).</p>'
    header = "".join(f"<th>{_esc(_display_name(k, models[k]))}</th>" for k in entries)
    rows = []
    for label, key, spec in _ABSTENTION_ROWS:
        values = [e.get(key) for e in entries.values()]
        if all(v is None for v in values):
            continue
        cells = "".join(f"<td>{html.escape(_fmt(v, spec))}</td>" for v in values)
        rows.append(f'<tr><td class="label">{_esc(label)}</td>{cells}</tr>')
    rules = "".join(f"<li>{_esc(_display_name(k, models[k]))}: {_esc(e.get('rule'))}</li>" for k, e in entries.items())
    table = f'<table><thead><tr><th class="label"></th>{header}</tr></thead><tbody>{"".join(rows)}</tbody></table>'
    return table + f"<ul>{rules}</ul>"


def _risk_coverage_figure(models: dict[str, dict]) -> Any:
    """Error rate among the most confident answers as coverage grows: lower is better."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 3.8))
    ax = fig.add_subplot(1, 1, 1)
    for i, (key, model) in enumerate(models.items()):
        curve = model.get("risk_coverage") or []
        if curve:
            ax.plot([p["coverage"] for p in curve], [p["risk"] for p in curve], marker="o", markersize=3,
                    color=_PALETTE[i % len(_PALETTE)], label=_wrap(_display_name(key, model)))
        threshold = (model.get("abstention") or {}).get("coverage")
        if threshold is not None and curve:
            ax.axvline(threshold, color=_PALETTE[i % len(_PALETTE)], linestyle=":", linewidth=1)
    ax.set_xlabel("coverage (share of texts answered, most confident first)")
    ax.set_ylabel("error rate among answered")
    ax.set_title("Risk-coverage (dotted: each model's abstention threshold)", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return fig


def _risk_coverage_html(models: dict[str, dict]) -> str:
    """The risk-coverage figure, when any model has a curve."""
    if not any(m.get("risk_coverage") for m in models.values()):
        return ""
    return f"<figure>{_img(figure_to_data_uri(_risk_coverage_figure(models)), 'risk-coverage curves')}</figure>"


def _ordered_classes(labels: Sequence[str], per_class: dict) -> list[str]:
    """Classes in the evaluation's label order, then any extra ones the model reported."""
    ordered = [str(label) for label in labels]
    return ordered + [c for c in per_class if c not in ordered]


def _per_class_table_html(name: str, labels: Sequence[str], per_class: dict | None) -> str:
    """One model's precision/recall/F1/support table, in a card."""
    per_class = per_class or {}
    rows = []
    for cls in _ordered_classes(labels, per_class):
        stats = per_class.get(cls) or {}
        rows.append(
            f'<tr><td class="label">{_esc(cls)}</td>'
            f'<td>{_fmt(stats.get("precision"))}</td><td>{_fmt(stats.get("recall"))}</td>'
            f'<td>{_fmt(stats.get("f1"))}</td><td>{_fmt(stats.get("support"), "d")}</td></tr>'
        )
    body = "".join(rows) or f'<tr><td colspan="5">{MISSING}</td></tr>'
    return (
        f'<div class="card"><h3>{_esc(name)}</h3><table><thead><tr><th class="label">class</th>'
        f"<th>precision</th><th>recall</th><th>F1</th><th>support</th></tr></thead>"
        f"<tbody>{body}</tbody></table></div>"
    )


def _confusion_figure(name: str, labels: Sequence[str], matrix: Sequence[Sequence[Any]]) -> Any:
    """A heatmap of counts, coloured by row share so rare classes stay readable."""
    import numpy as np
    from matplotlib.figure import Figure

    counts = np.array([[0 if _is_missing(c) else c for c in row] for row in matrix], dtype=float)
    totals = counts.sum(axis=1, keepdims=True)
    share = np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)
    n = len(counts)
    side = max(3.2, 0.75 * n + 1.8)
    fig = Figure(figsize=(side + 0.6, side))
    ax = fig.subplots()
    image = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    for i in range(n):
        for j in range(counts.shape[1]):
            colour = "white" if share[i, j] > 0.55 else "#222"
            ax.text(j, i, f"{int(counts[i, j])}\n{share[i, j]:.0%}", ha="center", va="center",
                    color=colour, fontsize=10 if n <= 6 else 7)
    names = [str(label) for label in labels][: counts.shape[1]]
    ax.set_xticks(range(len(names)), names, rotation=30 if n > 3 else 0, ha="right" if n > 3 else "center")
    ax.set_yticks(range(min(n, len(labels))), [str(label) for label in labels][:n])
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(_wrap(name), fontsize=11)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of true row")
    fig.tight_layout()
    return fig


def _confusion_row_html(labels: Sequence[str], models: dict[str, dict]) -> str:
    """One embedded heatmap per model, side by side; a note where a matrix is missing."""
    cells = []
    for key, model in models.items():
        name = _display_name(key, model)
        matrix = model.get("confusion_matrix")
        if matrix:
            uri = figure_to_data_uri(_confusion_figure(name, labels, matrix))
            cells.append(f"<figure>{_img(uri, f'confusion matrix: {name}')}</figure>")
        else:
            cells.append(f'<div class="card"><h3>{_esc(name)}</h3>'
                         f'<p class="note">No confusion matrix {MISSING}</p></div>')
    return (
        '<p class="note">Cells show counts and the share of the true row; colour follows the share.</p>'
        f'<div class="grid">{"".join(cells)}</div>'
    )


def _reliability_bins(reliability: dict | None) -> list[tuple[int, float, float, int]]:
    """(bin index, mean confidence, accuracy, count) for the non-empty bins only."""
    reliability = reliability or {}
    conf = reliability.get("bin_confidence") or []
    acc = reliability.get("bin_accuracy") or []
    count = reliability.get("bin_count") or []
    bins = []
    for i, (c, a) in enumerate(zip(conf, acc)):
        n = count[i] if i < len(count) else None
        if not _is_missing(c) and not _is_missing(a) and (n is None or n > 0):
            bins.append((i, float(c), float(a), int(n or 0)))
    return bins


def _draw_reliability(ax: Any, name: str, model: dict, colour: str) -> None:
    """Bars span each equal-width bin at its accuracy; dots mark the bin's mean confidence."""
    reliability = model.get("reliability") or {}
    n_bins = len(reliability.get("bin_confidence") or []) or 10
    width = 1.0 / n_bins
    bins = _reliability_bins(reliability)
    ax.plot([0, 1], [0, 1], linestyle="--", color="#888", linewidth=1, label="perfect calibration")
    if bins:
        lefts = [i * width for i, _, _, _ in bins]
        ax.bar(lefts, [a for _, _, a, _ in bins], width=width, align="edge", color=colour,
               alpha=0.75, edgecolor="#333", linewidth=0.6, label="accuracy")
        ax.scatter([c for _, c, _, _ in bins], [a for _, _, a, _ in bins], s=14, color="#111",
                   zorder=3, label="mean confidence")
    else:
        ax.text(0.5, 0.5, f"no reliability data {MISSING}", ha="center", va="center", color="#777")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_aspect("equal")
    ax.set_xlabel("confidence")
    ax.set_title(f"{_wrap(name)}\nECE = {_fmt(model.get('ece'))}", fontsize=10)


def _reliability_figure(models: dict[str, dict]) -> Any:
    """One reliability subplot per model, sharing the accuracy axis."""
    from matplotlib.figure import Figure

    count = max(len(models), 1)
    fig = Figure(figsize=(3.3 * count + 0.5, 3.9))
    axes = fig.subplots(1, count, sharey=True, squeeze=False)[0]
    for index, (key, model) in enumerate(models.items()):
        _draw_reliability(axes[index], _display_name(key, model), model, _PALETTE[index % len(_PALETTE)])
    axes[0].set_ylabel("accuracy")
    axes[0].legend(loc="upper left", fontsize=7, frameon=False)
    fig.tight_layout()
    return fig


def _slice_columns(models: dict[str, dict]) -> list[str]:
    """Every slice column any model reports, in first-seen order."""
    columns: list[str] = []
    for model in models.values():
        for column in model.get("slices") or {}:
            if column not in columns:
                columns.append(column)
    return columns


def _slice_values(models: dict[str, dict], column: str) -> tuple[list[str], dict[str, Any]]:
    """The column's slice values in first-seen order, with the first reported row count of each."""
    values: list[str] = []
    rows: dict[str, Any] = {}
    for model in models.values():
        for value, stats in ((model.get("slices") or {}).get(column) or {}).items():
            if value not in values:
                values.append(value)
            if _is_missing(rows.get(value)):
                rows[value] = (stats or {}).get("rows")
    return values, rows


def _slice_figure(models: dict[str, dict], column: str) -> Any:
    """Grouped bars: macro-F1 per slice value (x), one bar per model; n rows under each value."""
    from matplotlib.figure import Figure

    values, rows = _slice_values(models, column)
    count = max(len(models), 1)
    group = 0.8
    width = group / count
    # Each bar needs ~0.35 in so its value label stays legible; the legend gets ~2.8 in on the right.
    axes_width = len(values) * max(1.0, 0.35 * count) + 0.8
    fig = Figure(figsize=(axes_width + 2.8, 3.6))
    ax = fig.subplots()
    for index, (key, model) in enumerate(models.items()):
        stats = ((model.get("slices") or {}).get(column)) or {}
        heights = [(stats.get(v) or {}).get("macro_f1") for v in values]
        xs = [x - group / 2 + width * (index + 0.5) for x in range(len(values))]
        heights = cast(list[float], [float("nan") if _is_missing(h) else h for h in heights])  # no None left
        bars = ax.bar(xs, heights, width=width * 0.95, color=_PALETTE[index % len(_PALETTE)],
                      label=_display_name(key, model))
        ax.bar_label(bars, labels=[_fmt(h, ".2f") if not _is_missing(h) else "" for h in heights],
                     fontsize=7, padding=1)
    many = len(values) > 6  # long value lists would collide on a flat axis
    ax.set_xticks(range(len(values)), [f"{v}\nn={_fmt(rows.get(v), 'd')}" for v in values],
                  rotation=35 if many else 0, ha="right" if many else "center")
    ax.set_ylim(0, 1.08)
    ax.set_ylabel("macro-F1")
    ax.set_title(f"macro-F1 by {column}", fontsize=11)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    # Legend outside on the right: any number of long display names fits without covering bars.
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    fig.tight_layout()
    return fig


def _slices_html(models: dict[str, dict]) -> str:
    """One grouped bar chart per slice column, or a note when there are no slices."""
    columns = _slice_columns(models)
    if not columns:
        return '<p class="note">No slices were evaluated.</p>'
    figures = []
    for column in columns:
        uri = figure_to_data_uri(_slice_figure(models, column))
        figures.append(f"<figure>{_img(uri, f'macro-F1 by {column}')}</figure>")
    return f'<div class="row">{"".join(figures)}</div>'


def _robustness_html(evaluation: dict) -> str:
    """Per perturbation, each model's share of answers kept and its macro-F1 drop, side by side."""
    models = {k: m["robustness"] for k, m in (evaluation.get("models") or {}).items() if m.get("robustness")}
    setup = evaluation.get("robustness") or {}
    if not models:
        return '<p class="note">Robustness was not measured (evaluate.robustness_rows: 0).</p>'
    names = evaluation["models"]
    header = "".join(f'<th colspan="2">{_esc(_display_name(k, names[k]))}</th>' for k in models)
    sub = "<th>answers kept ↑</th><th>macro-F1 drop ↓</th>" * len(models)
    rows = []
    for perturbation in setup.get("perturbations") or next(iter(models.values()))["perturbations"]:
        cells = "".join(f"<td>{_fmt(m['perturbations'].get(perturbation, {}).get('unchanged'))}</td>"
                        f"<td>{_fmt(m['perturbations'].get(perturbation, {}).get('macro_f1_drop'), '+.3f')}</td>"
                        for m in models.values())
        rows.append(f'<tr><td class="label">{_esc(perturbation)}</td>{cells}</tr>')
    pooled = "".join(f"<td><b>{_fmt(m.get('unchanged'))}</b></td><td></td>" for m in models.values())
    rows.append(f'<tr><td class="label"><b>all (pooled)</b></td>{pooled}</tr>')
    table = (f'<table><thead><tr><th class="label" rowspan="2">perturbation</th>{header}</tr><tr>{sub}</tr>'
             f"</thead><tbody>{''.join(rows)}</tbody></table>")
    note = (f'<p class="note">On {_esc(setup.get("rows"))} test rows; answers kept: the share whose answer on the '
            "perturbed text equals the answer on the clean one; drop: clean minus perturbed macro-F1 on those "
            "rows. The gate's robustness check compares the pooled share.</p>")
    return table + note


def _forgetting_html(evaluation: dict) -> str:
    """Each model's accuracy and macro-F1 on the regression set, per domain (earlier test rows,
    the regression file's slices) and pooled: what retraining may have forgotten."""
    regression = evaluation.get("regression") or {}
    models = {k: m for k, m in (regression.get("models") or {}).items() if k in (evaluation.get("models") or {})}
    if not regression.get("rows") or not models:
        return ('<p class="note">No regression set: no champion whose test rows this data still holds, '
                "and no evaluate.regression_file.</p>")
    names = evaluation["models"]
    header = "".join(f'<th colspan="2">{_esc(_display_name(k, names[k]))}</th>' for k in models)
    sub = "<th>accuracy ↑</th><th>macro-F1 ↑</th>" * len(models)
    rows = []
    for domain, count in (regression.get("domains") or {}).items():
        cells = "".join(f"<td>{_fmt(m['domains'].get(domain, {}).get('accuracy'))}</td>"
                        f"<td>{_fmt(m['domains'].get(domain, {}).get('macro_f1'))}</td>" for m in models.values())
        rows.append(f'<tr><td class="label">{_esc(domain)}</td><td>{_esc(count)}</td>{cells}</tr>')
    pooled = "".join(f"<td><b>{_fmt(m.get('accuracy'))}</b></td><td><b>{_fmt(m.get('macro_f1'))}</b></td>"
                     for m in models.values())
    rows.append(f'<tr><td class="label"><b>all (pooled)</b></td><td>{_esc(regression["rows"])}</td>{pooled}</tr>')
    table = (f'<table><thead><tr><th class="label" rowspan="2">domain</th><th rowspan="2">rows</th>{header}</tr>'
             f"<tr>{sub}</tr></thead><tbody>{''.join(rows)}</tbody></table>")
    note = ('<p class="note">Earlier test rows: this run\'s test rows that were test rows of the champion\'s data '
            "version too; the other domains come from evaluate.regression_file. The gate's forgetting check "
            "compares the challenger's pooled gate.slice_metric with the champion's.</p>")
    return table + note


def _history_figure(trials: Sequence[dict]) -> Any:
    """Validation macro-F1 per trial (pruned trials at their last scored epoch)
    with the best so far as a step line."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    done = sorted((t["number"], t["value"]) for t in trials
                  if t.get("state") == "COMPLETE" and not _is_missing(t.get("value")))
    pruned = [(t["number"], t["intermediate"][-1][1]) for t in trials
              if t.get("state") == "PRUNED" and t.get("intermediate")]
    fig = Figure(figsize=(6.4, 3.6))
    ax = fig.subplots()
    if done:
        ax.scatter(*zip(*done), color=_PALETTE[0], zorder=3, label="complete")
        best = [max(v for _, v in done[: i + 1]) for i in range(len(done))]
        last = max(t["number"] for t in trials)
        ax.step([n for n, _ in done] + [last], best + best[-1:], where="post", color="#333", linewidth=1,
                label="best so far")
    if pruned:
        ax.scatter(*zip(*pruned), marker="x", color=_PALETTE[3], zorder=3, label="pruned (last scored epoch)")
    ax.set_xlabel("trial")
    # trials are whole numbers; a linear axis's default locator is a MaxNLocator (AutoLocator)
    cast(MaxNLocator, ax.xaxis.get_major_locator()).set_params(integer=True)
    ax.set_ylabel("validation macro-F1")
    ax.set_title("Optimisation history", fontsize=11)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8, framealpha=0.8)
    fig.tight_layout()
    return fig


def _importance_figure(importances: dict[str, float]) -> Any:
    """Horizontal bars, most important setting on top."""
    from matplotlib.figure import Figure

    names = list(importances)[::-1]
    fig = Figure(figsize=(6.0, 0.35 * len(names) + 1.3))
    ax = fig.subplots()
    bars = ax.barh(names, [importances[n] for n in names], color=_PALETTE[0])
    ax.bar_label(bars, fmt="%.2f", fontsize=8, padding=2)
    ax.set_xlim(0, max(importances.values(), default=0) * 1.15 + 1e-9)
    ax.set_xlabel("importance (Optuna's PED-ANOVA, sums to 1)")
    ax.set_title("Parameter importances", fontsize=11)
    fig.tight_layout()
    return fig


def tuning_figures(tuning: dict) -> dict[str, Any]:
    """The search's plots by file stem: optimisation history, and parameter
    importances when enough trials completed to estimate them."""
    figures = {"optimisation_history": _history_figure(tuning.get("trials") or [])}
    if tuning.get("importances"):
        figures["param_importances"] = _importance_figure(tuning["importances"])
    return figures


def write_tuning_plots(tuning: dict, folder: Path) -> list[Path]:
    """Saves `tuning_figures` as PNG files in `folder`; returns their paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for stem, fig in tuning_figures(tuning).items():
        paths.append(folder / f"{stem}.png")
        fig.savefig(paths[-1], dpi=110, bbox_inches="tight", facecolor="white")
    return paths


def evaluation_figures(evaluation: dict) -> dict[str, Any]:
    """The evaluation's plots by file stem: one confusion matrix per model with
    one, and the reliability (calibration) diagram of all models."""
    models = evaluation.get("models") or {}
    labels = evaluation.get("labels") or []
    figures = {f"confusion_{key}": _confusion_figure(_display_name(key, model), labels, model["confusion_matrix"])
               for key, model in models.items() if model.get("confusion_matrix")}
    if models:
        figures["calibration"] = _reliability_figure(models)
    return figures


def write_evaluation_plots(evaluation: dict, folder: Path) -> list[Path]:
    """Saves `evaluation_figures` as PNG files in `folder` (emptied first); returns their paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.png"):
        old.unlink()
    paths = []
    for stem, fig in evaluation_figures(evaluation).items():
        paths.append(folder / f"{stem}.png")
        fig.savefig(paths[-1], dpi=110, bbox_inches="tight", facecolor="white")
    return paths


def _param_text(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return ", ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def _tuning_html(tuning: dict | None) -> list[str]:
    """The hyperparameter search: its outcome, best settings and plots (absent when not tuned)."""
    if not tuning:
        return []
    rows = "".join(f'<tr><td class="label">{_esc(k)}</td><td>{_esc(_param_text(v))}</td></tr>'
                   for k, v in (tuning.get("best_params") or {}).items())
    summary = (
        f'<p class="meta">Study <code>{_esc(tuning.get("study_name"))}</code>: {_esc(tuning.get("n_complete"))} '
        f'complete, {_esc(tuning.get("n_pruned"))} pruned, {_esc(tuning.get("n_failed"))} failed trials. Best: '
        f'trial {_esc(tuning.get("best_trial"))}, validation macro-F1 '
        f'<b>{_fmt(tuning.get("best_value"), ".4f")}</b>.</p>'
        f'<p class="note">Each trial trained on the same {_esc(tuning.get("train_rows"))} train rows and was '
        "scored on the validation rows; no test row was seen. The challenger above trained with these settings "
        "on every train row.</p>")
    plots = "".join(f"<figure>{_img(figure_to_data_uri(fig), stem.replace('_', ' '))}</figure>"
                    for stem, fig in tuning_figures(tuning).items())
    if not tuning.get("importances"):
        plots += '<p class="note">Too few completed trials to estimate parameter importances.</p>'
    elif (tuning.get("n_complete") or 0) < 10:
        plots += (f'<p class="note">Importances from {_esc(tuning.get("n_complete"))} completed trials '
                  "are a rough guide; a longer search sharpens them.</p>")
    table = ('<table><thead><tr><th class="label">setting</th><th>best value</th></tr></thead>'
             f"<tbody>{rows}</tbody></table>")
    return ["<h2>Tuning</h2>", summary, table, f'<div class="row">{plots}</div>']


def _body_html(evaluation: dict, title: str) -> str:
    """Every section of the report, in reading order."""
    models: dict[str, dict] = evaluation.get("models") or {}
    labels = [str(label) for label in evaluation.get("labels") or []]
    if not models:
        return _header_html(evaluation, title) + '<p class="note">No models were evaluated.</p>'
    per_class = "".join(
        _per_class_table_html(_display_name(k, m), labels, m.get("per_class")) for k, m in models.items()
    )
    reliability = _img(figure_to_data_uri(_reliability_figure(models)), "reliability diagrams")
    return "\n".join([
        _header_html(evaluation, title),
        "<h2>Metrics</h2>", _metrics_table_html(models),
        '<p class="note">Bold marks the best value in each row.</p>',
        "<h2>Per-class metrics</h2>", f'<div class="row">{per_class}</div>',
        "<h2>Confusion matrices</h2>", _confusion_row_html(labels, models),
        "<h2>Calibration (reliability diagrams)</h2>", f"<figure>{reliability}</figure>",
        '<p class="note">Probabilities are temperature-scaled on the validation split; the metrics table '
        "gives the test ECE before and after.</p>",
        "<h2>None of these (abstention)</h2>", _abstention_html(models), _risk_coverage_html(models),
        "<h2>Slices</h2>", _slices_html(models),
        "<h2>Robustness (perturbed test rows)</h2>", _robustness_html(evaluation),
        "<h2>Forgetting (regression set)</h2>", _forgetting_html(evaluation),
        *_tuning_html(evaluation.get("tuning")),
    ])


def render_evaluation_report(evaluation: dict, title: str = "tuneloop evaluation") -> str:
    """Returns the whole report as one self-contained HTML document string."""
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{_esc(title)}</title><style>{_CSS}</style></head>"
        f"<body>\n{_body_html(evaluation, title)}\n</body></html>\n"
    )


def write_evaluation_report(evaluation: dict, out_path: Path, title: str = "tuneloop evaluation") -> Path:
    """Writes one self-contained HTML file (plots embedded as base64 PNG) and returns out_path."""
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(render_evaluation_report(evaluation, title), encoding="utf-8")
    return out_path
