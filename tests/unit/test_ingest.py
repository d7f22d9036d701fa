"""Ingest: any supported format reads to one canonical frame; DVC versions and restores the bytes.

The DVC round trip (ingest, ingest changed data, restore the first version
with the local cache gone) runs once for the module: each DVC call costs a
second or two.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd
import pytest

from tuneloop.tasks.ingest import (
    DataVersion,
    IngestConfig,
    IngestError,
    canonicalize,
    load_data_version,
    read_table,
    restore_data,
    run_ingest,
)
from tuneloop.values.workspace import Workspace

TWELVE_WORDS = "the plot drags in the middle but the ending lands very well"
LONG_TEXT = " ".join(["a long and winding review that keeps going"] * 3 + ["on", "and", "on"])

SOURCE_ROWS = pd.DataFrame({
    "text": ["A gripping, beautifully acted story.", "It was fine.", TWELVE_WORDS, LONG_TEXT, ""],
    "label": ["positive", "neutral", "negative", "positive", "negative"],
    "site": ["imdb", "imdb", "rt", "rt", "imdb"],
})

# what every format must read to: 1-based source rows, text, label, word-count bucket
CANONICAL = pd.DataFrame({
    "row": [1, 2, 3, 4, 5],
    "text": SOURCE_ROWS["text"].tolist(),
    "label": SOURCE_ROWS["label"].tolist(),
    "length_bucket": ["<10", "<10", "10-24", ">=25", "<10"],
})


def write_table(frame: pd.DataFrame, path: Path) -> Path:
    """Writes `frame` as CSV, JSON Lines or Parquet, chosen by the file extension."""
    if path.suffix == ".csv":
        frame.to_csv(path, index=False)
    elif path.suffix == ".jsonl":
        frame.to_json(path, orient="records", lines=True)
    else:
        frame.to_parquet(path, index=False)
    return path


def test_fixture_texts_have_the_word_counts_the_buckets_assume() -> None:
    assert [len(t.split()) for t in SOURCE_ROWS["text"]] == [5, 3, 12, 27, 0]


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_every_format_reads_to_the_same_canonical_frame(tmp_path: Path, suffix: str) -> None:
    raw = read_table(write_table(SOURCE_ROWS, tmp_path / f"reviews{suffix}"))
    frame, excluded = canonicalize(raw, IngestConfig())
    assert excluded == 0
    pd.testing.assert_frame_equal(frame, CANONICAL)


def test_slice_and_split_columns_are_carried_into_the_canonical_frame(tmp_path: Path) -> None:
    source = SOURCE_ROWS.assign(fold=["train", "train", "TEST ", "val", "train"])  # aliases normalised
    raw = read_table(write_table(source, tmp_path / "reviews.csv"))
    frame, _ = canonicalize(raw, IngestConfig(slice_columns=("site",), split_column="fold"))
    assert list(frame.columns) == ["row", "text", "label", "split", "site", "length_bucket"]
    assert frame["split"].tolist() == ["train", "train", "test", "validation", "train"]
    assert frame["site"].tolist() == ["imdb", "imdb", "rt", "rt", "imdb"]


def test_a_row_without_a_declared_split_keeps_an_empty_one_for_validate_to_name(tmp_path: Path) -> None:
    source = SOURCE_ROWS.assign(fold=["train", None, "test", "validation", "train"])
    raw = read_table(write_table(source, tmp_path / "reviews.csv"))
    frame, _ = canonicalize(raw, IngestConfig(split_column="fold"))
    assert frame["split"].tolist() == ["train", "", "test", "validation", "train"]


def test_renamed_source_columns_are_mapped_to_text_and_label(tmp_path: Path) -> None:
    source = SOURCE_ROWS.rename(columns={"text": "review", "label": "sentiment"})
    raw = read_table(write_table(source, tmp_path / "reviews.parquet"))
    frame, _ = canonicalize(raw, IngestConfig(text_column="review", label_column="sentiment"))
    pd.testing.assert_frame_equal(frame, CANONICAL)


def test_missing_column_raises_naming_it_and_listing_the_columns_present() -> None:
    with pytest.raises(IngestError) as error:
        canonicalize(SOURCE_ROWS, IngestConfig(text_column="review", slice_columns=("site", "genre")))
    message = str(error.value)
    assert "['review', 'genre']" in message
    assert "it has ['text', 'label', 'site']" in message


def test_excluded_labels_are_dropped_counted_and_keep_their_source_row_numbers() -> None:
    frame, excluded = canonicalize(SOURCE_ROWS, IngestConfig(exclude_labels=("neutral",)))
    assert excluded == 1
    assert frame["row"].tolist() == [1, 3, 4, 5]
    assert "neutral" not in set(frame["label"])
    assert list(frame.index) == [0, 1, 2, 3]


def test_empty_csv_text_stays_an_empty_string_not_nan(tmp_path: Path) -> None:
    path = tmp_path / "reviews.csv"
    path.write_text("text,label\n,negative\nNA,positive\nok then,positive\n")
    frame, _ = canonicalize(read_table(path), IngestConfig())
    assert frame["text"].tolist() == ["", "NA", "ok then"]
    assert frame["length_bucket"].tolist() == ["<10", "<10", "<10"]


def test_labels_are_stripped_of_surrounding_whitespace(tmp_path: Path) -> None:
    path = tmp_path / "reviews.csv"
    path.write_text("text,label\nnice one, positive\ndull,negative \n")
    frame, _ = canonicalize(read_table(path), IngestConfig())
    assert frame["label"].tolist() == ["positive", "negative"]


def test_read_table_rejects_unknown_format_and_missing_file(tmp_path: Path) -> None:
    (tmp_path / "reviews.xlsx").write_bytes(b"x")
    with pytest.raises(IngestError, match="unsupported format '.xlsx'"):
        read_table(tmp_path / "reviews.xlsx")
    with pytest.raises(IngestError, match="does not exist"):
        read_table(tmp_path / "nope.csv")


# --- DVC: snapshot, version, push, restore ---------------------------------------------


V1_CSV = b"text,label,site\nGreat movie!,positive,imdb\nawful plot,negative,rt\nmeh,neutral,rt\n,negative,imdb\n"
V2_CSV = b"text,label,site\nGreat movie!,positive,imdb\nawful plot,negative,rt\nloved it,positive,rt\n"


@dataclass(frozen=True)
class IngestRoundTrip:
    workspace: Workspace
    config: IngestConfig
    v1: DataVersion
    v1_version_json: dict
    v1_dataset: pd.DataFrame
    v2: DataVersion
    cache_existed: bool
    restored: Path


@pytest.fixture(scope="module")
def ingest_round_trip(tmp_path_factory: pytest.TempPathFactory) -> IngestRoundTrip:
    """Ingests V1, then V2 from the same source path, deletes the DVC cache and
    restores V1, all from a working directory outside the project (so no path
    may depend on the process's cwd)."""
    root = tmp_path_factory.mktemp("ingest_project")
    elsewhere = tmp_path_factory.mktemp("some_other_cwd")
    workspace = Workspace(root)
    config = IngestConfig(source="incoming/reviews.csv", exclude_labels=("neutral",), dvc_remote=".dvc-remote")
    source = root / "incoming" / "reviews.csv"
    source.parent.mkdir()
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(elsewhere)
        source.write_bytes(V1_CSV)
        v1 = run_ingest(config, workspace)
        v1_version_json = json.loads(workspace.data_version.read_text())
        v1_dataset = pd.read_parquet(workspace.dataset)
        source.write_bytes(V2_CSV)
        v2 = run_ingest(config, workspace)
        cache = root / ".dvc" / "cache"
        cache_existed = cache.is_dir()
        shutil.rmtree(cache)
        restored = restore_data(v1.md5, v1.size, v1.path, root, root / "data" / "restored" / "v1", config.dvc_remote)
    assert not list(elsewhere.iterdir()), "nothing may be written to the process's cwd"
    return IngestRoundTrip(workspace, config, v1, v1_version_json, v1_dataset, v2, cache_existed, restored)


def remote_object(root: Path, md5: str) -> Path:
    """Where DVC 3 stores a file with this md5 in a local remote."""
    return root / ".dvc-remote" / "files" / "md5" / md5[:2] / md5[2:]


def test_data_version_md5_is_the_md5_of_the_source_bytes(ingest_round_trip: IngestRoundTrip) -> None:
    v1 = ingest_round_trip.v1
    assert v1.md5 == hashlib.md5(V1_CSV).hexdigest()
    assert v1.size == len(V1_CSV)
    assert v1.short == v1.md5[:8]
    assert (v1.path, v1.source) == ("data/raw/reviews.csv", "incoming/reviews.csv")
    assert (v1.rows, v1.excluded_rows) == (3, 1)


def test_ingest_pushes_the_snapshot_to_the_local_remote_in_the_project(ingest_round_trip: IngestRoundTrip) -> None:
    root = ingest_round_trip.workspace.root
    assert remote_object(root, ingest_round_trip.v1.md5).read_bytes() == V1_CSV
    assert remote_object(root, ingest_round_trip.v2.md5).read_bytes() == V2_CSV
    # stored relative to .dvc/, so the project folder can move
    assert re.search(r"url = \.\./\.dvc-remote$", (root / ".dvc" / "config").read_text(), re.M)


def test_ingest_writes_prepared_dataset_and_version_json(ingest_round_trip: IngestRoundTrip) -> None:
    trip = ingest_round_trip
    assert trip.v1_version_json == asdict(trip.v1)
    expected = pd.DataFrame({
        "row": [1, 2, 4], "text": ["Great movie!", "awful plot", ""], "label": ["positive", "negative", "negative"],
        "length_bucket": ["<10", "<10", "<10"],
    })
    pd.testing.assert_frame_equal(trip.v1_dataset, expected)
    # the latest ingest is what the workspace now holds
    assert load_data_version(trip.workspace) == trip.v2
    assert pd.read_parquet(trip.workspace.dataset)["text"].tolist() == ["Great movie!", "awful plot", "loved it"]


def test_snapshot_under_data_raw_holds_the_latest_source_bytes(ingest_round_trip: IngestRoundTrip) -> None:
    root = ingest_round_trip.workspace.root
    assert (root / "data" / "raw" / "reviews.csv").read_bytes() == V2_CSV
    assert f"md5: {ingest_round_trip.v2.md5}" in (root / "data" / "raw" / "reviews.csv.dvc").read_text()


def test_changed_data_gets_a_new_md5(ingest_round_trip: IngestRoundTrip) -> None:
    v1, v2 = ingest_round_trip.v1, ingest_round_trip.v2
    assert v2.md5 == hashlib.md5(V2_CSV).hexdigest() != v1.md5
    assert (v2.rows, v2.excluded_rows) == (3, 0)


def test_restore_data_brings_back_first_version_bytes_from_the_remote(ingest_round_trip: IngestRoundTrip) -> None:
    trip = ingest_round_trip
    assert trip.cache_existed  # the cache really was there, and was deleted before restoring
    assert trip.restored == trip.workspace.root / "data" / "restored" / "v1" / "reviews.csv"
    assert trip.restored.read_bytes() == V1_CSV


def test_incoming_files_are_appended_to_the_source_as_a_new_data_version(tmp_path: Path) -> None:
    workspace = Workspace(tmp_path)
    write_table(SOURCE_ROWS, tmp_path / "reviews.csv")
    config = IngestConfig(source="reviews.csv", exclude_labels=("neutral",), incoming_dir="data/incoming")
    before = run_ingest(config, workspace)
    incoming = tmp_path / "data" / "incoming"
    incoming.mkdir(parents=True)
    write_table(pd.DataFrame({"text": ["Loved it", "Hated it"], "label": ["positive", "negative"]}),
                incoming / "batch-001.jsonl")
    after = run_ingest(config, workspace)
    assert after.md5 != before.md5
    assert after.rows == before.rows + 2
    assert after.incoming == ["data/incoming/batch-001.jsonl"]
    assert after.path == "data/raw/reviews+incoming.csv"
    frame = pd.read_parquet(workspace.dataset)
    assert frame["text"].tolist()[-2:] == ["Loved it", "Hated it"]
    assert frame["row"].tolist()[-2:] == [6, 7]  # row numbers of the merged snapshot


def test_incoming_file_without_the_label_column_is_refused_by_name(tmp_path: Path) -> None:
    write_table(SOURCE_ROWS, tmp_path / "reviews.csv")
    (tmp_path / "data" / "incoming").mkdir(parents=True)
    pd.DataFrame({"text": ["x"]}).to_csv(tmp_path / "data" / "incoming" / "bad.csv", index=False)
    with pytest.raises(IngestError, match=r"bad\.csv lacks columns \['label'\]"):
        run_ingest(IngestConfig(source="reviews.csv"), Workspace(tmp_path))


def test_ingest_keeps_the_remotes_other_options_such_as_an_s3_endpoint(tmp_path: Path) -> None:
    from tuneloop.tasks.ingest import open_dvc_repo

    open_dvc_repo(tmp_path, "s3://bucket/dvc").close()
    subprocess.run([sys.executable, "-m", "dvc", "remote", "modify", "tuneloop", "endpointurl",
                    "http://127.0.0.1:9000"], cwd=tmp_path, check=True, capture_output=True)
    open_dvc_repo(tmp_path, "s3://bucket/dvc").close()  # what every ingest does
    config = (tmp_path / ".dvc" / "config").read_text()
    assert "url = s3://bucket/dvc" in config
    assert "endpointurl = http://127.0.0.1:9000" in config


# --- hostile files: every text byte-exact or refused, nothing written (issue 21) ---------------


def project_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize("name, content, message", [
    ("nul.csv", b'text,label\n"The film\x00 was fine",positive\n"dull",negative\n',
     "column 'text', row 1 holds a NUL character, which cannot be kept as written (1 rows in all); remove it from "
     "the file"),
    ("nul.jsonl", b'{"text": "fine", "label": "positive"}\n{"text": "bad\\u0000", "label": "negative"}\n',
     "column 'text', row 2 holds a NUL character, which cannot be kept as written (1 rows in all); remove it from "
     "the file"),
    ("surrogate.jsonl", b'{"text": "fine", "label": "positive"}\n{"text": "bad \\ud800 one", "label": "negative"}\n',
     "column 'text', row 2 holds a lone surrogate (a \\ud800-\\udfff escape), which cannot be kept as written "
     "(1 rows in all); remove it from the file"),
    ("old-mac.csv", b"text,label\rgood film,positive\rbad film,negative\r",
     "ends its lines with CR alone (classic Mac); save it with LF or CRLF line ends"),
    ("old-mac.jsonl", b'{"text": "a", "label": "x"}\r{"text": "b", "label": "y"}\r',
     "ends its lines with CR alone (classic Mac); save it with LF or CRLF line ends"),
    ("header-only.csv", b"text,label\n", "has a header but no rows: nothing to learn from"),
    ("labels.jsonl", b'{"text": "a", "label": true}\n{"text": "b", "label": "true"}\n',
     "column 'label' spells the label 'true' as a boolean and as a string: write every label the same way (all "
     "strings, or all numbers and true/false)"),
    ("numbers.jsonl", b'{"text": "a", "label": 1}\n{"text": "b", "label": "1"}\n',
     "column 'label' spells the label '1' as a number and as a string: write every label the same way (all "
     "strings, or all numbers and true/false)"),
    ("nested.jsonl", b'{"text": "a", "label": ["x"]}\n',
     "column 'label', row 1: a label is one string, number or true/false, not a list or an object"),
])
def test_a_text_that_cannot_be_kept_byte_exact_or_a_label_spelled_two_ways_is_refused_and_nothing_is_written(
        tmp_path: Path, name: str, content: bytes, message: str) -> None:
    (tmp_path / name).write_bytes(content)
    before = project_files(tmp_path)
    with pytest.raises(IngestError) as refused:
        run_ingest(IngestConfig(source=name), Workspace(tmp_path))
    assert str(refused.value) in (f"{tmp_path / name}: {message}", f"{tmp_path / name} {message}")
    assert project_files(tmp_path) == before  # no snapshot, no DVC repo, no prepared data


def test_a_text_is_kept_exactly_as_written_quotes_newlines_and_spaces_included(tmp_path: Path) -> None:
    texts = ['  two  spaces, a "quote" and\na newline  ', "tab\there", "line\u2028separator (raw in JSON)", "x\r\ny"]
    frame = pd.DataFrame({"text": texts, "label": ["a", "b", "a", "b"]})
    frame.to_csv(tmp_path / "exact.csv", index=False)
    (tmp_path / "exact.jsonl").write_text("".join(json.dumps({"text": t, "label": "a"}, ensure_ascii=False) + "\n"
                                                  for t in texts))
    assert read_table(tmp_path / "exact.csv")["text"].tolist() == texts
    assert read_table(tmp_path / "exact.jsonl")["text"].tolist() == texts


def test_json_labels_are_text_by_one_rule_whole_numbers_without_a_fraction(tmp_path: Path) -> None:
    lines = [{"text": "a", "label": True}, {"text": "b", "label": False}, {"text": "c", "label": 1},
             {"text": "d", "label": 1.0}, {"text": "e", "label": 2.5}, {"text": "f", "label": None}]
    (tmp_path / "labels.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    frame, _ = canonicalize(read_table(tmp_path / "labels.jsonl"), IngestConfig())
    assert frame["label"].tolist() == ["true", "false", "1", "1", "2.5", None]


@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_a_pipe_or_a_device_as_the_source_is_refused_without_reading_it(tmp_path: Path, kind: str) -> None:
    import os

    source = tmp_path / "data.csv"
    if kind == "fifo":
        os.mkfifo(source)  # opening it to read would wait for a writer forever
    else:
        source.symlink_to("/dev/zero")  # reading it would never end
    before = project_files(tmp_path)
    with pytest.raises(IngestError) as refused:
        run_ingest(IngestConfig(source="data.csv"), Workspace(tmp_path))
    assert str(refused.value) == (f"data source {source} is not a regular file (a pipe or a device?); copy the data "
                                  "to a file")
    assert project_files(tmp_path) == before


def test_restoring_a_data_version_dvc_does_not_hold_fails_in_one_line_and_leaves_no_folder(
        ingest_round_trip: IngestRoundTrip) -> None:
    root = ingest_round_trip.workspace.root
    before = project_files(root)
    with pytest.raises(IngestError) as refused:
        restore_data("0123456789abcdef" * 2, 12, "data/raw/reviews.csv", root, root / "data" / "restored" / "v9",
                     ingest_round_trip.config.dvc_remote)
    assert str(refused.value) == ("DVC could not restore data version 0123456789abcdef0123456789abcdef: neither the "
                                  "project's DVC cache nor the remote .dvc-remote holds it; nothing was written")
    assert project_files(root) == before
