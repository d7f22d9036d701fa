from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tuneloop.model import fastpath
from tuneloop.model.classifier import pad_batch, pool
from tuneloop.tasks.finetune import FinetuneConfig, build_model

LABELS = ["negative", "positive"]


def batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Four texts of different lengths: padding must not change what real tokens compute."""
    ids, mask = pad_batch([[101, 2009, 2001, 2307, 102], [101, 2204, 102], [101, 2919, 3185, 2001, 6659, 2200, 102],
                           [101, 102]], pad_id=0)
    return ids, mask, torch.tensor([1, 1, 0, 0])


def sequence_classifier(tiny_bert, method: str) -> torch.nn.Module:
    """A transformers BertForSequenceClassification ([CLS] pooler), LoRA-wrapped or not:
    the model tuneloop trained before `TextClassifier`, which registry versions still hold."""
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=len(LABELS))
    if method == "full":
        return model
    return get_peft_model(model, LoraConfig(task_type=TaskType.SEQ_CLS, r=4, lora_alpha=32, lora_dropout=0.05,
                                            target_modules=["query", "key", "value", "dense"]))


def model_with_trained_adapters(tiny_bert, method: str = "lora", text_classifier: bool = False) -> torch.nn.Module:
    torch.manual_seed(0)
    model = (build_model(tiny_bert, LABELS, FinetuneConfig(method=method, lora_r=4)) if text_classifier
             else sequence_classifier(tiny_bert, method))
    for name, param in model.named_parameters():
        if "lora_B" in name:  # zero at initialisation, which would hide a wrong adapter path
            param.data.normal_(0.0, 0.1)
    return model


def without_dropout(model: torch.nn.Module) -> torch.nn.Module:
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


@pytest.mark.parametrize("method", ["lora", "full"])
def test_fast_path_gives_the_models_own_logits(tiny_bert, method):
    model = model_with_trained_adapters(tiny_bert, method).eval()
    ids, mask, _ = batch()
    assert fastpath.supports(model)
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(fastpath.sequence_logits(model, ids, mask), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_fast_path_gives_the_models_own_loss_and_gradients(tiny_bert, method):
    model = without_dropout(model_with_trained_adapters(tiny_bert, method)).train()
    ids, mask, labels = batch()
    model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    F.cross_entropy(fastpath.sequence_logits(model, ids, mask), labels).backward()
    got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert got.keys() == expected.keys()
    for name in expected:
        if name.endswith("key.bias") or name.endswith("key.base_layer.bias"):
            # softmax ignores a shift shared by all keys: its true gradient is 0, both sides hold rounding noise
            continue
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-6, msg=name)


def own_forward_logits(model, ids, mask) -> torch.Tensor:
    """A TextClassifier's logits through its encoder's own (transformers, PEFT) forward."""
    hidden = model.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
    return model.head(pool(hidden, mask, model.pooling))


@pytest.mark.parametrize("method", ["lora", "full"])
def test_text_classifier_takes_the_fast_path_and_gives_its_encoders_own_logits_and_gradients(tiny_bert, method):
    model = without_dropout(model_with_trained_adapters(tiny_bert, method, text_classifier=True)).train()
    assert fastpath.supports_encoder(fastpath.unwrap(model.encoder))
    ids, mask, labels = batch()
    F.cross_entropy(own_forward_logits(model, ids, mask), labels).backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(ids, mask), labels).backward()
    got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert got.keys() == expected.keys() and any(n.startswith("head.") for n in got)
    for name in expected:
        if name.endswith("key.bias") or name.endswith("key.base_layer.bias"):
            continue  # see above: a shared shift of every key has gradient 0
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-6, msg=name)
    with torch.no_grad():
        model.eval()
        torch.testing.assert_close(model(ids, mask), own_forward_logits(model, ids, mask), rtol=1e-5, atol=1e-6)


def test_fast_encoder_gives_the_encoders_own_hidden_states(tiny_bert):
    from transformers import AutoModel

    encoder = AutoModel.from_pretrained(tiny_bert).eval()
    ids, mask, _ = batch()
    assert fastpath.supports_encoder(encoder)
    with torch.no_grad():
        expected = encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        got = fastpath.encode(encoder, ids, mask)
    real = mask.bool()  # padded positions hold arbitrary values in both
    torch.testing.assert_close(got[real], expected[real], rtol=1e-5, atol=1e-5)


def test_fast_path_is_refused_for_a_loss_it_does_not_compute(tiny_bert):
    from transformers import AutoModelForSequenceClassification

    regression = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=1,
                                                                    problem_type="regression")
    assert not fastpath.supports(regression)


def test_attention_with_dropout_is_the_fused_attention_when_nothing_is_dropped():
    torch.manual_seed(0)
    qkv = torch.randn(3, 4 * 6, 16)  # 4 texts of 6 tokens, hidden 16
    mask = torch.tensor([[1] * 6, [1] * 3 + [0] * 3, [1] * 5 + [0], [1] + [0] * 5])
    fused = fastpath.attend(qkv, mask, heads=2, p=0.1, training=False)
    manual = fastpath.attend(qkv, mask, heads=2, p=1e-12, training=True)  # the dropout path, dropping nothing
    real = mask.reshape(-1).bool()
    torch.testing.assert_close(manual[real], fused[real], rtol=1e-5, atol=1e-6)


def test_dropped_positions_are_each_dropped_with_probability_p():
    torch.manual_seed(0)
    n, p = 200_000, 0.1
    dropped = fastpath.dropped_positions(n, p).numpy()
    assert (np.diff(dropped) > 0).all() and dropped.min() >= 0 and dropped.max() < n  # sorted, distinct, in range
    assert abs(len(dropped) / n - p) < 4 * np.sqrt(p * (1 - p) / n)
    per_tenth = np.bincount(dropped * 10 // n, minlength=10) / (n / 10)
    assert np.abs(per_tenth - p).max() < 0.01  # no part of the tensor is favoured
    gaps = np.diff(dropped)
    assert abs(gaps.mean() - 1 / p) < 0.1  # geometric gaps: mean 1/p ...
    assert abs((gaps == 1).mean() - p) < 0.01  # ... and P(next element dropped too) = p: independence


def test_dropout_scales_what_it_keeps_and_blocks_the_gradient_of_what_it_drops():
    torch.manual_seed(0)
    x = torch.ones(300, 100, requires_grad=True)
    y = fastpath.dropout(x, 0.25, training=True)
    y.sum().backward()
    dropped = y == 0
    assert 0.2 < dropped.float().mean() < 0.3
    torch.testing.assert_close(y[~dropped], torch.full_like(y[~dropped], 1 / 0.75))
    torch.testing.assert_close(x.grad, (~dropped).float() / 0.75)


def test_dropout_copies_are_independent_and_their_gradients_add_up():
    torch.manual_seed(0)
    x = torch.ones(200, 50, requires_grad=True)
    copies = fastpath.dropout(x, 0.5, training=True, copies=3)  # (3, 200, 50)
    copies.sum().backward()
    agree = (copies[0] == copies[1]).float().mean()
    assert 0.4 < agree < 0.6  # independent masks agree half the time at p = 0.5
    torch.testing.assert_close(x.grad, (copies != 0).float().sum(0) * 2.0)


def test_dropout_add_keeps_the_residual_where_it_drops():
    torch.manual_seed(0)
    x, residual = torch.randn(100, 100, requires_grad=True), torch.randn(100, 100, requires_grad=True)
    out = fastpath.dropout_add(x, residual, 0.2, training=True)
    out.sum().backward()
    dropped = x.grad == 0
    assert 0.15 < dropped.float().mean() < 0.25
    torch.testing.assert_close(out[dropped], residual[dropped])
    torch.testing.assert_close(out[~dropped], (residual + x / 0.8)[~dropped])
    torch.testing.assert_close(residual.grad, torch.ones_like(residual))


def test_dropout_in_eval_mode_is_the_identity():
    x = torch.randn(10, 10)
    assert fastpath.dropout(x, 0.5, training=False) is x
    torch.testing.assert_close(fastpath.dropout_add(x, x, 0.5, training=False), 2 * x)


def test_pad_batch_right_pads_each_row_to_the_longest():
    ids, mask = pad_batch([[5, 6, 7], [8], [9, 10]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0], [9, 10, 0]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0]]
    assert ids.dtype == mask.dtype == torch.long
