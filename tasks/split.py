"""split: stable, deterministic train/validation/test split.

A row's split is a pure function of its normalised text and the seed: a hash
of the two, read as a number in [0, 1), is held against the fractions. So

- texts equal after normalisation land in the same split: a duplicate never
  leaks from train into test;
- a row keeps its split in every later data version: when new rows arrive
  (incoming files, drift feedback) no train row becomes a test row, and
  champion and challenger are scored on rows neither trained on;
- every class is split in the same proportions in expectation (a class of n
  rows gets about n * test_fraction test rows).

A split declared by the source (a `split` column) is kept; a declared split
that has no validation or no test rows gets them carved from its train rows by
the same hash.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd

from tuneloop.tasks.validate import SPLITS, leaked_from, normalise_text
from tuneloop.values.config import SplitConfig
from tuneloop.values.errors import TuneloopError
from tuneloop.values.workspace import Workspace

SPLIT_ALIASES = {"val": "validation", "valid": "validation", "dev": "validation", "eval": "validation"}


class SplitError(TuneloopError, ValueError):
    """The data cannot be split as declared."""


def declared_split(frame: pd.DataFrame) -> pd.Series | None:
    """The source's own split column, normalised; None when the source declares none.

    Raises:
        SplitError: a row declares a split other than train/validation/test (or an alias);
            the validate stage reports such rows before the split runs.
    """
    if "split" not in frame.columns:
        return None
    declared = frame["split"].astype(str).str.strip().str.lower().replace(SPLIT_ALIASES)
    unknown = declared[~declared.isin(SPLITS)]
    if len(unknown):
        values = sorted(set(unknown))[:5]
        raise SplitError(f"split: {len(unknown)} rows declare a split outside {list(SPLITS)}: {values}")
    return declared


def check_declared_split(frame: pd.DataFrame) -> None:
    """Refuses a declared split that has no train rows (before any compute).

    Raises:
        SplitError: naming the fix.
    """
    declared = declared_split(frame) if "split" in frame.columns else None
    if declared is not None and not (declared == "train").any():
        counts = declared.value_counts().to_dict()
        raise SplitError(f"split: no row is a train row ({counts}): mark some rows `train` "
                         "in the split column, or drop ingest.split_column to let tuneloop split")


class UntrainableData(SplitError):
    """The data passed validation's rules but cannot train and test a classifier."""


def trainability_problems(frame: pd.DataFrame, config: SplitConfig) -> list[str]:
    """Why no classifier can be trained, tuned and tested on `frame` as the split
    stage will divide it: no rows, fewer than two labels, a split without rows,
    or train rows of one label. Empty when it can."""
    labels = sorted(frame["label"].dropna().unique().tolist()) if len(frame) else []
    if not len(frame):
        return ["the data has no rows (after ingest.exclude_labels): nothing to train on"]
    if len(labels) < 2:
        return [f"the data holds {len(labels)} label ({labels}): a classifier needs at least 2"]
    split = split_dataset(frame, config)
    counts = split_counts(split)
    problems = [f"after the split, {name} has no rows ({', '.join(f'{k} {v}' for k, v in counts.items())})"
                for name in SPLITS if not counts[name]]
    if problems:
        distinct = normalise_text(frame["text"].astype(str)).nunique()
        problems.append(f"the data holds {distinct} distinct texts (after normalising) and rows with one text "
                        "share a split: add rows with other texts")
    elif split.loc[split["split"] == "train", "label"].nunique() < 2:
        problems.append("after the split, every train row has one label: add rows of the other labels")
    return problems


def check_trainable(frame: pd.DataFrame, config: SplitConfig) -> None:
    """Refuses data no model can learn from and be scored on, before any model is loaded.

    Raises:
        UntrainableData: naming every reason.
    """
    problems = trainability_problems(frame, config)
    if problems:
        raise UntrainableData("the data cannot train a classifier: " + "; ".join(problems))


def stable_unit(texts: pd.Series, seed: int) -> np.ndarray:
    """A number in [0, 1) per text, from a SHA-256 of the seed and the normalised
    text: the same text gives the same number in every data version."""
    keys = normalise_text(texts.astype(str))
    return np.fromiter(
        (int.from_bytes(hashlib.sha256(f"{seed}\x00{key}".encode()).digest()[:8], "big") / 2.0**64 for key in keys),
        dtype=np.float64, count=len(keys))


def hashed_split(unit: np.ndarray, config: SplitConfig) -> np.ndarray:
    """validation below `validation_fraction`, then test up to the sum of both fractions, train above."""
    cut = config.validation_fraction + config.test_fraction
    return np.where(unit < config.validation_fraction, "validation", np.where(unit < cut, "test", "train"))


def split_dataset(frame: pd.DataFrame, config: SplitConfig) -> pd.DataFrame:
    """Adds a `split` column (train/validation/test).

    Without a declared split every row gets its hashed split. A declared split
    is kept, except that when it has no validation (or no test) rows, the
    declared train rows whose hashed split is validation (or test) become so.

    Raises:
        SplitError: an unknown declared split, or no train rows.
    """
    out = frame.copy()
    hashed = hashed_split(stable_unit(out["text"], config.seed), config)
    declared = declared_split(frame)
    if declared is None:
        out["split"] = hashed
    else:
        split = declared.to_numpy(dtype=object).copy()
        split[leaked_rows(out["text"], split)] = "train"
        for missing in ("validation", "test"):
            if not (split == missing).any():
                split[(split == "train") & (hashed == missing)] = missing
        out["split"] = split
        check_declared_split(frame)
    return out


def leaked_rows(texts: pd.Series, split: np.ndarray) -> np.ndarray:
    """Validation/test rows whose text is also a train row's, by the validate
    stage's own `split_leakage` rule: a declared split's leak, which that stage
    refuses unless the rule is a warning; such rows are moved to train, so no
    model is scored on a text it trained on."""
    text = texts.astype(str).reset_index(drop=True)
    rows = pd.Series(np.arange(1, len(text) + 1))
    return leaked_from(text, pd.Series(split, dtype=object), rows).notna().to_numpy()


def split_counts(frame: pd.DataFrame) -> dict[str, int]:
    return {name: int((frame["split"] == name).sum()) for name in SPLITS}


def run_split(config: SplitConfig, workspace: Workspace) -> dict[str, int]:
    """Reads the ingested dataset, writes `data/split/splits.parquet`.

    Raises:
        UntrainableData: the data cannot train and test a classifier (check_trainable); nothing is written.

    Returns:
        Row counts per split (and `leaked_to_train`, when declared validation/test
        rows repeating a train text were moved).
    """
    source = pd.read_parquet(workspace.dataset)
    check_trainable(source, config)
    frame = split_dataset(source, config)
    workspace.splits.parent.mkdir(parents=True, exist_ok=True)
    frame.to_parquet(workspace.splits, index=False)
    counts = split_counts(frame)
    declared = declared_split(source)
    moved = int(leaked_rows(source["text"], declared.to_numpy()).sum()) if declared is not None else 0
    return {**counts, "leaked_to_train": moved} if moved else counts


def earlier_test_rows(texts: pd.Series, earlier: pd.DataFrame) -> np.ndarray:
    """Which of `texts` (this data version's test rows) were test rows of an `earlier` split
    frame too (its `split` column), by normalised text: with stable splits these are the old
    test rows still held, the rows a model that forgot its old domain would now get wrong."""
    known = set(normalise_text(earlier.loc[earlier["split"] == "test", "text"].astype(str)))
    return normalise_text(texts.astype(str)).isin(known).to_numpy()


def load_split(workspace: Workspace, name: str) -> pd.DataFrame:
    frame = pd.read_parquet(workspace.splits)
    return frame[frame["split"] == name].reset_index(drop=True)
