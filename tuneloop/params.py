"""`params.yaml`, loaded once at the entry point into frozen, validated values.

Each section is a config dataclass of `tasks/config.py` (the one place its
defaults are written), named after the stage module that uses it; pydantic only
checks them here, at the edge (unknown keys are errors, types are coerced or
refused).
"""

from __future__ import annotations

from pathlib import Path

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


def load_params(path: Path) -> Params:
    """Reads and validates params.yaml.

    Raises:
        ParamsError: the file is missing, not YAML, or invalid.
    """
    if not path.exists():
        raise ParamsError(f"{path} not found: run tuneloop from the project root or pass --params")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ParamsError(f"{path} is not valid YAML: {error}") from None
    if raw is not None and not isinstance(raw, dict):
        raise ParamsError(f"{path} must be a mapping of sections")
    return parse_params(raw or {}, path)
