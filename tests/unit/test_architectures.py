"""Any local Hugging Face model folder fine-tunes: encoders and decoders, LoRA on
every linear layer whatever the modules are called, a decoder without a pad token."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tuneloop.tasks.classifier import default_pooling, load_classifier, predict_proba
from tuneloop.tasks.finetune import FinetuneConfig, finetune
from tiny_model import build_tiny_model, sentiment_rows

FAMILIES = {"bert": "mean", "roberta": "mean", "distilbert": "mean", "deberta-v2": "mean",
            "llama": "last", "qwen2": "last", "mistral": "last"}
FEW_STEPS = FinetuneConfig(epochs=1, max_steps=4, batch_size=16, lora_r=4, max_length=32, learning_rate=1e-2,
                           checkpoint_every_steps=0, min_steps=0, min_examples_per_class=0, head_init="random")


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_each_architecture_trains_saves_and_scores_with_lora_on_all_linear_layers(tmp_path: Path, family: str) -> None:
    base = build_tiny_model(tmp_path / family, family, pad_token=family not in {"llama", "qwen2", "mistral"})
    train, validation = sentiment_rows(64, seed=0), sentiment_rows(16, seed=1)
    result = finetune(str(base), base, train, validation, ["negative", "positive"], FEW_STEPS,
                      tmp_path / "model", tmp_path / "checkpoints", "v1", progress=False)
    assert result.steps == 4
    assert default_pooling(base) == FAMILIES[family]
    meta = json.loads((tmp_path / "model" / "tuneloop.json").read_text())
    assert meta["pooling"] == FAMILIES[family]
    adapter = json.loads((tmp_path / "model" / "adapter_config.json").read_text())
    assert adapter["target_modules"]  # PEFT resolved all-linear to this architecture's own names
    classifier = load_classifier(tmp_path / "model", device="cpu")
    probs = predict_proba(classifier, validation[0] + ["a much longer text than the others, to pad the rest"])
    assert probs.shape == (17, 2) and np.allclose(probs.sum(1), 1.0, atol=1e-5)
    alone = predict_proba(classifier, [validation[0][0]])  # padding in a batch never changes a text's score
    np.testing.assert_allclose(alone[0], probs[0], atol=1e-5)


def test_a_decoder_without_a_pad_token_gets_one_and_scores_its_last_real_token(tmp_path: Path) -> None:
    from tuneloop.tasks.classifier import load_tokenizer

    base = build_tiny_model(tmp_path / "llama", "llama", pad_token=False)
    tokenizer = load_tokenizer(base)
    assert tokenizer.pad_token_id is not None
