"""The service against its own OpenAPI spec: schemathesis, every check, a fixed
seed and a few hundred generated requests (valid and invalid) sent in-process
over ASGI. Every status code and error body must be the one the spec
documents, valid bodies must be accepted, invalid ones refused, and nothing
may be a 500."""

from __future__ import annotations

import time

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, seed, settings
from schemathesis import GenerationMode
from schemathesis.config import SchemathesisConfig

from tuneloop.model.classifier import load_classifier
from tuneloop.service.auth import Token
from tuneloop.service.serve import ChampionFollower, ServeConfig, create_app
from tuneloop.service.store import PredictionStore
from tuneloop.tasks.finetune import FinetuneConfig, finetune

FAST = FinetuneConfig(epochs=1, max_steps=4, learning_rate=1e-2, batch_size=16, lora_r=8, max_length=32)
LIMITS = ServeConfig(max_text_chars=50, max_batch=4, poll_seconds=60.0, max_body_bytes=100_000)
SECRET = "contract-secret-0123456789"
TOKENS = (Token("contract", frozenset({"predict", "feedback"}), SECRET),)
CONFIG = {
    "generation": {"mode": "all"},  # valid and invalid requests
    # 413 is the documented answer to a text or batch over the limits (the spec's maxLength/maxItems)
    "checks": {"negative_data_rejection": {"expected-statuses": [400, 401, 403, 404, 405, 409, 413, 422]}},
}
EXAMPLES = 75  # per operation and mode: at most 450 requests in all (about 310 sent)


@pytest.fixture(scope="module")
def api_schema(tiny_bert, toy_task, tmp_path_factory):
    out = tmp_path_factory.mktemp("contract")
    result = finetune("tiny", tiny_bert, toy_task["train"], toy_task["validation"], toy_task["labels"], FAST,
                      out / "model", out / "checkpoints", "contract", progress=False)
    classifier = load_classifier(result.model_dir, base_model=str(tiny_bert), device="cpu")
    follower = ChampionFollower("tiny-model", "tiny-base", lambda: "1", lambda version: classifier, 60.0)
    follower.check()  # the lifespan is not run by schemathesis' ASGI client
    app = create_app(follower, PredictionStore(f"sqlite:///{out}/predictions.db"), LIMITS, TOKENS)
    return schemathesis.openapi.from_asgi("/openapi.json", app, config=SchemathesisConfig.from_dict(CONFIG))


def run_operation(operation, mode: GenerationMode) -> int:
    """Sends EXAMPLES generated requests of one operation and mode; returns how many were sent."""
    sent = []

    @seed(2026)
    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
              suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate])
    def check(case) -> None:
        case.call_and_validate(headers={"Authorization": f"Bearer {SECRET}"})
        sent.append(case)

    check()
    return len(sent)


def test_every_answer_matches_the_documented_contract_within_a_minute(api_schema):
    started, sent = time.perf_counter(), {}
    for result in api_schema.get_all_operations():
        operation = result.ok()
        has_input = bool(list(operation.body)) or bool(list(operation.iter_parameters()))
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE) if has_input else (GenerationMode.POSITIVE,):
            sent[f"{operation.label} {mode.value}"] = run_operation(operation, mode)
    seconds = time.perf_counter() - started
    print(f"\nschemathesis: {sum(sent.values())} requests in {seconds:.1f} s: {sent}")
    assert set(sent) == {"POST /predict positive", "POST /predict negative", "POST /feedback positive",
                         "POST /feedback negative", "GET /health positive", "GET /version positive"}
    assert 100 <= sum(sent.values()) <= 500 and seconds < 60
