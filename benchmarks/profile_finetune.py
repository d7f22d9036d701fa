"""Where fine-tuning's time goes: torch's profiler over tuneloop's finetune stage and
the Hugging Face Trainer of `benchmarks.run`, on the same model, rows and steps.

    .venv/bin/python -m benchmarks.profile_finetune     # about 4 minutes on 2 cores

Runs `benchmarks.run`'s fine-tuning comparison (LoRA on MiniLM, a random head at
the rate the stage picks for it, one epoch) on a sample of the shipped movie
reviews, each side whole under `torch.profiler`, and sorts every operator's own
CPU time into matrix products (forward and backward), attention, normalisation
and activations, the optimizer, and the rest; what no torch operator holds is
Python and data handling. With the training FLOPs of `benchmarks.flops` it
gives the rate inside the products (FLOPs / product seconds) beside the rate
over the whole run: the first says how close the products run to the measured
matmul peak, the second how much of the run is spent outside them. The
profiler slows both sides alike; the speed ratio is `benchmarks.run`'s.
Writes benchmarks/results/profile-finetune-<date>.json. Not a test: nothing
here asserts.
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from collections import defaultdict
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Callable

from torch.profiler import ProfilerActivity, profile

from benchmarks.flops import training_flops
from benchmarks.measure import machine, matmul_peak
from benchmarks.profile_scoring import group_of
from benchmarks.run import RESULTS, ROOT, finetune_trainer, finetune_tuneloop, load_rows, model_shape
from tuneloop.model.classifier import resolve_model_path, tokenize
from tuneloop.pipeline.params import load_params

OPTIMIZER = ("_foreach", "adam", "addcdiv", "lerp", "clip_grad", "_fused_")


def training_group(name: str) -> str:
    """The scoring groups, plus the optimizer's update."""
    return "optimizer" if any(needle in name for needle in OPTIMIZER) else group_of(name)


def profiled(train: Callable[[], dict]) -> dict:
    """Own CPU time by group (seconds), the run's wall time and what `train` returned."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        started = time.perf_counter()
        result = train()
        wall = time.perf_counter() - started
    by_group: dict[str, float] = defaultdict(float)
    top = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    for event in top:
        by_group[training_group(event.key)] += event.self_cpu_time_total / 1e6
    torch_s = sum(by_group.values())
    return {"wall_s": wall, "train_seconds": result["train_seconds"], "steps": result["steps"],
            "val_macro_f1": result["val_macro_f1"], "torch_self_s": torch_s,
            "outside_torch_s": max(0.0, wall - torch_s), "groups_s": dict(by_group),
            "top_ops": [{"op": e.key, "self_s": e.self_cpu_time_total / 1e6, "calls": e.count} for e in top[:10]]}


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description="Where fine-tuning's time goes, tuneloop against the Trainer.")
    parser.add_argument("--train-rows", type=int, default=1600, help="train rows sampled (one epoch)")
    args = parser.parse_args(argv)
    params = load_params(ROOT / "params.yaml")
    config = replace(params.finetune, epochs=1, max_steps=None, min_steps=0, min_examples_per_class=0,
                     head_init="random", device="cpu", precision="fp32",
                     learning_rate=params.finetune.rate(probe_started=False))
    base_path = resolve_model_path(params.model.base)
    rows, labels = load_rows(args.train_rows, 0)
    from transformers import AutoTokenizer

    lengths = [len(s) for s in tokenize(AutoTokenizer.from_pretrained(base_path), rows["train"][0], config.max_length)]
    shape = model_shape(base_path, labels, config)
    flops = training_flops(shape["token_parameters_lora"], shape["layers"], shape["hidden"], lengths)
    print("measuring the fp32 matmul peak ...", flush=True)
    peak = max(matmul_peak().values())
    runs: dict[str, dict] = {}
    with TemporaryDirectory() as tmp:
        for name, train in (("tuneloop finetune", finetune_tuneloop), ("HF Trainer + PEFT", finetune_trainer)):
            print(f"profiling {name} ...", flush=True)
            run = profiled(lambda: train(base_path, rows, labels, config, Path(tmp) / name.split()[0]))
            products = run["groups_s"].get("matrix products", 0.0)
            run["product_gflops_per_s"] = flops / products / 1e9 if products else None
            run["whole_run_gflops_per_s"] = flops / run["wall_s"] / 1e9
            runs[name] = run
            gc.collect()
    for run in runs.values():
        run["product_fraction_of_peak"] = (run["product_gflops_per_s"] or 0.0) / peak
        run["whole_run_fraction_of_peak"] = run["whole_run_gflops_per_s"] / peak
    peak_after = max(matmul_peak().values())  # a shared host can be slow at either end: the better of the two
    peak = max(peak, peak_after)
    report = {"machine": machine(), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "peak_gflops": peak, "train_rows": len(lengths), "train_tokens": int(sum(lengths)),
              "training_gflops": flops / 1e9, "runs": runs}
    path = RESULTS / f"profile-finetune-{datetime.now(timezone.utc):%Y-%m-%d}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    for name, run in runs.items():
        print(f"\n{name}: {run['wall_s']:.1f} s wall (profiled), {run['steps']} steps, validation macro-F1 "
              f"{run['val_macro_f1']:.4f}; torch ops {run['torch_self_s']:.1f} s, outside torch "
              f"{run['outside_torch_s']:.1f} s")
        for group, seconds in sorted(run["groups_s"].items(), key=lambda kv: -kv[1]):
            print(f"  {group:48s} {seconds:6.1f} s  {seconds / run['wall_s']:5.1%} of wall")
        product = run["product_gflops_per_s"]
        print(f"  inside the products {product:.0f} GFLOP/s ({product / peak:.0%} of the {peak:.0f} GFLOP/s peak); "
              f"whole run {run['whole_run_gflops_per_s']:.0f} GFLOP/s ({run['whole_run_gflops_per_s'] / peak:.0%})")
    print(f"\nresults: {path}")
    return path


if __name__ == "__main__":
    main()
