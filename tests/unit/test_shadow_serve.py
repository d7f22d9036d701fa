"""The shadow path on the real service: uvicorn on a loopback port in a process of
its own (tests/unit/shadow_process.py), a tiny LoRA model, a SQLite store. The
answer is always the champion's; the shadow's answers are logged under the same
request id with the shadow's version; a shadow that raises, or is slow, changes
nothing about the champion's answers or rows."""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tuneloop.service.store import PredictionStore
from tuneloop.tasks.finetune import FinetuneConfig, finetune

FAST = FinetuneConfig(epochs=1, max_steps=4, learning_rate=1e-2, batch_size=16, lora_r=8, max_length=32)
SERVER = Path(__file__).with_name("shadow_process.py")


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def call(port: int, method: str, path: str, body: dict | None = None) -> tuple[int, dict, float]:
    """(status, JSON body, seconds the answer took)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    started = time.monotonic()
    connection.request(method, path, json.dumps(body) if body is not None else None,
                       {"Content-Type": "application/json"})
    response = connection.getresponse()
    answer = json.loads(response.read())
    connection.close()
    return response.status, answer, time.monotonic() - started


@pytest.fixture(scope="module")
def service(tiny_bert, toy_task, tmp_path_factory):
    folder = tmp_path_factory.mktemp("shadow-service")
    model = finetune("tiny", tiny_bert, toy_task["train"], toy_task["validation"], toy_task["labels"], FAST,
                     folder / "model", folder / "checkpoints", "shadow", progress=False).model_dir
    store_url, port, alias = f"sqlite:///{folder}/predictions.db", free_port(), folder / "shadow-alias"
    alias.write_text("")
    log = folder / "service.log"
    process = subprocess.Popen([sys.executable, str(SERVER), str(model), str(tiny_bert), store_url, str(port),
                                str(alias)], env={**os.environ, "PYTHONPATH": str(SERVER.parent)},
                               stdout=subprocess.DEVNULL, stderr=log.open("w"))
    deadline = time.monotonic() + 180
    while True:
        assert process.poll() is None and time.monotonic() < deadline, "the service did not start"
        try:
            if call(port, "GET", "/health")[0] == 200:
                break
        except OSError:
            time.sleep(0.5)
    try:
        yield {"port": port, "store": PredictionStore(store_url), "alias": alias, "log": log}
    finally:
        process.terminate()
        process.wait(timeout=60)


def set_shadow(service: dict, version: str) -> None:
    """Moves the alias and waits until the service says it scores that version beside the champion."""
    service["alias"].write_text(version)
    deadline = time.monotonic() + 30
    while call(service["port"], "GET", "/health")[1]["shadow"] != (version or None):
        assert time.monotonic() < deadline, f"the service never picked up shadow {version!r}"
        time.sleep(0.2)


def shadow_rows(store: PredictionStore, request_id: str, expected: int, wait_s: float = 30.0):
    deadline = time.monotonic() + wait_s
    while True:
        rows = store.shadow(request_id)
        if len(rows) >= expected or time.monotonic() > deadline:
            return rows
        time.sleep(0.1)


TEXTS = ["the film was great", "the plot was awful really", "the cast was boring"]


def test_the_answer_is_the_champions_and_the_shadows_is_logged_with_the_same_request_id(service) -> None:
    set_shadow(service, "2")
    status, body, _ = call(service["port"], "POST", "/predict", {"texts": TEXTS})
    assert status == 200 and body["model_version"] == "1"
    assert {p["model_version"] for p in body["predictions"]} == {"1"}
    store, request_id = service["store"], body["request_id"]
    champion = store.request(request_id)
    assert champion["model_version"].tolist() == ["1"] * 3 and champion["text"].tolist() == TEXTS
    assert champion["confidence"].tolist() == pytest.approx([p["confidence"] for p in body["predictions"]])
    shadow = shadow_rows(store, request_id, 3)
    assert shadow["request_id"].tolist() == [request_id] * 3 and shadow["item"].tolist() == [0, 1, 2]
    assert shadow["model_version"].tolist() == ["2"] * 3
    assert shadow["label"].tolist() == champion["label"].tolist()  # the same model, a hotter temperature:
    assert all(s < c for s, c in zip(shadow["confidence"], champion["confidence"]))  # its own, softer confidences
    pairs = store.shadow_pairs("2", "1")
    assert pairs["request_id"].tolist() == [request_id] * 3
    assert len(store.window()) == 3  # the champion's rows alone, as monitoring and feedback read them


def test_a_shadow_that_raises_on_every_call_leaves_the_champions_answers_and_rows_intact(service) -> None:
    set_shadow(service, "")
    status, before, _ = call(service["port"], "POST", "/predict", {"texts": TEXTS})
    assert status == 200
    set_shadow(service, "3")
    answers = [call(service["port"], "POST", "/predict", {"texts": TEXTS}) for _ in range(3)]
    store = service["store"]
    for status, body, _ in answers:
        assert status == 200 and body["model_version"] == "1"
        assert [(p["label"], round(p["confidence"], 6)) for p in body["predictions"]] == [
            (p["label"], round(p["confidence"], 6)) for p in before["predictions"]]
        assert store.request(body["request_id"])["label"].tolist() == [p["label"] for p in body["predictions"]]
    deadline = time.monotonic() + 30
    while not all(f"shadow version 3 failed on request {body['request_id']}" in service["log"].read_text()
                  for _, body, _ in answers):  # each request was tried on the shadow, and it raised
        assert time.monotonic() < deadline, service["log"].read_text()[-2000:]
        time.sleep(0.2)
    assert "the shadow version is broken" in service["log"].read_text()
    assert all(store.shadow(body["request_id"]).empty for _, body, _ in answers)
    feedback = call(service["port"], "POST", "/feedback", {"request_id": answers[0][1]["request_id"],
                                                          "labels": ["positive", "negative", "negative"]})
    assert feedback[0] == 200 and feedback[1]["updated"] == 3  # feedback works as without a shadow
    health = call(service["port"], "GET", "/health")
    assert health[0] == 200 and health[1]["version"] == "1" and health[1]["shadow"] == "3"
    assert (health[1]["shadow_failed"], health[1]["shadow_skipped"]) == (3, 0)


def test_the_answer_never_waits_for_a_slow_shadow(service) -> None:
    set_shadow(service, "4")  # 3 seconds per call
    status, body, seconds = call(service["port"], "POST", "/predict", {"text": "the ending was superb"})
    assert status == 200 and body["model_version"] == "1"
    assert seconds < 2.0, f"the answer took {seconds:.1f} s: it waited for the shadow"
    assert service["store"].shadow(body["request_id"]).empty  # not yet: the shadow is still scoring
    rows = shadow_rows(service["store"], body["request_id"], 1)
    assert rows["model_version"].tolist() == ["4"] and rows["label"].tolist() == [body["predictions"][0]["label"]]
