"""The baseline's embedding cache: a retrain on grown data embeds only the new texts,
and its probe is the one a run without the cache fits."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from test_base_choice import FAST, LABELS, split_workspace
from tiny_model import build_tiny_bert

from tuneloop.tasks.baseline import EmbeddingCache, encoder_key, load_probe, run_baseline
from tuneloop.values.config import ModelConfig
from tuneloop.values.workspace import Workspace


class Counting:
    """A stand-in encoder: each text's vector is its length and first letter's code,
    and every call is recorded."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def __call__(self, texts: list[str]) -> np.ndarray:
        self.calls.append(list(texts))
        return np.array([[len(t), ord(t[0]) if t else 0] for t in texts], dtype=np.float32).reshape(-1, 2)


def test_only_texts_not_embedded_before_are_computed_and_rows_keep_their_order(tmp_path) -> None:
    compute = Counting()
    first = EmbeddingCache.open(tmp_path, "k")
    assert first.embed(["ab", "c"], compute).tolist() == [[2, 97], [1, 99]]
    first.save()
    second = EmbeddingCache.open(tmp_path, "k")
    out = second.embed(["dddd", "c", "ab", "c"], compute)
    assert out.tolist() == [[4, 100], [1, 99], [2, 97], [1, 99]]
    assert compute.calls == [["ab", "c"], ["dddd"]]  # one call, new texts only
    assert (second.computed, second.reused) == (1, 3)
    assert EmbeddingCache.open(tmp_path, "k").embed(["e", "e"], compute).tolist() == [[1, 101], [1, 101]]
    assert compute.calls[-1] == ["e"]  # a text repeated in one call is embedded once


def test_a_fully_cached_call_computes_nothing_and_an_empty_call_keeps_the_width(tmp_path) -> None:
    compute = Counting()
    cache = EmbeddingCache.open(tmp_path, "k")
    cache.embed(["x"], compute)
    assert cache.embed(["x", "x"], compute).tolist() == [[1, 120], [1, 120]]
    assert cache.embed([], compute).shape == (0, 2)
    assert compute.calls == [["x"]]


def test_the_file_keeps_only_the_last_runs_texts(tmp_path) -> None:
    compute = Counting()
    old = EmbeddingCache.open(tmp_path, "k")
    old.embed(["gone", "kept"], compute)
    old.save()
    new = EmbeddingCache.open(tmp_path, "k")
    new.embed(["kept"], compute)
    new.save()
    assert len(EmbeddingCache.open(tmp_path, "k").known) == 1
    assert compute.calls == [["gone", "kept"]]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k.npz"]  # no partial file left


def test_an_unreadable_cache_file_is_ignored_and_replaced(tmp_path) -> None:
    (tmp_path / "k.npz").write_text("not a numpy archive")
    compute = Counting()
    cache = EmbeddingCache.open(tmp_path, "k")
    assert cache.embed(["ab"], compute).tolist() == [[2, 97]] and cache.computed == 1
    cache.save()
    assert list(EmbeddingCache.open(tmp_path, "k").known.values())[0].tolist() == [2, 97]


def test_digests_that_end_in_a_zero_byte_survive_the_round_trip(tmp_path) -> None:
    from tuneloop.tasks.baseline import text_digests

    texts = [f"text {i}" for i in range(2000)]
    assert any(d.endswith(b"\0") for d in text_digests(texts))  # ~8 of 2,000 do
    compute = Counting()
    cache = EmbeddingCache.open(tmp_path, "k")
    cache.embed(texts, compute)
    cache.save()
    again = EmbeddingCache.open(tmp_path, "k")
    again.embed(texts, compute)
    assert (again.computed, again.reused) == (0, 2000)


def test_the_key_changes_with_weights_tokenizer_pooling_and_length(tiny_bert, tmp_path) -> None:
    key = encoder_key(tiny_bert, "mean", 32)
    assert encoder_key(tiny_bert, "mean", 32) == key
    assert len({key, encoder_key(tiny_bert, "cls", 32), encoder_key(tiny_bert, "mean", 64)}) == 3
    other = build_tiny_bert(tmp_path / "other", seed=3)
    assert encoder_key(other, "mean", 32) != key
    retokenized = tmp_path / "retokenized"
    shutil.copytree(tiny_bert, retokenized)
    vocab = retokenized / "vocab.txt"
    vocab.write_text(vocab.read_text() + "newword\n")
    assert encoder_key(retokenized, "mean", 32) != key


def grow(ws_root: Path, extra: int) -> None:
    """Appends `extra` new train rows (texts never seen) to the workspace's split."""
    splits = Workspace(ws_root).splits
    frame = pd.read_parquet(splits)
    new = pd.DataFrame({"text": [f"a brand new review number {i}, quite good" for i in range(extra)],
                        "label": ["positive"] * extra, "split": "train"})
    grown = pd.concat([frame.drop(columns="row"), new], ignore_index=True)
    grown.assign(row=lambda f: range(len(f))).to_parquet(splits)


def test_a_retrain_on_grown_data_embeds_only_the_new_rows_and_fits_the_same_probe(tiny_bert, tmp_path) -> None:
    bases = {str(tiny_bert): tiny_bert}
    ws = split_workspace(tmp_path / "cached")
    distinct = pd.read_parquet(ws.splits)["text"].nunique()  # the toy rows repeat some texts
    first = run_baseline(FAST, ModelConfig(), bases, LABELS, ws)
    assert first["embeddings"]["computed"] == distinct
    grow(ws.root, 20)
    second = run_baseline(FAST, ModelConfig(), bases, LABELS, ws)
    assert second["embeddings"] == {"computed": 20, "reused": 224}  # every old row, none embedded again

    cold = split_workspace(tmp_path / "cold")  # the same grown rows, no cache
    grow(cold.root, 20)
    reference = run_baseline(FAST, ModelConfig(), bases, LABELS, cold)
    assert reference["embeddings"]["computed"] == distinct + 20
    for key in ("accuracy", "macro_f1", "c", "temperature"):
        assert second["probe"][key] == pytest.approx(reference["probe"][key], abs=1e-4)
    np.testing.assert_allclose(load_probe(ws.probe_dir).weight.numpy(), load_probe(cold.probe_dir).weight.numpy(),
                               atol=1e-3)
