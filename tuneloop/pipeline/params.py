"""`params.yaml`, loaded once at the entry point into frozen, validated values.

Each section is a config dataclass of `tuneloop/values/config.py` (the one place its
defaults are written), named after the stage module that uses it; pydantic only
checks them here, at the edge (unknown keys are errors, types are coerced or
refused).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Sequence, cast

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tuneloop.tasks.tune_space import TuneConfig
from tuneloop.values.config import (
    BaselineConfig,
    EvaluateConfig,
    FinetuneConfig,
    GateConfig,
    IngestConfig,
    MlflowConfig,
    ModelConfig,
    MonitorConfig,
    ServeConfig,
    ShadowConfig,
    SplitConfig,
    TriggerConfig,
    ValidateConfig,
)
from tuneloop.values.errors import TuneloopError


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
    shadow: ShadowConfig = ShadowConfig()

    @property
    def declared_labels(self) -> tuple[str, ...] | None:
        """The label set listed in the validate section; None for `labels: auto`."""
        labels = self.validate_.labels  # "auto" or a tuple: ValidateConfig makes a YAML null "auto"
        return None if labels == "auto" else tuple(cast(tuple[str, ...], labels))


class ParamsError(TuneloopError, ValueError):
    """params.yaml is missing, not YAML, or does not match the stages' settings."""


def describe(error: ValidationError, path: Path) -> str:
    """Every problem on one line, each named by its section and key."""
    problems = []
    for item in error.errors():
        where = ".".join(str(p) for p in item["loc"]).replace("validate_", "validate")
        message = item["msg"].removeprefix("Value error, ")  # a section's own check names its key already
        problems.append(message if message.startswith(f"{where}.") else f"{where}: {message}")
    return f"{path} is not valid: " + "; ".join(problems)


class DuplicateKey(yaml.MarkedYAMLError):
    """A mapping that writes one key twice."""


class UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key written twice in one mapping: plain
    PyYAML keeps the last one silently, so one of two settings would be ignored."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set[str] = set()
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            if key_node.value in seen:
                raise DuplicateKey(problem=f"key {key_node.value!r} is written twice in one section",
                                   problem_mark=key_node.start_mark)
            seen.add(key_node.value)
        return super().construct_mapping(node, deep)


def read_yaml(text: str, what: str):
    """`text` parsed by UniqueKeyLoader.

    Raises:
        ParamsError: in one line, naming `what`, the line and the problem (a duplicated key,
            a syntax error, nesting too deep to read).
    """
    try:
        return yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = " ".join(str(error.problem or error.context or "").split())
        if isinstance(error, DuplicateKey):
            raise ParamsError(f"{what}: {problem}{where}; YAML would keep only the last, remove one") from None
        raise ParamsError(f"{what} is not valid YAML: {problem}{where}") from None
    except yaml.YAMLError as error:
        raise ParamsError(f"{what} is not valid YAML: {' '.join(str(error).split())}") from None
    except RecursionError:
        raise ParamsError(f"{what} nests its values too deeply to read (thousands of levels)") from None


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
        target[leaf] = read_yaml(text, f"--set {override!r}: the value") if text.strip() else text
    return merged


def read_params_text(path: Path) -> str:
    """The text of a params file.

    Raises:
        ParamsError: the path is missing, a folder or not a regular file, or its bytes are not UTF-8.
    """
    if not path.exists():
        raise ParamsError(f"{path} not found: run tuneloop from the project root or pass --params")
    if path.is_dir():
        raise ParamsError(f"{path} is a folder, not a params file: pass --params FILE")
    if not path.is_file():
        raise ParamsError(f"{path} is not a regular file (a pipe or a device?): pass --params FILE")
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise ParamsError(f"{path} is not UTF-8 (line {line}, byte {error.start}): save it as UTF-8") from None


def load_params(path: Path, overrides: Sequence[str] = ()) -> Params:
    """Reads and validates params.yaml, with `--set` overrides over it.

    An empty file (or one of comments only) is an error, never the code's
    defaults: those name tuneloop's own movie-review data.

    Raises:
        ParamsError: the file is missing, unreadable, not YAML, empty or repeats a key, an
            override is malformed, or the result is invalid; always one line.
    """
    raw = read_yaml(read_params_text(path), str(path))
    if raw is not None and not isinstance(raw, dict):
        raise ParamsError(f"{path} must be a mapping of sections")
    if not raw:
        raise ParamsError(f"{path} is empty: tuneloop does not fall back to its shipped defaults (they train on "
                          "its own movie reviews); write your sections, or let `tuneloop init DATA` write them")
    source = path if not overrides else Path(f"{path} with --set {' --set '.join(overrides)}")
    return parse_params(apply_overrides(raw, overrides), source)
