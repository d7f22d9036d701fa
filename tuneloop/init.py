"""`tuneloop init DATA [DIR]`: a project for a user's own labelled file.

Reads the file as ingest will (CSV with `,` `;` tab or `|`, JSON Lines,
Parquet; UTF-8 with or without BOM), proposes its text, label, split and slice
columns, fits the validation bounds to what it read (naming the rows the
defaults would have refused), and writes a commented `params.yaml`, a
`dvc.yaml` and a `.gitignore`; git and DVC are initialised if needed.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import numpy as np
import pandas as pd
import yaml

from tuneloop.tasks.ingest import IngestConfig, label_texts, read_table
from tuneloop.tasks.split import SPLIT_ALIASES, SPLITS, leaked_rows
from tuneloop.tasks.validate import ValidateConfig
from tuneloop.values.errors import TuneloopError
from tuneloop.values.workspace import folder_problem

LABEL_NAMES = ("label", "labels", "intent", "category", "class", "target", "y", "sentiment", "topic", "tag")
TEXT_NAMES = ("text", "sentence", "utterance", "query", "question", "review", "content", "body", "message")
SPLIT_NAMES = ("split", "set", "partition", "subset", "fold")
# A label meaning "none of these": the model learns it like any label and abstains when it wins.
OUT_OF_SCOPE_NAMES = ("oos", "out_of_scope", "out-of-scope", "outofscope", "other", "none", "no_intent", "unknown")
# Columns that name rows or folds, not what the data is about: never slices.
NOT_SLICE_NAME = re.compile(r"(^|_)(id|ids|uuid|guid|key|index|idx|row|fold|folds|kfold|seed|hash|timestamp|ts|"
                            r"date|time)(_|$)|^(k?fold|cv)_?\d*$", re.IGNORECASE)
GITIGNORE = """.venv/
__pycache__/
# produced by runs (the data snapshot is tracked by DVC, the registry by MLflow;
# metrics/ and plots/ are small and tracked in git, for dvc metrics/plots diff)
/mlflow.db
/optuna.db
/mlartifacts/
/models/
/reports/
/state/
/data/prepared/
/data/split/
/data/incoming/*
!/data/incoming/.gitkeep
/data/restored/
/.dvc-remote/
/dvc_plots/
"""
PLOTS_PAGE = Path(__file__).with_name("dvc_plots.html")  # `dvc plots show` offline: Vega carried inline
SECTION_NOTES = {
    "model": "the base model: all-MiniLM-L6-v2 ships with tuneloop; any local Hugging Face folder works",
    "mlflow": "null tracking_uri: SQLite (mlflow.db) in this folder; every run adds a registry version",
    "ingest": "your file and its columns, as `tuneloop init` read them",
    "validate": "bounds fitted to your data by `tuneloop init`; labels: auto reads the label set from the data",
    "split": "a row's split is a hash of its text: it never moves when the data grows",
    "baseline": "the frozen base model + a linear probe (C chosen on validation): what fine-tuning must beat",
    "tune": "optional search of finetune's settings (tuneloop run --tune)",
    "finetune": "LoRA from the probe's head; more epochs for small or many-class data",
    "evaluate": "base probe, champion and challenger on the same test rows",
    "gate": "promote only with a gain whose bootstrap interval is above zero",
    "shadow": "a shadow version scores live traffic beside the champion; `tuneloop monitor` promotes or discards it",
}


class InitError(TuneloopError, ValueError):
    """The file cannot start a project as it is."""


@dataclass(frozen=True)
class Columns:
    text: str
    label: str
    split: str | None = None
    slices: tuple[str, ...] = ()


@dataclass
class Proposal:
    """What init read and what it proposes."""

    rows: int
    columns: Columns
    labels: list[str]
    validate: dict
    notes: list[str] = field(default_factory=list)
    length_slices: tuple[int, ...] = (10, 25)
    out_of_scope: str | None = None  # the label meaning "none of these", if the data has one


def text_like(frame: pd.DataFrame) -> list[str]:
    """Columns of text values (not numbers), in file order."""
    return [c for c in frame.columns if frame[c].dropna().map(lambda v: isinstance(v, str)).all()
            and frame[c].notna().any()]


def propose_columns(frame: pd.DataFrame, text: str | None = None, label: str | None = None,
                    split: str | None = None) -> Columns:
    """The text column (by name, else the longest texts), the label column (by
    name, else the text column with fewest distinct values), a split column whose
    values are train/validation/test, and the other few-valued columns as slices.

    Raises:
        InitError: a named column is missing, or none fits.
    """
    for name in (text, label, split):
        if name is not None and name not in frame.columns:
            raise InitError(f"column {name!r} is not in the file; it has {list(frame.columns)}")
    strings = text_like(frame)
    by_name = {str(c).lower(): c for c in frame.columns}
    text = text or next((by_name[n] for n in TEXT_NAMES if n in by_name), None) or max(
        strings, key=lambda c: frame[c].astype(str).str.len().mean(), default=None)
    if text is None:
        raise InitError("no column holds text; name it with --text")
    split = split or next((by_name[n] for n in SPLIT_NAMES if n in by_name and is_split(frame[by_name[n]])), None)
    candidates = [c for c in frame.columns if c not in (text, split)]
    label = label or next((by_name[n] for n in LABEL_NAMES if n in by_name and by_name[n] in candidates), None) or min(
        (c for c in candidates if 2 <= frame[c].nunique() <= max(2, len(frame) // 2)),
        key=lambda c: frame[c].nunique(), default=None)
    if label is None:
        raise InitError("no column looks like a label (2 or more values, repeated); name it with --label")
    slices = tuple(c for c in candidates if c != label and describes_data(frame, c) and not is_split(frame[c]))
    return Columns(str(text), str(label), None if split is None else str(split), tuple(map(str, slices)))


def describes_data(frame: pd.DataFrame, column) -> bool:
    """Whether a column is worth a slice: a few repeated values (2 to 50, none of
    them a row's own, most values held by 10+ rows) and not a name that says it
    indexes rows or cross-validation folds (`id`, `fold`, `KFold_3` values)."""
    values = frame[column].dropna()
    counts = values.astype(str).value_counts()
    if not 2 <= len(counts) <= 50 or NOT_SLICE_NAME.search(str(column)):
        return False
    if counts.index.str.fullmatch(r"(?i)(k?fold|cv|split)[ _-]?\d+").all():
        return False
    return len(counts) <= len(values) / 10 and float((counts >= 10).mean()) >= 0.5


def out_of_scope_label(labels: pd.Series) -> str | None:
    """A label that says "none of these" (oos, out_of_scope, other, none ...), if the data has one."""
    by_name = {str(v).strip().lower().replace(" ", "_"): str(v) for v in labels.unique()}
    return next((by_name[name] for name in OUT_OF_SCOPE_NAMES if name in by_name), None)


def is_split(values: pd.Series) -> bool:
    normalised = values.dropna().astype(str).str.strip().str.lower().replace(SPLIT_ALIASES)
    return bool(len(normalised) > 0 and normalised.isin(SPLITS).all() and (normalised == "train").any())


def fitted_bounds(texts: pd.Series, labels: pd.Series) -> tuple[dict, list[str]]:
    """validate's bounds widened to what the data holds, and a note for each
    rule the defaults would have broken (with the rows they would have refused).

    Empty texts stay refused (min_text_chars >= 1); a class below 10 rows
    stays refused too: too few to learn or to measure.
    """
    defaults, notes = ValidateConfig(), []
    chars = texts.astype(str).str.strip().str.len()
    counts = labels.value_counts()
    bounds = {"min_text_chars": defaults.min_text_chars, "max_text_chars": defaults.max_text_chars,
              "min_rows_per_class": defaults.min_rows_per_class, "max_class_imbalance": defaults.max_class_imbalance}
    shortest = int(chars[chars > 0].min()) if (chars > 0).any() else 1
    if shortest < defaults.min_text_chars:
        bounds["min_text_chars"] = max(1, shortest)
        refused = texts[(chars > 0) & (chars < defaults.min_text_chars)]
        notes.append(f"min_text_chars {defaults.min_text_chars} -> {bounds['min_text_chars']}: the default would "
                     f"refuse {len(refused)} short texts, e.g. rows {[int(i) + 1 for i in refused.index[:5]]}")
    if chars.max() > defaults.max_text_chars:
        bounds["max_text_chars"] = int(chars.max())
        notes.append(f"max_text_chars {defaults.max_text_chars} -> {bounds['max_text_chars']}: "
                     f"{int((chars > defaults.max_text_chars).sum())} texts are longer")
    if counts.min() < defaults.min_rows_per_class:
        bounds["min_rows_per_class"] = max(10, int(counts.min()))
        small = counts[counts < defaults.min_rows_per_class]
        notes.append(f"min_rows_per_class {defaults.min_rows_per_class} -> {bounds['min_rows_per_class']}: "
                     f"{len(small)} classes are smaller, e.g. {as_counts(small.head(3))}")
    ratio = float(counts.max() / counts.min())
    if ratio > defaults.max_class_imbalance:
        bounds["max_class_imbalance"] = float(round(ratio + 0.5))
        notes.append(f"max_class_imbalance {defaults.max_class_imbalance:g} -> {bounds['max_class_imbalance']:g}: "
                     f"largest/smallest class is {ratio:.1f}")
    return bounds, notes


def declared_leaks(frame: pd.DataFrame, columns: Columns) -> np.ndarray:
    """Row positions of the declared split's validation/test rows that repeat a train text."""
    split = frame[columns.split].astype(str).str.strip().str.lower().replace(SPLIT_ALIASES).to_numpy()
    return np.flatnonzero(leaked_rows(frame[columns.text].fillna("").astype(str), split))


def as_counts(counts: pd.Series) -> dict[str, int]:
    return {str(k): int(v) for k, v in counts.items()}


def length_edges(texts: pd.Series) -> tuple[int, ...]:
    """Word-count edges at the thirds of the data: three length slices of similar size."""
    words = texts.astype(str).str.split().str.len()
    edges = sorted({max(2, int(round(q))) for q in words.quantile([1 / 3, 2 / 3])})
    return tuple(edges)


def propose(frame: pd.DataFrame, columns: Columns) -> Proposal:
    labels = label_texts(frame[columns.label], columns.label).dropna()  # as ingest will read them
    if labels.nunique() < 2:
        raise InitError(f"column {columns.label!r} holds fewer than 2 labels: nothing to classify")
    bounds, notes = fitted_bounds(frame[columns.text].fillna(""), labels)
    if columns.split:
        leaked = declared_leaks(frame, columns)
        if len(leaked):
            bounds["severity"] = {"split_leakage": "warning"}
            notes.append(f"split_leakage error -> warning: {len(leaked)} validation/test rows of your split repeat "
                         f"a train text (rows {[int(i) + 1 for i in leaked[:5]]}); the split stage moves them to "
                         "train, so no model is scored on a text it trained on")
    tiny = labels.value_counts()[lambda c: c < bounds["min_rows_per_class"]]
    if len(tiny):
        notes.append(f"classes with fewer than {bounds['min_rows_per_class']} rows will stop validation: "
                     f"{as_counts(tiny)}; add rows or list them in ingest.exclude_labels")
    oos = out_of_scope_label(labels)
    if oos is not None:
        notes.append(f"model.out_of_scope_label: {oos}: the model learns it like any label, answers "
                     "`abstained: true` when it wins, and its confidence threshold is chosen to catch "
                     "out-of-scope texts (set it to null if the label means something else)")
    return Proposal(len(frame), columns, sorted(labels.unique()), bounds, notes,
                    length_edges(frame[columns.text].fillna("")), oos)


def params_text(proposal: Proposal, source: str, name: str, base_model: str) -> str:
    """A commented params.yaml: every section at its defaults but for the data's own."""
    from tuneloop.pipeline.params import Params

    columns = proposal.columns
    ingest = IngestConfig(source=source, text_column=columns.text, label_column=columns.label,
                          slice_columns=columns.slices, split_column=columns.split,
                          length_slices=proposal.length_slices)
    params = Params.model_validate({
        "model": {"base": base_model, "out_of_scope_label": proposal.out_of_scope}, "mlflow": {"model_name": name},
        "ingest": {k: v for k, v in vars(ingest).items()},
        "validate": {"labels": "auto", **proposal.validate},  # severity: only the rules init changed
    })
    sections = params.model_dump(mode="json", by_alias=True)
    sections["validate"].pop("pii_patterns")  # the built-in patterns; add your own here
    out = [f"# tuneloop project for {source} ({proposal.rows} rows, {len(proposal.labels)} labels),",
           "# written by `tuneloop init`. Run it: tuneloop run. Each section is one stage's settings;",
           "# unknown keys are errors. The README explains every knob.", ""]
    for section, values in sections.items():
        if section in SECTION_NOTES:
            out.append(f"# {SECTION_NOTES[section]}")
        out.append(yaml.safe_dump({section: values}, sort_keys=False, default_flow_style=False,
                                  allow_unicode=True).rstrip())
        out.append("")
    return "\n".join(out)


def dvc_yaml_text() -> str | None:
    """The pipeline's dvc.yaml for a user's project: tuneloop's own stages,
    without the dependencies on tuneloop's source files (they live in its
    checkout); None when tuneloop is not installed from a checkout."""
    shipped = Path(__file__).resolve().parents[1] / "dvc.yaml"
    if not shipped.exists():
        return None
    pipeline = yaml.safe_load(shipped.read_text())
    for stage in pipeline["stages"].values():
        stage["deps"] = [d for d in stage.get("deps", []) if not str(d).startswith(("tasks/", "tuneloop/"))]
    return ("# dvc repro runs these stages; tuneloop run runs the same as one Prefect flow and records\n"
            "# each stage in dvc.lock. dvc metrics show, dvc plots show, dvc exp show --only-changed.\n"
            + yaml.safe_dump(pipeline, sort_keys=False))


def run_git(folder: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=folder, capture_output=True, check=False)


def init_project(data: Path, folder: Path, text: str | None = None, label: str | None = None,
                 split: str | None = None, base_model: str = "all-MiniLM-L6-v2", force: bool = False) -> Proposal:
    """Writes params.yaml, dvc.yaml and .gitignore into `folder` for `data`.

    Raises:
        InitError: the file cannot be read as a labelled table, `folder` is a
            file (or below one), or it already holds a params.yaml (unless `force`).
    """
    from tuneloop.tasks.ingest import open_dvc_repo

    data, folder = data.resolve(), folder.resolve()
    unusable = folder_problem(folder)
    if unusable:
        raise InitError(f"the project folder {folder} cannot be used: {unusable}; name a folder as the second "
                        "argument (`tuneloop init DATA DIR`)")
    frame = read_table(data)
    proposal = propose(frame, propose_columns(frame, text, label, split))
    if (folder / "params.yaml").exists() and not force:
        raise InitError(f"{folder / 'params.yaml'} exists; pass --force to overwrite it")
    folder.mkdir(parents=True, exist_ok=True)
    source = str(data.relative_to(folder)) if folder in data.parents else str(data)
    name = "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in folder.name).strip("-.") or "project"
    (folder / "params.yaml").write_text(params_text(proposal, source, f"{name}-classifier", base_model))
    dvc_yaml = dvc_yaml_text()
    if dvc_yaml is not None and not (folder / "dvc.yaml").exists():
        (folder / "dvc.yaml").write_text(dvc_yaml)
    if not (folder / ".gitignore").exists():
        (folder / ".gitignore").write_text(GITIGNORE)
    # a dependency of dvc.yaml's ingest: it must exist (the default is a folder, never None)
    incoming = folder / cast(str, IngestConfig().incoming_dir)
    incoming.mkdir(parents=True, exist_ok=True)
    (incoming / ".gitkeep").touch()
    if not (folder / ".git").exists():
        run_git(folder, "init", "-q")
    open_dvc_repo(folder, IngestConfig().dvc_remote).close()
    offline_plots(folder)
    return proposal


def offline_plots(folder: Path) -> None:
    """`dvc plots show` writes a page that renders offline: DVC's page loads Vega
    from a CDN; this template (config plots.html_template) carries it inline."""
    shutil.copy(PLOTS_PAGE, folder / ".dvc" / PLOTS_PAGE.name)
    config = folder / ".dvc" / "config"
    text = config.read_text() if config.exists() else ""
    if "html_template" not in text:
        config.write_text(text + f"[plots]\n    html_template = {PLOTS_PAGE.name}\n")
