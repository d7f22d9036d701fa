"""baseline: what the base model does without fine-tuning.

Two references on the test split: a linear probe (scikit-learn's
multinomial logistic regression on the frozen encoder's pooled, normalised
embeddings, fitted on train, its regularisation chosen on validation) and
zero-shot classification (cosine similarity of a text to each label's prompt).
A fine-tuned model that cannot beat a strong probe is not worth its compute;
the probe's weights also start the fine-tuned model's head.

The probe is also a complete model: the frozen base encoder with the fitted
head, calibrated on validation like every model. It is saved as a classifier
folder (method "probe": no weights of its own beside the head) that
`classifier.load_classifier` scores, evaluate compares and the gate may
register as champion when fine-tuning does not beat it.

With `baseline.candidates` listed, every candidate base model is probed on the
same train and validation rows and timed on the same validation sample;
`choose_base` keeps the best validation macro-F1 within the latency budget,
and the probe saved (and the base finetune starts from) is that model's.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch

from tuneloop.model.calibration import Abstention, calibrate, softmax
from tuneloop.model.classifier import (
    HEAD_FILE,
    LABELS_FILE,
    META_FILE,
    load_tokenizer,
    pooled_embeddings,
    read_meta,
    resolve_pooling,
)
from tuneloop.model.classifier import load_encoder as load_base_encoder
from tuneloop.plumbing.integrity import base_weights_sha256
from tuneloop.tasks.evaluate import timed_scoring
from tuneloop.values.config import BaselineConfig, ModelConfig
from tuneloop.values.decision import TOLERANCE
from tuneloop.values.errors import TuneloopError
from tuneloop.values.labels import label_indices, resolve_class_weight

PROBE_WEIGHTS = "probe.safetensors"


@dataclass
class Probe:
    weight: torch.Tensor  # (classes, hidden)
    bias: torch.Tensor  # (classes,)
    labels: list[str]
    c: float = 0.0  # the regularisation it was fitted with
    class_weight: str = "none"  # "balanced": each class weighed by rows / (classes x its rows)
    offsets: list[float] | None = None  # per-class decision offsets folded into `bias` (imbalanced rows)

    def logits(self, embeddings: np.ndarray) -> np.ndarray:
        return (torch.from_numpy(embeddings) @ self.weight.T + self.bias).numpy()  # (rows, classes)

    def predict_proba(self, embeddings: np.ndarray) -> np.ndarray:
        return softmax(self.logits(embeddings))

    @property
    def setting(self) -> str:
        """How it was fitted, as the baseline line says it: `C=10` or `C=10 balanced`."""
        return f"C={self.c:g}" + (" balanced" if self.class_weight == "balanced" else "")


def load_encoder(base_path: Path, device: str = "auto"):
    """The base model's encoder (no head) and tokenizer, in eval mode."""
    return load_base_encoder(base_path, device), load_tokenizer(base_path)


def fit_probe(embeddings: np.ndarray, y: np.ndarray, labels: Sequence[str], c: float, max_iter: int,
              class_weight: str = "none") -> Probe:
    """Multinomial logistic regression (L-BFGS, L2 penalty 1/c; class_weight
    "balanced" weighs each class by rows / (classes x its rows)) as one linear
    layer of `len(labels)` outputs; a class absent from `y` keeps a very low bias."""
    from sklearn.linear_model import LogisticRegression

    weighting = "balanced" if class_weight == "balanced" else None
    fitted = LogisticRegression(C=c, max_iter=max_iter, class_weight=weighting).fit(embeddings, y)
    weight = np.zeros((len(labels), embeddings.shape[1]), dtype=np.float32)
    bias = np.full(len(labels), -1e4, dtype=np.float32)
    if len(fitted.classes_) == 2:  # one logit z; softmax([-z/2, z/2]) is sigmoid(z)
        weight[fitted.classes_] = np.stack([-fitted.coef_[0] / 2, fitted.coef_[0] / 2])
        bias[fitted.classes_] = [-fitted.intercept_[0] / 2, fitted.intercept_[0] / 2]
    else:
        weight[fitted.classes_], bias[fitted.classes_] = fitted.coef_, fitted.intercept_
    return Probe(torch.from_numpy(weight), torch.from_numpy(bias), list(labels), c, class_weight)


def select_probe(train: tuple[np.ndarray, np.ndarray], validation: tuple[np.ndarray, np.ndarray],
                 labels: Sequence[str], config: BaselineConfig) -> tuple[Probe, dict[str, float]]:
    """Fits one probe per `probe_c` and `probe_class_weights` on train ("auto": balanced
    on imbalanced rows, else none); returns the best on validation macro-F1 (on a tie:
    the first weighting listed, then the stronger regularisation) and every setting's
    score, keyed `C=10` / `C=10 balanced`.

    With decision offsets (`probe_thresholds`, imbalanced rows) each setting is instead
    scored by its out-of-fold train macro-F1 after its offsets (keyed `C=10 balanced
    offsets`): a 97:3 file's validation holds ~8 rows of the small class, train ~80, and
    the chosen probe carries its offsets in its bias."""
    from tuneloop.model.metrics import macro_f1

    scores: dict[str, float] = {}
    best: tuple[Probe, float] | None = None
    weightings = dict.fromkeys(resolve_class_weight(how, train[1], len(labels)) for how in config.probe_class_weights)
    offsets = resolve_class_weight(config.probe_thresholds, train[1], len(labels)) != "none"
    for class_weight in weightings:
        for c in sorted(config.probe_c):
            probe = fit_probe(train[0], train[1], labels, c, config.probe_max_iter, class_weight)
            if offsets:
                shift, score = out_of_fold_offsets(train, probe, config.probe_max_iter)
                probe.bias, probe.offsets = probe.bias + torch.from_numpy(shift), shift.tolist()
                scores[f"{probe.setting} offsets"] = score
            else:
                score = macro_f1(validation[1], probe.logits(validation[0]).argmax(1), len(labels))
                scores[probe.setting] = score
            if best is None or score > best[1]:
                best = (probe, score)
    if best is None:
        raise ValueError("baseline.probe_c lists no C value: no probe was fitted")
    return best[0], scores


def decision_offsets(logits: np.ndarray, y: np.ndarray, classes: int, passes: int = 2,
                     candidates: int = 41) -> np.ndarray:
    """Per-class offsets added to `logits` before the argmax, chosen for macro-F1 on these
    (held-out) rows: coordinate ascent, one class at a time, over offsets that flip the
    class's quantiles of margins. Zeros when no offset improves on the plain argmax.

    On imbalanced rows a plain argmax follows the priors the training loss saw (or, with
    balanced weights, equal priors); macro-F1 wants a point in between, which only rows
    the model did not train on can show.

    Returns:
        (classes,) float32 offsets.
    """
    from tuneloop.model.metrics import macro_f1

    logits, y = np.asarray(logits, dtype=np.float64), np.asarray(y, dtype=np.int64)
    offsets = np.zeros(classes)
    best = macro_f1(y, logits.argmax(1), classes)
    for _ in range(passes):
        improved = False
        for k in range(classes):
            shifted = logits + offsets
            others = np.delete(shifted, k, axis=1).max(1)
            margin = shifted[:, k] - others  # > 0: k wins
            tries = offsets[k] - np.quantile(margin, np.linspace(0.0, 1.0, candidates)) + 1e-6
            for value in sorted(tries, key=lambda v: abs(v - offsets[k])):
                trial = offsets.copy()
                trial[k] = value
                score = macro_f1(y, (logits + trial).argmax(1), classes)
                if score > best + 1e-9:
                    best, offsets, improved = score, trial, True
        if not improved:
            break
    return offsets.astype(np.float32)


def out_of_fold_offsets(train: tuple[np.ndarray, np.ndarray], probe: Probe, max_iter: int,
                        folds: int = 5) -> tuple[np.ndarray, float]:
    """`decision_offsets` for `probe`'s setting, chosen on out-of-fold logits of the
    train rows (k-fold, stratified), and the out-of-fold macro-F1 with them; zero offsets
    (and validation cannot be replaced: score -1) when the smallest class has under 2 rows."""
    from sklearn.model_selection import StratifiedKFold

    from tuneloop.model.metrics import macro_f1

    x, y = train
    classes = len(probe.labels)
    counts = np.bincount(y, minlength=classes)
    folds = min(folds, int(counts[counts > 0].min()))
    if folds < 2:
        return np.zeros(classes, dtype=np.float32), -1.0
    logits = np.zeros((len(y), classes), dtype=np.float32)
    for fit_rows, held_rows in StratifiedKFold(folds, shuffle=True, random_state=0).split(x, y):
        fold_probe = fit_probe(x[fit_rows], y[fit_rows], probe.labels, probe.c, max_iter, probe.class_weight)
        logits[held_rows] = fold_probe.logits(x[held_rows])
    present = counts > 0
    offsets = np.zeros(classes, dtype=np.float32)
    offsets[present] = decision_offsets(logits[:, present], np.searchsorted(np.flatnonzero(present), y),
                                        int(present.sum()))
    return offsets, macro_f1(y, (logits + offsets).argmax(1), classes)


def save_probe(probe: Probe, out_dir: Path) -> None:
    """The probe's weights and labels (what `probe_head` starts a fine-tuned head from)."""
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({"weight": probe.weight.contiguous(), "bias": probe.bias}, str(out_dir / PROBE_WEIGHTS))
    (out_dir / LABELS_FILE).write_text(json.dumps(probe.labels))


def save_probe_model(probe: Probe, out_dir: Path, tokenizer, base_model: str, pooling: str, max_length: int,
                     temperature: float, abstention: Abstention) -> None:
    """The probe as a complete classifier folder (`load_classifier` reads it): the head,
    labels, tokenizer and tuneloop.json (method "probe": the base model's own encoder)."""
    from safetensors.torch import save_file

    save_probe(probe, out_dir)
    save_file({"weight": probe.weight.contiguous(), "bias": probe.bias.contiguous()}, str(out_dir / HEAD_FILE))
    tokenizer.save_pretrained(out_dir)
    meta = {"method": "probe", "base_model": base_model, "max_length": max_length, "pooling": pooling,
            "probe": {"c": probe.c, "class_weight": probe.class_weight, "offsets": probe.offsets},
            "temperature": temperature, "abstention": abstention.to_dict()}
    (out_dir / META_FILE).write_text(json.dumps(meta, indent=2))


def load_probe(probe_dir: Path) -> Probe:
    from safetensors.torch import load_file

    tensors = load_file(str(probe_dir / PROBE_WEIGHTS))
    return Probe(tensors["weight"], tensors["bias"], json.loads((probe_dir / "labels.json").read_text()))


def probe_head(probe_dir: Path, labels: Sequence[str], hidden_size: int,
               pooling: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The saved probe as (weight, bias) for a classifier head.

    Args:
        pooling: the pooling the head will read (resolved, not "auto"); a probe
            fitted on other sentence vectors is refused. None: not checked.

    Raises:
        FileNotFoundError: no probe: run the baseline stage first.
        TuneloopError: it was fitted for other labels, another base model or another pooling
            (or its pooling is not recorded).
    """
    if not (probe_dir / PROBE_WEIGHTS).exists():
        raise FileNotFoundError(f"{probe_dir / PROBE_WEIGHTS} is missing: run `tuneloop baseline` first "
                                "(or set finetune.head_init: random)")
    probe = load_probe(probe_dir)
    if probe.labels != list(labels) or probe.weight.shape[1] != hidden_size:
        raise TuneloopError(f"the probe in {probe_dir} was fitted for other labels, another base model or another "
                            "pooling: run `tuneloop baseline` again")
    if pooling is not None:
        check_probe_pooling(probe_dir, pooling)
    return probe.weight, probe.bias


def check_probe_pooling(probe_dir: Path, pooling: str) -> None:
    """Raises TuneloopError unless the probe was fitted on `pooling` (resolved) sentence vectors,
    as its tuneloop.json records: `model.pooling` changed since the baseline ran."""
    fitted = read_meta(probe_dir).get("pooling") if (probe_dir / META_FILE).exists() else None
    if fitted != pooling:
        raise TuneloopError(f"the probe in {probe_dir} was fitted on {fitted or 'unrecorded'} pooling, "
                            f"model.pooling is now {pooling}: run `tuneloop baseline` again")


def zero_shot_proba(encoder, tokenizer, embeddings: np.ndarray, labels: Sequence[str], config: BaselineConfig,
                    pooling: str) -> np.ndarray:
    """Softmax over cosine similarities between each text and each label prompt."""
    prompts = [config.zero_shot_template.format(label=label) for label in labels]
    label_vectors = pooled_embeddings(encoder, tokenizer, prompts, config.max_length,
                                      pooling=pooling)  # (classes, hidden)
    similarity = torch.from_numpy(embeddings @ label_vectors.T)  # (rows, classes)
    return torch.softmax(similarity / config.zero_shot_temperature, dim=-1).numpy()


def embed(encoder, tokenizer, texts: Sequence[str], config: BaselineConfig, pooling: str,
          progress: bool = True) -> np.ndarray:
    return pooled_embeddings(encoder, tokenizer, list(texts), config.max_length, config.batch_size, progress, pooling)


def encoder_key(path: Path, pooling: str, max_length: int) -> str:
    """What a pooled embedding depends on: the base's weights, its config and tokenizer
    files, the pooling and the truncation length (16 hex digits)."""
    digest = hashlib.sha256(f"{pooling}/{max_length}/{base_weights_sha256(path)}".encode())
    for file in sorted(p for p in Path(path).iterdir() if p.is_file() and p.suffix in {".json", ".txt", ".model"}):
        digest.update(file.name.encode() + b"\0" + file.read_bytes())
    return digest.hexdigest()[:16]


def text_digests(texts: Sequence[str]) -> list[bytes]:
    return [hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest() for text in texts]


@dataclass
class EmbeddingCache:
    """One base model's pooled embeddings of the texts the last baseline run embedded,
    keyed by a digest of the text: a retrain on grown data embeds only the new texts.

    `save` keeps only this run's texts, so the file never outgrows one dataset
    (about 1.5 KB a text for a 384-wide encoder). An unreadable file is ignored.
    """

    file: Path
    known: dict[bytes, np.ndarray] = field(default_factory=dict)  # the file's, then this run's new ones
    used: dict[bytes, None] = field(default_factory=dict)  # this run's texts, in order: what `save` keeps
    computed: int = 0  # distinct texts this run embedded
    reused: int = 0  # rows this run took from the file (or an earlier call)

    @classmethod
    def open(cls, folder: Path, key: str) -> "EmbeddingCache":
        file = Path(folder) / f"{key}.npz"
        try:
            with np.load(file) as stored:
                digests, vectors = stored["digests"], stored["embeddings"]
            return cls(file, dict(zip((bytes(row) for row in digests), vectors)))
        except (OSError, ValueError, KeyError, zipfile.BadZipFile):
            return cls(file)

    def embed(self, texts: Sequence[str], compute: Callable[[list[str]], np.ndarray]) -> np.ndarray:
        """(len(texts), hidden) embeddings: stored ones where the text was embedded
        before, `compute` (called once, on each new distinct text in order) for the rest."""
        digests = text_digests(texts)
        new: dict[bytes, int] = {}  # digest: its first row
        for i, digest in enumerate(digests):
            if digest not in self.known and digest not in new:
                new[digest] = i
        if new or not self.known:
            fresh = compute([texts[i] for i in new.values()])
            self.known.update(zip(new, fresh))
            hidden = fresh.shape[1]
        else:
            hidden = next(iter(self.known.values())).shape[0]
        out = np.empty((len(texts), hidden), dtype=np.float32)
        for i, digest in enumerate(digests):
            out[i] = self.known[digest]
        self.used.update(dict.fromkeys(digests))
        self.computed += len(new)
        self.reused += sum(digest not in new for digest in digests)
        return out

    def save(self) -> None:
        """Writes this run's texts' embeddings (atomically: a reader sees the old file or the new)."""
        if not self.used:
            return
        self.file.parent.mkdir(parents=True, exist_ok=True)
        partial = self.file.with_name(f"{self.file.stem}.{os.getpid()}.partial.npz")
        np.savez(partial, digests=np.frombuffer(b"".join(self.used), dtype=np.uint8).reshape(-1, 16),
                 embeddings=np.stack([self.known[digest] for digest in self.used]))
        os.replace(partial, self.file)


@dataclass(frozen=True)
class BaseScore:
    """One candidate base model as the choice reads it."""

    name: str  # as baseline.candidates lists it
    macro_f1: float  # its chosen probe's validation macro-F1
    latency_ms: float  # ms per example, batch scoring of the latency sample (`evaluate.timed_scoring`)


def choose_base(scores: Sequence[BaseScore], budget_ms: float | None) -> tuple[str, list[str]]:
    """The candidate with the best validation macro-F1 among those within the latency
    budget (on a tie: the first listed), and one reason per candidate, the choice's first.

    Args:
        scores: every candidate, in the order listed.
        budget_ms: ms per example (`gate.max_latency_ms`); None: no budget.

    Raises:
        TuneloopError: no candidate is within the budget (naming each one's latency).
    """
    within = [s for s in scores if budget_ms is None or s.latency_ms <= budget_ms]
    if not within:
        raise TuneloopError(f"no base model in baseline.candidates scores within gate.max_latency_ms ({budget_ms:g} ms "
                            "per example): " + ", ".join(f"{s.name} {s.latency_ms:.1f} ms" for s in scores))
    best = within[0]
    for score in within[1:]:
        if score.macro_f1 > best.macro_f1 + TOLERANCE:
            best = score
    limit = "no latency budget" if budget_ms is None else f"budget {budget_ms:g} ms"
    reasons = [f"chose {best.name}: the best validation macro-F1 within the latency budget" if len(scores) > 1
               else f"chose {best.name}: the only candidate"]
    for score in scores:
        fits = budget_ms is None or score.latency_ms <= budget_ms
        reasons.append(f"{score.name}: validation macro-F1 {score.macro_f1:.4f}, {score.latency_ms:.2f} ms per "
                       f"example ({'within' if fits else 'over'} {limit})")
    return best.name, reasons


@dataclass
class ProbedBase:
    """One candidate base model's probe, fitted on train, scored and timed on validation."""

    name: str
    path: Path
    pooling: str  # resolved
    tokenizer: object
    probe: Probe
    settings: dict[str, float]  # every probe setting's score (`select_probe`)
    validation: np.ndarray  # (rows, hidden) embeddings, for calibration
    score: BaseScore
    cache: EmbeddingCache


def probe_base(name: str, path: Path, texts: Mapping[str, Sequence[str]], y: Mapping[str, np.ndarray],
               labels: Sequence[str], config: BaselineConfig, model: ModelConfig,
               cache_folder: Path) -> ProbedBase:
    """Embeds train and validation with the base model at `path` (texts embedded by the
    last run come from its `EmbeddingCache` in `cache_folder`), selects its probe, and
    times the frozen encoder plus probe on the first `config.latency_rows` validation rows
    (embedded afresh, after a warm-up batch)."""
    from tuneloop.model.metrics import macro_f1

    pooling = resolve_pooling(model.pooling, path)
    encoder, tokenizer = load_encoder(path, config.device)
    cache = EmbeddingCache.open(cache_folder, encoder_key(path, pooling, config.max_length))
    x = {split: cache.embed(texts[split], lambda rows: embed(encoder, tokenizer, rows, config, pooling))
         for split in ("train", "validation")}
    probe, settings = select_probe((x["train"], y["train"]), (x["validation"], y["validation"]), labels, config)
    sample = list(texts["validation"][:config.latency_rows])
    embed(encoder, tokenizer, sample[:config.batch_size], config, pooling, progress=False)  # warm, cache or not
    _, latency = timed_scoring(
        lambda rows: probe.predict_proba(embed(encoder, tokenizer, rows, config, pooling, progress=False)), sample)
    f1 = macro_f1(y["validation"], probe.logits(x["validation"]).argmax(1), len(labels))
    return ProbedBase(name, path, pooling, tokenizer, probe, settings, x["validation"], BaseScore(name, f1, latency),
                      cache)


def run_baseline(config: BaselineConfig, model: ModelConfig, bases: Mapping[str, Path], labels: Sequence[str],
                 workspace, max_latency_ms: float | None = None) -> dict:
    """Fits a probe per base model on train (its C and class weighting chosen on
    validation), chooses the base (`choose_base`), calibrates its probe on validation,
    scores probe and zero-shot on test.

    Writes the probe, a complete classifier, to `models/probe/`, the test metrics to
    `metrics/baseline.json` and the choice of base to `reports/baseline.json`; each
    candidate's embeddings of this run's texts to `state/embeddings/` (the next run
    embeds only texts not among them).

    Args:
        bases: {name as params list it: local folder}, in the order listed; one
            entry when `baseline.candidates` is empty (model.base).
        max_latency_ms: the latency budget the chosen base must meet; None: none.

    Returns:
        {"probe": {...}, "zero_shot": {...}, "base": {...}} with accuracy and macro-F1 each;
        the probe's also its setting, temperature, abstention and every setting's validation
        macro-F1; "base" the chosen name, the reasons and every candidate's score and latency;
        "embeddings" how many texts the chosen base embedded ("computed") and took from the
        last run's ("reused").

    Raises:
        TuneloopError: no candidate is within `max_latency_ms`.
    """
    from tuneloop.model.metrics import accuracy, macro_f1
    from tuneloop.tasks.split import load_split
    from tuneloop.values.workspace import write_json

    frames = {name: load_split(workspace, name) for name in ("train", "validation", "test")}
    texts = {name: frame["text"].tolist() for name, frame in frames.items()}
    y = {name: label_indices(frame["label"], labels) for name, frame in frames.items()}
    probed = [probe_base(name, path, texts, y, labels, config, model, workspace.embedding_cache)
              for name, path in bases.items()]
    choice, reasons = choose_base([p.score for p in probed], max_latency_ms)
    chosen = next(p for p in probed if p.name == choice)
    probe = chosen.probe
    temperature, abstention = calibrate(probe.logits(chosen.validation), y["validation"], labels, model)
    save_probe_model(probe, workspace.probe_dir, chosen.tokenizer, chosen.name, chosen.pooling, config.max_length,
                     temperature, abstention)
    encoder = load_base_encoder(chosen.path, config.device)  # loaded again: one candidate in memory at a time
    x_test = chosen.cache.embed(texts["test"], lambda rows: embed(encoder, chosen.tokenizer, rows, config,
                                                                  chosen.pooling))
    for candidate in probed:
        candidate.cache.save()
    result = {}
    for name, probs in (("probe", probe.predict_proba(x_test)),
                        ("zero_shot", zero_shot_proba(encoder, chosen.tokenizer, x_test, labels, config,
                                                      chosen.pooling))):
        predicted = probs.argmax(1)
        result[name] = {"accuracy": accuracy(y["test"], predicted),
                        "macro_f1": macro_f1(y["test"], predicted, len(labels))}
    write_json(workspace.baseline_metrics, result)  # the test scores only: `dvc metrics show` columns
    result["base"] = {"chosen": choice, "max_latency_ms": max_latency_ms, "reasons": reasons,
                      "candidates": [{"name": p.score.name, "validation_macro_f1": p.score.macro_f1,
                                      "latency_ms_per_example": p.score.latency_ms} for p in probed]}
    write_json(workspace.base_choice, result["base"])
    result["probe"].update(setting=probe.setting, c=probe.c, class_weight=probe.class_weight, offsets=probe.offsets,
                           temperature=temperature, abstention=abstention.rule,
                           validation_macro_f1_by_setting=chosen.settings)
    result["embeddings"] = {"computed": chosen.cache.computed, "reused": chosen.cache.reused}
    return result
