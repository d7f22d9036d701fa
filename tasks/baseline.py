"""baseline: what the base model does without fine-tuning.

Two references on the test split: a linear probe (multinomial logistic
regression on frozen, mean-pooled embeddings, fitted on train) and zero-shot
classification (cosine similarity of a text to each label's prompt). A
fine-tuned model that cannot beat the probe is not worth its compute.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from tasks.classifier import mean_pooled_embeddings, pick_device

PROBE_WEIGHTS = "probe.safetensors"


@dataclass(frozen=True)
class BaselineConfig:
    batch_size: int = 64
    max_length: int = 128
    probe_l2: float = 1e-4  # ridge penalty on the probe's weights
    probe_max_iter: int = 200
    zero_shot_template: str = "This text is {label}."
    zero_shot_temperature: float = 0.05  # cosine similarities are close together; sharpen them
    device: str = "auto"
    __pydantic_config__ = {"extra": "forbid"}


@dataclass
class Probe:
    weight: torch.Tensor  # (classes, hidden)
    bias: torch.Tensor  # (classes,)
    labels: list[str]

    def predict_proba(self, embeddings: np.ndarray) -> np.ndarray:
        logits = torch.from_numpy(embeddings) @ self.weight.T + self.bias  # (rows, classes)
        return torch.softmax(logits, dim=-1).numpy()


def load_encoder(base_path: Path, device: str = "auto"):
    """The base model's encoder (no head) and tokenizer, in eval mode."""
    from transformers import AutoModel, AutoTokenizer

    encoder = AutoModel.from_pretrained(base_path).to(pick_device(device)).eval()
    return encoder, AutoTokenizer.from_pretrained(base_path)


def fit_probe(embeddings: np.ndarray, y: np.ndarray, labels: Sequence[str], l2: float, max_iter: int) -> Probe:
    """Multinomial logistic regression fitted with L-BFGS (full batch: the
    embeddings of a few thousand rows fit in memory)."""
    x = torch.from_numpy(embeddings)
    target = torch.as_tensor(y, dtype=torch.long)
    weight = torch.zeros((len(labels), x.shape[1]), requires_grad=True)
    bias = torch.zeros(len(labels), requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ weight.T + bias, target) + l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return Probe(weight.detach(), bias.detach(), list(labels))


def save_probe(probe: Probe, out_dir: Path) -> None:
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({"weight": probe.weight.contiguous(), "bias": probe.bias}, str(out_dir / PROBE_WEIGHTS))
    (out_dir / "labels.json").write_text(json.dumps(probe.labels))


def load_probe(probe_dir: Path) -> Probe:
    from safetensors.torch import load_file

    tensors = load_file(str(probe_dir / PROBE_WEIGHTS))
    return Probe(tensors["weight"], tensors["bias"], json.loads((probe_dir / "labels.json").read_text()))


def zero_shot_proba(encoder, tokenizer, embeddings: np.ndarray, labels: Sequence[str], config: BaselineConfig) -> np.ndarray:
    """Softmax over cosine similarities between each text and each label prompt."""
    prompts = [config.zero_shot_template.format(label=label) for label in labels]
    label_vectors = mean_pooled_embeddings(encoder, tokenizer, prompts, config.max_length)  # (classes, hidden)
    similarity = torch.from_numpy(embeddings @ label_vectors.T)  # (rows, classes)
    return torch.softmax(similarity / config.zero_shot_temperature, dim=-1).numpy()


def embed(encoder, tokenizer, texts: Sequence[str], config: BaselineConfig, progress: bool = True) -> np.ndarray:
    return mean_pooled_embeddings(encoder, tokenizer, list(texts), config.max_length, config.batch_size, progress)


def label_indices(labels_column, labels: Sequence[str]) -> np.ndarray:
    index = {name: i for i, name in enumerate(labels)}
    return np.asarray([index[v] for v in labels_column], dtype=np.int64)


def run_baseline(config: BaselineConfig, base_path: Path, labels: Sequence[str], workspace) -> dict:
    """Fits the probe on train, scores probe and zero-shot on test.

    Writes the probe to `models/probe/` and the metrics to `metrics/baseline.json`.

    Returns:
        {"probe": {...}, "zero_shot": {...}} with accuracy and macro-F1 each.
    """
    from tasks.metrics import accuracy, macro_f1
    from tasks.split import load_split
    from tasks.workspace import write_json

    train, test = load_split(workspace, "train"), load_split(workspace, "test")
    encoder, tokenizer = load_encoder(base_path, config.device)
    train_x = embed(encoder, tokenizer, train["text"], config)
    test_x = embed(encoder, tokenizer, test["text"], config)
    probe = fit_probe(train_x, label_indices(train["label"], labels), labels, config.probe_l2, config.probe_max_iter)
    save_probe(probe, workspace.probe_dir)
    y_test = label_indices(test["label"], labels)
    result = {}
    for name, probs in (("probe", probe.predict_proba(test_x)),
                        ("zero_shot", zero_shot_proba(encoder, tokenizer, test_x, labels, config))):
        predicted = probs.argmax(1)
        result[name] = {"accuracy": accuracy(y_test, predicted), "macro_f1": macro_f1(y_test, predicted, len(labels))}
    write_json(workspace.baseline_metrics, result)
    return result
