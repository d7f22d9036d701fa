"""`finetune.head_init: random` learns on real text at the default learning rate, through
the fast path and the model's own forward alike (issue 23: it used to collapse to one class)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tuneloop.tasks import fastpath
from tuneloop.tasks.classifier import resolve_model_path
from tuneloop.tasks.finetune import FinetuneConfig, finetune

MOVIES = Path(__file__).resolve().parents[2] / "data" / "vader_sentiment" / "movie_reviews.csv"
# the setting that collapsed with a randomly drawn head (seed 0: validation macro-F1 0.37, loss back at ln 2)
CONFIG = FinetuneConfig(epochs=2, min_steps=0, min_examples_per_class=0, head_init="random", learning_rate=2e-3,
                        batch_size=16, max_length=64, checkpoint_every_steps=0, device="cpu", patience=100, seed=0)


def rows() -> tuple[tuple, tuple, tuple[str, ...]]:
    frame = pd.read_csv(MOVIES)
    frame = frame[frame["label"].isin(["positive", "negative"])].reset_index(drop=True)
    order = np.random.default_rng(0).permutation(len(frame))
    labels = ("negative", "positive")
    part = lambda idx: (frame["text"].iloc[idx].tolist(), [labels.index(v) for v in frame["label"].iloc[idx]])  # noqa: E731
    return part(order[:640]), part(order[5000:5300]), labels


@pytest.mark.slow
@pytest.mark.parametrize("path", ["fast path", "own forward"])
def test_a_head_without_probe_learns_real_sentiment_at_the_default_learning_rate(path, tmp_path, monkeypatch):
    if path == "own forward":
        monkeypatch.setattr(fastpath, "supports_encoder", lambda encoder: False)
    train, validation, labels = rows()
    result = finetune("all-MiniLM-L6-v2", resolve_model_path("all-MiniLM-L6-v2"), train, validation, labels, CONFIG,
                      tmp_path / "model", tmp_path / "checkpoints", "movies", progress=False)
    assert result.steps == 80
    assert result.best_val_macro_f1 > 0.65  # a constant predictor scores ~0.35
    assert result.curve[-1]["loss"] < 0.62  # ln 2 = 0.693 is predicting one class
