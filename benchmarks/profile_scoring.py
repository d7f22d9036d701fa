"""Where scoring's time goes: torch's profiler over tuneloop's scorer and the
pipeline-style loop of `benchmarks.run`, on the same model and rows.

    .venv/bin/python -m benchmarks.profile_scoring     # about 2 minutes on 2 cores

Trains the benchmark's model (100 LoRA steps on 3,200 shipped movie reviews,
as `benchmarks.run` does), then scores the 1,044 test rows at batch 64 under
`torch.profiler` on each side and sorts every operator's own CPU time into
matrix products, attention, normalisation and activations, and the rest;
tokenisation is timed apart (it runs outside torch). The split backs the
scoring ratio of benchmarks/README.md: once matrix products hold most of the
time and already run near the measured matmul peak, no scheduling change can
triple throughput in fp32. Writes benchmarks/results/profile-scoring-<date>.json.
Not a test: nothing here asserts.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from tempfile import TemporaryDirectory

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.measure import machine
from benchmarks.run import RESULTS, ROOT, finetune_tuneloop, load_rows, own_forward
from tuneloop.model.classifier import load_classifier, predict_proba, resolve_model_path, tokenize
from tuneloop.pipeline.params import load_params

GROUPS = (  # (group, substrings of aten operator names), first match wins
    ("matrix products", ("addmm", "aten::mm", "bmm", "matmul", "linear", "mkldnn", "baddbmm")),
    ("attention", ("scaled_dot_product", "flash", "_efficient_attention", "softmax")),
    ("normalisation and activations", ("layer_norm", "gelu", "tanh", "norm")),
)


def group_of(name: str) -> str:
    for group, needles in GROUPS:
        if any(needle in name for needle in needles):
            return group
    return "other torch ops (copies, masks, adds, pooling)"


def profiled(score) -> dict:
    """Own CPU time by group (seconds) and the profiled wall time of one scoring pass."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        started = time.perf_counter()
        score()
        wall = time.perf_counter() - started
    by_group: dict[str, float] = defaultdict(float)
    top = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    for event in top:
        by_group[group_of(event.key)] += event.self_cpu_time_total / 1e6
    return {"wall_s": wall, "torch_self_s": sum(by_group.values()), "groups_s": dict(by_group),
            "top_ops": [{"op": e.key, "self_s": e.self_cpu_time_total / 1e6, "calls": e.count} for e in top[:8]]}


def main() -> Path:
    params = load_params(ROOT / "params.yaml")
    config = replace(params.finetune, epochs=1, max_steps=100, min_steps=0, min_examples_per_class=0,
                     head_init="random", device="cpu", precision="fp32")
    rows, labels = load_rows(3200, 0)
    texts, batch = rows["test"][0], params.evaluate.batch_size
    with TemporaryDirectory() as tmp:
        print("training the benchmark's model (100 steps) ...", flush=True)
        trained = finetune_tuneloop(resolve_model_path(params.model.base), rows, labels, config, Path(tmp))
        classifier = load_classifier(Path(trained["model_dir"]), "all-MiniLM-L6-v2", device="cpu")
        forward, tokenizer = own_forward(classifier.model), classifier.tokenizer

        @torch.inference_mode()
        def pipeline() -> np.ndarray:
            return np.concatenate([forward(**{k: v for k, v in tokenizer(
                texts[i:i + batch], padding=True, truncation=True, max_length=classifier.max_length,
                return_tensors="pt").items() if k in {"input_ids", "attention_mask"}}).argmax(1).numpy()
                for i in range(0, len(texts), batch)])

        def ours() -> np.ndarray:
            return predict_proba(classifier, texts, batch).argmax(1)

        ours(), pipeline()  # warm-up
        started = time.perf_counter()
        tokenize(tokenizer, texts, classifier.max_length)
        tokenize_s = time.perf_counter() - started
        report = {"machine": machine(), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                  "rows": len(texts), "batch_size": batch, "tokenize_s": tokenize_s,
                  "runs": {"tuneloop evaluate": profiled(ours), "pipeline-style transformers loop": profiled(pipeline)}}
    path = RESULTS / f"profile-scoring-{datetime.now(timezone.utc):%Y-%m-%d}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    for name, run in report["runs"].items():
        print(f"\n{name}: {run['wall_s']:.2f} s wall (profiled), torch ops {run['torch_self_s']:.2f} s")
        for group, seconds in sorted(run["groups_s"].items(), key=lambda kv: -kv[1]):
            print(f"  {group:48s} {seconds:6.2f} s  {seconds / run['torch_self_s']:5.1%}")
    print(f"\ntokenisation of all rows (outside torch): {tokenize_s:.2f} s\nresults: {path}")
    return path


if __name__ == "__main__":
    main()
