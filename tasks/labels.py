"""Labels as class indices: a label's index is its position in the label list, everywhere."""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np


def label_index(labels: Sequence[str]) -> dict[str, int]:
    """Each label's class index."""
    return {name: i for i, name in enumerate(labels)}


def label_indices(values: Iterable[str], labels: Sequence[str], unknown: int | None = None) -> np.ndarray:
    """Label names as class indices (int64).

    Args:
        unknown: the index of a name outside `labels` (e.g. len(labels): a class
            of its own, always wrong); None makes such a name a KeyError.
    """
    index = label_index(labels)
    if unknown is None:
        return np.asarray([index[v] for v in values], dtype=np.int64)
    return np.asarray([index.get(v, unknown) for v in values], dtype=np.int64)
