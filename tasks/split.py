"""split: deterministic, stratified train/validation/test split.

Texts that are equal after normalisation always land in the same split, so a
duplicate can never leak from train into test. Same data + same seed gives the
same rows in every split: base, champion and challenger are scored on
identical test rows for a data version.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from tasks.validate import normalise_text
from tasks.workspace import Workspace

SPLITS = ("train", "validation", "test")
SPLIT_ALIASES = {"val": "validation", "valid": "validation", "dev": "validation", "eval": "validation"}


@dataclass(frozen=True)
class SplitConfig:
    validation_fraction: float = 0.1
    test_fraction: float = 0.1
    seed: int = 42
    __pydantic_config__ = {"extra": "forbid"}

    def __post_init__(self) -> None:
        if self.validation_fraction < 0 or self.test_fraction < 0:
            raise ValueError("split: validation_fraction and test_fraction must not be negative")
        if not 0 < self.validation_fraction + self.test_fraction < 1:
            raise ValueError("split: validation_fraction + test_fraction must be between 0 and 1")


def declared_split(frame: pd.DataFrame) -> pd.Series | None:
    """The source's own split column, normalised; None when the source declares none.

    Raises:
        ValueError: a row declares a split other than train/validation/test (or an alias);
            the validate stage reports such rows before the split runs.
    """
    if "split" not in frame.columns:
        return None
    declared = frame["split"].astype(str).str.strip().str.lower().replace(SPLIT_ALIASES)
    unknown = declared[~declared.isin(SPLITS)]
    if len(unknown):
        values = sorted(set(unknown))[:5]
        raise ValueError(f"split: {len(unknown)} rows declare a split outside {list(SPLITS)}: {values}")
    return declared


def assign_groups(groups: np.ndarray, config: SplitConfig, rng: np.random.Generator) -> dict[int, str]:
    """Shuffles one class's duplicate groups and cuts them by the fractions."""
    order = rng.permutation(groups)
    n_test = int(round(len(order) * config.test_fraction))
    n_val = int(round(len(order) * config.validation_fraction))
    names = ["test"] * n_test + ["validation"] * n_val + ["train"] * (len(order) - n_test - n_val)
    return dict(zip(order.tolist(), names))


def split_dataset(frame: pd.DataFrame, config: SplitConfig) -> pd.DataFrame:
    """Adds a `split` column (train/validation/test).

    A split declared by the source is kept. Otherwise rows are grouped by
    normalised text, each group is stratified by its first row's label, and
    groups are assigned with a generator seeded by `config.seed`.
    """
    out = frame.copy()
    declared = declared_split(frame)
    if declared is not None:
        out["split"] = declared.to_numpy()
        return out
    # the validate stage's normalisation: what it calls leakage, the split never creates
    group = pd.factorize(normalise_text(out["text"]))[0]
    group_label = pd.Series(out["label"].to_numpy(), index=group).groupby(level=0).first()
    rng = np.random.default_rng(config.seed)
    assignment: dict[int, str] = {}
    for label in sorted(group_label.unique()):
        assignment.update(assign_groups(group_label.index[group_label == label].to_numpy(), config, rng))
    out["split"] = [assignment[g] for g in group]
    return out


def run_split(config: SplitConfig, workspace: Workspace) -> dict[str, int]:
    """Reads the ingested dataset, writes `data/split/splits.parquet`.

    Returns:
        Row counts per split.
    """
    frame = split_dataset(pd.read_parquet(workspace.dataset), config)
    workspace.splits.parent.mkdir(parents=True, exist_ok=True)
    frame.to_parquet(workspace.splits, index=False)
    return {name: int((frame["split"] == name).sum()) for name in SPLITS}


def load_split(workspace: Workspace, name: str) -> pd.DataFrame:
    frame = pd.read_parquet(workspace.splits)
    return frame[frame["split"] == name].reset_index(drop=True)
