"""Behaviour checks of a trained model on the shipped data, as Made-With-ML does:
invariance (a change that must not move the answer) and direction (a change that
must move it one way).

The model is the baseline stage's probe (the frozen all-MiniLM-L6-v2 with its
fitted head: a complete model that tuneloop registers as champion when
fine-tuning does not beat it), trained on 3,000 shipped movie reviews (test
macro-F1 0.73 on 200 held-out rows). Invariance is asked of its confident answers
(probability >= 0.8, half of them): an answer near 0.5 may rightly tip. The
perturbations are the evaluate stage's own (`tasks/perturbations.py`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tuneloop.model.classifier import load_encoder, load_tokenizer, pooled_embeddings, resolve_model_path
from tuneloop.model.metrics import macro_f1
from tuneloop.pipeline.params import load_params
from tuneloop.tasks.baseline import BaselineConfig, select_probe
from tuneloop.tasks.ingest import canonicalize, read_table
from tuneloop.tasks.perturbations import add_punctuation, strip_punctuation, typos, uppercase, whitespace
from tuneloop.tasks.split import split_dataset

ROOT = Path(__file__).resolve().parents[2]
# One regularisation, not the stage's search: on these rows C=0.1, 1 and 10 score within 2e-5 of each
# other on validation (0.7767), so which one wins flips with library versions (measured 2026-12-06:
# C=0.1 by 2e-5), and C=0.1's flat probabilities leave 1 of 200 answers above 0.8.
CHOSEN_C = 10.0
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model():
    params = load_params(ROOT / "params.yaml")
    frame, _ = canonicalize(read_table(ROOT / params.ingest.source), params.ingest)
    frame = split_dataset(frame, params.split)
    labels = list(params.declared_labels or sorted(frame["label"].unique()))
    parts = {name: frame[frame["split"] == name].sample(n, random_state=0) for name, n in
             (("train", 3000), ("validation", 300), ("test", 200))}  # the file is sorted: a sample has both labels
    base = resolve_model_path(params.model.base)
    encoder, tokenizer = load_encoder(base, "cpu"), load_tokenizer(base)

    def embed(texts: list[str]) -> np.ndarray:
        return pooled_embeddings(encoder, tokenizer, texts, 128)

    y = {k: v["label"].map(labels.index).to_numpy() for k, v in parts.items()}
    probe, _ = select_probe((embed(parts["train"]["text"].tolist()), y["train"]),
                            (embed(parts["validation"]["text"].tolist()), y["validation"]), labels,
                            BaselineConfig(probe_c=(CHOSEN_C,)))

    def predict(texts: list[str]) -> np.ndarray:  # (texts, labels) probabilities
        return probe.predict_proba(embed(texts))

    return {"predict": predict, "labels": labels, "test": parts["test"]["text"].tolist(), "y_test": y["test"]}


def test_the_model_learned_before_its_behaviour_is_judged(model) -> None:
    predicted = model["predict"](model["test"]).argmax(1)
    assert macro_f1(model["y_test"], predicted, len(model["labels"])) > 0.7  # a constant answer scores <= 0.5


@pytest.mark.parametrize("change, kept", [(uppercase, 1.0), (whitespace, 1.0), (add_punctuation, 1.0),
                                          (strip_punctuation, 1.0), (lambda t: typos(t, 0.05, seed=1), 0.90)],
                         ids=["uppercase", "whitespace", "add-punctuation", "strip-punctuation", "typos-5%"])
def test_a_confident_answer_does_not_move_with_casing_spacing_punctuation_or_a_few_typos(model, change,
                                                                                        kept) -> None:
    probabilities = model["predict"](model["test"])
    confident = probabilities.max(1) >= 0.8
    assert confident.sum() >= 50
    after = model["predict"]([change(text) for text in model["test"]]).argmax(1)
    assert (after == probabilities.argmax(1))[confident].mean() >= kept


GOOD = ["wonderful", "brilliant", "moving", "delightful", "superb", "charming"]
BAD = ["dreadful", "boring", "awful", "tedious", "pointless", "terrible"]


def test_a_plainly_positive_or_negative_review_gets_that_label(model) -> None:
    positive, negative = model["labels"].index("positive"), model["labels"].index("negative")
    good = model["predict"]([f"The film is {word}." for word in GOOD]).argmax(1)
    bad = model["predict"]([f"The film is {word}." for word in BAD]).argmax(1)
    assert (good == positive).all() and (bad == negative).all()


def test_praise_added_to_a_review_raises_its_positive_probability_and_scorn_lowers_it(model) -> None:
    positive = model["labels"].index("positive")
    texts = model["test"][:100]
    plain = model["predict"](texts)[:, positive]
    for praise in ("A wonderful, moving film.", "I loved it."):
        praised = model["predict"]([f"{t} {praise}" for t in texts])[:, positive]
        assert (praised > plain).mean() >= 0.95, praise
    for scorn in ("A dreadful, boring film.", "What a waste of time."):
        scorned = model["predict"]([f"{t} {scorn}" for t in texts])[:, positive]
        assert (scorned < plain).mean() >= 0.8, scorn
