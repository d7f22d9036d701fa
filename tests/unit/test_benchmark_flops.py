from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # benchmarks/ sits beside tasks/, outside the package

from benchmarks.flops import attention_flops, inference_flops, token_parameters, training_flops  # noqa: E402


def test_training_flops_are_four_per_parameter_per_real_token_plus_three_attention_passes():
    lengths = [3, 5]  # 8 real tokens; padding to 5 would add 2, which are not counted
    attention = 4 * 2 * 10 * (9 + 25)  # 2 layers, hidden 10: Q@K^T and P@V forward
    assert attention_flops(layers=2, hidden=10, lengths=lengths) == attention
    assert training_flops(parameters=1000, layers=2, hidden=10, lengths=lengths) == 4 * 1000 * 8 + 3 * attention
    assert inference_flops(parameters=1000, layers=2, hidden=10, lengths=lengths) == 2 * 1000 * 8 + attention


def test_token_parameters_count_encoder_layers_and_adapters_but_not_embeddings_or_head():
    named = [
        ("bert.embeddings.word_embeddings.weight", torch.zeros(100, 4)),
        ("bert.encoder.layer.0.attention.self.query.weight", torch.zeros(4, 4)),
        ("base_model.model.bert.encoder.layer.1.output.dense.lora_A.default.weight", torch.zeros(2, 4)),
        ("bert.pooler.dense.weight", torch.zeros(4, 4)),
        ("classifier.weight", torch.zeros(2, 4)),
    ]
    assert token_parameters(named) == 16 + 8


@pytest.mark.slow
def test_minilm_has_about_ten_million_token_parameters():
    from tuneloop.model.classifier import resolve_model_path
    from tuneloop.tasks.finetune import FinetuneConfig, build_model

    model = build_model(resolve_model_path("all-MiniLM-L6-v2"), ["negative", "positive"], FinetuneConfig())
    count = token_parameters(model.named_parameters())
    assert 10_600_000 < count < 11_400_000  # 6 layers of 1.77M weights, plus 0.66M in r=16 adapters
