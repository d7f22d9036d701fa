"""`tuneloop init` and the file reader it shares with ingest: any labelled file starts a project."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tuneloop.init import InitError, fitted_bounds, init_project, propose_columns
from tuneloop.pipeline.params import load_params
from tuneloop.tasks.ingest import IngestError, read_table

ROWS = [("wake me up at seven", "alarm_set"), ("what time is it", "datetime_query"), ("up", "volume_up"),
        ("turn the lights off", "iot_hue_lightoff"), ("play some jazz", "play_music")] * 12


def frame() -> pd.DataFrame:
    return pd.DataFrame({"utterance": [t for t, _ in ROWS], "intent": [label for _, label in ROWS],
                         "scenario": [label.split("_")[0] for _, label in ROWS]})


@pytest.mark.parametrize("name, write", [
    ("comma.csv", lambda f, p: f.to_csv(p, index=False)),
    ("semicolon.csv", lambda f, p: f.to_csv(p, index=False, sep=";")),
    ("tab.tsv", lambda f, p: f.to_csv(p, index=False, sep="\t")),
    ("bom.csv", lambda f, p: p.write_bytes(b"\xef\xbb\xbf" + f.to_csv(index=False).encode())),
    ("lines.jsonl", lambda f, p: f.to_json(p, orient="records", lines=True)),
    ("table.parquet", lambda f, p: f.to_parquet(p, index=False)),
])
def test_every_supported_format_reads_to_the_same_table(tmp_path: Path, name: str, write) -> None:
    path = tmp_path / name
    write(frame(), path)
    pd.testing.assert_frame_equal(read_table(path).astype(str), frame().astype(str))


@pytest.mark.parametrize("content, message", [
    ("caf\xe9,label\n".encode("latin-1"), r"is not UTF-8 \(line 1, byte 3\): save it as UTF-8"),
    (b"", "is empty"),
    (b"  \n\n", "is empty"),
    (b"text,label\nfine,a\ntoo,many,fields\n", "line 3 has 3 fields where the header has 2 .comma-separated."),
    (b"text,text\nhello,a\n", r"column\(s\) \['text'\] appear more than once"),
    (b"text;label\nx;y;z\n", "line 2 has 3 fields where the header has 2 .semicolon-separated."),
])
def test_a_malformed_csv_is_one_clear_error_naming_the_line_and_never_its_contents(
        tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "data.csv"
    path.write_bytes(content)
    with pytest.raises(IngestError, match=message) as error:
        read_table(path)
    assert "many,fields" not in str(error.value) and "caf" not in str(error.value)


def test_a_jsonl_file_with_a_broken_line_names_that_line(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "a", "label": "x"}\n{"text": "b", "label": \n[1, 2]\n')
    with pytest.raises(IngestError, match="line 2 is not valid JSON"):
        read_table(path)
    path.write_text('{"text": "a", "label": "x"}\n[1, 2]\n')
    with pytest.raises(IngestError, match="line 2 is not a JSON object"):
        read_table(path)


def test_a_folder_or_an_unknown_format_is_refused_by_name(tmp_path: Path) -> None:
    with pytest.raises(IngestError, match="is a folder"):
        read_table(tmp_path)
    (tmp_path / "data.xlsx").write_bytes(b"x")
    with pytest.raises(IngestError, match="unsupported format '.xlsx'"):
        read_table(tmp_path / "data.xlsx")


def test_columns_are_proposed_by_name_and_shape_and_flags_override_them() -> None:
    proposed = propose_columns(frame())
    assert (proposed.text, proposed.label, proposed.split, proposed.slices) == (
        "utterance", "intent", None, ("scenario",))
    unnamed = frame().rename(columns={"utterance": "a", "intent": "b"}).assign(b=lambda f: f["b"] + "!")
    unnamed["scenario"] = ["x", "y"] * 30  # fewer values than b: the shape alone would take it
    assert (propose_columns(unnamed).text, propose_columns(unnamed).label) == ("a", "scenario")
    assert propose_columns(unnamed, label="b").label == "b"
    with pytest.raises(InitError, match="column 'nope' is not in the file"):
        propose_columns(frame(), text="nope")


def test_a_column_of_train_validation_test_values_is_proposed_as_the_split() -> None:
    data = frame().assign(split=["train", "dev", "test", "train", "train"] * 12)
    assert propose_columns(data).split == "split"
    assert "split" not in propose_columns(data).slices


def test_bounds_fit_the_data_and_say_which_rows_the_defaults_would_refuse() -> None:
    texts = pd.Series(["up"] + ["a normal request"] * 99)
    labels = pd.Series(["small"] * 38 + ["big"] * 62)
    bounds, notes = fitted_bounds(texts, labels)
    assert bounds["min_text_chars"] == 2 and bounds["min_rows_per_class"] == 38
    assert any("refuse 1 short texts, e.g. rows [1]" in note for note in notes)
    assert any("'small': 38" in note for note in notes)
    tiny, _ = fitted_bounds(pd.Series(["text"] * 55), pd.Series(["a"] * 3 + ["b"] * 52))
    assert tiny["min_rows_per_class"] == 10  # a 3-row class stays refused: too few to learn or measure


def test_init_writes_a_project_whose_params_load_with_labels_auto_and_git_and_dvc_set_up(tmp_path: Path) -> None:
    data = tmp_path / "my intents.csv"
    frame().to_csv(data, index=False, sep=";")
    folder = tmp_path / "project"
    proposal = init_project(data, folder)
    params = load_params(folder / "params.yaml")
    assert params.ingest.source == str(data.resolve())
    assert (params.ingest.text_column, params.ingest.label_column) == ("utterance", "intent")
    assert params.validate_.labels == "auto" and params.declared_labels is None
    assert params.validate_.min_text_chars == 2  # "up"
    assert params.mlflow.model_name == "project-classifier"
    assert proposal.labels == sorted({label for _, label in ROWS})
    assert (folder / ".git").is_dir() and (folder / ".dvc").is_dir()
    pipeline = (folder / "dvc.yaml").read_text()
    assert "tasks/" not in pipeline and "tuneloop/" not in pipeline  # no deps on tuneloop's own source files
    assert "plots/confusion.csv" in pipeline and "${ingest.incoming_dir}" in pipeline
    ignored = (folder / ".gitignore").read_text()
    assert "/models/" in ignored and "/metrics/" not in ignored  # metrics/ is small and in git
    assert (folder / "data" / "incoming" / ".gitkeep").exists()  # ingest's dependency exists from the start
    with pytest.raises(InitError, match="exists; pass --force"):
        init_project(data, folder)


def test_labels_ending_in_a_question_mark_survive_the_written_yaml(tmp_path: Path) -> None:
    data = tmp_path / "faq.jsonl"
    rows = [{"question": f"question {i} here", "answer_type": "why?" if i % 2 else "how: now"} for i in range(40)]
    data.write_text("\n".join(json.dumps(r) for r in rows))
    init_project(data, tmp_path / "faq")
    raw = yaml.safe_load((tmp_path / "faq" / "params.yaml").read_text())
    assert raw["ingest"]["label_column"] == "answer_type"
    assert load_params(tmp_path / "faq" / "params.yaml").ingest.text_column == "question"


def test_init_refuses_a_file_without_two_labels(tmp_path: Path) -> None:
    data = tmp_path / "one.csv"
    pd.DataFrame({"text": ["a b c", "d e f"] * 10, "label": ["x"] * 20}).to_csv(data, index=False)
    with pytest.raises(InitError, match="fewer than 2 labels|no column looks like a label"):
        init_project(data, tmp_path / "p")


def test_a_declared_split_that_leaks_is_named_and_its_rule_becomes_a_warning(tmp_path: Path) -> None:
    data = frame().assign(split=["train"] * 50 + ["test"] * 10)
    data.loc[55, "utterance"] = "WAKE me up at seven!"  # repeats a train text
    path = tmp_path / "folds.csv"
    data.to_csv(path, index=False)
    proposal = init_project(path, tmp_path / "p")
    params = load_params(tmp_path / "p" / "params.yaml")
    assert params.ingest.split_column == "split"
    assert params.validate_.severity["split_leakage"] == "warning"
    assert any("repeat a train text" in note and "moves them to train" in note for note in proposal.notes)
    clean = frame().assign(split=["train"] * 50 + ["test"] * 10, utterance=[f"text {i}" for i in range(60)])
    clean.to_csv(path, index=False)
    init_project(path, tmp_path / "q")
    assert load_params(tmp_path / "q" / "params.yaml").validate_.severity["split_leakage"] == "error"


def test_dvc_plots_show_in_an_init_project_renders_offline_and_its_page_is_git_ignored(tmp_path: Path) -> None:
    import subprocess
    import sys

    data = tmp_path / "intents.csv"
    frame().to_csv(data, index=False)
    folder = tmp_path / "project"
    init_project(data, folder)
    (folder / "plots").mkdir()
    (folder / "plots" / "confusion.csv").write_text("actual,predicted\na,a\na,b\nb,b\n")
    (folder / "plots" / "calibration.csv").write_text("confidence,accuracy,rows\n0.55,0.5,2\n0.95,1.0,1\n")
    (folder / "plots" / "training.csv").write_text("epoch,step,val_macro_f1\n0,0,0.6\n1,10,0.8\n")
    dvc = Path(sys.executable).with_name("dvc")
    done = subprocess.run([str(dvc), "plots", "show"], cwd=folder, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    page = (folder / "dvc_plots" / "index.html").read_text()
    assert "<script src=" not in page and "cdn.jsdelivr" not in page  # nothing fetched
    assert "vega-embed 6.18.2" in page and page.count("vegaEmbed(") >= 3  # the libraries inline, three plots
    ignored = subprocess.run(["git", "check-ignore", "dvc_plots/index.html"], cwd=folder, capture_output=True)
    assert ignored.returncode == 0
