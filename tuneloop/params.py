"""`params.yaml`, loaded once at the entry point into frozen, validated values.

Each section is a config dataclass of `tasks/config.py` (the one place its
defaults are written), named after the stage module that uses it; pydantic only
checks them here, at the edge (unknown keys are errors, types are coerced or
refused).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Sequence

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tuneloop.tasks.config import (BaselineConfig, EvaluateConfig, FinetuneConfig, GateConfig, IngestConfig,
                                   MlflowConfig, ModelConfig, MonitorConfig, ServeConfig, SplitConfig,
                                   TriggerConfig, ValidateConfig)
from tuneloop.tasks.errors import TuneloopError
from tuneloop.tasks.tune_space import TuneConfig


class Params(BaseModel):
    """Every section of params.yaml; each stage is handed only its own."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    model: ModelConfig = ModelConfig()
    mlflow: MlflowConfig = MlflowConfig()
    ingest: IngestConfig = IngestConfig()
    # `validate` would shadow a BaseModel method; the YAML key stays `validate`
    validate_: ValidateConfig = Field(default=ValidateConfig(), alias="validate")
    split: SplitConfig = SplitConfig()
    baseline: BaselineConfig = BaselineConfig()
    tune: TuneConfig = TuneConfig()  # optional: off unless tune.enabled
    finetune: FinetuneConfig = FinetuneConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    gate: GateConfig = GateConfig()
    triggers: TriggerConfig = TriggerConfig()
    serve: ServeConfig = ServeConfig()
    monitor: MonitorConfig = MonitorConfig()

    @property
    def declared_labels(self) -> tuple[str, ...] | None:
        """The label set listed in the validate section; None for `labels: auto`."""
        return None if self.validate_.labels == "auto" else tuple(self.validate_.labels)


class ParamsError(TuneloopError, ValueError):
    """params.yaml is missing, not YAML, or does not match the stages' settings."""


def describe(error: ValidationError, path: Path) -> str:
    lines = [f"{path} is not valid:"]
    for item in error.errors():
        where = ".".join(str(p) for p in item["loc"]).replace("validate_", "validate")
        lines.append(f"  {where}: {item['msg']}")
    return "\n".join(lines)


def parse_params(raw: dict, source: Path = Path("params.yaml")) -> Params:
    """Validates a params mapping.

    Raises:
        ParamsError: naming every bad key or value.
    """
    try:
        return Params.model_validate(raw or {})
    except ValidationError as error:
        raise ParamsError(describe(error, source)) from None


def apply_overrides(raw: dict, overrides: Sequence[str]) -> dict:
    """`section.key=value` strings (`--set finetune.epochs=2`) over a params
    mapping, as `dvc exp run -S` writes them: the value is read as YAML (2,
    0.5, true, null, [a, b]); keys nest at the dots.

    Raises:
        ParamsError: an override without `=`, or a dotted key through a value that is not a section.
    """
    merged = copy.deepcopy(raw)
    for override in overrides:
        key, sep, text = override.partition("=")
        if not sep or not key.strip() or "" in key.strip().split("."):
            raise ParamsError(f"--set {override!r}: write section.key=value, e.g. finetune.epochs=2")
        *sections, leaf = key.strip().split(".")
        target = merged
        for name in sections:
            target = target.setdefault(name, {})
            if not isinstance(target, dict):
                raise ParamsError(f"--set {override!r}: {name} is a value, not a section")
        try:
            target[leaf] = yaml.safe_load(text) if text.strip() else text
        except yaml.YAMLError as error:
            raise ParamsError(f"--set {override!r}: the value is not valid YAML: {error}") from None
    return merged


def load_params(path: Path, overrides: Sequence[str] = ()) -> Params:
    """Reads and validates params.yaml, with `--set` overrides over it.

    Raises:
        ParamsError: the file is missing, not YAML, an override is malformed, or the result is invalid.
    """
    if not path.exists():
        raise ParamsError(f"{path} not found: run tuneloop from the project root or pass --params")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ParamsError(f"{path} is not valid YAML: {error}") from None
    if raw is not None and not isinstance(raw, dict):
        raise ParamsError(f"{path} must be a mapping of sections")
    source = path if not overrides else Path(f"{path} with --set {' --set '.join(overrides)}")
    return parse_params(apply_overrides(raw or {}, overrides), source)
