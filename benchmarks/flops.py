"""Useful FLOPs of training and scoring a transformer encoder, as pure functions.

"Useful" counts the matrix multiplications the model needs on real tokens:
padding is not useful work and is not counted, so an implementation that pads
less does not look busier than one that pads more.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def token_parameters(named_parameters) -> int:
    """Parameters applied to every token: those of the encoder layers (LoRA adapters
    included). Embeddings are lookups, and the pooler and classifier act on one
    token per text, so they are left out.

    Args:
        named_parameters: (name, tensor) pairs, e.g. `model.named_parameters()`.
    """
    return int(sum(p.numel() for name, p in named_parameters if ".encoder.layer." in f".{name}"))


def attention_flops(layers: int, hidden: int, lengths: Sequence[int]) -> float:
    """Forward FLOPs of attention scores and weighted values: per layer and text,
    Q @ K^T and P @ V are each 2 * len^2 * hidden."""
    squares = float(np.square(np.asarray(lengths, dtype=np.float64)).sum())
    return 4.0 * layers * hidden * squares


def training_flops(parameters: int, layers: int, hidden: int, lengths: Sequence[int]) -> float:
    """Useful FLOPs of one training pass (forward and backward) over texts of these token lengths.

    4 * parameters * tokens: 2 for the forward matmuls and 2 for the backward
    matmuls that carry the gradient to the layer's input; frozen weights need
    no weight gradient (LoRA adapters do, so their cost of 6 per parameter is
    undercounted here). Attention: its forward, and twice that backward.
    """
    tokens = float(np.asarray(lengths, dtype=np.float64).sum())
    return 4.0 * parameters * tokens + 3.0 * attention_flops(layers, hidden, lengths)


def inference_flops(parameters: int, layers: int, hidden: int, lengths: Sequence[int]) -> float:
    """Useful FLOPs of one forward pass: 2 * parameters * tokens plus attention."""
    tokens = float(np.asarray(lengths, dtype=np.float64).sum())
    return 2.0 * parameters * tokens + attention_flops(layers, hidden, lengths)
