"""Choosing the base model among `baseline.candidates`: the pure decision as a table,
the settings checked at the edge, and the baseline stage on two tiny random BERTs
recording every candidate and handing its choice to finetune, evaluate and register."""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path

import pandas as pd
import pytest
from tiny_model import build_tiny_bert, sentiment_rows

from tuneloop.pipeline.params import ParamsError, parse_params
from tuneloop.plumbing.mlflow_model import CardFacts, base_choice_notes, model_card
from tuneloop.tasks.baseline import BaseScore, choose_base, run_baseline
from tuneloop.tasks.ingest import DataVersion
from tuneloop.values.config import BaselineConfig, ModelConfig
from tuneloop.values.errors import TuneloopError
from tuneloop.values.workspace import Workspace, read_json, write_json

LABELS = ["negative", "positive"]
FAST = BaselineConfig(batch_size=32, max_length=32, probe_c=(1.0,), latency_rows=16, device="cpu")


def scores(*rows: tuple[str, float, float]) -> list[BaseScore]:
    return [BaseScore(*row) for row in rows]


@pytest.mark.parametrize("rows, budget, expected", [
    ([("a", 0.80, 10.0), ("b", 0.85, 20.0)], 50.0, "b"),  # the better one, both within budget
    ([("a", 0.80, 10.0), ("b", 0.85, 60.0)], 50.0, "a"),  # the better one is over budget
    ([("a", 0.85, 10.0), ("b", 0.85, 5.0)], 50.0, "a"),  # a tie: the first listed, not the faster
    ([("a", 0.80, 10.0), ("b", 0.80 + 1e-12, 10.0)], 50.0, "a"),  # within float tolerance: a tie
    ([("a", 0.80, 50.0)], 50.0, "a"),  # at the budget is within it
    ([("a", 0.80, 500.0), ("b", 0.90, 900.0)], None, "b"),  # no budget (model.base alone)
])
def test_choose_base_keeps_the_best_validation_macro_f1_within_the_latency_budget(rows, budget, expected) -> None:
    choice, reasons = choose_base(scores(*rows), budget)
    assert choice == expected
    assert reasons[0].startswith(f"chose {expected}")
    assert [r.split(":")[0] for r in reasons[1:]] == [name for name, _, _ in rows]  # one line per candidate


def test_choose_base_says_which_candidates_are_over_the_budget() -> None:
    _, reasons = choose_base(scores(("a", 0.80, 10.0), ("b", 0.85, 60.0)), 50.0)
    assert reasons[1:] == ["a: validation macro-F1 0.8000, 10.00 ms per example (within budget 50 ms)",
                           "b: validation macro-F1 0.8500, 60.00 ms per example (over budget 50 ms)"]


def test_choose_base_refuses_when_no_candidate_is_within_the_budget() -> None:
    with pytest.raises(TuneloopError, match=r"^no base model in baseline.candidates scores within "
                                            r"gate.max_latency_ms \(50 ms per example\): a 60.0 ms, b 70.0 ms$"):
        choose_base(scores(("a", 0.80, 60.0), ("b", 0.85, 70.0)), 50.0)


def test_baseline_candidates_default_to_none_and_refuse_repeats_and_blanks() -> None:
    assert BaselineConfig().candidates == () and BaselineConfig().latency_rows == 256
    with pytest.raises(ParamsError, match="must not list a base model twice"):
        parse_params({"baseline": {"candidates": ["all-MiniLM-L6-v2", "all-MiniLM-L6-v2"]}})
    with pytest.raises(ParamsError, match="baseline.candidates must not be empty"):
        parse_params({"baseline": {"candidates": ["all-MiniLM-L6-v2", " "]}})


def test_a_candidate_that_is_not_a_model_folder_is_refused_in_one_line_before_any_model_loads(tmp_path) -> None:
    from tuneloop.pipeline.stages import candidate_bases

    params = parse_params({"baseline": {"candidates": ["all-MiniLM-L6-v2", str(tmp_path / "nowhere")]}})
    with pytest.raises(TuneloopError, match=r"^baseline.candidates\[1\]: base model '.*nowhere' is neither") as error:
        candidate_bases(params)
    assert "\n" not in str(error.value)
    assert list(candidate_bases(parse_params({}))) == ["all-MiniLM-L6-v2"]  # no candidates: model.base


@pytest.fixture(scope="module")
def two_bases(tiny_bert, tmp_path_factory) -> dict[str, Path]:
    """Two different tiny random BERTs: the session's (hidden 32) and a wider one of another seed."""
    wider = build_tiny_bert(tmp_path_factory.mktemp("tiny-bert-wide"), seed=7, hidden_size=48)
    return {str(tiny_bert): tiny_bert, str(wider): wider}


def split_workspace(root: Path) -> Workspace:
    """A workspace after ingest and split: toy sentiment rows with named labels."""
    ws = Workspace(root)
    frames = []
    for split, (n, seed) in {"train": (128, 0), "validation": (48, 1), "test": (48, 2)}.items():
        texts, labels = sentiment_rows(n, seed)
        frames.append(pd.DataFrame({"text": texts, "label": [LABELS[i] for i in labels], "split": split}))
    ws.splits.parent.mkdir(parents=True, exist_ok=True)
    pd.concat(frames, ignore_index=True).assign(row=lambda f: range(len(f))).to_parquet(ws.splits)
    write_json(ws.data_version, asdict(DataVersion("e" * 32, 1, "data/raw/x.csv", "x.csv", 224, 0)))
    return ws


def test_the_baseline_probes_every_candidate_on_the_same_rows_and_saves_the_chosen_ones_probe(
        two_bases, tmp_path) -> None:
    from tuneloop.model.classifier import read_meta
    from tuneloop.tasks.baseline import load_probe

    ws = split_workspace(tmp_path)
    result = run_baseline(FAST, ModelConfig(), two_bases, LABELS, ws, max_latency_ms=10_000.0)
    recorded = read_json(ws.base_choice)
    assert recorded == json.loads(json.dumps(result["base"]))
    assert [c["name"] for c in recorded["candidates"]] == list(two_bases)
    f1 = {c["name"]: c["validation_macro_f1"] for c in recorded["candidates"]}
    assert recorded["chosen"] == max(two_bases, key=lambda name: (f1[name], -list(two_bases).index(name)))
    assert all(0 < c["latency_ms_per_example"] < 10_000 for c in recorded["candidates"])
    assert read_meta(ws.probe_dir)["base_model"] == recorded["chosen"]  # finetune's head starts from it
    hidden = {str(p): w for p, w in zip(two_bases.values(), (32, 48))}
    assert load_probe(ws.probe_dir).weight.shape == (2, hidden[recorded["chosen"]])


def test_the_baseline_refuses_when_every_candidate_is_slower_than_the_budget(two_bases, tmp_path) -> None:
    ws = split_workspace(tmp_path)
    with pytest.raises(TuneloopError, match=r"^no base model in baseline.candidates scores within gate.max_latency_ms"):
        run_baseline(FAST, ModelConfig(), two_bases, LABELS, ws, max_latency_ms=1e-6)
    assert not ws.probe_dir.exists() and not ws.base_choice.exists()  # nothing half-written


def stage_params(two_bases: dict[str, Path], sandbox, name: str, **baseline):
    return parse_params({"model": {"base": next(iter(two_bases))}, "validate": {"labels": LABELS},
                         "baseline": {**asdict(replace(FAST, **baseline)), "candidates": list(two_bases)},
                         "mlflow": {"tracking_uri": sandbox.tracking_uri, "experiment": sandbox.experiment,
                                    "model_name": name}})


def test_the_baseline_stage_logs_every_candidate_and_the_later_stages_use_its_choice(
        two_bases, tmp_path, mlflow_sandbox, mlflow_model_name) -> None:
    import mlflow

    from tuneloop.pipeline import stages
    from tuneloop.plumbing.tracking import start_pipeline_run
    from tuneloop.tasks.gate import PROBE

    params = stage_params(two_bases, mlflow_sandbox, mlflow_model_name)
    ws = split_workspace(tmp_path)
    start_pipeline_run(params.mlflow, ws, {"data.md5": "e" * 32})
    result = stages.baseline(params, ws)
    chosen = result["base"]["chosen"]
    run = mlflow.MlflowClient().get_run(stages.tracking.last_stage_run(ws, "baseline", "e" * 32))
    names = [run.data.tags[f"baseline.candidate.{i}"] for i in range(2)]
    assert names == list(two_bases) and run.data.tags["baseline.base_model"] == chosen
    for i, candidate in enumerate(result["base"]["candidates"]):
        assert run.data.metrics[f"baseline.candidate.{i}.macro_f1"] == pytest.approx(candidate["validation_macro_f1"])
        assert run.data.metrics[f"baseline.candidate.{i}.latency_ms_per_example"] > 0

    assert stages.base_model(params, ws) == chosen  # what finetune, tune and evaluate load
    assert stages.finetune_inputs(params, ws)["base_model"] == chosen
    write_json(ws.evaluation, {"models": {PROBE: {"accuracy": 0.9, "macro_f1": 0.9, "ece": 0.05,
                                                  "latency_ms_per_example": 1.0}}})
    tags = stages.version_tags(params, ws, PROBE)
    assert tags["base_model.name"] == chosen
    assert [c["name"] for c in json.loads(tags["base_model.candidates"])] == list(two_bases)

    moved = stage_params({**two_bases, "x": Path()}, mlflow_sandbox, mlflow_model_name)
    with pytest.raises(TuneloopError, match=r"^baseline.candidates changed since the baseline chose a base model"):
        stages.base_model(moved, ws)


def test_without_candidates_the_base_is_model_base_and_no_choice_is_read(tmp_path) -> None:
    from tuneloop.pipeline import stages

    params = parse_params({"model": {"base": "/somewhere/model"}})
    assert stages.base_model(params, Workspace(tmp_path)) == "/somewhere/model"


def test_candidates_listed_but_never_probed_ask_for_the_baseline(tmp_path) -> None:
    from tuneloop.pipeline import stages

    params = parse_params({"baseline": {"candidates": ["all-MiniLM-L6-v2"]}})
    with pytest.raises(TuneloopError, match=r"reports/baseline.json is missing: run `tuneloop baseline` first"):
        stages.base_model(params, Workspace(tmp_path))


def test_the_model_card_names_every_candidate_and_the_chosen_base_by_folder_name() -> None:
    rows = [{"name": "all-MiniLM-L6-v2", "macro_f1": 0.81, "latency_ms": 3.5},
            {"name": "/models/bge-small", "macro_f1": 0.84, "latency_ms": 6.25}]
    notes = base_choice_notes(rows, "/models/bge-small")
    card = model_card(CardFacts("m", "d" * 32, "data/raw/x.csv", "bge-small (a local model folder)", "a" * 64,
                                "abc", {"macro_f1": 0.8}, (), notes), LABELS, "lora")
    assert ("- chosen among 2 base models by validation macro-F1 within the latency budget (linear probes on the "
            "same rows): all-MiniLM-L6-v2 macro-F1 0.8100, 3.50 ms per example; bge-small (chosen) macro-F1 "
            "0.8400, 6.25 ms per example\n") in card
    assert "/models" not in card  # a local path names this machine
    assert base_choice_notes([], "x") == ""
