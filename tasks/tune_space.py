"""tune_space: the search space of a tuning study, as params.yaml declares it.

Each key of `tune.space` is a `finetune` setting with a range `{low, high[,
log][, step]}` or `{choices}`. This module parses and checks a space (every
value it can give must make a valid FinetuneConfig, so a typo fails when params
load, not twenty minutes into a search), holds the shipped default space, and
turns Optuna's values into finetune settings and back. It needs no Optuna
import: a trial is anything with `suggest_categorical/int/float`.
"""

from __future__ import annotations

import json
import typing
from dataclasses import dataclass, field, fields, replace
from typing import Any

from tuneloop.values.config import FinetuneConfig

SCALAR_TYPES = (type(None), bool, int, float, str)  # what Optuna stores as a categorical choice


@dataclass(frozen=True)
class ParamSpec:
    """One searched setting: a range `{low, high[, log][, step]}` or `{choices}`."""

    low: int | float | None = None
    high: int | float | None = None
    log: bool = False  # sample uniformly in log space (learning rates)
    step: int | float | None = None
    choices: tuple[Any, ...] | None = None  # any YAML values, lists included (target_modules)
    __pydantic_config__ = {"extra": "forbid"}

    def __post_init__(self) -> None:
        if self.choices is not None:
            if self.low is not None or self.high is not None or self.log or self.step is not None:
                raise ValueError("give either {low, high[, log][, step]} or {choices}, not both")
            if len(self.choices) == 0:
                raise ValueError("choices must not be empty")
            object.__setattr__(self, "choices", tuple(tuple(c) if isinstance(c, list) else c for c in self.choices))
        elif self.low is None or self.high is None:
            raise ValueError("a range needs both low and high (or give choices)")
        elif self.low > self.high:
            raise ValueError(f"low {self.low} is above high {self.high}")
        elif self.log and (self.low <= 0 or self.step is not None):
            raise ValueError("a log range needs low > 0 and no step")

    def bounds(self) -> tuple[int | float, int | float]:
        """(low, high) of a range (__post_init__ refuses a spec with neither choices nor both)."""
        if self.low is None or self.high is None:
            raise ValueError("a range needs both low and high (or give choices)")
        return self.low, self.high


def default_space() -> dict[str, ParamSpec]:
    """The search space shipped in params.yaml."""
    return {
        "method": ParamSpec(choices=("lora",)),
        "learning_rate": ParamSpec(low=3e-4, high=4e-3, log=True),
        "lora_r": ParamSpec(choices=(8, 16, 32)),
        "lora_alpha": ParamSpec(choices=(16, 32)),
        "lora_dropout": ParamSpec(low=0.0, high=0.2),
        "epochs": ParamSpec(low=1, high=2),
        "batch_size": ParamSpec(choices=(16, 32)),
        "max_length": ParamSpec(choices=(64, 128)),
        "weight_decay": ParamSpec(low=0.0, high=0.1),
        "warmup_ratio": ParamSpec(low=0.0, high=0.2),
    }


def as_spec(name: str, spec: Any) -> ParamSpec:
    """A ParamSpec from a mapping, naming unknown keys (pydantic hands ParamSpecs through)."""
    if isinstance(spec, ParamSpec):
        return spec
    if not isinstance(spec, dict):
        raise ValueError(f"tune.space.{name} must be {{low, high[, log][, step]}} or {{choices}}, got {spec!r}")
    unknown = sorted(set(spec) - {f.name for f in fields(ParamSpec)})
    if unknown:
        raise ValueError(f"tune.space.{name}: unknown keys {', '.join(unknown)}; "
                         "a spec is {low, high[, log][, step]} or {choices}")
    try:
        return ParamSpec(**spec)
    except ValueError as error:
        raise ValueError(f"tune.space.{name}: {error}") from None


def is_int_setting(name: str) -> bool:
    hint = typing.get_type_hints(FinetuneConfig)[name]
    return hint is int or set(typing.get_args(hint)) == {int, type(None)}


def check_values(name: str, spec: ParamSpec) -> None:
    """Every value the spec can give must make a valid FinetuneConfig (a typo in
    `method: {choices: [lora, fulll]}` fails here, not twenty minutes in)."""
    values = spec.choices if spec.choices is not None else spec.bounds()
    if spec.choices is None and is_int_setting(name) and not all(float(v).is_integer() for v in values):
        raise ValueError(f"tune.space.{name}: an integer setting needs integer low and high")
    for value in values:
        try:
            apply_params(FinetuneConfig(), {name: value})
        except (TypeError, ValueError) as error:
            raise ValueError(f"tune.space.{name}: {value!r} is not a valid value: {error}") from None


def apply_params(base: FinetuneConfig, values: dict[str, Any]) -> FinetuneConfig:
    """`base` with `values` over it; lists become tuples (JSON and YAML have no tuples)."""
    return replace(base, **{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def choice_label(value: Any) -> Any:
    """What Optuna stores for a choice: scalars as they are, lists as JSON text."""
    return value if isinstance(value, SCALAR_TYPES) else json.dumps(list(value))


def suggest_value(trial, name: str, spec: ParamSpec) -> Any:
    if spec.choices is not None:
        labels = {choice_label(c): c for c in spec.choices}
        return labels[trial.suggest_categorical(name, list(labels))]
    low, high = spec.bounds()
    if is_int_setting(name):
        return trial.suggest_int(name, int(low), int(high), step=int(spec.step or 1), log=spec.log)
    return trial.suggest_float(name, float(low), float(high), step=spec.step, log=spec.log)


def suggest(trial, space: dict[str, ParamSpec], base: FinetuneConfig) -> FinetuneConfig:
    """The trial's settings: `base` with one value drawn for every searched setting."""
    return apply_params(base, {name: suggest_value(trial, name, spec) for name, spec in space.items()})


def decode(params: dict[str, Any], space: dict[str, ParamSpec]) -> dict[str, Any]:
    """A trial's Optuna params as finetune values (JSON text back to lists)."""
    out = {}
    for name, value in params.items():
        spec = space.get(name)
        labels = {choice_label(c): c for c in spec.choices} if spec and spec.choices is not None else {}
        chosen = labels.get(value, value)
        out[name] = list(chosen) if isinstance(chosen, tuple) else chosen
    return out


def encode(config: FinetuneConfig, space: dict[str, ParamSpec]) -> dict[str, Any]:
    """`config`'s values of the searched settings as Optuna params, leaving out any
    the space cannot produce (so enqueueing the defaults never leaves the space)."""
    out = {}
    for name, spec in space.items():
        value = getattr(config, name)
        if spec.choices is not None:
            label = choice_label(value)
            if label in {choice_label(c) for c in spec.choices}:
                out[name] = label
        elif value is not None and spec.low <= value <= spec.high:
            out[name] = value
    return out


def check_space(space: dict[str, Any]) -> dict[str, ParamSpec]:
    """`tune.space` as ParamSpecs, every key a finetune setting and every value valid.

    Raises:
        ValueError: naming the unknown settings, or the setting and value that is wrong.
    """
    specs = {name: as_spec(name, spec) for name, spec in dict(space).items()}
    unknown = sorted(set(specs) - {f.name for f in fields(FinetuneConfig)})
    if unknown:
        raise ValueError(f"tune.space names settings finetune does not have: {', '.join(unknown)}; "
                         f"searchable: {', '.join(f.name for f in fields(FinetuneConfig))}")
    for name, spec in specs.items():
        check_values(name, spec)
    return specs


# --- the `tune` section of params.yaml (its defaults live here, with the space they need)


@dataclass(frozen=True)
class PrunerConfig:
    n_startup_trials: int = 2  # completed trials before any pruning: the median needs a few values
    n_warmup_steps: int = 0  # epochs every trial trains before it may be pruned
    __pydantic_config__ = {"extra": "forbid"}


@dataclass(frozen=True)
class TuneConfig:
    enabled: bool = False  # off: finetune trains with params.finetune as written
    n_trials: int = 12  # finished trials the study aims for, counting those of earlier, interrupted runs
    timeout_minutes: float | None = 11.0  # per run: no trial starts after it, a running one stops at its next epoch
    study_name: str = "tuneloop"  # prefix; the data version and search settings complete the name
    storage: str | None = None  # Optuna RDB URL; None: sqlite optuna.db beside the MLflow SQLite db
    seed: int = 0  # TPE sampler and train subsample
    startup_trials: int = 4  # random trials before TPE models the results
    train_rows: int | None = 3072  # rows each trial trains on (seeded subsample); None: every train row
    enqueue_defaults: bool = True  # trial 0 runs params.finetune's own values: the search starts from them
    heartbeat_seconds: int = 30  # a running trial records that its worker is alive this often
    grace_seconds: int = 180  # a trial silent this long has lost its worker: it is failed and run again
    pruner: PrunerConfig = PrunerConfig()
    space: dict[str, ParamSpec] = field(default_factory=default_space)
    __pydantic_config__ = {"extra": "forbid"}

    def __post_init__(self) -> None:
        object.__setattr__(self, "space", check_space(self.space))
        if self.n_trials < 1 or (self.train_rows is not None and self.train_rows < 1):
            raise ValueError("tune.n_trials and tune.train_rows must be at least 1")
        if self.heartbeat_seconds < 1 or self.grace_seconds <= self.heartbeat_seconds:
            raise ValueError("tune.heartbeat_seconds must be at least 1 and tune.grace_seconds above it")
