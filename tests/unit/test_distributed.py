"""Fine-tuning across processes: 2 CPU ranks (gloo, torchrun) train on the same
global batches in the same order as 1 process, end with the same losses and
weights within float tolerance, and leave one set of saved weights."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from tuneloop.model.distributed import Ranks, ranks_from_env, shard
from tuneloop.pipeline import stages
from tuneloop.pipeline.launch import torchrun_command
from tuneloop.pipeline.params import parse_params
from tuneloop.tasks.finetune import CHECKPOINT_FILE, FinetuneConfig, length_grouped_order
from tuneloop.tasks.ingest import DataVersion
from tuneloop.values.workspace import Workspace, write_json

# no dropout anywhere, fp32 products: 1 and 2 processes then differ only by float summation order
# (bf16 products round each half-batch's activations on their own, which the tolerances below do not allow)
SETTINGS = FinetuneConfig(epochs=2, learning_rate=1e-2, batch_size=16, lora_r=4, lora_dropout=0.0, max_length=32,
                          checkpoint_every_steps=10, patience=2, min_steps=0, min_examples_per_class=0,
                          head_init="random", device="cpu", precision="fp32")


def test_each_rank_takes_a_contiguous_half_of_every_global_batch_in_the_one_process_order() -> None:
    batches = length_grouped_order([5, 3, 9, 2, 7, 1, 4, 8, 6, 3], batch_size=4, seed=13)
    two = [Ranks(rank, 2) for rank in range(2)]
    for batch in batches:
        parts = [shard(batch, ranks) for ranks in two]
        assert np.concatenate([rows for rows, weight in parts if weight]).tolist() == batch.tolist()
        assert [len(rows) for rows, _ in parts] == [len(p) for p in np.array_split(batch, 2)]
        # each rank's summed loss x weight, averaged over the 2 ranks, is the global batch's mean loss
        assert sum(weight * len(rows) for rows, weight in parts) / 2 == pytest.approx(1.0)


def test_a_rank_with_no_rows_in_a_short_last_batch_runs_one_row_weighted_zero() -> None:
    rows, weight = shard(np.array([7]), Ranks(1, 2))
    assert rows.tolist() == [7] and weight == 0.0
    assert shard(np.array([7]), Ranks(0, 2))[0].tolist() == [7]


def test_ranks_come_from_the_launchers_environment() -> None:
    assert ranks_from_env({}) == Ranks(0, 1, 0)
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}
    assert ranks_from_env(env) == Ranks(3, 4, 1) and not ranks_from_env(env).is_main


def test_the_launcher_runs_this_python_under_torchrun(tmp_path) -> None:
    command = torchrun_command(2, tmp_path / "p.yaml", tmp_path, tmp_path / "r.json")
    assert command[1:6] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m"]
    assert command[6] == "tuneloop.distributed_finetune"


@pytest.fixture(scope="module")
def no_dropout_bert(tiny_bert, tmp_path_factory) -> Path:
    target = tmp_path_factory.mktemp("tiny-bert-no-dropout") / "model"
    shutil.copytree(tiny_bert, target)
    config = json.loads((target / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (target / "config.json").write_text(json.dumps(config))
    return target


def project(root: Path, base: Path, toy_task: dict, sandbox=None):
    """A workspace after split (toy rows) and params that fine-tune the tiny model."""
    ws = Workspace(root)
    labels = toy_task["labels"]
    frames = [pd.DataFrame({"text": texts, "label": [labels[i] for i in ys], "split": name})
              for name, (texts, ys) in (("train", toy_task["train"]), ("validation", toy_task["validation"]))]
    ws.splits.parent.mkdir(parents=True)
    pd.concat(frames, ignore_index=True).to_parquet(ws.splits)
    write_json(ws.data_version, asdict(DataVersion("e" * 32, 1, "data/raw/x.csv", "x.csv", 320, 0)))
    raw = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(SETTINGS).items()}
    tracked = {"mlflow": {"tracking_uri": sandbox.tracking_uri, "experiment": sandbox.experiment}} if sandbox else {}
    params = parse_params({"model": {"base": str(base)}, "validate": {"labels": labels}, "finetune": raw, **tracked})
    return params, ws


@pytest.fixture(scope="module")
def one_and_two(no_dropout_bert, toy_task, tmp_path_factory, mlflow_sandbox):
    """The same run in this process (the core alone) and as the stage with 2 torchrun ranks
    (`tuneloop finetune --nproc 2`: launched, then logged to the pipeline's MLflow run)."""
    from tuneloop.plumbing import tracking

    params, one_ws = project(tmp_path_factory.mktemp("one"), no_dropout_bert, toy_task)
    one = stages.train_model(stages.finetune_inputs(params, one_ws), progress=False)
    params, two_ws = project(tmp_path_factory.mktemp("two"), no_dropout_bert, toy_task, mlflow_sandbox)
    tracking.start_pipeline_run(mlflow_sandbox.config(), two_ws, {})
    two = stages.finetune(params, two_ws, nproc=2)
    return one, two, two_ws


def test_two_processes_take_the_same_steps_and_validation_decisions_as_one(one_and_two) -> None:
    one, two, _ = one_and_two
    assert (two.steps, two.epochs_run, two.stopped_early) == (one.steps, one.epochs_run, one.stopped_early) == (
        32, 2, False)  # 256 rows / global batch 16, 2 epochs: the same global batch, not 8 per rank
    assert [h["val_macro_f1"] for h in two.history] == pytest.approx([h["val_macro_f1"] for h in one.history],
                                                                     abs=1e-9)
    assert two.best_val_macro_f1 == one.best_val_macro_f1


def test_two_processes_train_loss_curve_is_within_tolerance_of_one(one_and_two) -> None:
    one, two, _ = one_and_two
    ones, twos = [h["train_loss"] for h in one.history], [h["train_loss"] for h in two.history]
    assert len(ones) == len(twos) == 2 and ones[1] < ones[0]  # the task is learnt
    assert twos == pytest.approx(ones, abs=1e-5)  # measured: 3e-8 apart


def test_two_processes_save_one_set_of_weights_equal_to_one_process(one_and_two) -> None:
    one, two, ws = one_and_two
    saved = sorted(p.relative_to(ws.root).as_posix() for p in ws.root.rglob("*.safetensors"))
    assert saved == ["models/challenger/adapter_model.safetensors", "models/challenger/head.safetensors"]
    assert not (ws.checkpoint_dir / CHECKPOINT_FILE).exists()  # rank 0 dropped the finished run's checkpoint
    for name in ("adapter_model.safetensors", "head.safetensors"):
        ours, theirs = load_file(str(two.model_dir / name)), load_file(str(one.model_dir / name))
        assert ours.keys() == theirs.keys()
        for key in ours:
            torch.testing.assert_close(ours[key], theirs[key], atol=1e-4, rtol=1e-3)


def test_the_stage_logs_rank_zeros_result_once_to_the_pipelines_run(one_and_two) -> None:
    from mlflow import MlflowClient

    from tuneloop.plumbing import tracking

    _, two, ws = one_and_two
    metrics = json.loads(ws.finetune_metrics.read_text())
    assert two.steps == 32
    assert (metrics["best_val_macro_f1"], metrics["epochs_run"]) == (two.best_val_macro_f1, two.epochs_run)
    client = MlflowClient()
    pipeline = client.get_run(tracking.current_run_id(ws))
    assert pipeline.data.metrics["finetune.steps"] == 32
    assert len(client.get_metric_history(pipeline.info.run_id, "finetune.steps")) == 1  # rank 1 logged nothing
