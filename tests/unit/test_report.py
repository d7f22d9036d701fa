"""The evaluation report: written, complete, escaped and tolerant of gaps."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from tuneloop.tasks.report import MISSING, figure_to_data_uri, write_evaluation_report

PNG = "data:image/png;base64,"


def _model(name: str, version: str | None, macro_f1: float, gap: float | None, slices: dict) -> dict:
    return {
        "name": name,
        "version": version,
        "accuracy": macro_f1 + 0.01,
        "macro_f1": macro_f1,
        "per_class": {
            "negative": {"precision": 0.80, "recall": 0.85, "f1": 0.82, "support": 530},
            "positive": {"precision": 0.84, "recall": 0.79, "f1": 0.81, "support": 526},
        },
        "confusion_matrix": [[450, 80], [110, 416]],
        "ece": 0.04,
        "reliability": {
            "bin_confidence": [None, None, None, None, None, 0.56, 0.66, 0.75, 0.85, 0.96],
            "bin_accuracy": [None, None, None, None, None, 0.52, 0.61, 0.72, 0.86, 0.95],
            "bin_count": [0, 0, 0, 0, 0, 60, 90, 150, 260, 496],
        },
        "slices": slices,
        "latency_ms_per_example": 1.9,
        "model_size_mb": 1.2,
        "train_val_gap": gap,
    }


def _slices(short_f1: float, long_f1: float) -> dict:
    return {
        "length_bucket": {
            "short": {"rows": 300, "accuracy": short_f1, "macro_f1": short_f1},
            "long": {"rows": 756, "accuracy": long_f1, "macro_f1": long_f1},
        },
        "source": {"web": {"rows": 1056, "accuracy": 0.8, "macro_f1": long_f1}},
    }


def _evaluation() -> dict:
    return {
        "data_version": "0123456789abcdef0123456789abcdef",
        "labels": ["negative", "positive"],
        "test_rows": 1056,
        "models": {
            "base_probe": _model("base <frozen> + logistic probe", None, 0.7712, None, _slices(0.74, 0.78)),
            "champion": _model("champion (registry)", "6", 0.8134, 0.02, _slices(0.79, 0.82)),
            "challenger": _model("challenger (LoRA, this run)", "7", 0.8256, 0.03, _slices(0.80, 0.83)),
        },
        "gate": {"promote": False, "reasons": ["macro-F1 gain 0.012 < 0.02 required", "ECE <= champion + 0.01"]},
    }


@pytest.fixture
def evaluation() -> dict:
    return _evaluation()


def _render(evaluation: dict, tmp_path: Path) -> str:
    out = write_evaluation_report(evaluation, tmp_path / "nested" / "report.html")
    assert out == tmp_path / "nested" / "report.html"
    return out.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def full_report(tmp_path_factory) -> tuple[dict, dict, str]:
    """The full fixture rendered once (each render draws six figures, ~1 s), with its input."""
    evaluation = _evaluation()
    before = copy.deepcopy(evaluation)
    text = _render(evaluation, tmp_path_factory.mktemp("full"))
    return before, evaluation, text


def test_report_is_written_with_each_model_name_and_formatted_macro_f1(full_report):
    text = full_report[2]
    assert text.startswith("<!DOCTYPE html>")
    for name in ("base &lt;frozen&gt; + logistic probe", "champion (registry)", "challenger (LoRA, this run)"):
        assert name in text
    for macro_f1 in ("0.771", "0.813", "0.826"):
        assert macro_f1 in text
    assert "0123456789abcdef0123456789abcdef" in text and "1056" in text


def test_best_macro_f1_is_bold_and_closest_to_zero_gap_wins(full_report):
    text = full_report[2]
    assert "<b>0.826</b>" in text and "<b>0.813</b>" not in text
    assert "<b>+0.020</b>" in text and "<b>+0.030</b>" not in text


def test_one_png_per_confusion_matrix_plus_reliability_plus_each_slice_column(full_report):
    text = full_report[2]
    models, reliability, slice_columns = 3, 1, 2
    assert text.count(PNG) == models + reliability + slice_columns


def test_gate_reasons_appear_html_escaped(full_report):
    text = full_report[2]
    assert "macro-F1 gain 0.012 &lt; 0.02 required" in text
    assert "ECE &lt;= champion + 0.01" in text
    assert "0.012 < 0.02" not in text
    assert "DO NOT PROMOTE" in text


def test_model_names_are_html_escaped(full_report):
    text = full_report[2]
    assert "<frozen>" not in text and text.count("base &lt;frozen&gt; + logistic probe") >= 2


def test_works_without_slices_or_gate(evaluation, tmp_path):
    for model in evaluation["models"].values():
        model["slices"] = {}
    evaluation.pop("gate")
    text = _render(evaluation, tmp_path)
    assert text.count(PNG) == 3 + 1
    assert "PROMOTE" not in text and "No slices were evaluated." in text


def test_passing_gate_gets_green_badge(evaluation, tmp_path):
    evaluation["models"] = {}  # no figures needed to check the header
    evaluation["gate"] = {"promote": True, "reasons": ["all checks passed"]}
    text = _render(evaluation, tmp_path)
    assert 'class="badge pass">PROMOTE' in text and "all checks passed" in text


def test_missing_values_render_as_dash(evaluation, tmp_path):
    probe = evaluation["models"]["base_probe"]
    probe.update(ece=None, latency_ms_per_example=None, reliability=None, confusion_matrix=None)
    probe["per_class"]["negative"]["precision"] = None
    evaluation["gate"] = None
    text = _render(evaluation, tmp_path)
    metrics_table = text.split("<h2>Metrics</h2>", 1)[1].split("</table>", 1)[0]
    # version, train-val gap, ECE and latency of the probe are all missing
    assert metrics_table.count(f"<td>{MISSING}</td>") == 4
    per_class = text.split("<h2>Per-class metrics</h2>", 1)[1].split("</table>", 1)[0]
    assert f"<td>{MISSING}</td>" in per_class
    # no heatmap for the probe, but the reliability figure still renders
    assert text.count(PNG) == 2 + 1 + 2


def test_no_models_still_writes_a_report(evaluation, tmp_path):
    evaluation["models"] = {}
    text = _render(evaluation, tmp_path)
    assert "No models were evaluated." in text and PNG not in text


def test_figure_to_data_uri_is_a_decodable_png():
    import base64

    from matplotlib.figure import Figure

    fig = Figure(figsize=(1, 1))
    fig.subplots().plot([0, 1], [0, 1])
    uri = figure_to_data_uri(fig)
    assert uri.startswith(PNG)
    assert base64.b64decode(uri[len(PNG):])[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_input_dict_is_not_mutated(full_report):
    before, after, _ = full_report
    assert after == before


def test_evaluation_plots_are_one_confusion_png_per_model_and_one_calibration_png(evaluation, tmp_path):
    from PIL import Image

    from tuneloop.tasks.report import write_evaluation_plots

    paths = write_evaluation_plots(evaluation, tmp_path / "plots")
    expected = {f"confusion_{key}.png" for key, model in evaluation["models"].items() if model.get("confusion_matrix")}
    assert {p.name for p in paths} == expected | {"calibration.png"}
    assert all(Image.open(p).size[0] > 200 for p in paths)


def _robustness(kept: float, typo_kept: float, typo_drop: float) -> dict:
    return {"rows": 500, "unchanged": kept, "clean_macro_f1": 0.8, "perturbations": {
        "lowercase": {"changed_texts": 480, "unchanged": 1.0, "macro_f1": 0.8, "macro_f1_drop": 0.0},
        "typos": {"changed_texts": 500, "unchanged": typo_kept, "macro_f1": 0.8 - typo_drop,
                  "macro_f1_drop": typo_drop}}}


def test_robustness_table_puts_champion_beside_challenger_per_perturbation(evaluation, tmp_path):
    evaluation["robustness"] = {"rows": 500, "perturbations": ["lowercase", "typos"], "typo_rate": 0.05}
    evaluation["models"]["champion"]["robustness"] = _robustness(0.97, 0.94, 0.021)
    evaluation["models"]["challenger"]["robustness"] = _robustness(0.91, 0.82, 0.064)
    text = _render(evaluation, tmp_path)
    section = text[text.index("<h2>Robustness"):]
    header = section[:section.index("</thead>")]
    assert header.index("champion (registry)") < header.index("challenger (LoRA, this run)")
    assert "base &lt;frozen&gt;" not in header  # a model without robustness scores gets no columns
    assert ('<td class="label">typos</td><td>0.940</td><td>+0.021</td><td>0.820</td><td>+0.064</td>'
            in section)
    assert "<td><b>0.970</b></td><td></td><td><b>0.910</b></td>" in section
    assert "On 500 test rows" in section


def test_report_without_robustness_says_it_was_not_measured(full_report):
    _, _, text = full_report
    assert "Robustness was not measured (evaluate.robustness_rows: 0)" in text


def _regression_scores(earlier: float, old_domain: float) -> dict:
    return {"rows": 150, "accuracy": (100 * earlier + 50 * old_domain) / 150, "macro_f1": 0.5, "domains": {
        "earlier test rows": {"rows": 100, "accuracy": earlier, "macro_f1": earlier - 0.01},
        "reviews 2019": {"rows": 50, "accuracy": old_domain, "macro_f1": old_domain - 0.01}}}


def test_forgetting_table_shows_each_domain_of_the_regression_set_per_model(evaluation, tmp_path):
    evaluation["regression"] = {"rows": 150, "domains": {"earlier test rows": 100, "reviews 2019": 50},
                                "models": {"champion": _regression_scores(0.9, 0.8),
                                           "challenger": _regression_scores(0.9, 0.5)}}
    text = _render(evaluation, tmp_path)
    section = text[text.index("<h2>Forgetting"):]
    header = section[:section.index("</thead>")]
    assert header.index("champion (registry)") < header.index("challenger (LoRA, this run)")
    assert "base &lt;frozen&gt;" not in header
    assert ('<td class="label">reviews 2019</td><td>50</td><td>0.800</td><td>0.790</td><td>0.500</td>'
            '<td>0.490</td>' in section)
    assert '<td class="label">earlier test rows</td><td>100</td><td>0.900</td>' in section
    assert '<td class="label"><b>all (pooled)</b></td><td>150</td><td><b>0.867</b></td>' in section


def test_report_without_a_regression_set_says_so(full_report):
    _, _, text = full_report
    assert "No regression set: no champion whose test rows this data still holds" in text
