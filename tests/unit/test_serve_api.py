"""The serving service without a registry: the follower's switching rules (with
stand-in loaders) and the HTTP API (request limits, responses, logging,
feedback) on a tiny LoRA model trained in about a second."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from tuneloop.model.classifier import load_classifier, predict_proba
from tuneloop.pipeline.params import ParamsError, parse_params
from tuneloop.service.serve import ChampionFollower, ServeConfig, create_app, smoke_check, store_url
from tuneloop.service.store import PredictionStore
from tuneloop.tasks.finetune import FinetuneConfig, finetune

# a few steps: these tests need a real LoRA folder and consistent answers, not accuracy
FAST = FinetuneConfig(epochs=1, max_steps=4, learning_rate=1e-2, batch_size=16, lora_r=8, max_length=32)
LIMITS = ServeConfig(max_text_chars=50, max_batch=4, poll_seconds=60.0)  # the test drives check() itself


@pytest.fixture(scope="module")
def tiny_model_dir(tiny_bert, toy_task, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("serve-model")
    result = finetune("tiny", tiny_bert, toy_task["train"], toy_task["validation"], toy_task["labels"], FAST,
                      out / "model", out / "checkpoints", "serve", progress=False)
    return result.model_dir


@pytest.fixture(scope="module")
def classifier(tiny_model_dir, tiny_bert):
    return load_classifier(tiny_model_dir, base_model=str(tiny_bert), device="cpu")


class Registry:
    """Stands in for the alias and the loader; counts loads per version."""

    def __init__(self, champion: str | None, good: dict):
        self.champion, self.good, self.loads = champion, good, []
        self.down = False

    def lookup(self) -> str | None:
        if self.down:
            raise ConnectionError("registry unreachable")
        return self.champion

    def load(self, version: str):
        self.loads.append(version)
        if version not in self.good:
            raise ValueError(f"corrupt weights in version {version}")
        return self.good[version]


def follower_for(registry: Registry, poll_seconds: float = 60.0) -> ChampionFollower:
    return ChampionFollower("tiny-model", "tiny-base", registry.lookup, registry.load, poll_seconds)


# --- the follower's switching rules ------------------------------------------------------------


def test_follower_loads_the_champion_then_switches_only_when_the_alias_moves() -> None:
    registry = Registry("1", {"1": "model one", "2": "model two"})
    follower = follower_for(registry)
    assert follower.check() is True
    assert (follower.served.version, follower.served.classifier) == ("1", "model one")
    assert follower.check() is False  # the alias did not move: nothing is reloaded
    registry.champion = "2"
    assert follower.check() is True
    assert (follower.served.version, follower.served.classifier) == ("2", "model two")
    registry.champion = "1"  # a rollback
    assert follower.check() is True
    assert (follower.served.version, follower.served.classifier) == ("1", "model one")
    assert registry.loads == ["1", "2"]  # the version served before stayed loaded: rolling back is a swap
    registry.champion = "2"  # and forward again
    assert follower.check() is True
    assert registry.loads == ["1", "2"]
    assert follower.last_error is None


def test_version_that_fails_to_load_never_serves_and_is_not_retried_until_the_alias_moves_again() -> None:
    registry = Registry("1", {"1": "model one", "4": "model four"})
    follower = follower_for(registry)
    follower.check()
    registry.champion = "3"  # broken
    for _ in range(3):
        assert follower.check() is False
    assert follower.served.version == "1"  # the old version keeps serving
    assert registry.loads == ["1", "3"]  # tried once, not on every poll
    status = follower.status()
    assert (status["version"], status["champion"], status["failed_version"]) == ("1", "3", "3")
    assert "version 3 was not switched to (version 1 keeps serving)" in status["last_error"]
    assert "corrupt weights in version 3" in status["last_error"]
    registry.champion = "1"  # rolled back to what serves: the failure is forgotten
    follower.check()
    assert follower.failed_version is None
    registry.champion = "3"  # moved to it again: tried again
    follower.check()
    assert registry.loads == ["1", "3", "3"]
    registry.champion = "4"
    assert follower.check() is True
    assert follower.served.version == "4"


def test_follower_keeps_serving_when_the_registry_is_unreachable_or_the_alias_is_removed() -> None:
    registry = Registry("1", {"1": "model one"})
    follower = follower_for(registry)
    follower.check()
    registry.down = True
    assert follower.check() is False
    assert follower.served.version == "1"
    assert "registry unreachable" in follower.last_error
    registry.down, registry.champion = False, None
    assert follower.check() is False
    assert follower.served.version == "1"


def test_follower_without_a_loadable_champion_serves_nothing_and_says_why() -> None:
    registry = Registry("7", {})
    follower = follower_for(registry)
    assert follower.check() is False
    assert follower.served is None
    assert "version 7 was not switched to (nothing is served)" in follower.last_error


def test_follower_thread_follows_the_alias_within_a_few_polls() -> None:
    registry = Registry("1", {"1": "model one", "2": "model two"})
    follower = follower_for(registry, poll_seconds=0.05)
    follower.check()
    follower.start()
    try:
        registry.champion = "2"
        deadline = time.monotonic() + 5
        while follower.served.version != "2" and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        follower.stop()
    assert follower.served.version == "2"
    assert not follower._thread.is_alive()


def test_smoke_check_passes_a_working_model_and_refuses_one_that_answers_nan(tiny_model_dir, tiny_bert) -> None:
    model = load_classifier(tiny_model_dir, base_model=str(tiny_bert), device="cpu")
    smoke_check(model)
    with torch.no_grad():
        model.model.head.weight.fill_(float("nan"))
    with pytest.raises(ValueError, match="smoke prediction gave probabilities"):
        smoke_check(model)


# --- configuration -------------------------------------------------------------------------------


def test_serve_params_are_validated_and_named() -> None:
    assert parse_params({"serve": {"port": 9000, "poll_seconds": 0.5}}).serve == ServeConfig(port=9000,
                                                                                             poll_seconds=0.5)
    assert parse_params({}).serve.host == "127.0.0.1"  # loopback unless told otherwise
    for bad, name in [({"poll_seconds": 0}, "serve.poll_seconds"), ({"max_batch": -1}, "serve.max_batch"),
                      ({"port": 70000}, "serve.port"), ({"workers": 4}, "serve.workers")]:
        with pytest.raises(ParamsError, match=name):
            parse_params({"serve": bad})


def test_store_url_prefers_the_environment_then_params_then_sqlite_in_state(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("TUNELOOP_STORE_URL", raising=False)
    assert store_url(ServeConfig(), tmp_path) == f"sqlite:///{tmp_path.resolve()}/state/predictions.db"
    assert (tmp_path / "state").is_dir()
    assert store_url(ServeConfig(store_url="postgresql://db/tl"), tmp_path) == "postgresql://db/tl"
    monkeypatch.setenv("TUNELOOP_STORE_URL", "postgresql://other/tl")
    assert store_url(ServeConfig(store_url="postgresql://db/tl"), tmp_path) == "postgresql://other/tl"


# --- the HTTP API -------------------------------------------------------------------------------


@pytest.fixture
def store(tmp_path) -> PredictionStore:
    return PredictionStore(f"sqlite:///{tmp_path}/predictions.db")


@pytest.fixture
def client(classifier, store):
    follower = follower_for(Registry("1", {"1": classifier}))
    with TestClient(create_app(follower, store, LIMITS)) as test_client:  # startup loads version 1
        yield test_client


def test_single_text_is_answered_with_label_probabilities_and_version_and_logged(client, store, classifier):
    response = client.post("/predict", json={"text": "the film was great"})
    assert response.status_code == 200
    body = response.json()
    (item,) = body["predictions"]
    expected = predict_proba(classifier, ["the film was great"])[0]
    assert item["probabilities"] == pytest.approx(dict(zip(classifier.labels, expected.tolist())), abs=1e-6)
    assert item["label"] == classifier.labels[int(expected.argmax())]
    assert item["confidence"] == pytest.approx(float(expected.max()), abs=1e-6)
    assert item["model_version"] == body["model_version"] == "1"
    assert item["request_id"] == body["request_id"] and len(body["request_id"]) == 32
    (row,) = store.window().to_dict("records")
    assert (row["request_id"], row["item"], row["text"], row["label"], row["model_version"]) == (
        body["request_id"], 0, "the film was great", item["label"], "1")
    assert row["confidence"] == pytest.approx(item["confidence"])
    assert json.loads(row["probabilities"]) == pytest.approx(item["probabilities"])
    assert row["true_label"] is None


def test_batch_is_answered_in_order_and_every_item_is_logged(client, store, classifier):
    texts = ["the plot was awful", "the cast was superb", "this movie was boring really", "the ending was good"]
    body = client.post("/predict", json={"texts": texts}).json()
    expected = predict_proba(classifier, texts)
    assert [p["item"] for p in body["predictions"]] == [0, 1, 2, 3]
    assert [p["label"] for p in body["predictions"]] == [classifier.labels[i] for i in expected.argmax(1)]
    assert all(sum(p["probabilities"].values()) == pytest.approx(1.0, abs=1e-5) for p in body["predictions"])
    logged = store.request(body["request_id"])
    assert logged["text"].tolist() == texts
    assert logged["label"].tolist() == [p["label"] for p in body["predictions"]]
    assert set(logged["model_version"]) == {"1"}


def test_requests_exactly_at_the_limits_are_accepted(client):
    assert client.post("/predict", json={"text": "x" * LIMITS.max_text_chars}).status_code == 200
    assert client.post("/predict", json={"texts": ["good"] * LIMITS.max_batch}).status_code == 200


@pytest.mark.parametrize("payload, status, message", [
    ({"text": "x" * 51}, 413, "text 0 has 51 characters; the limit is serve.max_text_chars = 50"),
    ({"texts": ["fine", "y" * 60]}, 413, "text 1 has 60 characters; the limit is serve.max_text_chars = 50"),
    ({"texts": ["good"] * 5}, 413, "5 texts in one request; the limit is serve.max_batch = 4"),
    ({"texts": []}, 422, '"texts" is empty'),
    ({"text": "   "}, 422, "text 0 is empty"),
    ({}, 422, 'send exactly one of "text"'),
    ({"text": "a", "texts": ["b"]}, 422, 'send exactly one of "text"'),
])
def test_requests_over_the_limits_or_malformed_get_a_4xx_naming_the_problem(client, store, payload, status, message):
    response = client.post("/predict", json=payload)
    assert response.status_code == status
    assert message in response.json()["detail"]
    assert store.count() == 0  # nothing answered, nothing logged


def test_unknown_fields_and_wrong_types_are_refused(client):
    assert client.post("/predict", json={"text": "good", "model": "2"}).status_code == 422
    assert client.post("/predict", json={"texts": "not a list"}).status_code == 422


def test_feedback_attaches_true_labels_to_a_logged_request(client, store):
    single = client.post("/predict", json={"text": "the film was bad"}).json()["request_id"]
    batch = client.post("/predict", json={"texts": ["the film was bad", "the cast was great"]}).json()["request_id"]
    assert client.post("/feedback", json={"request_id": single, "label": "negative"}).json() == {
        "request_id": single, "updated": 1}
    response = client.post("/feedback", json={"request_id": batch, "labels": ["negative", "positive"]})
    assert response.json()["updated"] == 2
    assert store.request(single)["true_label"].tolist() == ["negative"]
    assert store.request(batch)["true_label"].tolist() == ["negative", "positive"]
    assert store.request(batch)["feedback_ts"].notna().all()


@pytest.mark.parametrize("payload, status, message", [
    ({"request_id": "nope", "label": "positive"}, 404, "no predictions with request_id 'nope'"),
    ({"label": "meh"}, 422, "unknown label(s) ['meh']; the model's labels are ['negative', 'positive']"),
    ({"labels": ["positive", "negative"]}, 422, "has 1 predictions; got 2 labels"),
    ({"label": "positive", "labels": ["positive"]}, 422, 'send exactly one of "label"'),
])
def test_feedback_for_an_unknown_request_or_label_is_refused(client, store, payload, status, message):
    request_id = client.post("/predict", json={"text": "the film was bad"}).json()["request_id"]
    response = client.post("/feedback", json={"request_id": request_id, **payload})
    assert response.status_code == status
    assert message in response.json()["detail"]
    assert store.request(request_id)["true_label"].isna().all()


def test_health_and_version_describe_the_served_model(client, classifier):
    health = client.get("/health")
    assert health.status_code == 200
    assert {k: health.json()[k] for k in ("status", "model", "version", "champion", "last_error")} == {
        "status": "ok", "model": "tiny-model", "version": "1", "champion": "1", "last_error": None}
    version = client.get("/version").json()
    assert {k: version[k] for k in ("model", "version", "base_model", "labels", "precision")} == {
        "model": "tiny-model", "version": "1", "base_model": "tiny-base", "labels": classifier.labels,
        "precision": "fp32"}
    assert version["loaded_at"] == health.json()["loaded_at"]


def test_without_a_champion_health_says_so_and_predictions_get_503(store):
    follower = follower_for(Registry(None, {}))
    with TestClient(create_app(follower, store, LIMITS)) as client:
        health = client.get("/health")
        assert (health.status_code, health.json()["status"], health.json()["version"]) == (503, "no champion", None)
        assert client.get("/version").status_code == 503
        response = client.post("/predict", json={"text": "good"})
        assert response.status_code == 503 and "no champion of tiny-model is loaded" in response.json()["detail"]


def test_prediction_that_cannot_be_logged_is_not_served(client, store, monkeypatch):
    def broken(predictions):
        raise ConnectionError("database gone")

    monkeypatch.setattr(store, "log", broken)
    response = client.post("/predict", json={"text": "the film was great"})
    assert response.status_code == 503
    assert "prediction store is unavailable" in response.json()["detail"]


def test_answers_use_one_model_version_even_when_the_alias_moves_mid_traffic(classifier, store):
    registry = Registry("1", {"1": classifier, "2": classifier})  # same weights, another version number
    follower = follower_for(registry)
    with TestClient(create_app(follower, store, LIMITS)) as client:
        first = client.post("/predict", json={"texts": ["good", "bad"]}).json()
        registry.champion = "2"
        follower.check()
        second = client.post("/predict", json={"texts": ["good", "bad"]}).json()
    assert {p["model_version"] for p in first["predictions"]} == {"1"}
    assert {p["model_version"] for p in second["predictions"]} == {"2"}
    assert store.window()["model_version"].tolist() == ["1", "1", "2", "2"]


# --- concurrent load: micro-batching and back-pressure -------------------------------------------


def test_concurrent_requests_are_scored_together_and_every_text_answered_and_logged_once(
        classifier, store, monkeypatch):
    from concurrent.futures import ThreadPoolExecutor

    import tuneloop.service.serve as serve

    calls: list[int] = []
    real = serve.score_texts

    def counted(model, texts, batch_size):
        calls.append(len(texts))
        time.sleep(0.02)  # a forward pass takes time: requests arriving meanwhile join the next batch
        return real(model, texts, batch_size)

    monkeypatch.setattr(serve, "score_texts", counted)
    requests = [[f"text {i}"] if i % 3 else [f"text {i} a", f"text {i} b", f"text {i} c"] for i in range(48)]
    config = ServeConfig(max_text_chars=50, max_batch=4, poll_seconds=60.0, batch_window_ms=5.0)
    with TestClient(create_app(follower_for(Registry("1", {"1": classifier})), store, config)) as client:
        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(lambda texts: client.post("/predict", json={"texts": texts}), requests))

    assert [a.status_code for a in answers] == [200] * len(requests)
    every_text = [t for texts in requests for t in texts]
    expected = dict(zip(every_text, predict_proba(classifier, every_text)))
    for texts, answer in zip(requests, answers):  # each caller got its own texts' answers, in order
        got = answer.json()["predictions"]
        assert [p["item"] for p in got] == list(range(len(texts)))
        for text, item in zip(texts, got):
            assert item["confidence"] == pytest.approx(float(expected[text].max()), abs=1e-5)
    logged = store.window()
    assert len(logged) == len(every_text) == sum(calls)  # every text scored once, logged once
    assert not logged.duplicated(["request_id", "item"]).any()
    assert sorted(logged["text"]) == sorted(every_text)
    assert len(calls) < len(requests) and max(calls) > 3  # batched across requests


def test_a_full_queue_answers_503_with_retry_after_and_logs_nothing_for_it(classifier, store, monkeypatch):
    import threading

    import tuneloop.service.serve as serve

    entered, release = threading.Event(), threading.Event()
    real = serve.score_texts

    def blocked(model, texts, batch_size):
        entered.set()
        release.wait(10)
        return real(model, texts, batch_size)

    monkeypatch.setattr(serve, "score_texts", blocked)
    config = ServeConfig(max_text_chars=50, max_batch=4, poll_seconds=60.0, max_queued_texts=2, scoring_workers=1)
    with TestClient(create_app(follower_for(Registry("1", {"1": classifier})), store, config)) as client:
        results: dict[str, object] = {}
        first = threading.Thread(target=lambda: results.update(a=client.post("/predict", json={"text": "one"})))
        first.start()
        assert entered.wait(10)  # the only scoring worker is busy with the first request
        second = threading.Thread(target=lambda: results.update(
            b=client.post("/predict", json={"texts": ["two", "three"]})))
        second.start()
        time.sleep(0.3)  # the second request's two texts now fill the queue
        refused = client.post("/predict", json={"text": "four"})
        release.set()
        first.join(10), second.join(10)

    assert refused.status_code == 503
    assert "queue is full" in refused.json()["detail"] and int(refused.headers["Retry-After"]) >= 1
    assert results["a"].status_code == results["b"].status_code == 200
    assert sorted(store.window()["text"]) == ["one", "three", "two"]  # the refused text was never logged


@pytest.mark.parametrize("threads, workers, each", [(2, 2, 1), (4, 2, 2), (2, 1, 2), (1, 2, 1), (2, 3, 1)])
def test_scoring_workers_on_a_cpu_share_the_threads_at_least_one_each(threads, workers, each) -> None:
    import torch

    from tuneloop.service.serve import share_cores

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert share_cores(workers, "cpu") == each == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
