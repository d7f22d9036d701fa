"""Any local Hugging Face model folder fine-tunes: encoders and decoders, LoRA on
every linear layer whatever the modules are called, a decoder without a pad token."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_model import build_tiny_model, sentiment_rows

from tuneloop.model.classifier import (
    Classifier,
    TextClassifier,
    default_pooling,
    load_classifier,
    load_encoder,
    load_tokenizer,
    pad_batch,
    predict_logits,
    predict_proba,
    tokenize,
)
from tuneloop.tasks import finetune as finetune_module
from tuneloop.tasks.finetune import FinetuneConfig, finetune

FAMILIES = {"bert": "mean", "roberta": "mean", "distilbert": "mean", "deberta-v2": "mean",
            "llama": "last", "qwen2": "last", "mistral": "last"}
FEW_STEPS = FinetuneConfig(epochs=1, max_steps=4, batch_size=16, lora_r=4, max_length=32, learning_rate=1e-2,
                           checkpoint_every_steps=0, min_steps=0, min_examples_per_class=0, head_init="random")


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_each_architecture_trains_saves_and_scores_with_lora_on_all_linear_layers(
        tmp_path: Path, family: str, monkeypatch: pytest.MonkeyPatch) -> None:
    base = build_tiny_model(tmp_path / family, family, pad_token=family not in {"llama", "qwen2", "mistral"})
    trained = keep_the_saved_model(monkeypatch)
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
    # the reloaded model (LoRA merged into the base weights) scores as the model it was trained as
    texts = validation[0]
    as_trained = Classifier(trained[0].eval(), load_tokenizer(base), ["negative", "positive"], 32, torch.device("cpu"))
    reloaded = predict_logits(classifier, texts)
    assert np.abs(reloaded).max() > 1e-3  # a trained head: a reload that lost it would score all zeros
    np.testing.assert_allclose(reloaded, predict_logits(as_trained, texts), atol=1e-4)


def keep_the_saved_model(monkeypatch: pytest.MonkeyPatch) -> list[TextClassifier]:
    """The in-memory model `finetune` hands to `save_model`, kept for comparison with its reload."""
    kept: list[TextClassifier] = []
    real = finetune_module.save_model

    def save_and_keep(model, *args, **kwargs) -> None:
        kept.append(model)
        real(model, *args, **kwargs)

    monkeypatch.setattr(finetune_module, "save_model", save_and_keep)
    return kept


def test_a_decoder_without_a_pad_token_gets_one_and_scores_its_last_real_token(tmp_path: Path) -> None:
    from tuneloop.model.classifier import load_tokenizer

    base = build_tiny_model(tmp_path / "llama", "llama", pad_token=False)
    tokenizer = load_tokenizer(base)
    assert tokenizer.pad_token_id is not None
    encoder = load_encoder(base, "cpu")
    model = TextClassifier(encoder, 2, "last").eval()
    short, longer = tokenize(tokenizer, ["the film was good", "the film was good and the cast was great too"], 32)
    with torch.no_grad():
        alone = encoder(input_ids=torch.tensor([short])).last_hidden_state[0, -1]  # (hidden,) its last real token
        ids, mask = pad_batch([short, longer], tokenizer.pad_token_id)  # `short` right-padded by 6+ tokens
        padded = model.features(ids, mask)[0]
        unpadded = model.features(*pad_batch([short], tokenizer.pad_token_id))[0]
        mean = TextClassifier(encoder, 2, "mean").eval().features(ids, mask)[0]
    assert len(longer) > len(short)
    np.testing.assert_allclose(padded.numpy(), torch.nn.functional.normalize(alone, dim=-1).numpy(), atol=1e-5)
    np.testing.assert_allclose(padded.numpy(), unpadded.numpy(), atol=1e-5)  # right padding changes nothing
    assert not np.allclose(padded.numpy(), mean.numpy(), atol=1e-3)  # and it is not the mean of the tokens
