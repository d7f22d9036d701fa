"""Fine-tuning and scoring throughput of tuneloop, side by side with the Hugging Face
Trainer and a pipeline-style transformers scoring loop.

    .venv/bin/python -m benchmarks.run                 # about 6 minutes on 2 cores
    .venv/bin/python -m benchmarks.run --train-rows 0  # a whole epoch of the train split (longer)

One process, one machine, the same model (all-MiniLM-L6-v2 with the LoRA
settings of params.yaml), the same rows of the shipped movie reviews, the same
batch size, learning rate, epochs, max length and number of optimizer steps.
Prints a table and writes benchmarks/results/<device>-<date>.json. What each
number means is in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import tempfile
import time
from dataclasses import asdict, replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from benchmarks.flops import inference_flops, token_parameters, training_flops
from benchmarks.measure import PeakMemory, machine, matmul_peak
from tuneloop.model.classifier import bf16_native, load_classifier, predict_proba, resolve_model_path, tokenize
from tuneloop.model.metrics import macro_f1
from tuneloop.pipeline.params import load_params
from tuneloop.tasks.evaluate import precision_check
from tuneloop.tasks.finetune import FinetuneConfig, build_model, finetune
from tuneloop.tasks.ingest import canonicalize, read_table
from tuneloop.tasks.split import split_dataset

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
MAX_QUALITY_GAP = 0.01  # validation macro-F1: a wider gap means one side did not learn, and no speed ratio is given


def load_rows(train_rows: int, seed: int) -> tuple[dict, tuple[str, ...]]:
    """Train/validation/test (texts, label indices) of the shipped movie reviews, split
    as the pipeline splits them; `train_rows` > 0 keeps a seeded sample of the train rows."""
    params = load_params(ROOT / "params.yaml")
    frame, _ = canonicalize(read_table(ROOT / params.ingest.source), params.ingest)
    frame = split_dataset(frame, params.split)
    labels = params.declared_labels or tuple(sorted(frame["label"].dropna().unique()))
    index = {name: i for i, name in enumerate(labels)}
    rows = {}
    for name in ("train", "validation", "test"):
        part = frame[frame["split"] == name].reset_index(drop=True)
        if name == "train" and 0 < train_rows < len(part):
            part = part.iloc[np.random.default_rng(seed).permutation(len(part))[:train_rows]].reset_index(drop=True)
        rows[name] = (part["text"].tolist(), [index[v] for v in part["label"]])
    return rows, labels


def finetune_tuneloop(base_path: Path, rows: dict, labels, config: FinetuneConfig, work: Path) -> dict:
    """The project's finetune stage, as the pipeline calls it."""
    with PeakMemory() as memory:
        started = time.perf_counter()
        result = finetune("all-MiniLM-L6-v2", base_path, rows["train"], rows["validation"], labels, config,
                          work / "model", work / "checkpoints", "benchmark")
        wall = time.perf_counter() - started
    return {"steps": result.steps, "train_seconds": result.seconds, "stage_seconds": wall,
            "val_macro_f1": result.best_val_macro_f1, "peak_rss_increase_mib": memory.increase_mib,
            "memory_method": memory.method, "model_dir": str(result.model_dir)}


def trainer_arguments(config: FinetuneConfig, out: Path, bf16: bool = False):
    """Trainer defaults, except what both sides must share: batch size, learning
    rate, epochs and seed; weight decay and warm-up too, so both optimizers follow
    the same schedule; `bf16`: the Trainer's own bf16 autocast. Nothing is saved or
    reported anywhere."""
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=config.batch_size, per_device_eval_batch_size=64,
        learning_rate=config.learning_rate, num_train_epochs=config.epochs, weight_decay=config.weight_decay,
        warmup_steps=config.warmup_ratio, seed=config.seed,  # a float < 1 is a share of the steps
        save_strategy="no", report_to="none", bf16=bf16, use_cpu=bf16,  # the Trainer asks use_cpu for bf16 on a CPU
    )


def own_forward(model: torch.nn.Module):
    """A TextClassifier's logits through its encoder's own transformers/PEFT forward
    (no tuneloop fast path): what the peers run."""
    from tuneloop.model.classifier import pool

    def logits(input_ids, attention_mask):
        hidden = model.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return model.head(pool(hidden, attention_mask, model.pooling))

    return logits


class ForTrainer(torch.nn.Module):
    """The same TextClassifier as the Trainer expects a model: labels in, loss and logits out."""

    def __init__(self, model: torch.nn.Module, label_smoothing: float = 0.0):
        super().__init__()
        self.model, self.forward_logits, self.label_smoothing = model, own_forward(model), label_smoothing

    def forward(self, input_ids, attention_mask, labels=None):
        from transformers.modeling_outputs import SequenceClassifierOutput

        logits = self.forward_logits(input_ids, attention_mask)
        loss = (torch.nn.functional.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)
                if labels is not None else None)  # the finetune stage's loss: same smoothing
        return SequenceClassifierOutput(loss=loss, logits=logits)


def finetune_trainer(base_path: Path, rows: dict, labels, config: FinetuneConfig, work: Path,
                     bf16: bool = False) -> dict:
    """A plain Hugging Face Trainer run of the same PEFT LoRA model: pre-tokenised
    rows, the default collator (DataCollatorWithPadding) and default sampler; fp32 as
    the Trainer defaults to, or with its `bf16` switch."""
    from transformers import AutoTokenizer, DataCollatorWithPadding, Trainer

    with PeakMemory() as memory:
        started = time.perf_counter()
        tokenizer = AutoTokenizer.from_pretrained(base_path)
        torch.manual_seed(config.seed)  # the same initial head and adapters as the finetune stage
        model = ForTrainer(build_model(base_path, labels, config), config.label_smoothing)

        def encoded(texts, targets):
            ids = tokenizer(list(texts), truncation=True, max_length=config.max_length)
            return [{"input_ids": i, "attention_mask": m, "labels": y}
                    for i, m, y in zip(ids["input_ids"], ids["attention_mask"], targets)]

        trainer = Trainer(model=model, args=trainer_arguments(config, work / "trainer", bf16),
                          train_dataset=encoded(*rows["train"]), processing_class=tokenizer,
                          data_collator=DataCollatorWithPadding(tokenizer))
        train_started = time.perf_counter()
        trainer.train()
        train_seconds = time.perf_counter() - train_started
        logits = trainer.predict(encoded(*rows["validation"])).predictions
        wall = time.perf_counter() - started
    f1 = macro_f1(np.asarray(rows["validation"][1]), np.asarray(logits).argmax(1), len(labels))
    return {"steps": trainer.state.global_step, "train_seconds": train_seconds, "stage_seconds": wall,
            "val_macro_f1": f1, "peak_rss_increase_mib": memory.increase_mib, "memory_method": memory.method}


def score_tuneloop(model_dir: Path, texts: list[str], batch_size: int,
                   precision: str = "fp32") -> tuple[np.ndarray, float, float]:
    """The evaluate stage's scorer: load_classifier + predict_proba (in `precision`: bf16 is what a
    version allowed `model.scoring_precision: bf16` serves with). Returns
    (predicted label indices, best seconds over two passes, peak RSS increase)."""
    classifier = load_classifier(model_dir, "all-MiniLM-L6-v2", device="cpu", precision=precision)
    predict_proba(classifier, texts[:batch_size], batch_size)  # warm-up
    seconds = []
    with PeakMemory() as memory:
        for _ in range(2):
            started = time.perf_counter()
            predicted = predict_proba(classifier, texts, batch_size).argmax(1)
            seconds.append(time.perf_counter() - started)
    return predicted, min(seconds), memory.increase_mib


def score_pipeline(model_dir: Path, texts: list[str], batch_size: int,
                   precision: str = "fp32") -> tuple[np.ndarray, float, float]:
    """A pipeline-style loop on the same merged model, same batch size: texts in input
    order, each batch padded to its longest, the model's own transformers forward
    (under bf16 autocast for `precision` bf16, as a peer would try it)."""
    classifier = load_classifier(model_dir, "all-MiniLM-L6-v2", device="cpu")
    forward, tokenizer = own_forward(classifier.model), classifier.tokenizer

    @torch.inference_mode()
    def predict(batch: list[str]) -> np.ndarray:
        encoded = tokenizer(batch, padding=True, truncation=True, max_length=classifier.max_length,
                            return_tensors="pt")
        with torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16"):
            return forward(encoded["input_ids"], encoded["attention_mask"]).float().argmax(1).numpy()

    predict(texts[:batch_size])  # warm-up
    seconds = []
    with PeakMemory() as memory:
        for _ in range(2):
            started = time.perf_counter()
            predicted = np.concatenate([predict(texts[i:i + batch_size]) for i in range(0, len(texts), batch_size)])
            seconds.append(time.perf_counter() - started)
    return predicted, min(seconds), memory.increase_mib


def model_shape(base_path: Path, labels, config: FinetuneConfig) -> dict:
    """Parameter counts and dimensions the FLOP formulas need."""
    model = build_model(base_path, labels, config)
    merged = build_model(base_path, labels, replace(config, method="full"))
    config = model.encoder.config
    shape = {"layers": config.num_hidden_layers, "hidden": config.hidden_size,
             "token_parameters_lora": token_parameters(model.named_parameters()),
             "token_parameters_merged": token_parameters(merged.named_parameters())}
    del model, merged
    gc.collect()
    return shape


def finetune_row(name: str, run: dict, examples: int, tokens: int, flops: float, peak: float,
                 precision: str) -> dict:
    seconds = run["train_seconds"]
    return {"name": name, "precision": precision, "steps": run["steps"],
            "examples_per_s": examples / seconds, "tokens_per_s": tokens / seconds,
            "useful_gflops_per_s": flops / seconds / 1e9, "fraction_of_peak": flops / seconds / 1e9 / peak,
            "val_macro_f1": run["val_macro_f1"], "train_seconds": seconds, "stage_seconds": run["stage_seconds"],
            "peak_rss_increase_mib": run["peak_rss_increase_mib"]}


def run_benchmark(train_rows: int, seed: int) -> dict:
    """Every measurement, in one process."""
    params = load_params(ROOT / "params.yaml")
    # one epoch on both sides: no step floor (min_steps, min_examples_per_class), a random head (no probe)
    # the learning rate the finetune stage picks for a random head, written out: the Trainer needs a number
    # both in fp32 (the shipped finetune.precision on a CPU, and the Trainer's default); where the CPU
    # multiplies bf16 in hardware, both once more with bf16 products (finetune.precision: bf16; bf16=True)
    config = replace(params.finetune, epochs=1, max_steps=None, min_steps=0, min_examples_per_class=0,
                     head_init="random", device="cpu", precision="fp32",
                     learning_rate=params.finetune.rate(probe_started=False))
    native = bf16_native(torch.device("cpu"))
    base_path = resolve_model_path(params.model.base)
    rows, labels = load_rows(train_rows, seed)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_path)
    train_lengths = [len(s) for s in tokenize(tokenizer, rows["train"][0], config.max_length)]
    test_lengths = [len(s) for s in tokenize(tokenizer, rows["test"][0], config.max_length)]
    shape = model_shape(base_path, labels, config)
    print("measuring the fp32 matmul peak ...", flush=True)
    peaks = matmul_peak()
    peak = max(peaks.values())
    report = {"machine": machine(), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "matmul_gflops": peaks, "peak_gflops": peak, "config": asdict(config), "model": shape,
              "rows": {name: len(r[0]) for name, r in rows.items()},
              "train_tokens": int(sum(train_lengths)), "test_tokens": int(sum(test_lengths))}
    flops = training_flops(shape["token_parameters_lora"], shape["layers"], shape["hidden"], train_lengths)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        print("fine-tuning: tuneloop finetune stage ...", flush=True)
        ours = finetune_tuneloop(base_path, rows, labels, config, work / "tuneloop")
        gc.collect()
        print("fine-tuning: Hugging Face Trainer ...", flush=True)
        theirs = finetune_trainer(base_path, rows, labels, config, work / "hf")
        gc.collect()
        examples, tokens = len(train_lengths), sum(train_lengths)
        report["finetune"] = [finetune_row("tuneloop finetune", ours, examples, tokens, flops, peak, "fp32"),
                              finetune_row("HF Trainer + PEFT", theirs, examples, tokens, flops, peak, "fp32")]
        if native:
            print("fine-tuning: tuneloop finetune stage, finetune.precision: bf16 ...", flush=True)
            low = finetune_tuneloop(base_path, rows, labels, replace(config, precision="bf16"), work / "tuneloop-bf16")
            gc.collect()
            print("fine-tuning: Hugging Face Trainer, bf16=True ...", flush=True)
            peer = finetune_trainer(base_path, rows, labels, config, work / "hf-bf16", bf16=True)
            gc.collect()
            report["finetune"] += [finetune_row("tuneloop finetune, bf16", low, examples, tokens, flops, peak, "bf16"),
                                   finetune_row("HF Trainer + PEFT, bf16", peer, examples, tokens, flops, peak,
                                                "bf16")]
        report["score"] = score_both(Path(ours["model_dir"]), rows["test"], params.evaluate.batch_size,
                                     inference_flops(shape["token_parameters_merged"], shape["layers"],
                                                     shape["hidden"], test_lengths), peak)
    report["memory_method"] = ours["memory_method"]
    return report


def score_both(model_dir: Path, test: tuple, batch_size: int, flops: float, peak: float) -> dict:
    """Both scorers in fp32 on the test rows; then, where the CPU multiplies bf16 in hardware,
    tuneloop's in bf16, with the evaluate stage's agreement check against its fp32 answers."""
    texts, y_true = list(test[0]), np.asarray(test[1])
    print("scoring: evaluate stage and a pipeline-style transformers loop ...", flush=True)
    ours, ours_s, ours_mem = score_tuneloop(model_dir, texts, batch_size)
    gc.collect()
    theirs, theirs_s, theirs_mem = score_pipeline(model_dir, texts, batch_size)
    n_labels = int(max(y_true.max(), ours.max()) + 1)

    def row(name: str, s: float, mem: float, predicted: np.ndarray) -> dict:
        return {"name": name, "rows_per_s": len(texts) / s, "seconds": s, "useful_gflops_per_s": flops / s / 1e9,
                "fraction_of_peak": flops / s / 1e9 / peak, "peak_rss_increase_mib": mem,
                "test_macro_f1": macro_f1(y_true, predicted, n_labels)}

    runs = [row("tuneloop evaluate", ours_s, ours_mem, ours),
            row("pipeline-style transformers loop", theirs_s, theirs_mem, theirs)]
    report = {"rows": len(texts), "batch_size": batch_size, "identical_predictions": int((ours == theirs).sum()),
              "runs": runs}
    if bf16_native(torch.device("cpu")):
        gc.collect()
        low, low_s, low_mem = score_tuneloop(model_dir, texts, batch_size, "bf16")
        verdict = precision_check(ours, low, y_true, n_labels, "bf16")
        report["bf16"] = {**row("tuneloop evaluate, bf16", low_s, low_mem, low), "allowed": verdict.yes,
                          "reasons": verdict.reasons, "identical_to_fp32": int((low == ours).sum())}
        gc.collect()
        peer, peer_s, peer_mem = score_pipeline(model_dir, texts, batch_size, "bf16")
        report["bf16_pipeline"] = {**row("pipeline-style transformers loop, bf16", peer_s, peer_mem, peer),
                                   "identical_to_fp32": int((peer == theirs).sum())}
    return report


def equal_work(a: dict, b: dict) -> bool:
    """Two fine-tuning runs whose speeds may be compared: the same optimizer steps and
    validation macro-F1 within MAX_QUALITY_GAP."""
    return a["steps"] == b["steps"] and abs(a["val_macro_f1"] - b["val_macro_f1"]) <= MAX_QUALITY_GAP


def markdown_table(report: dict) -> str:
    """The README's table."""
    ours, theirs = report["finetune"][:2]
    score_ours, score_theirs = report["score"]["runs"]

    def ratio(a: float, b: float, comparable: bool = True) -> str:
        return f"**{a / b:.2f}x**" if comparable else "none: unequal work or quality"

    fair = equal_work(ours, theirs)
    lines = [
        f"| fine-tuning ({ours['steps']} steps of batch {report['config']['batch_size']}) | tuneloop | HF Trainer "
        "| ratio | target |",
        "|---|---:|---:|---:|---|",
        f"| training examples/s | {ours['examples_per_s']:.1f} | {theirs['examples_per_s']:.1f} | "
        f"{ratio(ours['examples_per_s'], theirs['examples_per_s'], fair)} | >= 3x |",
        f"| non-padding tokens/s | {ours['tokens_per_s']:.0f} | {theirs['tokens_per_s']:.0f} | "
        f"{ratio(ours['tokens_per_s'], theirs['tokens_per_s'], fair)} | |",
        f"| optimizer steps | {ours['steps']} | {theirs['steps']} | | equal |",
        f"| validation macro-F1 | {ours['val_macro_f1']:.4f} | {theirs['val_macro_f1']:.4f} | "
        f"{ours['val_macro_f1'] - theirs['val_macro_f1']:+.4f} | within {MAX_QUALITY_GAP} |",
        f"| useful GFLOP/s (share of the {report['peak_gflops']:.0f} GFLOP/s fp32 matmul peak) | "
        f"{ours['useful_gflops_per_s']:.1f} ({ours['fraction_of_peak']:.0%}) | "
        f"{theirs['useful_gflops_per_s']:.1f} ({theirs['fraction_of_peak']:.0%}) | | >= 50% |",
        f"| peak RSS increase (MiB) | {ours['peak_rss_increase_mib']:.0f} | "
        f"{theirs['peak_rss_increase_mib']:.0f} | | |",
    ]
    if len(report["finetune"]) > 3:
        low, peer = report["finetune"][2:4]

        lines += [
            "",
            "| fine-tuning with bf16 products (`finetune.precision: bf16`) | tuneloop, bf16 | HF Trainer, fp32 "
            "| ratio | target |",
            "|---|---:|---:|---:|---|",
            f"| training examples/s | {low['examples_per_s']:.1f} | {theirs['examples_per_s']:.1f} | "
            f"{ratio(low['examples_per_s'], theirs['examples_per_s'], equal_work(low, theirs))} | >= 3x |",
            f"| validation macro-F1 | {low['val_macro_f1']:.4f} | {theirs['val_macro_f1']:.4f} | "
            f"{low['val_macro_f1'] - theirs['val_macro_f1']:+.4f} | within {MAX_QUALITY_GAP} |",
            f"| useful GFLOP/s (share of the fp32 peak) | {low['useful_gflops_per_s']:.1f} "
            f"({low['fraction_of_peak']:.0%}) | | | |",
            f"| the Trainer in bf16 too (`bf16=True`): examples/s · validation macro-F1 | "
            f"{low['examples_per_s']:.1f} · {low['val_macro_f1']:.4f} | "
            f"{peer['examples_per_s']:.1f} · {peer['val_macro_f1']:.4f} | "
            f"{ratio(low['examples_per_s'], peer['examples_per_s'], equal_work(low, peer))} | |",
            f"| tuneloop bf16 against tuneloop fp32: examples/s · validation macro-F1 | "
            f"{low['examples_per_s']:.1f} · {low['val_macro_f1']:.4f} | "
            f"{ours['examples_per_s']:.1f} · {ours['val_macro_f1']:.4f} | "
            f"{low['examples_per_s'] / ours['examples_per_s']:.2f}x | |",
        ]
    lines += [
        "",
        f"| scoring ({report['score']['rows']} test rows, batch {report['score']['batch_size']}) | tuneloop evaluate "
        "| pipeline-style transformers loop | ratio | target |",
        "|---|---:|---:|---:|---|",
        f"| rows/s | {score_ours['rows_per_s']:.0f} | {score_theirs['rows_per_s']:.0f} | "
        f"{ratio(score_ours['rows_per_s'], score_theirs['rows_per_s'])} | >= 3x |",
        f"| identical predictions | {report['score']['identical_predictions']} / {report['score']['rows']} | | | all |",
        f"| useful GFLOP/s (share of peak) | {score_ours['useful_gflops_per_s']:.1f} "
        f"({score_ours['fraction_of_peak']:.0%}) "
        f"| {score_theirs['useful_gflops_per_s']:.1f} ({score_theirs['fraction_of_peak']:.0%}) | | |",
        f"| peak RSS increase (MiB) | {score_ours['peak_rss_increase_mib']:.0f} | "
        f"{score_theirs['peak_rss_increase_mib']:.0f} | | |",
        f"| test macro-F1 | {score_ours['test_macro_f1']:.4f} | {score_theirs['test_macro_f1']:.4f} | | |",
    ]
    low = report["score"].get("bf16")
    if low:
        lines += [
            "",
            "| scoring in bf16 (`model.scoring_precision: bf16`) | tuneloop evaluate, bf16 "
            "| pipeline-style loop, fp32 | ratio | target |",
            "|---|---:|---:|---:|---|",
            f"| rows/s | {low['rows_per_s']:.0f} | {score_theirs['rows_per_s']:.0f} | "
            f"{ratio(low['rows_per_s'], score_theirs['rows_per_s'], low['allowed'])} | >= 3x |",
            f"| answers equal to tuneloop's fp32 | {low['identical_to_fp32']} / {report['score']['rows']} | | | "
            ">= 99.5% |",
            f"| test macro-F1 | {low['test_macro_f1']:.4f} | {score_theirs['test_macro_f1']:.4f} | "
            f"{low['test_macro_f1'] - score_ours['test_macro_f1']:+.4f} vs fp32 | within 0.005 |",
            f"| useful GFLOP/s (share of the fp32 peak) | {low['useful_gflops_per_s']:.1f} "
            f"({low['fraction_of_peak']:.0%}) | | | |",
        ]
        peer = report["score"].get("bf16_pipeline")
        if peer:
            lines.append(f"| the pipeline-style loop in bf16 too: rows/s | {low['rows_per_s']:.0f} | "
                         f"{peer['rows_per_s']:.0f} (its answers equal to its fp32: {peer['identical_to_fp32']}) | "
                         f"{ratio(low['rows_per_s'], peer['rows_per_s'], low['allowed'])} | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train-rows", type=int, default=3200,
                        help="seeded sample of train rows, one epoch (0: the whole train split)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the train-row sample")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the JSON results")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    report = run_benchmark(args.train_rows, args.seed)
    report["benchmark_seconds"] = time.perf_counter() - started
    report["table"] = markdown_table(report)
    args.out.mkdir(parents=True, exist_ok=True)
    device = "gpu" if report["machine"]["gpu"] else "cpu"
    path = args.out / f"{device}-{datetime.now(timezone.utc):%Y-%m-%d}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    m = report["machine"]
    print(f"\n{m['cpu']}, {m['cores']} cores, torch {m['torch']} ({m['torch_threads']} threads); "
          f"{math.ceil(report['benchmark_seconds'])} s in all\n\n{report['table']}\n\nresults: {path}")
    return path


if __name__ == "__main__":
    main()
