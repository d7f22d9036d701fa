"""The baseline is an honest one: on HWU64 (64 intents, the authors' folds) the
probe with C chosen on validation is scikit-learn's LogisticRegression at that C,
on MiniLM's mean-pooled, normalised embeddings, and stronger than the C=1 default."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.linear_model import LogisticRegression

from tuneloop.tasks.baseline import BaselineConfig, select_probe
from tuneloop.model.classifier import load_encoder, load_tokenizer, pooled_embeddings, resolve_model_path
from tuneloop.model.metrics import macro_f1

HWU64 = Path(__file__).resolve().parents[3] / "shared" / "datasets" / "hwu64" / "hwu64.csv"


@pytest.mark.slow
@pytest.mark.skipif(not HWU64.exists(), reason="../shared/datasets/hwu64 is not beside the project")
def test_validation_tuned_probe_matches_scikit_learn_and_beats_its_default_c_on_hwu64() -> None:
    frame = pd.read_csv(HWU64)
    fold = frame["fold"].str.replace("KFold_", "").astype(int)
    parts = {"train": frame[fold <= 8], "validation": frame[fold == 9], "test": frame[fold == 10]}
    labels = sorted(frame["label"].unique())
    index = {name: i for i, name in enumerate(labels)}
    base = resolve_model_path("all-MiniLM-L6-v2")
    encoder, tokenizer = load_encoder(base, "cpu"), load_tokenizer(base)
    x = {k: pooled_embeddings(encoder, tokenizer, v["text"].tolist(), 128) for k, v in parts.items()}
    y = {k: v["label"].map(index).to_numpy() for k, v in parts.items()}
    probe, scores = select_probe((x["train"], y["train"]), (x["validation"], y["validation"]), labels,
                                 BaselineConfig())
    ours = macro_f1(y["test"], probe.predict_proba(x["test"]).argmax(1), len(labels))
    same_c = LogisticRegression(C=probe.c, max_iter=1000).fit(x["train"], y["train"]).predict(x["test"])
    default_c = LogisticRegression(C=1.0, max_iter=1000).fit(x["train"], y["train"]).predict(x["test"])
    assert probe.setting == "C=10" and scores["C=10"] > scores["C=1"]
    assert ours == pytest.approx(macro_f1(y["test"], same_c, len(labels)), abs=1e-9)
    assert ours == pytest.approx(0.8957, abs=0.003)  # the measured strength
    assert ours > macro_f1(y["test"], default_c, len(labels)) + 0.02
    assert np.isfinite(list(scores.values())).all()
