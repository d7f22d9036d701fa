"""finetune: LoRA (or full) fine-tuning of a sequence classifier.

Imports only torch, transformers, peft, numpy and pandas so the same code runs
on a bare GPU machine, on a laptop CPU and in unit tests on a tiny model.

Speed comes from doing little: texts are tokenised once, batches group texts
of similar length and are padded only to their own longest text, the loss is
accumulated on the device and read back only when the progress bar refreshes,
and a BERT classifier runs through `tasks.fastpath` (the same function with
fewer, larger operations and cheap dropout masks). `benchmarks/` measures it
against the Hugging Face Trainer.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from tuneloop.model import distributed
from tuneloop.model.calibration import Abstention, calibrate
from tuneloop.model.classifier import (
    HEAD_FILE,
    LABELS_FILE,
    META_FILE,
    Classifier,
    TextClassifier,
    bf16_native,
    load_classifier,
    load_encoder,
    load_tokenizer,
    pad_batch,
    pick_device,
    predict_logits,
    predict_proba,
    read_meta,
    resolve_pooling,
    tokenize,
)
from tuneloop.model.distributed import Ranks
from tuneloop.model.metrics import macro_f1
from tuneloop.plumbing import integrity
from tuneloop.values.config import FinetuneConfig
from tuneloop.values.labels import resolve_class_weight

CHECKPOINT_FILE = "last.pt"
LOSS_EVERY = 20  # steps between loss readbacks (a host sync): the progress bar's and the loss curve's

# (step, {name: value}): how training reports its curve as it goes (the stage logs it to MLflow)
OnMetrics = Callable[[int, dict[str, float]], None]


def no_metrics(step: int, values: dict[str, float]) -> None:
    """The OnMetrics of a caller that does not listen."""


def curve_values(point: dict) -> dict[str, float]:
    """A loss-curve point as reported: {loss, learning_rate}."""
    return {"loss": point["loss"], "learning_rate": point["learning_rate"]}


def replay(state: TrainState, on_metrics: OnMetrics) -> None:
    """Reports the points a resumed run's checkpoint already holds, so its curve starts complete."""
    for point in state.curve:
        on_metrics(point["step"], curve_values(point))
    for epoch in state.history:
        on_metrics(epoch["step"], {"val_macro_f1": epoch["val_macro_f1"]})


@dataclass
class FinetuneResult:
    model_dir: Path
    best_val_macro_f1: float
    train_macro_f1: float
    steps: int
    epochs_run: int
    stopped_early: bool
    resumed_from_step: int
    seconds: float
    train_examples_per_s: float
    train_tokens_per_s: float
    history: list[dict] = field(default_factory=list)
    curve: list[dict] = field(default_factory=list)  # {step, loss, learning_rate} every LOSS_EVERY steps
    precision: str = "fp32"  # the matrix products' precision in training: "bf16" or "fp32"


def build_model(base_path: Path, labels: Sequence[str], config: FinetuneConfig,
                head: tuple[torch.Tensor, torch.Tensor] | None = None, pooling: str = "auto") -> TextClassifier:
    """The base model's encoder, pooled, with a linear head, its encoder wrapped in
    LoRA adapters unless full fine-tuning is asked for.

    Args:
        head: (weight (labels, hidden), bias (labels,)) to start the head from,
            the baseline's linear probe; None starts it at zero (see below).
        pooling: `model.pooling` ("auto": how the base model was trained).
    """
    encoder = load_encoder(base_path, "cpu")
    if config.method == "lora":
        from peft import LoraConfig, get_peft_model

        targets = config.target_modules if isinstance(config.target_modules, str) else list(config.target_modules)
        lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                          target_modules=targets)
        encoder = get_peft_model(encoder, lora)
    encoder.train()
    model = TextClassifier(encoder, len(labels), resolve_pooling(pooling, base_path))
    with torch.no_grad():
        # Without a probe the head starts at zero, not at random: a random head sends the
        # encoder random gradients that Adam scales up to full-size steps, and at 2e-3 that
        # collapsed MiniLM to one class in 2 of 4 seeds (movie reviews, 80 steps); from
        # zero the head learns the classes' directions first and 4 of 4 seeds learned.
        if head is None:
            model.head.weight.zero_()
            model.head.bias.zero_()
        else:
            model.head.weight.copy_(head[0])
            model.head.bias.copy_(head[1])
    return model


def length_grouped_order(lengths: Sequence[int], batch_size: int, seed: int) -> list[np.ndarray]:
    """Shuffled batches of similar-length examples.

    Shuffles, cuts into windows of 50 batches, sorts each window by length and
    shuffles the batch order: random enough for SGD, with little padding. The
    order depends only on (lengths, batch_size, seed), so a resumed run replays it.
    """
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(lengths))
    by_index = np.asarray(lengths)
    window = batch_size * 50
    batches: list[np.ndarray] = []
    for start in range(0, len(order), window):
        chunk = order[start : start + window]
        chunk = chunk[np.argsort(-by_index[chunk], kind="stable")]
        batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    return [batches[i] for i in rng.permutation(len(batches))]


def linear_schedule(total_steps: int, warmup_ratio: float):
    """Linear warm-up then linear decay to zero, as a LambdaLR factor."""
    warmup = max(1, int(total_steps * warmup_ratio))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return factor


def run_fingerprint(config: FinetuneConfig, data_key: str, base_path: Path) -> str:
    """Identifies a training run: a checkpoint is resumed only into the same run."""
    payload = json.dumps([asdict(config), data_key, str(base_path)], sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the parameters that training changes (adapters and head)."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(path: Path, state: dict) -> None:
    """Writes atomically, so an interruption never leaves a half-written file,
    with the file's sha256 beside it (`last.pt.sha256`) for `load_checkpoint` to check."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    digest = integrity.sha256_file(tmp)
    os.replace(tmp, path)
    digest_path(path).write_text(digest + "\n")


def digest_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def load_checkpoint(path: Path, fingerprint: str) -> dict | None:
    """The checkpoint of the same run, or None when there is none to resume.

    Read without pickle (`weights_only=True`: tensors, numbers, strings,
    lists and dicts only), after its bytes are checked against the sha256
    written with it, so a crafted or damaged file is refused, never run.

    Raises:
        IntegrityError: the file does not match its recorded sha256, or is not
            a plain-tensor checkpoint; the message says how to start afresh.
    """
    if not path.exists():
        return None
    afresh = f"delete {path.parent} to train from the start"
    recorded = digest_path(path).read_text().strip() if digest_path(path).exists() else None
    if recorded != integrity.sha256_file(path):
        raise integrity.IntegrityError(f"refusing to resume from {path}: its sha256 does not match the one "
                                       f"written with it ({digest_path(path).name}); {afresh}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise integrity.IntegrityError(f"refusing to resume from {path}: it holds more than tensors and numbers "
                                       f"({str(error).splitlines()[0]}); {afresh}") from None
    return state if state.get("fingerprint") == fingerprint else None


def training_precision(device: torch.device, precision: str) -> str:
    """"bf16" when asked, or for "auto" on a CUDA card with bf16; else "fp32".

    On a CPU bf16 training is asked for, not automatic: where the CPU multiplies bf16 in
    hardware (AVX-512 BF16, AMX) it trains 1.29x faster (AMD EPYC, the movie run's 530
    steps: 152 s vs 196 s) but that run's test macro-F1 was 0.8477 against fp32's 0.8534;
    where it does not, bf16 is emulated and slower.
    """
    if precision == "bf16":
        return "bf16"
    return "bf16" if precision == "auto" and device.type == "cuda" and bf16_native(device) else "fp32"


def autocast_context(device: torch.device, precision: str):
    """bf16 autocast where `training_precision` says bf16, else a no-op. The weights, the
    optimizer and the loss stay fp32: only the matrix products run in bf16."""
    if training_precision(device, precision) == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return torch.autocast(device_type=device.type, enabled=False)


def score_macro_f1(model, tokenizer, labels, texts, y_true, config, device) -> float:
    """Validation macro-F1 of the model as it is now."""
    model.eval()
    clf = Classifier(model, tokenizer, list(labels), config.max_length, device)
    with autocast_context(device, config.precision):
        predicted = predict_proba(clf, texts, batch_size=max(64, config.batch_size)).argmax(1)
    model.train()
    return macro_f1(np.asarray(y_true), predicted, len(labels))


@dataclass
class TrainState:
    """What a checkpoint must carry to continue a run exactly where it stopped:
    numbers, tensors and lists/dicts of them only, so it loads without pickle."""

    step: int = 0
    epoch: int = 0
    best_f1: float = -1.0
    best_state: dict[str, torch.Tensor] | None = None
    bad_epochs: int = 0
    history: list[dict] = field(default_factory=list)
    curve: list[dict] = field(default_factory=list)
    examples: int = 0
    tokens: int = 0
    seconds: float = 0.0
    epoch_loss: float = 0.0  # summed mean train loss of this epoch's steps so far (all ranks' mean)
    epoch_steps: int = 0

    def to_plain(self) -> dict:
        """A plain dict (no dataclass to unpickle); `TrainState(**plain)` reverses it."""
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


def make_optimizer(model: torch.nn.Module, config: FinetuneConfig, device: torch.device, total_steps: int,
                   probe_started: bool = False):
    """AdamW over the trainable parameters only, with a linear warm-up/decay
    schedule. The body trains at `config.rate` (its measured default depends on the
    method and on whether the head starts from the probe). A head started from the
    probe trains at `head_learning_rate`; a random head has everything to learn and
    trains at the body's rate. The fused kernel updates every tensor in one
    operation (CPU and CUDA), instead of a dozen operations per tensor."""
    head = [p for n, p in model.named_parameters() if p.requires_grad and n.startswith("head.")]
    body = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("head.")]
    rate = config.rate(probe_started)
    head_lr = config.head_learning_rate if probe_started and config.head_learning_rate is not None \
        else rate  # 0.0 is a rate (a frozen head), not "unset"
    groups = [{"params": body, "lr": rate}, {"params": head, "lr": head_lr}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=rate,
                                  weight_decay=config.weight_decay, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_schedule(total_steps, config.warmup_ratio))
    return optimizer, scheduler


def restore(model, optimizer, scheduler, checkpoint: dict) -> TrainState:
    """Loads a checkpoint's weights and optimizer state; returns its progress."""
    model.load_state_dict(checkpoint["trainable"], strict=False)
    optimizer.load_state_dict(checkpoint["optimizer"])
    scheduler.load_state_dict(checkpoint["scheduler"])
    torch.set_rng_state(checkpoint["torch_rng"])
    return TrainState(**checkpoint["state"])


def snapshot(model, optimizer, scheduler, state: TrainState, fingerprint: str) -> dict:
    """Everything a resume needs, as tensors, numbers and strings (loadable with weights_only=True)."""
    return {
        "fingerprint": fingerprint, "trainable": trainable_state(model),
        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "torch_rng": torch.get_rng_state(), "state": state.to_plain(),
    }


def class_weights(targets: torch.Tensor, classes: int, how: str) -> torch.Tensor | None:
    """Per-class loss weights: "balanced" gives class c rows / (classes x rows of c), so
    every class weighs the same in the loss and the weight averaged over the rows is 1;
    a class without train rows gets 0. "none": None (every row weighs 1). "auto": balanced
    when the classes' row counts differ by labels.AUTO_BALANCE_RATIO or more, else none."""
    if resolve_class_weight(how, targets.numpy(), classes) == "none":
        return None
    counts = torch.bincount(targets, minlength=classes).float()  # (classes,)
    weights = len(targets) / (int((counts > 0).sum()) * counts.clamp(min=1))
    return torch.where(counts > 0, weights, torch.zeros_like(weights))


def row_losses(logits: torch.Tensor, y: torch.Tensor, weight: torch.Tensor | None, smoothing: float) -> torch.Tensor:
    """Each row's cross-entropy (with label smoothing), times its class's weight: (batch,)."""
    losses = F.cross_entropy(logits.float(), y, reduction="none", label_smoothing=smoothing)
    return losses if weight is None else losses * weight[y]


def loss_function(model: torch.nn.Module, weight: torch.Tensor | None = None, smoothing: float = 0.0):
    """(input_ids, attention_mask, labels) -> mean (class-weighted, smoothed) cross-entropy of the logits."""
    return lambda input_ids, mask, y: row_losses(model(input_ids, mask), y, weight, smoothing).mean()


def curve_point(step: int, loss_sum: torch.Tensor, steps: int, scheduler, ranks: Ranks) -> dict:
    """The mean loss of the last `steps` steps (over all ranks) and the body's learning rate after `step`."""
    loss = distributed.mean_across(loss_sum, ranks).item() / steps
    return {"step": step, "loss": loss, "learning_rate": float(scheduler.get_last_lr()[0])}


def sharded_loss_function(model: torch.nn.Module, ranks: Ranks, classes: torch.Tensor | None = None,
                          smoothing: float = 0.0):
    """(input_ids, attention_mask, labels, weight) -> this rank's share of the
    global batch's mean cross-entropy; one process keeps the plain mean.

    Args:
        classes: per-class loss weights (`class_weights`), None for none.
    """
    if not ranks.distributed:
        compute_loss = loss_function(model, classes, smoothing)
        return lambda input_ids, mask, y, weight: compute_loss(input_ids, mask, y)
    return lambda input_ids, mask, y, weight: row_losses(model(input_ids, mask), y, classes, smoothing).sum() * weight


def train_steps(model, batches, ids, targets, pad_id, optimizer, scheduler, config, device, bar,
                curve: list[dict], first_step: int, ranks: Ranks = Ranks(),
                weights: torch.Tensor | None = None,
                on_metrics: OnMetrics = no_metrics) -> tuple[int, int, int, torch.Tensor]:
    """Runs optimizer steps over `batches` (global batches) until the next checkpoint is due,
    appending a loss-curve point to `curve` (and reporting it to `on_metrics`) every
    LOSS_EVERY steps and at the end.

    Each rank trains on its shard of every global batch (`distributed.shard`);
    `model` is the DDP-wrapped model when distributed, so gradients are averaged.
    `weights` are the per-class loss weights (None: every row weighs 1); gradients
    are clipped to `config.max_grad_norm`.

    Returns:
        (steps, examples, non-padding tokens of the global batches, summed loss on the device).

    The loss stays on the device and is read back only every LOSS_EVERY steps
    (and when the call ends): one host sync per 20 steps instead of one per step.
    """
    loss_sum = torch.zeros((), device=device)
    window = torch.zeros((), device=device)
    tokens = examples = unread = 0
    compute_loss = sharded_loss_function(model, ranks, weights, config.label_smoothing)
    trainable = [p for p in model.parameters() if p.requires_grad]
    for done, batch in enumerate(batches, start=1):
        tokens += sum(len(ids[i]) for i in batch)
        examples += len(batch)
        index, weight = distributed.shard(batch, ranks)
        input_ids, mask = pad_batch([ids[i] for i in index], pad_id)
        with autocast_context(device, config.precision):
            loss = compute_loss(input_ids.to(device, non_blocking=True), mask.to(device, non_blocking=True),
                                targets[index].to(device, non_blocking=True), weight)
        loss.backward()
        if config.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm, foreach=True)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        loss_sum += loss.detach()
        window += loss.detach()
        unread += 1
        bar.update(1)
        due = config.checkpoint_every_steps > 0 and done % config.checkpoint_every_steps == 0
        if done % LOSS_EVERY == 0 or due or done == len(batches):
            curve.append(curve_point(first_step + done, window, unread, scheduler, ranks))
            on_metrics(curve[-1]["step"], curve_values(curve[-1]))
            bar.set_postfix(loss=f"{curve[-1]['loss']:.4f}")
            window.zero_()
            unread = 0
        if due:
            return done, examples, tokens, loss_sum
    return len(batches), examples, tokens, loss_sum


def finetune(
    base_model: str, base_path: Path, train: tuple[Sequence[str], Sequence[int]],
    validation: tuple[Sequence[str], Sequence[int]], labels: Sequence[str], config: FinetuneConfig,
    out_dir: Path, checkpoint_dir: Path, data_key: str, progress: bool = True,
    on_epoch_end: Callable[[int, float], None] | None = None,
    head: tuple[torch.Tensor, torch.Tensor] | None = None, pooling: str = "auto",
    on_metrics: OnMetrics | None = None,
) -> FinetuneResult:
    """Fine-tunes `base_path` on `train`, early-stopping on validation macro-F1.

    A checkpoint is written every `checkpoint_every_steps` and at each epoch's
    end; a run started again with the same config, data and base model resumes
    from it. The best epoch's weights are saved to `out_dir` as safetensors
    (adapter or full model) with the tokenizer, labels.json and tuneloop.json.

    Args:
        base_model: the name recorded in the saved model (params' value).
        train, validation: (texts, label indices).
        data_key: identifies the data version; part of the resume fingerprint.
        on_epoch_end: called with (epoch, validation macro-F1) after each
            epoch; an exception it raises (a pruned tuning trial) ends the run.
        head: (weight, bias) to start the classifier head from (the linear
            probe, with `head_init: probe`); None starts it at random.
        pooling: `model.pooling`, the same the probe was fitted with.
        on_metrics: called (on the main rank) with (step, {name: value}) while
            training: loss and learning_rate every LOSS_EVERY steps, val_macro_f1
            after each epoch (and the probe's start); a resumed run first
            reports the points its checkpoint holds. Plain values: the caller
            decides where they go (the stage logs them to MLflow).

    Raises:
        ValueError: no train or no validation rows.
    """
    from tqdm.auto import tqdm

    if not len(train[0]) or not len(validation[0]):
        raise ValueError(f"finetune needs train and validation rows, got {len(train[0])} and {len(validation[0])}")
    torch.manual_seed(config.seed)
    ranks = distributed.current_ranks()  # rank 0 of 1 unless a launcher joined a process group
    device = distributed.rank_device(pick_device(config.device), ranks)
    tokenizer = load_tokenizer(base_path)
    model = build_model(base_path, labels, config, head, pooling).to(device)
    model.train()
    ids = tokenize(tokenizer, train[0], config.max_length)
    targets = torch.as_tensor(np.asarray(train[1]), dtype=torch.long)
    steps_per_epoch = math.ceil(len(ids) / config.batch_size)
    epochs = config.epochs_for(len(ids), len(labels))
    floor = config.floor_epochs(len(ids), len(labels))  # patience stops nothing before it
    weights = class_weights(targets, len(labels), config.class_weights)
    weights = None if weights is None else weights.to(device)
    total_steps = steps_per_epoch * epochs
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)
    optimizer, scheduler = make_optimizer(model, config, device, total_steps, probe_started=head is not None)
    head_key = "random" if head is None else hashlib.sha256(
        b"".join(t.detach().cpu().float().numpy().tobytes() for t in head)).hexdigest()
    fingerprint = run_fingerprint(config, f"{data_key}/{head_key}/{pooling}", base_path)
    checkpoint_path = Path(checkpoint_dir) / CHECKPOINT_FILE
    checkpoint = load_checkpoint(checkpoint_path, fingerprint)
    state = restore(model, optimizer, scheduler, checkpoint) if checkpoint else TrainState()
    resumed_from = state.step
    report = on_metrics if on_metrics is not None and ranks.is_main else no_metrics
    replay(state, report)
    if head is not None and not checkpoint:
        score_start(model, tokenizer, labels, validation, config, device, state, ranks)
        report(0, {"val_macro_f1": state.history[-1]["val_macro_f1"]})
    trained = distributed.wrap(model, ranks, device)  # DDP across ranks; `model` itself otherwise
    pad_id = tokenizer.pad_token_id or 0
    bar = tqdm(total=total_steps, initial=state.step, desc="fine-tuning", unit="step",
               disable=not progress or not ranks.is_main)
    stopped_early = False
    while state.epoch < epochs and state.step < total_steps:
        batches = length_grouped_order([len(s) for s in ids], config.batch_size, config.seed + state.epoch)
        done_in_epoch = state.step - state.epoch * steps_per_epoch
        batches = batches[done_in_epoch : done_in_epoch + total_steps - state.step]
        while batches:
            started = time.perf_counter()
            steps, examples, tokens, loss_sum = train_steps(
                trained, batches, ids, targets, pad_id, optimizer, scheduler, config, device, bar, state.curve,
                state.step, ranks, weights, report)
            state.step, state.examples, state.tokens = (state.step + steps, state.examples + examples,
                                                        state.tokens + tokens)
            state.epoch_loss += float(distributed.mean_across(loss_sum, ranks).item())
            state.epoch_steps += steps
            state.seconds += time.perf_counter() - started
            batches = batches[steps:]
            if batches and ranks.is_main:  # one writer: every rank holds the same weights
                save_checkpoint(checkpoint_path, snapshot(model, optimizer, scheduler, state, fingerprint))
        stopped_early = end_epoch(model, tokenizer, labels, validation, config, device, state, ranks, floor)
        report(state.history[-1]["step"], {"val_macro_f1": state.history[-1]["val_macro_f1"]})
        if ranks.is_main:
            save_checkpoint(checkpoint_path, snapshot(model, optimizer, scheduler, state, fingerprint))
        if on_epoch_end is not None:
            on_epoch_end(state.epoch, state.history[-1]["val_macro_f1"])
        if stopped_early:
            break
    bar.close()
    return finish(model, tokenizer, labels, train, base_model, config, device, state, out_dir,
                  checkpoint_path, resumed_from, stopped_early, ranks)


def agreed_macro_f1(model, tokenizer, labels, texts, y_true, config, device, ranks: Ranks) -> float:
    """Rank 0's macro-F1 on every rank: one process scores, all take the same
    keep/stop decisions (the others wait at the broadcast)."""
    f1 = score_macro_f1(model, tokenizer, labels, texts, y_true, config, device) if ranks.is_main else 0.0
    return distributed.broadcast_float(f1, ranks, device)


def score_start(model, tokenizer, labels, validation, config, device, state: TrainState,
                ranks: Ranks = Ranks()) -> None:
    """Scores the probe-started model before any step: fine-tuning keeps it
    unless an epoch beats it on validation, so it never ends below the probe."""
    f1 = agreed_macro_f1(model, tokenizer, labels, validation[0], validation[1], config, device, ranks)
    state.history.append({"epoch": 0, "step": 0, "val_macro_f1": f1})
    state.best_f1, state.best_state = f1, trainable_state(model)


def end_epoch(model, tokenizer, labels, validation, config, device, state: TrainState,
              ranks: Ranks = Ranks(), floor: int = 1) -> bool:
    """Scores validation, keeps the best weights; True when patience ran out.

    Patience counts epochs that do not beat the best trained epoch: the probe's
    start (epoch 0) is kept if nothing beats it, but an early epoch below it,
    its learning rate still high, does not end the run; nor does any epoch
    before `floor` (the epochs min_steps and min_examples_per_class promise).
    Distributed, rank 0's score decides on every rank.
    """
    f1 = agreed_macro_f1(model, tokenizer, labels, validation[0], validation[1], config, device, ranks)
    trained_best = max((h["val_macro_f1"] for h in state.history if h["epoch"] >= 1), default=-1.0)
    train_loss = state.epoch_loss / state.epoch_steps if state.epoch_steps else None
    state.history.append({"epoch": state.epoch + 1, "step": state.step, "val_macro_f1": f1, "train_loss": train_loss})
    state.epoch_loss, state.epoch_steps = 0.0, 0
    if f1 > state.best_f1:
        state.best_f1, state.best_state = f1, trainable_state(model)
    state.bad_epochs = 0 if f1 > trained_best else state.bad_epochs + 1
    state.epoch += 1
    return state.bad_epochs >= config.patience and state.epoch >= floor


def finish(model, tokenizer, labels, train, base_model, config, device, state, out_dir,
           checkpoint_path, resumed_from, stopped_early, ranks: Ranks = Ranks()) -> FinetuneResult:
    """Restores the best epoch, measures the train score for the train-vs-
    validation gap, saves the model and drops the finished run's checkpoint
    (rank 0 alone writes; the others wait until the weights are saved)."""
    if state.best_state is not None:
        model.load_state_dict(state.best_state, strict=False)
    # a seeded random sample: enough rows for the gap, cheap to score (sources are often sorted by label)
    rows = np.random.default_rng(config.seed).permutation(len(train[0]))[:1000]
    train_f1 = agreed_macro_f1(model, tokenizer, labels, [train[0][i] for i in rows],
                               [train[1][i] for i in rows], config, device, ranks)
    if ranks.is_main:
        save_model(model, tokenizer, labels, base_model, config, Path(out_dir), state.history)
        checkpoint_path.unlink(missing_ok=True)
    distributed.barrier(ranks)
    seconds = max(state.seconds, 1e-9)
    return FinetuneResult(
        model_dir=Path(out_dir), best_val_macro_f1=state.best_f1, train_macro_f1=train_f1,
        steps=state.step, epochs_run=state.epoch, stopped_early=stopped_early,
        resumed_from_step=resumed_from, seconds=state.seconds,
        train_examples_per_s=state.examples / seconds,
        train_tokens_per_s=state.tokens / seconds, history=state.history, curve=state.curve,
        precision=training_precision(device, config.precision),
    )


def save_model(model, tokenizer, labels, base_model: str, config: FinetuneConfig, out_dir: Path,
               history: list[dict]) -> None:
    """Weights as safetensors (the encoder's adapter alone for LoRA, and the
    head), tokenizer, label map and the metadata `load_classifier` needs."""
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    model.encoder.save_pretrained(out_dir)
    save_file({k: v.detach().cpu().contiguous() for k, v in model.head.state_dict().items()}, str(out_dir / HEAD_FILE))
    tokenizer.save_pretrained(out_dir)
    (out_dir / LABELS_FILE).write_text(json.dumps(list(labels)))
    meta = {"method": config.method, "base_model": base_model, "max_length": config.max_length,
            "pooling": model.pooling, "config": asdict(config), "history": history}
    (out_dir / META_FILE).write_text(json.dumps(meta, indent=2, default=str))


def calibrate_model(model_dir: Path, validation: tuple[Sequence[str], Sequence[int]], labels: Sequence[str],
                    settings, batch_size: int = 64) -> tuple[float, Abstention]:
    """Fits a saved model's temperature and abstention threshold on the validation
    rows and writes them into its tuneloop.json, where `load_classifier` reads them.

    Args:
        settings: the `model` params section (calibrate, out_of_scope_label, abstain_max_accuracy_drop).
    """
    classifier = load_classifier(Path(model_dir), device="cpu" if not torch.cuda.is_available() else "auto")
    logits = predict_logits(classifier, list(validation[0]), batch_size)  # (rows, labels)
    temperature, abstention = calibrate(logits, np.asarray(validation[1]), labels, settings)
    meta = read_meta(model_dir)
    meta.update(temperature=temperature, abstention=abstention.to_dict())
    (Path(model_dir) / META_FILE).write_text(json.dumps(meta, indent=2, default=str))
    return temperature, abstention
