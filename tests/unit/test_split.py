"""The split: stable as data grows, stratified in expectation, duplicate-safe, faithful to a declared split."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from tuneloop.tasks.split import SplitConfig, load_split, run_split, split_dataset
from tuneloop.values.workspace import Workspace


def synthetic_frame(n: int = 1000, positive_share: float = 0.7) -> pd.DataFrame:
    """`n` distinct texts, the first `positive_share` of them positive (rows shuffled)."""
    rng = np.random.default_rng(0)
    labels = np.where(np.arange(n) < int(n * positive_share), "positive", "negative")
    order = rng.permutation(n)
    return pd.DataFrame({
        "row": np.arange(1, n + 1),
        "text": [f"review number {i} of the set" for i in order],
        "label": labels[order],
    })


def test_same_data_and_seed_give_identical_split() -> None:
    frame = synthetic_frame()
    first = split_dataset(frame, SplitConfig(seed=42))
    again = split_dataset(frame.copy(), SplitConfig(seed=42))
    pd.testing.assert_frame_equal(first, again)


def test_split_adds_only_a_split_column_and_keeps_rows_in_order() -> None:
    frame = synthetic_frame(200)
    out = split_dataset(frame, SplitConfig())
    pd.testing.assert_frame_equal(out.drop(columns="split"), frame)
    assert set(out["split"]) == {"train", "validation", "test"}
    assert "split" not in frame.columns  # the input is not modified


def test_different_seed_gives_different_test_rows() -> None:
    frame = synthetic_frame()
    test_a = set(split_dataset(frame, SplitConfig(seed=1)).query("split == 'test'")["row"])
    test_b = set(split_dataset(frame, SplitConfig(seed=2)).query("split == 'test'")["row"])
    assert len(test_a) == pytest.approx(100, abs=30) and len(test_b) == pytest.approx(100, abs=30)
    assert len(test_a & test_b) < 40  # about 10 expected by chance


def test_split_is_stratified_by_label_in_expectation() -> None:
    # a pure hash of the text stratifies in expectation: on 1,000-row splits the
    # share's standard deviation is 0.0145, so 3 of them bound it
    frame = synthetic_frame(10000, positive_share=0.7)
    out = split_dataset(frame, SplitConfig(validation_fraction=0.1, test_fraction=0.1, seed=5))
    overall = (out["label"] == "positive").mean()
    for name in ("train", "validation", "test"):
        share = (out.loc[out["split"] == name, "label"] == "positive").mean()
        assert share == pytest.approx(overall, abs=0.05), name


def test_fractions_are_respected() -> None:
    out = split_dataset(synthetic_frame(1000), SplitConfig(validation_fraction=0.15, test_fraction=0.2, seed=3))
    counts = out["split"].value_counts()
    # binomial counts: within 3 standard deviations (13, 11 and 15 rows)
    assert counts["test"] == pytest.approx(200, abs=39)
    assert counts["validation"] == pytest.approx(150, abs=33)
    assert counts["train"] == pytest.approx(650, abs=45)


@pytest.mark.parametrize("seed", range(12))
def test_texts_equal_after_normalisation_always_share_a_split(seed: int) -> None:
    frame = synthetic_frame(300)
    dupes = pd.DataFrame({
        "row": [901, 902, 903, 904, 905],
        "text": ["Great movie!", "great   movie", "GREAT MOVIE", "Awful, simply awful.", "awful simply awful"],
        "label": ["positive", "positive", "negative", "negative", "negative"],
    })
    out = split_dataset(pd.concat([frame, dupes], ignore_index=True), SplitConfig(seed=seed))
    where = dict(zip(out["row"], out["split"]))
    assert where[901] == where[902] == where[903]  # even when a duplicate's label disagrees
    assert where[904] == where[905]


def test_declared_split_column_is_kept_with_aliases_normalised() -> None:
    frame = pd.DataFrame({
        "row": [1, 2, 3, 4, 5, 6],
        "text": ["a b c", "d e f", "g h i", "j k l", "m n o", "a b c!"],
        "label": ["positive", "negative"] * 3,
        "split": ["train", "val", "test", "Validation", "dev", "test"],
    })
    out = split_dataset(frame, SplitConfig(seed=0))
    # row 6 ("a b c!") repeats train row 1 after normalisation: it joins train, never scored on
    assert out["split"].tolist() == ["train", "validation", "test", "validation", "validation", "train"]


def test_a_declared_split_with_an_unknown_value_is_an_error_not_a_random_split() -> None:
    frame = synthetic_frame(20)
    frame["split"] = ["train"] * 19 + ["tset"]
    with pytest.raises(ValueError, match=r"1 rows declare a split outside .*'tset'"):
        split_dataset(frame, SplitConfig())


def test_declared_split_is_the_same_whatever_the_seed() -> None:
    frame = synthetic_frame(50)
    frame["split"] = ["test" if i % 5 == 0 else "validation" if i % 5 == 1 else "train" for i in range(50)]
    for seed in (0, 1, 99):
        assert split_dataset(frame, SplitConfig(seed=seed))["split"].tolist() == frame["split"].tolist()


@pytest.mark.parametrize("validation, test", [(0.5, 0.5), (0.6, 0.5)])
def test_split_config_rejects_fractions_summing_to_one_or_more(validation: float, test: float) -> None:
    with pytest.raises(ValueError, match="validation_fraction \\+ test_fraction must be below 1"):
        SplitConfig(validation_fraction=validation, test_fraction=test)


@pytest.mark.parametrize("validation, test", [(-0.1, 0.2), (0.0, 0.2), (0.1, 0.0)])
def test_split_config_rejects_an_empty_or_negative_fraction(validation: float, test: float) -> None:
    # fine-tuning early-stops on validation and the gate scores test: neither may be empty
    with pytest.raises(ValueError, match="must be positive"):
        SplitConfig(validation_fraction=validation, test_fraction=test)


def test_no_row_ever_changes_split_as_the_data_grows() -> None:
    rng = np.random.default_rng(7)
    texts = [f"request {i} about topic {rng.integers(50)}" for i in range(5200)]
    labels = rng.choice(["a", "b", "c"], size=5200)
    seen: dict[str, str] = {}
    for size in (1000, 2000, 3000, 5000, 5200):
        frame = pd.DataFrame({"row": np.arange(size), "text": texts[:size], "label": labels[:size]})
        out = split_dataset(frame, SplitConfig(seed=42))
        moved = [t for t, s in zip(out["text"], out["split"]) if seen.setdefault(t, s) != s]
        assert moved == [], f"{len(moved)} rows changed split at {size} rows"
    assert pd.Series(list(seen.values())).value_counts().to_dict().keys() == {"train", "validation", "test"}


def test_a_declared_split_without_validation_gets_it_carved_from_train_rows() -> None:
    frame = synthetic_frame(1000)
    frame["split"] = ["test" if i % 10 == 0 else "train" for i in range(1000)]
    out = split_dataset(frame, SplitConfig(validation_fraction=0.1, seed=3))
    assert (out.loc[frame["split"] == "test", "split"] == "test").all()  # declared test rows stay test
    carved = out.loc[frame["split"] == "train", "split"].value_counts().to_dict()
    assert set(carved) == {"train", "validation"}
    assert carved["validation"] == pytest.approx(90, abs=30)
    for label in ("positive", "negative"):  # every class gets validation rows
        assert ((out["split"] == "validation") & (out["label"] == label)).sum() > 10
    again = split_dataset(frame, SplitConfig(validation_fraction=0.1, seed=3))
    assert again["split"].tolist() == out["split"].tolist()


def test_a_declared_split_with_only_train_gets_validation_and_test_carved() -> None:
    frame = synthetic_frame(500)
    frame["split"] = "train"
    counts = split_dataset(frame, SplitConfig(seed=1))["split"].value_counts().to_dict()
    assert set(counts) == {"train", "validation", "test"} and counts["train"] > 350


def test_a_declared_split_without_train_rows_is_an_error_naming_the_fix() -> None:
    frame = synthetic_frame(20)
    frame["split"] = ["validation"] * 10 + ["test"] * 10
    with pytest.raises(ValueError, match="no row is a train row"):
        split_dataset(frame, SplitConfig())


def test_run_split_writes_splits_parquet_and_counts_rows(tmp_path) -> None:
    workspace = Workspace(tmp_path)
    workspace.dataset.parent.mkdir(parents=True)
    synthetic_frame(100).to_parquet(workspace.dataset, index=False)
    counts = run_split(SplitConfig(validation_fraction=0.1, test_fraction=0.2, seed=4), workspace)
    assert sum(counts.values()) == 100 and min(counts.values()) > 0
    written = pd.read_parquet(workspace.splits)
    assert written["split"].value_counts().to_dict() == {k: v for k, v in counts.items()}
    test = load_split(workspace, "test")
    assert len(test) == counts["test"] and list(test.index) == list(range(counts["test"]))
    assert set(test["row"]) == set(written.loc[written["split"] == "test", "row"])


def test_declared_validation_or_test_rows_repeating_a_train_text_join_train(tmp_path) -> None:
    frame = synthetic_frame(100)
    frame["split"] = ["train"] * 80 + ["validation"] * 10 + ["test"] * 10
    frame.loc[95, "text"] = frame.loc[3, "text"].upper() + "!"  # a test row repeating train row 3
    out = split_dataset(frame, SplitConfig())
    assert out.loc[95, "split"] == "train"
    assert (out["split"] != frame["split"]).sum() == 1
    workspace = Workspace(tmp_path)
    workspace.dataset.parent.mkdir(parents=True)
    frame.to_parquet(workspace.dataset, index=False)
    assert run_split(SplitConfig(), workspace) == {"train": 81, "validation": 10, "test": 9, "leaked_to_train": 1}
