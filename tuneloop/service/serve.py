"""serve: the champion behind an HTTP API, following the registry's alias.

`tuneloop serve` answers `POST /predict` with the model behind `champion`. A
background thread polls the alias; when it moves (a promotion, a rollback) the
new version is downloaded, loaded and asked one smoke prediction before it
replaces the old one, so a version that cannot answer never serves. Every
prediction is logged to the prediction store, and `POST /feedback` attaches the
true labels the monitoring flow scores against. When the `shadow` alias is set,
its version is followed the same way and scores every request after the
champion has answered, off the request path, its answers logged under the same
request id (`ShadowScorer`); nothing it does reaches the champion's answers.

    POST /predict   {"text": "..."} or {"texts": ["...", ...]}
    POST /feedback  {"request_id": "...", "label": "..."} or {"request_id": "...", "labels": [...]}
                    (+ "correction": true to replace labels already given; every change is kept)
    GET  /health    200 {"status": "ok", "shadow": ...} with a model loaded, else 503 {"status": "no champion"}
    GET  /version   the model name, version, load time and base model
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import threading
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Annotated, Callable, cast

import numpy as np
import pandas as pd
import torch
import uvicorn
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from fastapi.security import HTTPBearer
from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from tuneloop.model.classifier import Classifier, Scored, load_classifier, pick_device, predict_proba, score_texts
from tuneloop.service.auth import Token, TokenGate, authorize
from tuneloop.service.batching import MicroBatcher, QueueFull
from tuneloop.service.limits import BodyLimit, SlowClientLimits, header_timeout_protocol, text_problem
from tuneloop.service.store import FeedbackConflict, Prediction, PredictionStore, store_url, utcnow
from tuneloop.values.config import ServeConfig
from tuneloop.values.privacy import mask_pii

log = logging.getLogger("tuneloop.serve")

SMOKE_TEXT = "The service asks every new version this one question before it serves."


def smoke_check(classifier: Classifier) -> None:
    """One fixed prediction must give finite probabilities summing to one.

    Raises:
        ValueError: saying what was wrong with the answer.
    """
    probs = predict_proba(classifier, [SMOKE_TEXT])  # (1, labels)
    if probs.shape != (1, len(classifier.labels)) or not classifier.labels:
        raise ValueError(f"smoke prediction has shape {probs.shape} for labels {classifier.labels}")
    if not np.isfinite(probs).all() or abs(float(probs.sum()) - 1.0) > 1e-3:
        raise ValueError(f"smoke prediction gave probabilities {probs[0].tolist()}")


def registry_loader(model_name: str, cache_dir: Path, base_model: str, device: str = "auto"
                    ) -> Callable[[str], Classifier]:
    """Download, verify, load and smoke-check one registry version: what the follower calls.

    The version's files must match the sha256s it recorded, and a LoRA version
    is rebuilt on the base model it was trained on (its recorded path or name,
    checked against its recorded hash), not on today's `params.model.base`;
    `base_model` only stands in for a version that records no base. A mismatch
    or a missing base raises, so the follower keeps the old model serving.
    """
    from tuneloop.tasks import registry

    def load(version: str) -> Classifier:
        model_dir, base = registry.verified_version(model_name, version, cache_dir, base_model)
        classifier = load_classifier(model_dir, base_model=str(base) if base else None, device=device)
        smoke_check(classifier)
        return classifier

    return load


def registry_lookup(model_name: str, alias: str = "champion") -> Callable[[], str | None]:
    """The version behind `alias` (`champion`, or `shadow`) now, or None."""
    from tuneloop.tasks import registry

    def lookup() -> str | None:
        info = registry.alias_version(model_name, alias)
        return info.version if info else None

    return lookup


def iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment else None


@dataclass(frozen=True)
class Served:
    """The model a request is answered by; swapped whole, never mutated."""

    version: str
    classifier: Classifier
    loaded_at: datetime


class ChampionFollower:
    """Holds the serving model and moves it when the `champion` alias moves.

    A version that fails to load or to answer the smoke prediction is never
    switched to; it is remembered and not tried again until the alias moves
    elsewhere and comes back. With `shadow_lookup`, the version behind `shadow`
    is followed the same way on the same checks, into `shadow`; nothing about
    it (a lookup or load that fails) touches the champion.
    """

    def __init__(self, model_name: str, base_model: str, lookup: Callable[[], str | None],
                 load: Callable[[str], Classifier], poll_seconds: float = 2.0,
                 shadow_lookup: Callable[[], str | None] | None = None):
        self.model_name, self.base_model = model_name, base_model
        self.poll_seconds = poll_seconds
        self._lookup, self._load, self._shadow_lookup = lookup, load, shadow_lookup
        self.shadow: Served | None = None  # scored beside the champion, off the request path
        self.failed_shadow: str | None = None
        self.served: Served | None = None  # read once per request: one reference, so swaps are atomic
        self._standby: Served | None = None  # the version served before this one, kept for instant rollback
        self.champion: str | None = None  # what the alias said at the last check
        self.failed_version: str | None = None
        self.last_error: str | None = None
        self.last_error_at: datetime | None = None
        self.last_check_at: datetime | None = None
        self._checking = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def check(self) -> bool:
        """Reads the alias once; loads and switches to a new version.

        Returns:
            True when the served version changed.
        """
        with self._checking:
            changed = self._check_champion()
            self._check_shadow()
            return changed

    def _check_champion(self) -> bool:
        self.last_check_at = utcnow()
        try:
            version = self._lookup()
        except Exception as error:  # the registry is down: keep serving what we have
            self._record_error(f"reading the `champion` alias failed: {error}")
            return False
        self.champion = version
        if version != self.failed_version:
            self.failed_version = None  # the alias moved on: that version may be tried again later
        current = self.served.version if self.served else None
        if version is None or version in (current, self.failed_version):
            return False
        return self._switch(version, current)

    def _check_shadow(self) -> None:
        """Follows the `shadow` alias: loaded when it appears or moves, dropped when it goes."""
        if self._shadow_lookup is None:
            return
        try:
            version = self._shadow_lookup()
        except Exception as error:  # keep scoring with what we have
            self._record_error(f"reading the `shadow` alias failed: {error}")
            return
        current = self.shadow.version if self.shadow else None
        if version is None or version != self.failed_shadow:
            self.failed_shadow = None
        if version is None:
            if current is not None:
                log.info("%s: shadow version %s dropped (the alias is gone)", self.model_name, current)
            self.shadow = None
            return
        if version in (current, self.failed_shadow):
            return
        try:
            self.shadow = Served(version, self._load(version), utcnow())
        except Exception as error:
            self.shadow, self.failed_shadow = None, version
            self._record_error(f"shadow version {version} was not loaded: {type(error).__name__}: {error}")
            return
        log.info("%s: shadow version %s scores beside the champion", self.model_name, version)

    def _switch(self, version: str, current: str | None) -> bool:
        standby = self._standby
        try:  # the version served just before stays loaded: rolling back to it is a swap, not a load
            classifier = standby.classifier if standby and standby.version == version else self._load(version)
        except Exception as error:
            kept = f"version {current} keeps serving" if current else "nothing is served"
            self._record_error(f"version {version} was not switched to ({kept}): {type(error).__name__}: {error}")
            self.failed_version = version  # after the error: /health never shows one without the other
            return False
        self._standby, self.served = self.served, Served(version, classifier, utcnow())
        log.info("%s: now serving version %s%s", self.model_name, version, f" (was {current})" if current else "")
        return True

    def _record_error(self, message: str) -> None:
        if message != self.last_error:
            log.error("%s", message)
        self.last_error, self.last_error_at = message, utcnow()

    def start(self) -> None:
        """Polls the alias every `poll_seconds` on a daemon thread until stop()."""
        self._stop.clear()
        self._thread = threading.Thread(target=self._follow, name="champion-follower", daemon=True)
        self._thread.start()

    def _follow(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            self.check()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def status(self) -> dict:
        served = self.served
        shadow = self.shadow
        return {"model": self.model_name, "version": served.version if served else None,
                "shadow": shadow.version if shadow else None,
                "loaded_at": iso(served.loaded_at if served else None), "champion": self.champion,
                "last_check_at": iso(self.last_check_at), "failed_version": self.failed_version,
                "last_error": self.last_error, "last_error_at": iso(self.last_error_at),
                "poll_seconds": self.poll_seconds}


# --- the HTTP API ---------------------------------------------------------------------------

REQUEST_ID = r"^[A-Za-z0-9_-]{1,64}$"  # what /predict issues (32 hex); anything else is refused unechoed
# A text must hold one character that is not blank, blank being exactly what str.isspace() says;
# spelled out so the spec's pattern (ECMA regex) and the check here agree on every character.
BLANKS = r"\u0009-\u000d\u001c-\u0020\u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
NOT_BLANK = f"[^{BLANKS}]"
MAX_LABEL_CHARS = 128  # the store's label column


def encodable(value: str) -> str:
    problem = text_problem(value)
    if problem:
        raise ValueError(f"the text {problem}")
    return value


Text = Annotated[str, AfterValidator(encodable)]
Label = Annotated[str, Field(min_length=1, max_length=MAX_LABEL_CHARS), AfterValidator(encodable)]


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: Text | None = None
    texts: list[Text] | None = None


class ItemPrediction(BaseModel):
    request_id: str
    item: int  # position in the request's batch
    label: str
    confidence: float  # calibrated probability of `label`
    probabilities: dict[str, float]
    abstained: bool  # "none of these": the model is too unsure, or its out-of-scope label won
    model_version: str


class PredictResponse(BaseModel):
    request_id: str  # what POST /feedback refers to
    model_version: str
    predictions: list[ItemPrediction]


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    request_id: Annotated[str, Field(pattern=REQUEST_ID)]
    label: Label | None = None
    labels: list[Label] | None = None
    # replaces labels already given; without it a different label is a 409. Strict: "yes" or 1 is no answer
    correction: Annotated[bool, Field(strict=True)] = False


class FeedbackResponse(BaseModel):
    request_id: str
    updated: int  # predictions whose label changed (0: the same labels were already there)


class Error(BaseModel):
    """Every error: one sentence naming the problem (and the limit), never the input."""

    detail: str


class Health(BaseModel):
    status: str  # "ok" | "no champion"
    model: str
    version: str | None
    shadow: str | None  # the version scoring beside the champion, off the request path
    shadow_failed: int  # requests the shadow raised on since the service started (logged, never answered)
    shadow_skipped: int  # requests not shadowed: serve.max_queued_texts texts were waiting for it
    loaded_at: str | None
    champion: str | None
    last_check_at: str | None
    failed_version: str | None
    last_error: str | None
    last_error_at: str | None
    poll_seconds: float


class VersionResponse(BaseModel):
    model: str
    version: str
    loaded_at: str | None
    base_model: str
    labels: list[str]
    precision: str = "fp32"  # fp32 | bf16: bf16 where the version allows it and the machine multiplies bf16


def request_texts(body: PredictRequest, config: ServeConfig) -> list[str]:
    """The texts of a predict request, within the limits.

    Raises:
        HTTPException: 422 for a missing, doubled or empty input; 413 naming the limit exceeded.
    """
    if (body.text is None) == (body.texts is None):
        raise HTTPException(422, 'send exactly one of "text" (a string) or "texts" (a list of strings)')
    texts = [body.text] if body.text is not None else body.texts
    if not texts:
        raise HTTPException(422, '"texts" is empty: send at least one text')
    if len(texts) > config.max_batch:
        raise HTTPException(413, f"{len(texts)} texts in one request; the limit is serve.max_batch = "
                                 f"{config.max_batch}")
    for index, text in enumerate(texts):
        if not re.search(NOT_BLANK, text):
            raise HTTPException(422, f"text {index} is empty")
        if len(text) > config.max_text_chars:
            raise HTTPException(413, f"text {index} has {len(text)} characters; the limit is "
                                     f"serve.max_text_chars = {config.max_text_chars}")
    return texts


def feedback_labels(body: FeedbackRequest, logged: pd.DataFrame) -> list[str]:
    """The true labels of a feedback request, checked against the logged predictions.

    Raises:
        HTTPException: 404 for an unknown request id; 422 for a wrong count or an unknown label.
    """
    if (body.label is None) == (body.labels is None):
        raise HTTPException(422, 'send exactly one of "label" (a string) or "labels" (one per text)')
    labels: list[str] = [body.label] if body.label is not None else cast(list[str], body.labels)  # one is set
    if logged.empty:
        raise HTTPException(404, f"no predictions with request_id {body.request_id!r}")
    if len(labels) != len(logged):
        raise HTTPException(422, f"request {body.request_id} has {len(logged)} predictions; got {len(labels)} labels")
    known = list(json.loads(logged["probabilities"].iloc[0]))  # the labels of the model that answered
    unknown = sorted(set(labels) - set(known))
    if unknown:
        raise HTTPException(422, f"unknown label(s) {unknown}; the model's labels are {known}")
    return labels


def scored_together(batch: list[tuple[Served, str]], batch_size: int) -> list[Scored]:
    """The scorer's work: the texts of many requests, each request's with the version it
    was taken under (a swap mid-batch splits the batch, it never mixes versions)."""
    results: list[Scored | None] = [None] * len(batch)
    by_version: dict[int, list[int]] = {}
    for index, (served, _) in enumerate(batch):
        by_version.setdefault(id(served), []).append(index)
    for indices in by_version.values():
        served = batch[indices[0]][0]
        for index, scored in zip(indices, score_texts(served.classifier, [batch[i][1] for i in indices], batch_size)):
            results[index] = scored
    return cast(list[Scored], results)  # every index is in one version's group: none is left None


def response_of(served: Served, scored: list[Scored]) -> PredictResponse:
    request_id = uuid.uuid4().hex
    items = [ItemPrediction(request_id=request_id, item=index, label=s.label, confidence=s.confidence,
                            model_version=served.version, probabilities=s.probabilities, abstained=s.abstained)
             for index, s in enumerate(scored)]
    return PredictResponse(request_id=request_id, model_version=served.version, predictions=items)


def written_together(store: PredictionStore, mask: bool, after: Callable[[], None] = lambda: None):
    """The store writer's work: the rows of many requests in one transaction (a group
    commit); masked of e-mails, phones and cards here, off the request path, when
    `mask`; then `after` (the retention purge, at most hourly)."""
    def write(rows: list[Prediction]) -> list[int]:
        if mask:
            rows = [replace(row, text=mask_pii(row.text)) for row in rows]
        store.log(rows)
        after()
        return [1] * len(rows)

    return write


def as_logged(response: PredictResponse, texts: list[str]) -> list[Prediction]:
    """The rows the store keeps (the writer masks them)."""
    return [Prediction(p.request_id, p.item, text, p.label, p.confidence,
                       p.probabilities, p.model_version, abstained=p.abstained)
            for p, text in zip(response.predictions, texts)]


class ShadowScorer:
    """Scores a request's texts with the shadow version on a thread of its own, after the
    champion has answered, and logs its answers under the request's id. The request never
    waits for it: a failure is logged and forgotten, and beyond `max_queued_texts` waiting
    texts a request is not shadowed at all (the champion's traffic is never slowed to catch up)."""

    def __init__(self, store: PredictionStore, batch_size: int, max_queued_texts: int):
        from concurrent.futures import ThreadPoolExecutor

        self.store, self.batch_size, self.max_queued_texts = store, batch_size, max_queued_texts
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shadow")
        self._lock = threading.Lock()
        self.queued = 0  # texts submitted and not yet done
        self.skipped = 0  # requests not shadowed: the queue was full
        self.failed = 0  # requests whose shadow scoring or logging raised

    def submit(self, shadow: Served, request_id: str, texts: list[str]) -> bool:
        """Queues the request for the shadow; False when the queue is full (nothing queued)."""
        with self._lock:
            if self.queued + len(texts) > self.max_queued_texts:
                self.skipped += 1
                return False
            self.queued += len(texts)
        self._pool.submit(self._score, shadow, request_id, texts)
        return True

    def _score(self, shadow: Served, request_id: str, texts: list[str]) -> None:
        try:
            scored = score_texts(shadow.classifier, texts, self.batch_size)
            self.store.log_shadow(Prediction(request_id, index, "", s.label, s.confidence, s.probabilities,
                                             shadow.version, abstained=s.abstained)
                                  for index, s in enumerate(scored))
        except Exception:
            self.failed += 1
            log.exception("shadow version %s failed on request %s (the champion's answer stands)",
                          shadow.version, request_id)
        finally:
            with self._lock:
                self.queued -= len(texts)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def describe_invalid(error: RequestValidationError) -> str:
    """Pydantic's errors as one sentence of locations and messages; the input is never included."""
    parts = []
    for item in error.errors()[:5]:
        if item.get("type") == "json_invalid":
            return f"invalid request: the body is not JSON (from character {item['loc'][-1]})"
        where = ".".join(str(p) for p in item.get("loc", ()) if p != "body") or "body"
        parts.append(f"{where}: {item.get('msg', 'invalid')}")
    return "invalid request: " + "; ".join(parts)


def errors(*statuses: int) -> dict:
    """The OpenAPI entries of the error statuses a route answers with."""
    return {status: {"model": Error} for status in statuses}


def tightened_contract(schema: dict, config: ServeConfig) -> dict:
    """The request bodies as the service enforces them: exactly one of text/texts
    (label/labels), non-blank texts within serve.max_text_chars, at most serve.max_batch."""
    text = {"type": "string", "minLength": 1, "maxLength": config.max_text_chars, "pattern": NOT_BLANK}
    label = {"type": "string", "minLength": 1, "maxLength": MAX_LABEL_CHARS}
    request_id = {"type": "string", "pattern": REQUEST_ID}
    schemas = schema["components"]["schemas"]
    schemas["PredictRequest"] = {"title": "PredictRequest", "oneOf": [
        {"type": "object", "properties": {"text": text}, "required": ["text"], "additionalProperties": False},
        {"type": "object", "properties": {"texts": {"type": "array", "items": text, "minItems": 1,
                                                    "maxItems": config.max_batch}},
         "required": ["texts"], "additionalProperties": False}]}
    correction = {"type": "boolean", "default": False}
    schemas["FeedbackRequest"] = {"title": "FeedbackRequest", "oneOf": [
        {"type": "object", "properties": {"request_id": request_id, "label": label, "correction": correction},
         "required": ["request_id", "label"], "additionalProperties": False},
        {"type": "object", "properties": {"request_id": request_id, "correction": correction,
                                          "labels": {"type": "array", "items": label, "minItems": 1}},
         "required": ["request_id", "labels"], "additionalProperties": False}]}
    return schema


def scope_guard(tokens: tuple[Token, ...], scope: str):
    """The dependency a route uses to require `scope`; returns the caller's name."""
    bearer = HTTPBearer(auto_error=False, scheme_name="bearer",
                        description="a token with the `predict` or `feedback` scope (tuneloop/service/auth.py)")

    def caller(request: Request) -> str:
        access = authorize(tokens, request.headers.get("authorization"), scope)
        if not access.allowed:
            headers = {"WWW-Authenticate": "Bearer"} if access.status == 401 else None
            raise HTTPException(access.status, access.reason, headers=headers)
        return cast(str, access.name)  # an allowed access names its token

    if not tokens:
        return caller  # nothing to send: the spec asks for no credentials

    def caller_with_credentials(request: Request, _credentials=Depends(bearer)) -> str:
        return caller(request)

    return caller_with_credentials


def retention_purger(store: PredictionStore, config: ServeConfig, every: timedelta = timedelta(hours=1)):
    """A call that deletes predictions older than serve.retention_days, at most once per `every`."""
    last: list[datetime] = []

    def purge() -> None:
        now = utcnow()
        if config.retention_days is None or (last and now - last[0] < every):
            return
        last[:] = [now]
        deleted = store.purge(now - timedelta(days=config.retention_days))
        if deleted:
            log.info("deleted %d predictions older than %s days (serve.retention_days)", deleted,
                     config.retention_days)

    return purge


SCOPES = {"/predict": "predict", "/feedback": "feedback"}  # the scope each data route needs


def create_app(follower: ChampionFollower, store: PredictionStore, config: ServeConfig,
               tokens: tuple[Token, ...] = (), limits: SlowClientLimits = SlowClientLimits()) -> FastAPI:
    """The service: loads the champion at startup, follows the alias while it runs.

    With `tokens`, /predict and /feedback need a bearer token of their scope,
    checked before any body is read; /health and /version stay open (probes, no
    data). Bodies are bounded in size, time and number (`limits`)."""
    purge = retention_purger(store, config)
    # Concurrent requests are scored together by `scoring_workers` workers (each on its
    # share of the cores: share_cores) and their predictions written in one transaction.
    scorer: MicroBatcher[tuple[Served, str], Scored] = MicroBatcher(
        lambda batch: scored_together(batch, config.batch_size), "scoring",
        max_items=config.batch_size, window_s=config.batch_window_ms / 1000, max_queued=config.max_queued_texts,
        workers=config.scoring_workers)
    writer = MicroBatcher(written_together(store, config.mask_pii, purge), "prediction store", max_items=4096,
                          window_s=0.0, max_queued=max(4096, 2 * config.max_queued_texts))
    shadow_scorer = ShadowScorer(store, config.batch_size, config.max_queued_texts)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        import anyio

        await anyio.to_thread.run_sync(follower.check)  # ready means loaded, when there is a champion
        await anyio.to_thread.run_sync(purge)
        follower.start()
        yield
        follower.stop()
        scorer.close()
        writer.close()
        shadow_scorer.close()

    app = FastAPI(title="tuneloop", summary="The champion text classifier.", lifespan=lifespan)
    app.add_middleware(BodyLimit, max_bytes=config.max_body_bytes, limits=limits)
    if tokens:  # added last, so it runs first: no body is read for a caller without a token
        app.add_middleware(TokenGate, tokens=tokens, scopes=SCOPES)
    auth = (401, 403) if tokens else ()
    may_predict, may_label = scope_guard(tokens, "predict"), scope_guard(tokens, "feedback")

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": describe_invalid(error)}, status_code=422)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception) -> JSONResponse:
        log.exception("unexpected error answering %s", request.url.path)
        return JSONResponse({"detail": f"internal error ({type(error).__name__}); see the service log"},
                            status_code=500)

    def served_or_503() -> Served:
        served = follower.served
        if served is None:
            raise HTTPException(503, f"no champion of {follower.model_name} is loaded: {follower.last_error or 'none'}")
        return served

    @app.post("/predict", response_model=PredictResponse, responses=errors(400, *auth, 413, 422, 503))
    async def predict(body: PredictRequest, caller: str = Depends(may_predict)) -> PredictResponse:
        texts = request_texts(body, config)
        served = served_or_503()
        try:
            scored = await asyncio.wrap_future(scorer.submit([(served, text) for text in texts]))
        except QueueFull as full:
            raise HTTPException(503, str(full), headers={"Retry-After": str(full.retry_after_s)}) from None
        response = response_of(served, scored)
        try:  # a prediction is served only once it is logged: monitoring sees every one
            await asyncio.wrap_future(writer.submit(as_logged(response, texts)))
        except Exception as error:
            log.exception("logging request %s failed", response.request_id)
            retry = {"Retry-After": str(error.retry_after_s)} if isinstance(error, QueueFull) else None
            raise HTTPException(503, f"the prediction store is unavailable: {type(error).__name__}",
                                headers=retry) from None
        shadow = follower.shadow
        if shadow is not None and shadow.version != served.version:  # after the answer is ready; never awaited
            shadow_scorer.submit(shadow, response.request_id, texts)
        return response

    @app.post("/feedback", response_model=FeedbackResponse, responses=errors(400, *auth, 404, 409, 413, 422))
    def feedback(body: FeedbackRequest, caller: str = Depends(may_label)) -> FeedbackResponse:
        labels = feedback_labels(body, store.request(body.request_id))
        try:
            updated = store.attach_feedback(body.request_id, labels, by=caller, correction=body.correction)
        except FeedbackConflict as conflict:
            raise HTTPException(409, str(conflict)) from None
        return FeedbackResponse(request_id=body.request_id, updated=updated)

    @app.get("/health", response_model=Health, responses={503: {"model": Health}})
    def health() -> JSONResponse:
        status = {**follower.status(), "shadow_failed": shadow_scorer.failed, "shadow_skipped": shadow_scorer.skipped}
        ok = status["version"] is not None
        return JSONResponse({"status": "ok" if ok else "no champion", **status}, status_code=200 if ok else 503)

    @app.get("/version", response_model=VersionResponse, responses=errors(503))
    def version() -> VersionResponse:
        served = served_or_503()
        return VersionResponse(model=follower.model_name, version=served.version, loaded_at=iso(served.loaded_at),
                               base_model=follower.base_model, labels=list(served.classifier.labels),
                               precision=served.classifier.precision)

    def openapi() -> dict:
        if app.openapi_schema is None:
            app.openapi_schema = tightened_contract(
                get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes), config)
        return app.openapi_schema

    app.openapi = openapi
    return app


def build_app(config: ServeConfig, model_name: str, base_model: str, root: Path,
              tokens: tuple[Token, ...] = ()) -> FastAPI:
    """The service wired to the registry (tracking already configured) and the store."""
    from tuneloop.values.workspace import Workspace

    cache = Workspace(Path(root)).models_cache
    follower = ChampionFollower(model_name, base_model, registry_lookup(model_name),
                                registry_loader(model_name, cache, base_model, config.device), config.poll_seconds,
                                shadow_lookup=registry_lookup(model_name, "shadow"))
    return create_app(follower, PredictionStore(store_url(config, root)), config, tokens)


def share_cores(workers: int, device: str) -> int:
    """On a CPU the scoring workers split the process's threads (at least one each):
    on 2 cores two one-thread forward passes of 4 texts side by side score 1.4x
    the texts of one two-thread pass of 8 (benchmarks/serve_load.py). Returns the
    threads each worker gets."""
    if pick_device(device).type == "cpu":
        torch.set_num_threads(max(1, torch.get_num_threads() // workers))
    return torch.get_num_threads()


class ServeRefused(RuntimeError):
    """The service will not start as configured; nothing was bound."""


def run_service(config: ServeConfig, model_name: str, base_model: str, root: Path) -> None:
    """Serves until interrupted (Ctrl-C or SIGTERM stop it cleanly).

    Raises:
        ServeRefused: the token configuration is broken, or the host is beyond
            loopback with no tokens configured.
    """
    from tuneloop.service.auth import TokenError, bind_refusal, load_tokens

    try:
        tokens = load_tokens(config.tokens_file, root)
    except TokenError as error:
        raise ServeRefused(str(error)) from None
    refusal = bind_refusal(config.host, tokens)
    if refusal:
        raise ServeRefused(refusal)
    log.info("%s", f"tokens: {', '.join(t.name for t in tokens)}" if tokens else
             "no tokens configured: anyone on this machine may predict and label (loopback only)")
    log.info("scoring: %d worker(s), %d thread(s) each", config.scoring_workers,
             share_cores(config.scoring_workers, config.device))
    serve_app(build_app(config, model_name, base_model, root, tokens), config.host, config.port)


def serve_app(app: FastAPI, host: str, port: int, limits: SlowClientLimits = SlowClientLimits()) -> None:
    """Runs `app` on uvicorn until interrupted, each request head bounded by
    `limits.header_seconds` (408 and closed after it; the app bounds the body)."""
    uvicorn.run(app, host=host, port=port, log_level="info", http=header_timeout_protocol(limits.header_seconds))
