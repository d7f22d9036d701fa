from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import tuneloop.tasks.finetune as ft
from tuneloop.model.classifier import load_classifier, predict_proba
from tuneloop.model.metrics import macro_f1
from tuneloop.tasks.finetune import FinetuneConfig, finetune, length_grouped_order, linear_schedule

FAST = FinetuneConfig(epochs=6, learning_rate=1e-2, batch_size=16, lora_r=8, max_length=32,
                      checkpoint_every_steps=10, patience=6, min_steps=0, min_examples_per_class=0)


def train(tiny_bert: Path, toy_task: dict, out: Path, config: FinetuneConfig = FAST, data_key: str = "v1",
          on_metrics=None):
    return finetune("tiny", tiny_bert, toy_task["train"], toy_task["validation"], toy_task["labels"], config,
                    out / "model", out / "checkpoints", data_key, progress=False, on_metrics=on_metrics)


def listener() -> tuple[list, list, object]:
    """(loss points, val_macro_f1 points, the on_metrics callable that fills them)."""
    losses, scores = [], []

    def on_metrics(step: int, values: dict) -> None:
        if "loss" in values:
            losses.append((step, values["loss"], values["learning_rate"]))
        if "val_macro_f1" in values:
            scores.append((step, values["val_macro_f1"]))

    return losses, scores, on_metrics


@pytest.fixture(scope="module")
def lora_run(tiny_bert, toy_task, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora")
    losses, scores, on_metrics = listener()
    return train(tiny_bert, toy_task, out, on_metrics=on_metrics), out, (losses, scores)


def test_training_reports_each_curve_point_and_epoch_score_to_on_metrics_as_it_goes(lora_run):
    result, _, (losses, scores) = lora_run
    assert losses == [(p["step"], p["loss"], p["learning_rate"]) for p in result.curve]
    assert scores == [(h["step"], h["val_macro_f1"]) for h in result.history]
    assert len(losses) > len(scores) >= 2


def test_lora_learns_a_separable_task(lora_run):
    result, _, _ = lora_run
    assert result.best_val_macro_f1 >= 0.9
    assert result.train_macro_f1 >= 0.85  # tiny random encoder, 96 steps from a zero head: 0.897 measured
    assert result.steps == 6 * 16  # 256 rows / 16 per batch, 6 epochs
    assert [h["epoch"] for h in result.history] == [1, 2, 3, 4, 5, 6]


def test_lora_run_saves_adapter_as_safetensors_with_tokenizer_and_label_map(lora_run):
    result, _, _ = lora_run
    files = {p.name for p in result.model_dir.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "labels.json", "tuneloop.json",
            "tokenizer.json"} <= files
    assert json.loads((result.model_dir / "labels.json").read_text()) == ["negative", "positive"]
    tensors = load_file(str(result.model_dir / "adapter_model.safetensors"))
    assert any("lora_A" in name for name in tensors)
    assert all("word_embeddings" not in name for name in tensors)  # frozen base weights are not copied
    head = load_file(str(result.model_dir / "head.safetensors"))  # the head, beside the adapter
    assert head["weight"].shape == (2, 32) and head["bias"].shape == (2,)


def test_saved_model_reloads_with_the_validation_score_it_reported(lora_run, tiny_bert, toy_task):
    result, _, _ = lora_run
    classifier = load_classifier(result.model_dir, base_model=str(tiny_bert))
    texts, labels = toy_task["validation"]
    predicted = predict_proba(classifier, texts).argmax(1)
    assert macro_f1(np.asarray(labels), predicted, 2) == pytest.approx(result.best_val_macro_f1)


def test_finished_run_removes_its_checkpoint(lora_run):
    _, out, _ = lora_run
    assert not (out / "checkpoints" / ft.CHECKPOINT_FILE).exists()


class Interrupted(Exception):
    pass


def test_interrupted_run_resumes_from_its_checkpoint_and_ends_with_the_same_weights(
        tiny_bert, toy_task, tmp_path, monkeypatch):
    reference = train(tiny_bert, toy_task, tmp_path / "reference")
    original_save = ft.save_checkpoint
    saves = []

    def save_then_die(path, state):
        original_save(path, state)
        saves.append(state["state"]["step"])
        if len(saves) == 2:  # the second checkpoint: step 16's epoch end came first, then step 26
            raise Interrupted

    monkeypatch.setattr(ft, "save_checkpoint", save_then_die)
    with pytest.raises(Interrupted):
        train(tiny_bert, toy_task, tmp_path / "resumed")
    monkeypatch.setattr(ft, "save_checkpoint", original_save)
    losses, scores, on_metrics = listener()
    resumed = train(tiny_bert, toy_task, tmp_path / "resumed", on_metrics=on_metrics)
    assert resumed.resumed_from_step == saves[-1] > 0
    # the resumed run reports its whole curve: the checkpoint's points first, then its own
    assert [step for step, _, _ in losses] == [p["step"] for p in resumed.curve]
    assert losses[0][0] < resumed.resumed_from_step < losses[-1][0]
    assert [step for step, _ in scores] == [h["step"] for h in resumed.history]
    assert resumed.steps == reference.steps
    ours = load_file(str(resumed.model_dir / "adapter_model.safetensors"))
    theirs = load_file(str(reference.model_dir / "adapter_model.safetensors"))
    assert ours.keys() == theirs.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name])


def test_checkpoint_of_a_different_run_is_not_resumed(tiny_bert, toy_task, tmp_path, monkeypatch):
    original_save = ft.save_checkpoint

    def save_then_die(path, state):
        original_save(path, state)
        raise Interrupted

    monkeypatch.setattr(ft, "save_checkpoint", save_then_die)
    with pytest.raises(Interrupted):
        train(tiny_bert, toy_task, tmp_path, replace(FAST, epochs=1))
    monkeypatch.undo()
    assert (tmp_path / "checkpoints" / ft.CHECKPOINT_FILE).exists()
    result = train(tiny_bert, toy_task, tmp_path, replace(FAST, epochs=1), data_key="v2")  # new data version
    assert result.resumed_from_step == 0


def test_early_stopping_ends_training_when_validation_stops_improving(tiny_bert, toy_task, tmp_path):
    config = replace(FAST, epochs=6, patience=1, learning_rate=0.0)  # nothing improves after epoch 1
    result = train(tiny_bert, toy_task, tmp_path, config)
    assert result.stopped_early
    assert result.epochs_run == 2


def test_full_finetuning_saves_every_weight(tiny_bert, toy_task, tmp_path):
    result = train(tiny_bert, toy_task, tmp_path, replace(FAST, method="full", learning_rate=3e-3))
    assert (result.model_dir / "model.safetensors").exists()
    assert not (result.model_dir / "adapter_config.json").exists()
    classifier = load_classifier(result.model_dir)
    texts, labels = toy_task["validation"]
    assert macro_f1(np.asarray(labels), predict_proba(classifier, texts).argmax(1), 2) >= 0.9


def test_max_steps_caps_optimizer_steps(tiny_bert, toy_task, tmp_path):
    result = train(tiny_bert, toy_task, tmp_path, replace(FAST, max_steps=5))
    assert result.steps == 5


def test_length_grouped_order_yields_every_example_once_and_is_deterministic():
    lengths = np.random.default_rng(0).integers(1, 100, size=1000).tolist()
    batches = length_grouped_order(lengths, 32, seed=7)
    assert sorted(np.concatenate(batches).tolist()) == list(range(1000))
    assert all(len(b) <= 32 for b in batches)
    again = length_grouped_order(lengths, 32, seed=7)
    assert all((a == b).all() for a, b in zip(batches, again))
    spread = np.mean([np.ptp(np.asarray(lengths)[b]) for b in batches])
    assert spread < 10  # batches hold texts of similar length: little padding


def test_linear_schedule_warms_up_then_decays_to_zero():
    factor = linear_schedule(total_steps=100, warmup_ratio=0.1)
    assert factor(0) == pytest.approx(0.1)
    assert factor(9) == pytest.approx(1.0)
    assert factor(55) == pytest.approx(0.5)
    assert factor(100) == 0.0


def test_unknown_method_is_refused():
    with pytest.raises(ValueError, match="method"):
        FinetuneConfig(method="qlora")


def test_a_head_learning_rate_of_zero_saves_the_probe_head_unchanged(tiny_bert, toy_task, tmp_path):
    """`head_learning_rate: 0.0` freezes a probe-started head: it is not read as "unset"
    (which would train the head at `learning_rate`) while the adapters train."""
    probe = (torch.randn(2, 32, generator=torch.Generator().manual_seed(0)), torch.tensor([0.1, -0.1]))
    config = replace(FAST, epochs=2, head_learning_rate=0.0, checkpoint_every_steps=0)
    result = finetune("tiny", tiny_bert, toy_task["train"], toy_task["validation"], toy_task["labels"], config,
                      tmp_path / "model", tmp_path / "checkpoints", "v1", progress=False, head=probe)
    assert [h["epoch"] for h in result.history] == [0, 1, 2]
    assert result.best_val_macro_f1 > result.history[0]["val_macro_f1"]  # a trained epoch was kept
    saved = load_file(str(result.model_dir / "head.safetensors"))
    assert torch.equal(saved["weight"], probe[0]) and torch.equal(saved["bias"], probe[1])


@pytest.mark.parametrize(("device", "precision", "native", "expected"), [
    ("cuda", "auto", True, "bf16"),   # a CUDA card with bf16
    ("cuda", "auto", False, "fp32"),
    ("cpu", "auto", True, "fp32"),    # a CPU with AVX-512 BF16 or AMX: bf16 training is asked for, not automatic
    ("cpu", "bf16", True, "bf16"),
    ("cpu", "bf16", False, "bf16"),   # asked for: bf16 wherever it runs
    ("cuda", "fp32", True, "fp32"),   # asked for: fp32 even where bf16 is native
])
def test_training_precision_is_bf16_when_asked_or_on_a_cuda_card_with_bf16(monkeypatch, device, precision, native,
                                                                           expected):
    monkeypatch.setattr(ft, "bf16_native", lambda d: native)
    assert ft.training_precision(torch.device(device), precision) == expected


@pytest.mark.parametrize(("precision", "products_in_bf16"), [("bf16", True), ("fp32", False), ("auto", False)])
def test_training_products_on_a_cpu_run_in_bf16_only_when_asked(monkeypatch, precision, products_in_bf16):
    monkeypatch.setattr(ft, "bf16_native", lambda device: True)
    a = torch.randn(4, 8)
    with ft.autocast_context(torch.device("cpu"), precision):
        product = a @ a.T
    assert (product.dtype == torch.bfloat16) is products_in_bf16


def test_a_run_reports_the_precision_its_products_ran_in(lora_run, tiny_bert, toy_task, tmp_path):
    assert FAST.precision == "auto" and lora_run[0].precision == "fp32"  # auto on a CPU
    asked = train(tiny_bert, toy_task, tmp_path, replace(FAST, precision="bf16", epochs=1))
    assert asked.precision == "bf16"
