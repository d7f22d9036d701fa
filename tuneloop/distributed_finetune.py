"""One rank of a distributed fine-tuning run (start it with a launcher).

    tuneloop finetune --nproc 2          this machine, 2 processes, logged to MLflow (what the tests run)
    torchrun --nproc-per-node 2 -m tuneloop.distributed_finetune --root . --params params.yaml
    accelerate launch --num_processes 2 -m tuneloop.distributed_finetune --root . --params params.yaml

Every rank reads the same workspace files (splits, probe, params) and runs
`tasks.finetune.finetune` after joining the launcher's process group through
WORLD_SIZE/RANK/LOCAL_RANK (gloo on CPU, NCCL on GPU). Rank 0 alone writes
checkpoints, the model and `--result`. Ranks never write to MLflow: started
directly, the run is not tracked; `tuneloop finetune --nproc` logs rank 0's result.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tuneloop.cli import offline_environment
from tuneloop.model import distributed
from tuneloop.model.classifier import pick_device
from tuneloop.pipeline import stages
from tuneloop.pipeline.launch import write_result
from tuneloop.pipeline.params import load_params
from tuneloop.tasks.finetune import FinetuneResult
from tuneloop.values.workspace import Workspace


def run_rank(params_path: Path, root: Path, result_path: Path | None) -> FinetuneResult:
    """Joins the process group, trains this rank's shards; rank 0 writes the result."""
    import torch.distributed as dist

    params, ws = load_params(params_path), Workspace(root.resolve())
    inputs = stages.finetune_inputs(params, ws)
    ranks = distributed.init_from_env(pick_device(inputs["config"].device))
    try:
        result = stages.train_model(inputs, progress=ranks.is_main)
        if ranks.is_main and result_path is not None:
            write_result(result, result_path)
        return result
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=str(__doc__).splitlines()[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="params.yaml, relative to --root")
    parser.add_argument("--root", type=Path, default=Path("."), help="the project folder (workspace root)")
    parser.add_argument("--result", type=Path, default=None, help="where rank 0 writes the result as JSON")
    args = parser.parse_args(argv)
    offline_environment()
    run_rank(args.params if args.params.is_absolute() else args.root / args.params, args.root, args.result)


if __name__ == "__main__":
    main()
