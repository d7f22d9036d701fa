"""The fine-tuning recipe: a head started from the validation-tuned probe, pooled
features shared by probe and classifier, epochs that grow for small or many-class
data, and champions scored fairly when the label set changes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from tuneloop.model.classifier import (
    Classifier,
    load_classifier,
    load_encoder,
    load_tokenizer,
    pooled_embeddings,
    predict_proba,
)
from tuneloop.tasks.baseline import BaselineConfig, fit_probe, probe_head, save_probe, select_probe
from tuneloop.tasks.evaluate import Candidate, EvaluateConfig, aligned, evaluate_models
from tuneloop.tasks.finetune import FinetuneConfig, build_model, finetune
from tuneloop.values.errors import TuneloopError

LABELS = ["negative", "positive"]


def separable(n: int, classes: int, seed: int, spread: float = 0.6) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(99).normal(size=(classes, 16))
    y = rng.integers(classes, size=n)
    x = centres[y] + rng.normal(scale=spread * 3, size=(n, 16))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), y


def test_the_probe_is_scikit_learns_logistic_regression_with_c_chosen_on_validation() -> None:
    train, validation, test = separable(600, 5, 0), separable(300, 5, 1), separable(300, 5, 2)
    labels = [f"c{i}" for i in range(5)]
    probe, scores = select_probe(train, validation, labels, BaselineConfig(probe_c=(0.01, 1.0, 100.0),
                                                                           probe_class_weights=("none", "balanced")))
    assert set(scores) == {"C=0.01", "C=1", "C=100", "C=0.01 balanced", "C=1 balanced", "C=100 balanced"}
    assert scores[probe.setting] == max(scores.values())
    weighting = "balanced" if probe.class_weight == "balanced" else None
    reference = LogisticRegression(C=probe.c, max_iter=1000, class_weight=weighting).fit(*train)
    np.testing.assert_array_equal(probe.predict_proba(test[0]).argmax(1), reference.predict(test[0]))


def lopsided(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """97:3 rows whose small class sits a little apart from the large one."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.03).astype(int)
    x = np.where(y[:, None] == 1, 0.45, 0.0) + rng.normal(scale=0.5, size=(n, 16))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), y


def test_on_a_97_to_3_split_the_balanced_probe_is_chosen_and_finds_the_small_class() -> None:
    train, validation, test = lopsided(2400, 0), lopsided(1500, 1), lopsided(1500, 2)
    plain_argmax = {"probe_c": (0.1,), "probe_thresholds": "none"}
    probe, scores = select_probe(train, validation, LABELS, BaselineConfig(**plain_argmax,
                                                                           probe_class_weights=("none", "balanced")))
    plain = fit_probe(*train, LABELS, 0.1, 1000)
    assert probe.class_weight == "balanced" and scores["C=0.1 balanced"] > scores["C=0.1"]
    # the default, auto, weighs classes here without trying the plain probe
    auto, auto_scores = select_probe(train, validation, LABELS, BaselineConfig(**plain_argmax))
    assert auto.class_weight == "balanced" and set(auto_scores) == {"C=0.1 balanced"}
    from tuneloop.model.metrics import macro_f1
    assert macro_f1(test[1], plain.logits(test[0]).argmax(1), 2) < 0.55  # the majority class, nearly always
    assert macro_f1(test[1], probe.logits(test[0]).argmax(1), 2) > 0.6


def test_on_a_97_to_3_split_offsets_chosen_out_of_fold_beat_the_balanced_argmax() -> None:
    """The balanced probe's argmax over-calls the small class; offsets chosen for macro-F1 on
    out-of-fold train rows (and the setting chosen by that score, not by ~45 validation rows
    of the small class) do better on 6,000 unseen rows."""
    train, validation, test = lopsided(2400, 0), lopsided(300, 1), lopsided(6000, 2)
    from tuneloop.model.metrics import macro_f1

    argmax, argmax_scores = select_probe(train, validation, LABELS, BaselineConfig(probe_thresholds="none"))
    offset, offset_scores = select_probe(train, validation, LABELS, BaselineConfig())
    assert argmax.offsets is None and set(argmax_scores) == {f"C={c:g} balanced" for c in (0.1, 1, 10, 100)}
    assert set(offset_scores) == {f"C={c:g} balanced offsets" for c in (0.1, 1, 10, 100)}
    assert offset_scores[f"{offset.setting} offsets"] == max(offset_scores.values())
    assert offset.offsets is not None and offset.offsets[0] > 0.2  # the large class is called more often
    plain_f1 = macro_f1(test[1], argmax.logits(test[0]).argmax(1), 2)
    offset_f1 = macro_f1(test[1], offset.logits(test[0]).argmax(1), 2)
    assert offset_f1 > plain_f1 + 0.02, (plain_f1, offset_f1)


def test_offsets_raise_macro_f1_on_the_rows_they_are_chosen_on_and_stay_zero_where_argmax_is_best() -> None:
    from tuneloop.model.metrics import macro_f1
    from tuneloop.tasks.baseline import decision_offsets

    rng = np.random.default_rng(0)
    y = np.r_[np.zeros(950, int), np.ones(30, int), np.full(20, 2)]
    logits = rng.normal(size=(1000, 3))
    logits[np.arange(1000), y] += 1.5
    logits[:, 0] += 3.0  # class 0 wins too often
    offsets = decision_offsets(logits, y, 3)
    assert macro_f1(y, (logits + offsets).argmax(1), 3) > macro_f1(y, logits.argmax(1), 3) + 0.05
    assert ((logits + offsets).argmax(1) == 0).sum() < (logits.argmax(1) == 0).sum()  # class 0 called less
    perfect = np.eye(3)[y] * 5.0
    np.testing.assert_array_equal(decision_offsets(perfect, y, 3), np.zeros(3, np.float32))


def test_a_binary_probe_gives_scikit_learns_probabilities_as_two_logits() -> None:
    x, y = separable(200, 2, 3)
    probe = fit_probe(x, y, LABELS, 1.0, 1000)
    reference = LogisticRegression(C=1.0, max_iter=1000).fit(x, y)
    np.testing.assert_allclose(probe.predict_proba(x), reference.predict_proba(x), atol=1e-5)


def test_the_probe_started_classifier_predicts_exactly_what_the_probe_does(tiny_bert: Path, toy_task: dict) -> None:
    texts, y = toy_task["train"]
    encoder, tokenizer = load_encoder(tiny_bert, "cpu"), load_tokenizer(tiny_bert)
    features = pooled_embeddings(encoder, tokenizer, texts, 32)
    probe = fit_probe(features, np.asarray(y), LABELS, 10.0, 1000)
    model = build_model(tiny_bert, LABELS, FinetuneConfig(), head=(probe.weight, probe.bias)).eval()
    ours = predict_proba(Classifier(model, tokenizer, LABELS, 32, torch.device("cpu")), texts)
    np.testing.assert_allclose(ours, probe.predict_proba(features), atol=1e-5)


def test_fine_tuning_that_never_beats_the_probe_on_validation_keeps_the_probe(
        tiny_bert: Path, toy_task: dict, tmp_path: Path) -> None:
    texts, y = toy_task["train"]
    encoder, tokenizer = load_encoder(tiny_bert, "cpu"), load_tokenizer(tiny_bert)
    probe = fit_probe(pooled_embeddings(encoder, tokenizer, texts, 32), np.asarray(y), LABELS, 10.0, 1000)
    ruinous = FinetuneConfig(epochs=2, learning_rate=5.0, batch_size=16, max_length=32, checkpoint_every_steps=0,
                             patience=2, min_steps=0, min_examples_per_class=0)
    result = finetune(str(tiny_bert), tiny_bert, toy_task["train"], toy_task["validation"], LABELS, ruinous,
                      tmp_path / "model", tmp_path / "ck", "v1", progress=False, head=(probe.weight, probe.bias))
    start = result.history[0]
    assert (start["epoch"], start["step"]) == (0, 0)
    assert all(h["val_macro_f1"] < start["val_macro_f1"] for h in result.history[1:])  # a learning rate of 5 ruins it
    assert result.best_val_macro_f1 == start["val_macro_f1"]
    val_texts = toy_task["validation"][0]
    saved = predict_proba(load_classifier(tmp_path / "model", device="cpu"), val_texts)
    expected = probe.predict_proba(pooled_embeddings(encoder, tokenizer, val_texts, 32))
    np.testing.assert_allclose(saved, expected, atol=1e-5)


@pytest.mark.parametrize("rows, classes, epochs", [
    (8845, 64, 3),   # HWU64: ~140 rows a class, seen 400 times = 3 epochs
    (8456, 2, 2),    # movie reviews: 265 steps an epoch, 500 steps = 2 epochs
    (2000, 2, 8),    # small data: 63 steps an epoch, 500 steps = 8 epochs
    (150000, 4, 1),  # large data: never fewer than `epochs`
])
def test_epochs_grow_for_small_or_many_class_data(rows: int, classes: int, epochs: int) -> None:
    assert FinetuneConfig(epochs=1, batch_size=32).epochs_for(rows, classes) == epochs


def test_a_probe_for_other_labels_or_another_model_is_refused_as_a_head(tmp_path: Path) -> None:
    x, y = separable(100, 2, 4)
    save_probe(fit_probe(x, y, LABELS, 1.0, 100), tmp_path)
    weight, bias = probe_head(tmp_path, LABELS, 16)
    assert weight.shape == (2, 16) and bias.shape == (2,)
    with pytest.raises(TuneloopError, match="fitted for other labels, another base model or another pooling"):
        probe_head(tmp_path, ["a", "b"], 16)
    with pytest.raises(TuneloopError, match="fitted for other labels, another base model or another pooling"):
        probe_head(tmp_path, LABELS, 32)
    with pytest.raises(FileNotFoundError, match="run `tuneloop baseline` first"):
        probe_head(tmp_path / "none", LABELS, 16)


def test_a_champion_without_a_new_label_scores_zero_on_its_rows_and_says_so() -> None:
    own = ["alarm", "music"]
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]], dtype=np.float32)
    np.testing.assert_allclose(aligned(probs, own, ["alarm", "lights", "music"]),
                               [[0.9, 0.0, 0.1], [0.2, 0.0, 0.8], [0.6, 0.0, 0.4]])
    test = pd.DataFrame({"row": [1, 2, 3], "text": ["wake me", "play jazz", "lights off"],
                         "label": ["alarm", "music", "lights"]})
    champion = Candidate("champion", "champion", lambda texts: probs, labels=own)
    evaluation, predictions = evaluate_models([champion], test, ["alarm", "lights", "music"],
                                          EvaluateConfig(robustness_rows=0), "v2")
    summary = evaluation["models"]["champion"]
    assert summary["unknown_labels"] == ["lights"]
    assert summary["accuracy"] == pytest.approx(2 / 3)
    assert predictions["champion"].tolist() == [0, 2, 0]


def test_an_early_epoch_below_the_probes_start_does_not_end_training(monkeypatch) -> None:
    import tuneloop.tasks.finetune as ft

    scores = iter([0.85, 0.95, 0.94])
    monkeypatch.setattr(ft, "score_macro_f1", lambda *args: next(scores))
    model, config = torch.nn.Linear(2, 2), FinetuneConfig(patience=1)
    state = ft.TrainState(best_f1=0.9, best_state=ft.trainable_state(model),
                          history=[{"epoch": 0, "step": 0, "val_macro_f1": 0.9}])
    stop = [ft.end_epoch(model, None, LABELS, ([], []), config, None, state) for _ in range(3)]
    assert stop == [False, False, True]  # epoch 1 (0.85 < the start's 0.9) goes on; epoch 3 < epoch 2 stops
    assert state.best_f1 == 0.95


def test_patience_never_stops_training_before_the_promised_floor_of_epochs(monkeypatch) -> None:
    import tuneloop.tasks.finetune as ft

    scores = iter([0.9, 0.8, 0.7, 0.6, 0.5])  # every epoch worse than the first
    monkeypatch.setattr(ft, "score_macro_f1", lambda *args: next(scores))
    model, config = torch.nn.Linear(2, 2), FinetuneConfig(patience=1)
    state = ft.TrainState()
    stop = [ft.end_epoch(model, None, LABELS, ([], []), config, None, state, floor=4) for _ in range(5)]
    assert stop == [False, False, False, True, True]  # patience ran out at epoch 2, the floor holds it to 4
    # the 97:3 movie subset: 2,400 train rows, 75 steps an epoch, min_steps 500 -> 7 epochs
    assert FinetuneConfig(batch_size=32).floor_epochs(2400, 2) == 7


def test_a_head_learning_rate_of_zero_freezes_the_probe_head_instead_of_meaning_unset() -> None:
    from tuneloop.tasks.finetune import make_optimizer

    model = torch.nn.Module()
    model.body, model.head = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    optimizer, _ = make_optimizer(model, FinetuneConfig(learning_rate=2e-3, head_learning_rate=0.0),
                                  torch.device("cpu"), 10, probe_started=True)
    assert [g["initial_lr"] for g in optimizer.param_groups] == [2e-3, 0.0]


def test_balanced_class_weights_make_each_class_weigh_the_same_and_average_one() -> None:
    from tuneloop.tasks.finetune import class_weights, row_losses

    targets = torch.tensor([0] * 97 + [1] * 3)
    weights = class_weights(targets, 3, "balanced")  # class 2 has no train rows
    assert weights.tolist() == pytest.approx([100 / (2 * 97), 100 / (2 * 3), 0.0])
    assert float(weights[targets].mean()) == pytest.approx(1.0)
    assert class_weights(targets, 3, "none") is None
    assert class_weights(targets, 3, "auto").tolist() == weights.tolist()  # 97:3 is over 10x: balanced
    assert class_weights(torch.tensor([0] * 60 + [1] * 10), 2, "auto") is None  # 6x: plain, as on HWU64
    logits, y = torch.zeros(2, 3), torch.tensor([0, 1])
    plain = row_losses(logits, y, None, 0.0)
    assert plain.tolist() == pytest.approx([np.log(3)] * 2)
    assert row_losses(logits, y, weights, 0.0).tolist() == pytest.approx((plain * weights[:2]).tolist())
    confident = torch.tensor([[10.0, 0.0, 0.0]])
    target = torch.tensor([0])
    assert float(row_losses(confident, target, None, 0.1)) > float(row_losses(confident, target, None, 0.0))


def test_only_a_probe_started_head_trains_at_the_head_learning_rate() -> None:
    from tuneloop.tasks.finetune import make_optimizer

    model = torch.nn.Module()
    model.body, model.head = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    config = FinetuneConfig(learning_rate=2e-3, head_learning_rate=1e-4)
    started, _ = make_optimizer(model, config, torch.device("cpu"), 10, probe_started=True)
    fresh, _ = make_optimizer(model, config, torch.device("cpu"), 10, probe_started=False)
    assert [g["initial_lr"] for g in started.param_groups] == [2e-3, 1e-4]
    assert [g["initial_lr"] for g in fresh.param_groups] == [2e-3, 2e-3]


def test_an_unset_learning_rate_is_the_measured_one_for_the_method_and_the_heads_start() -> None:
    """LoRA beside a random head trains at 1e-3 (2e-3 collapses some seeds to one class: issue 23),
    beside the probe's head at 2e-3; full fine-tuning at 1e-4; a rate the user writes is kept."""
    from tuneloop.tasks.finetune import make_optimizer

    model = torch.nn.Module()
    model.body, model.head = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    rates = lambda config, started: [g["initial_lr"] for g in make_optimizer(  # noqa: E731
        model, config, torch.device("cpu"), 10, probe_started=started)[0].param_groups]
    assert FinetuneConfig().learning_rate is None
    assert rates(FinetuneConfig(), False) == [1e-3, 1e-3]
    assert rates(FinetuneConfig(), True) == [2e-3, 1e-4]
    assert rates(FinetuneConfig(method="full"), True) == [1e-4, 1e-4]
    assert rates(FinetuneConfig(method="full"), False) == [1e-4, 1e-4]
    assert rates(FinetuneConfig(learning_rate=2e-3), False) == [2e-3, 2e-3]


def test_a_probe_fitted_with_another_pooling_is_refused_as_a_head_and_for_evaluation(tmp_path: Path,
                                                                                     tiny_bert: Path) -> None:
    from tuneloop.model.calibration import Abstention
    from tuneloop.model.classifier import read_meta
    from tuneloop.pipeline import stages
    from tuneloop.pipeline.params import parse_params
    from tuneloop.tasks.baseline import save_probe_model
    from tuneloop.values.workspace import Workspace

    ws = Workspace(tmp_path)
    x, y = separable(100, 2, 4)
    save_probe_model(fit_probe(x, y, LABELS, 1.0, 100), ws.probe_dir, load_tokenizer(tiny_bert), str(tiny_bert),
                     "mean", 32, 1.0, Abstention())
    assert read_meta(ws.probe_dir)["pooling"] == "mean"
    assert probe_head(ws.probe_dir, LABELS, 16, "mean")[0].shape == (2, 16)
    refused = r"^the probe in .* was fitted on mean pooling, model.pooling is now cls: run `tuneloop baseline` again$"
    with pytest.raises(TuneloopError, match=refused):
        probe_head(ws.probe_dir, LABELS, 16, "cls")

    def params(pooling: str):
        return parse_params({"model": {"base": str(tiny_bert), "pooling": pooling}, "validate": {"labels": LABELS}})

    stages.check_probe_model(params("auto"), ws)  # auto is mean for a BERT without a pooling config
    with pytest.raises(TuneloopError, match=refused.replace("cls", "last")):
        stages.check_probe_model(params("last"), ws)
