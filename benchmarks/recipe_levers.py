"""Levers on the fine-tuning recipe, on HWU64 with `tuneloop init` defaults: validation and test side by side.

    .venv/bin/python -m benchmarks.recipe_levers                  # every lever, about 25 minutes on 2 cores
    .venv/bin/python -m benchmarks.recipe_levers --only shipped --only r-drop

A fresh project is made as a new user makes it (`tuneloop init hwu64.csv DIR`,
then the ingest, validate, split and baseline stages through the CLI), so every
lever starts from the same split, probe and head. Each lever then trains the
finetune stage's model with its own building blocks (`build_model`,
`make_optimizer`, `length_grouped_order`, the loss with label smoothing and
clipping), from the shipped `finetune` settings with the lever's changes, and
after each epoch scores the validation and the test rows, with the weights as
they are and with an exponential moving average of them (decay 0.99, the
horizon about 100 steps). `shipped` reproduces the finetune stage's result
exactly (same seed, same batches); it also fits a fresh logistic-regression
head on the fine-tuned encoder's features (C 1/10/100).

The point is which lever moves validation *and* test: each split holds about
1,100 rows of 64 intents, so one run's macro-F1 moves by about a point with the
seed alone (see the `seed-*` levers). Not a test: nothing asserts. Writes
benchmarks/results/recipe-levers-<date>.json.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.measure import machine
from benchmarks.recipe import HWU64, RESULTS, tuneloop

# name: (finetune settings changed, R-Drop weight: two dropout passes, their symmetric KL added to the loss)
LEVERS: dict[str, tuple[dict, float]] = {
    "shipped": ({}, 0.0),
    "seed-1": ({"seed": 1}, 0.0),
    "seed-2": ({"seed": 2}, 0.0),
    "full-5e-5-head-1e-3": ({"method": "full", "learning_rate": 5e-5, "head_learning_rate": 1e-3}, 0.0),
    "r-drop": ({}, 1.0),
    "lora-r64": ({"lora_r": 64, "lora_alpha": 128}, 0.0),
}
EMA_DECAY = 0.99


def prepare(folder: Path) -> None:
    """An HWU64 project through its baseline stage, as a user makes it."""
    done = tuneloop(folder.parent, "init", str(HWU64), str(folder))
    if done.returncode != 0:
        raise RuntimeError(f"init failed: {done.stderr[-2000:]}")
    for stage in ("ingest", "validate", "split", "baseline"):
        done = tuneloop(folder, stage)
        if done.returncode != 0:
            raise RuntimeError(f"{stage} failed: {(done.stdout + done.stderr)[-2000:]}")


def rdrop_loss(model, x, mask, y, weights, smoothing: float, alpha: float) -> torch.Tensor:
    """Mean cross-entropy of two dropout passes plus alpha x their symmetric KL (Liang et al. 2021)."""
    from tuneloop.tasks.finetune import row_losses

    first, second = model(x, mask), model(x, mask)  # (batch, labels) each
    ce = (row_losses(first, y, weights, smoothing).mean() + row_losses(second, y, weights, smoothing).mean()) / 2
    p, q = first.float().log_softmax(-1), second.float().log_softmax(-1)
    kl = (F.kl_div(p, q, log_target=True, reduction="batchmean")
          + F.kl_div(q, p, log_target=True, reduction="batchmean")) / 2
    return ce + alpha * kl


def train_lever(root: Path, changes: dict, rdrop: float, reprobe: bool) -> dict:
    """Trains one lever; validation and test macro-F1 after each epoch, live and averaged weights."""
    from tuneloop.model.classifier import load_tokenizer, pad_batch, tokenize
    from tuneloop.pipeline import stages
    from tuneloop.pipeline.params import load_params
    from tuneloop.tasks import finetune as ft
    from tuneloop.values.workspace import Workspace

    params, ws = load_params(root / "params.yaml"), Workspace(root)
    inputs = stages.finetune_inputs(params, ws)
    config, labels = replace(inputs["config"], **changes), inputs["labels"]
    rows = {"validation": inputs["validation"], "test": stages.labelled_rows(stages.load_split(ws, "test"), labels)}
    torch.manual_seed(config.seed)
    device = torch.device("cpu")
    tokenizer = load_tokenizer(inputs["base_path"])
    model = ft.build_model(inputs["base_path"], labels, config, inputs["head"], inputs["pooling"])
    ids = tokenize(tokenizer, inputs["train"][0], config.max_length)
    targets = torch.as_tensor(np.asarray(inputs["train"][1]), dtype=torch.long)
    epochs = config.epochs_for(len(ids), len(labels))
    total = math.ceil(len(ids) / config.batch_size) * epochs
    optimizer, scheduler = ft.make_optimizer(model, config, device, total, probe_started=inputs["head"] is not None)
    weights = ft.class_weights(targets, len(labels), config.class_weights)
    loss_of = ft.loss_function(model, weights, config.label_smoothing)
    trainable = [p for p in model.parameters() if p.requires_grad]
    average = ft.trainable_state(model)  # the same tensors' running average, by name
    pad = tokenizer.pad_token_id or 0

    def scores() -> dict[str, float]:
        return {split: ft.score_macro_f1(model, tokenizer, labels, texts, y, config, device)
                for split, (texts, y) in rows.items()}

    def averaged_scores() -> dict[str, float]:
        live = ft.trainable_state(model)
        model.load_state_dict(average, strict=False)
        found = scores()
        model.load_state_dict(live, strict=False)
        return found

    points, step, started = [], 0, time.perf_counter()
    for epoch in range(epochs):
        for batch in ft.length_grouped_order([len(s) for s in ids], config.batch_size, config.seed + epoch):
            x, mask = pad_batch([ids[i] for i in batch], pad)
            y = targets[batch]
            loss = rdrop_loss(model, x, mask, y, weights, config.label_smoothing, rdrop) if rdrop \
                else loss_of(x, mask, y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm or math.inf)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            with torch.no_grad():  # bias-corrected: the early average is not the start's weights
                for a, p in zip(average.values(), trainable):
                    a.lerp_(p, 1 - min(EMA_DECAY, (1 + step) / (10 + step)))
        seconds = time.perf_counter() - started
        points.append({"epoch": epoch + 1, "step": step, "seconds": round(seconds), **scores(),
                       **{f"averaged_{k}": v for k, v in averaged_scores().items()}})
        print(f"  epoch {epoch + 1}: {json.dumps(points[-1])}", flush=True)
    result = {"changes": changes, "rdrop": rdrop, "epochs": epochs, "steps": step, "points": points}
    if reprobe:
        result["reprobe"] = refit_head(model, tokenizer, config.max_length, inputs["train"], rows, len(labels))
    return result


def refit_head(model, tokenizer, max_length: int, train, rows: dict, classes: int) -> list[dict]:
    """Logistic regression (C 1/10/100) on the fine-tuned encoder's train features, scored on validation and test."""
    from sklearn.linear_model import LogisticRegression

    from tuneloop.model.classifier import pooled_embeddings
    from tuneloop.model.metrics import macro_f1

    model.eval()  # no dropout in the features

    def features(texts) -> np.ndarray:
        return pooled_embeddings(model.encoder, tokenizer, texts, max_length, pooling=model.pooling)

    seen = features(train[0])
    held = {split: (features(texts), np.asarray(y)) for split, (texts, y) in rows.items()}
    found = []
    for c in (1.0, 10.0, 100.0):
        head = LogisticRegression(C=c, max_iter=1000).fit(seen, train[1])
        found.append({"C": c, **{split: macro_f1(y, head.predict(x), classes) for split, (x, y) in held.items()}})
    return found


def table(results: dict[str, dict]) -> str:
    lines = ["| lever | epochs | validation | test | averaged: validation | averaged: test | training |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        last = r["points"][-1]
        lines.append(f"| {name} | {r['epochs']} | {last['validation']:.4f} | {last['test']:.4f} | "
                     f"{last['averaged_validation']:.4f} | {last['averaged_test']:.4f} | {last['seconds']} s |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description="Levers on the fine-tuning recipe (HWU64)")
    parser.add_argument("--only", choices=list(LEVERS), action="append")
    chosen = parser.parse_args().only or list(LEVERS)
    if not HWU64.exists():
        sys.exit(f"needs {HWU64}")
    where, results = machine(), {}
    with tempfile.TemporaryDirectory(prefix="tuneloop-levers-") as scratch:
        project = Path(scratch) / "hwu64"
        prepare(project)
        for name in chosen:
            print(name, flush=True)
            changes, rdrop = LEVERS[name]
            results[name] = train_lever(project, changes, rdrop, reprobe=name == "shipped")
    print(f"\n{where['cpu']}, {where['cores']} cores, torch {where['torch']}\n\n{table(results)}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"recipe-levers-{datetime.now(timezone.utc):%Y-%m-%d}.json"
    out.write_text(json.dumps({"machine": where, "results": results}, indent=2) + "\n")
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()
