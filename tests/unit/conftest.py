from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ helpers (tiny_model)

from tiny_model import build_tiny_bert, sentiment_rows  # noqa: E402


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    """A 2-layer, hidden-32 BERT with random weights and MiniLM's tokenizer."""
    return build_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def toy_task() -> dict:
    """Separable train/validation rows for the tiny model."""
    return {"train": sentiment_rows(256, seed=0), "validation": sentiment_rows(64, seed=1),
            "labels": ["negative", "positive"]}
