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


def finetune_run(name: str, precision: str, examples_per_s: float, val_macro_f1: float, steps: int = 100) -> dict:
    return {"name": name, "precision": precision, "steps": steps, "examples_per_s": examples_per_s,
            "tokens_per_s": examples_per_s * 27, "useful_gflops_per_s": examples_per_s, "fraction_of_peak": 0.5,
            "val_macro_f1": val_macro_f1, "peak_rss_increase_mib": 100.0}


def benchmark_report(finetune: list[dict]) -> dict:
    scoring = {"rows_per_s": 200.0, "useful_gflops_per_s": 100.0, "fraction_of_peak": 0.5,
               "peak_rss_increase_mib": 20.0, "test_macro_f1": 0.79}
    return {"finetune": finetune, "config": {"batch_size": 32}, "peak_gflops": 180.0,
            "score": {"runs": [scoring, {**scoring, "rows_per_s": 100.0}], "rows": 1044, "batch_size": 64,
                      "identical_predictions": 1044}}


def table_row(table: str, start: str) -> str:
    return next(line for line in table.splitlines() if line.startswith(start))


def test_benchmark_table_prints_each_speed_ratio_only_beside_equal_steps_and_quality():
    from benchmarks.run import markdown_table

    table = markdown_table(benchmark_report([
        finetune_run("tuneloop finetune", "fp32", 80.0, 0.8115),
        finetune_run("HF Trainer + PEFT", "fp32", 30.0, 0.8146),
        finetune_run("tuneloop finetune, bf16", "bf16", 120.0, 0.8000),   # 0.0146 behind the fp32 Trainer: withheld
        finetune_run("HF Trainer + PEFT, bf16", "bf16", 40.0, 0.8050),    # 0.0050 apart: printed
    ]))
    assert "| training examples/s | 80.0 | 30.0 | **2.67x** | >= 3x |" in table
    assert table_row(table, "| fine-tuning with bf16 products").count("|") == 6
    bf16_rows = table[table.index("| fine-tuning with bf16 products"):]
    assert table_row(bf16_rows, "| training examples/s") == \
        "| training examples/s | 120.0 | 30.0 | none: unequal work or quality | >= 3x |"
    assert "| 120.0 · 0.8000 | 40.0 · 0.8050 | **3.00x** |" in table_row(bf16_rows, "| the Trainer in bf16 too")
    assert table_row(bf16_rows, "| tuneloop bf16 against tuneloop fp32").endswith("| 1.50x | |")


def test_benchmark_table_has_no_bf16_block_where_the_cpu_has_no_bf16_units():
    from benchmarks.run import markdown_table

    table = markdown_table(benchmark_report([
        finetune_run("tuneloop finetune", "fp32", 80.0, 0.8115),
        finetune_run("HF Trainer + PEFT", "fp32", 30.0, 0.8146, steps=90)]))  # unequal steps: withheld
    assert "bf16 products" not in table
    assert "| training examples/s | 80.0 | 30.0 | none: unequal work or quality | >= 3x |" in table


def test_rdrop_loss_is_the_cross_entropy_when_both_passes_agree_and_adds_their_symmetric_kl_when_not():
    from benchmarks.recipe_levers import rdrop_loss

    y = torch.tensor([0, 1])
    same = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    ce = torch.nn.functional.cross_entropy(same, y)
    assert rdrop_loss(lambda x, m: same, None, None, y, None, 0.0, 1.0).item() == pytest.approx(ce.item())
    passes = iter([same, torch.zeros(2, 2)])  # the second pass is uniform
    p = same.log_softmax(-1)
    q = torch.full((2, 2), 0.5).log()
    kl = ((p.exp() * (p - q)).sum(-1).mean() + (q.exp() * (q - p)).sum(-1).mean()) / 2
    expected = (ce + torch.nn.functional.cross_entropy(torch.zeros(2, 2), y)) / 2 + 3.0 * kl
    assert rdrop_loss(lambda x, m: next(passes), None, None, y, None, 0.0, 3.0).item() == pytest.approx(expected.item())


@pytest.mark.parametrize("line", [
    "[6/9] finetune: 831 steps in 180s (147.5 ex/s, fp32 products), best validation macro-F1 0.9235; temperature 0.70",
    "[6/9] finetune: 831 steps in 180s (147.5 ex/s), best validation macro-F1 0.9235",
])
def test_recipe_benchmark_reads_steps_seconds_and_rate_from_the_finetune_stage_line(line):
    from benchmarks.recipe import finetune_line

    found = finetune_line("[5/9] tune: off\n" + line)
    assert found is not None and found.groups() == ("831", "180", "147.5")
