"""How a registered version loads and predicts as an MLflow model: tuneloop's
pyfunc wrapper (bundled base referenced, or a local base carried) against
`mlflow.transformers` on the same base and LoRA settings, and tuneloop's own
loader (what `tuneloop serve` uses) as the reference.

    OMP_NUM_THREADS=1 python benchmarks/mlflow_flavor.py   # CPU, ~2 minutes

Prints, per packaging: folder size, load time and the time to predict 64 texts.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import pandas as pd

TEXTS = [f"review {i}: the film was {'great' if i % 2 else 'dull'} and the cast {'shone' if i % 3 else 'struggled'}"
         for i in range(64)]


def size_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file()) / 2**20


def timed(fn):
    started = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - started


def pyfunc_row(label: str, folder: Path) -> str:
    import mlflow

    model, load_s = timed(lambda: mlflow.pyfunc.load_model(str(folder)))
    model.predict(pd.DataFrame({"text": TEXTS[:2]}))  # warm-up
    _, predict_s = timed(lambda: model.predict(pd.DataFrame({"text": TEXTS})))
    return f"{label:44s} {size_mb(folder):8.1f} MB  load {load_s:5.2f} s  predict 64 {predict_s * 1000:7.1f} ms"


def main() -> None:
    from tuneloop.model.classifier import load_classifier, predict_proba, resolve_model_path
    from tuneloop.plumbing import mlflow_model
    from tuneloop.tasks.finetune import FinetuneConfig, finetune

    base = resolve_model_path("all-MiniLM-L6-v2")
    out = Path(tempfile.mkdtemp(prefix="flavor-"))
    rows = (TEXTS, [i % 2 for i in range(64)])
    trained = finetune("all-MiniLM-L6-v2", base, rows, rows, ["dull", "great"],
                       FinetuneConfig(max_steps=2, batch_size=16, max_length=64, head_init="random"),
                       out / "trained", out / "ckpt", "bench", progress=False).model_dir
    card = mlflow_model.CardFacts("bench", "0" * 32, "x.csv", "MiniLM", "0" * 64, "unknown", {})
    referenced = mlflow_model.save_version_model(trained, "all-MiniLM-L6-v2", base, card, out / "ref" / "m",
                                                 out / "ref")
    carried = mlflow_model.save_version_model(trained, str(base), base, card, out / "car" / "m", out / "car")

    classifier, load_s = timed(lambda: load_classifier(trained, "all-MiniLM-L6-v2", "cpu"))
    predict_proba(classifier, TEXTS[:2])
    _, predict_s = timed(lambda: predict_proba(classifier, TEXTS))
    print(f"{'tuneloop load_classifier (serve)':44s} {size_mb(trained):8.1f} MB  load {load_s:5.2f} s  "
          f"predict 64 {predict_s * 1000:7.1f} ms")
    print(pyfunc_row("pyfunc, base referenced (pip package)", referenced))
    print(pyfunc_row("pyfunc, base carried", carried))
    print(pyfunc_row("mlflow.transformers, LoRA (PEFT) pipeline", transformers_model(base, out / "hf")))


def transformers_model(base: Path, path: Path) -> Path:
    """The same base and LoRA settings as a transformers text-classification pipeline:
    [CLS] pooler and a fresh head, not tuneloop's pooled, normalised head."""
    import mlflow.transformers
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=2)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="SEQ_CLS"))
    classify = pipeline("text-classification", model=model, tokenizer=AutoTokenizer.from_pretrained(base))
    mlflow.transformers.save_model(classify, str(path), pip_requirements=["torch", "transformers", "peft"])
    return path


if __name__ == "__main__":
    main()
