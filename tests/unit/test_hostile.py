"""Hostile requests and malformed inputs against the service and the paths taken
from tags and flags: each gets its exact status and message, echoes none of its
input, and leaves the prediction store (predictions, labels, feedback history)
or the file system as it was.

The service runs in-process (TestClient) on a tiny LoRA model, with tokens:
`web` may predict, `labeller` may give feedback, `admin` may do both.
"""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta
from pathlib import Path

import pandas as pd
import pytest
from fastapi.testclient import TestClient

from tuneloop.model.classifier import load_classifier
from tuneloop.service.auth import Token, TokenError, bind_refusal, load_tokens, parse_tokens
from tuneloop.service.limits import BodyLimit
from tuneloop.service.serve import ChampionFollower, ServeConfig, create_app
from tuneloop.service.store import Prediction, PredictionStore, utcnow
from tuneloop.tasks.feedback import export_feedback
from tuneloop.tasks.finetune import FinetuneConfig, finetune
from tuneloop.values.privacy import mask_pii

FAST = FinetuneConfig(epochs=1, max_steps=4, learning_rate=1e-2, batch_size=16, lora_r=8, max_length=32)
LIMITS = ServeConfig(max_text_chars=50, max_batch=4, poll_seconds=60.0, max_body_bytes=1_100_000)
SECRETS = {"web": "web-secret-0123456789", "labeller": "label-secret-0123456789", "admin": "admin-secret-0123456789"}
TOKENS = (Token("web", frozenset({"predict"}), SECRETS["web"]),
          Token("labeller", frozenset({"feedback"}), SECRETS["labeller"]),
          Token("admin", frozenset({"predict", "feedback"}), SECRETS["admin"]))


def bearer(name: str) -> dict:
    return {"Authorization": f"Bearer {SECRETS[name]}"}


@pytest.fixture(scope="module")
def trained(tiny_bert, toy_task, tmp_path_factory) -> Path:
    """The tiny LoRA model's folder, as the finetune stage writes it."""
    out = tmp_path_factory.mktemp("hostile-model")
    return finetune("tiny", tiny_bert, toy_task["train"], toy_task["validation"], toy_task["labels"], FAST,
                    out / "model", out / "checkpoints", "hostile", progress=False).model_dir


@pytest.fixture(scope="module")
def classifier(trained, tiny_bert):
    return load_classifier(trained, base_model=str(tiny_bert), device="cpu")


@pytest.fixture
def store(tmp_path) -> PredictionStore:
    return PredictionStore(f"sqlite:///{tmp_path}/predictions.db")


def app_for(classifier, store, tokens=TOKENS, config=LIMITS):
    follower = ChampionFollower("tiny-model", "tiny-base", lambda: "1", lambda version: classifier, 60.0)
    return create_app(follower, store, config, tokens)


@pytest.fixture
def client(classifier, store):
    with TestClient(app_for(classifier, store)) as test_client:
        yield test_client


@pytest.fixture
def logged(client) -> dict:
    """One single-text and one two-text request, answered and logged; the single one labelled `negative`."""
    single = client.post("/predict", json={"text": "the film was bad"}, headers=bearer("web")).json()["request_id"]
    pair = client.post("/predict", json={"texts": ["the plot was bad", "the cast was great"]},
                       headers=bearer("web")).json()["request_id"]
    assert client.post("/feedback", json={"request_id": single, "label": "negative"},
                       headers=bearer("labeller")).status_code == 200
    return {"single": single, "pair": pair}


def snapshot(store: PredictionStore) -> tuple:
    """Everything the store holds, for before/after comparisons."""
    rows = store.window().drop(columns=["id"]).astype(str).values.tolist()
    return rows, store.feedback_history().drop(columns=["id"]).astype(str).values.tolist()


def assert_refused(response, status: int, detail: str, *unechoed: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert response.json()["detail"] == detail
    for value in unechoed:
        assert value not in response.text


# --- authentication and scopes -------------------------------------------------------------------

NO_BEARER = "send Authorization: Bearer <token>"


@pytest.mark.parametrize("path, body, headers, status, detail", [
    ("/predict", {"text": "good"}, {}, 401, NO_BEARER),
    ("/predict", {"text": "good"}, {"Authorization": "Basic d2ViOnNlY3JldA=="}, 401, NO_BEARER),
    ("/predict", {"text": "good"}, {"Authorization": "Bearer "}, 401, NO_BEARER),
    ("/predict", {"text": "good"}, {"Authorization": "Bearer guessed-secret-0123456789"}, 401,
     "the bearer token is not a known token"),
    ("/predict", {"text": "good"}, {"Authorization": "Bearer " + SECRETS["web"][:-1]}, 401,
     "the bearer token is not a known token"),
    ("/predict", {"text": "good"}, bearer("labeller"), 403, "token 'labeller' has scopes ['feedback'], not 'predict'"),
    ("/feedback", {"request_id": "a" * 32, "label": "positive"}, {}, 401, NO_BEARER),
    ("/feedback", {"request_id": "a" * 32, "label": "positive"}, bearer("web"), 403,
     "token 'web' has scopes ['predict'], not 'feedback'"),
])
def test_requests_without_a_token_of_the_right_scope_are_refused_and_change_nothing(
        client, store, logged, path, body, headers, status, detail):
    before = snapshot(store)
    response = client.post(path, json=body, headers=headers)
    assert_refused(response, status, detail, "secret")
    assert (response.headers.get("www-authenticate") == "Bearer") == (status == 401)
    assert snapshot(store) == before


def test_health_and_version_stay_open_for_probes_while_data_routes_need_tokens(client):
    assert client.get("/health").status_code == 200
    assert client.get("/version").json()["version"] == "1"


def test_without_tokens_loopback_callers_are_anonymous_and_their_feedback_says_so(classifier, store):
    with TestClient(app_for(classifier, store, tokens=())) as anonymous:
        request_id = anonymous.post("/predict", json={"text": "the film was bad"}).json()["request_id"]
        assert anonymous.post("/feedback", json={"request_id": request_id, "label": "negative"}).status_code == 200
    assert store.request(request_id)["feedback_by"].tolist() == ["anonymous"]


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.20", "10.0.0.5", "example.com", "[::]"])
def test_binding_beyond_loopback_without_tokens_is_refused(host):
    assert bind_refusal(host, ()).startswith(f"refusing to serve on {host} without tokens")
    assert bind_refusal(host, TOKENS) is None


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "localhost"])
def test_loopback_binds_without_tokens(host):
    assert bind_refusal(host, ()) is None


def test_serve_command_refuses_0_0_0_0_without_tokens_and_binds_nothing(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from tuneloop.cli import app

    monkeypatch.delenv("TUNELOOP_TOKENS", raising=False)
    monkeypatch.delenv("TUNELOOP_TOKENS_FILE", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "params.yaml").write_text("mlflow: {tracking_uri: 'sqlite:///" + str(tmp_path) + "/m.db'}\n")
    result = CliRunner().invoke(app, ["serve", "--host", "0.0.0.0", "--root", str(tmp_path)])
    assert result.exit_code == 2
    assert "serve refused: refusing to serve on 0.0.0.0 without tokens" in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("text, message", [
    ("web:predict:short", "$TUNELOOP_TOKENS, token 1 (web): the secret must be at least 16"),
    ("web:admin:" + "x" * 20, "$TUNELOOP_TOKENS, token 1 (web): scopes must be some of ['predict', 'feedback']"),
    ("w/b:predict:" + "x" * 20, "$TUNELOOP_TOKENS, token 1: a name is 1-64 letters"),
    ("a:predict:" + "x" * 20 + " b:feedback:" + "x" * 20, "$TUNELOOP_TOKENS, token 2 (b): names and secrets"),
    ("a:predict:" + "x" * 20 + "\na:feedback:" + "y" * 20, "$TUNELOOP_TOKENS, token 2 (a): names and secrets"),
    (":predict:" + "x" * 20, "$TUNELOOP_TOKENS, token 1: a name is 1-64 letters"),
])
def test_malformed_token_configuration_is_refused_without_repeating_the_secret(text, message):
    with pytest.raises(TokenError) as refused:
        parse_tokens(text, "$TUNELOOP_TOKENS")
    assert str(refused.value).startswith(message)
    assert "x" * 16 not in str(refused.value) and "short" not in str(refused.value)


def test_tokens_come_from_the_variable_then_the_file_and_a_missing_file_is_named(tmp_path, monkeypatch):
    monkeypatch.delenv("TUNELOOP_TOKENS", raising=False)
    monkeypatch.delenv("TUNELOOP_TOKENS_FILE", raising=False)
    (tmp_path / "tokens").write_text("# who may do what\nweb:predict:" + "s" * 20 + "\n")
    assert [(t.name, sorted(t.scopes)) for t in load_tokens("tokens", tmp_path)] == [("web", ["predict"])]
    monkeypatch.setenv("TUNELOOP_TOKENS", "app:predict,feedback:" + "v" * 20)
    assert [t.name for t in load_tokens("tokens", tmp_path)] == ["app"]
    monkeypatch.delenv("TUNELOOP_TOKENS")
    with pytest.raises(TokenError, match="token file .*/absent does not exist"):
        load_tokens("absent", tmp_path)
    assert "s" * 20 not in repr(load_tokens("tokens", tmp_path))


# --- bodies: size, encoding, shape ---------------------------------------------------------------


def call_asgi(app, headers: list, chunks: list[bytes]) -> tuple[int, dict, int]:
    """Sends one POST /predict straight to an ASGI app; returns (status, body, chunks the app read)."""
    sent, read = [], [0]

    async def receive():
        if read[0] < len(chunks):
            read[0] += 1
            return {"type": "http.request", "body": chunks[read[0] - 1], "more_body": read[0] < len(chunks)}
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/predict", "headers": headers, "query_string": b"",
             "http_version": "1.1", "scheme": "http", "server": ("127.0.0.1", 80), "client": ("127.0.0.1", 1)}
    asyncio.run(app(scope, receive, send))
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return sent[0]["status"], json.loads(body), read[0]


def never_called(scope, receive, send):
    raise AssertionError("the app behind the limit was reached")


def test_declared_oversized_body_is_refused_before_a_byte_is_read():
    limit = BodyLimit(never_called, max_bytes=1000)
    status, body, read = call_asgi(limit, [(b"content-length", b"50000000")], [b"x" * 10])
    assert (status, body, read) == (413, {"detail": "the request body is over serve.max_body_bytes = 1000 bytes"}, 0)


def test_streamed_body_without_length_is_cut_at_the_first_chunk_past_the_limit():
    limit = BodyLimit(never_called, max_bytes=1000)
    status, body, read = call_asgi(limit, [], [b"x" * 400] * 100)  # 40 KB, chunked
    assert (status, read) == (413, 3)  # 1200 bytes read of 40,000
    assert body["detail"] == "the request body is over serve.max_body_bytes = 1000 bytes"


@pytest.mark.parametrize("length", [b"abc", b"-5", b"1e9"])
def test_malformed_content_length_is_a_400(length):
    status, body, read = call_asgi(BodyLimit(never_called, 1000), [(b"content-length", length)], [b"{}"])
    assert (status, body, read) == (400, {"detail": "the Content-Length header is not one non-negative integer"}, 0)


def test_fifty_megabyte_body_is_refused_with_413_and_nothing_logged(client, store, logged):
    before = snapshot(store)
    response = client.post("/predict", content=b'{"text": "' + b"a" * 50_000_000 + b'"}',
                           headers={**bearer("web"), "content-type": "application/json"})
    assert_refused(response, 413, "the request body is over serve.max_body_bytes = 1100000 bytes")
    assert len(response.content) < 200
    assert snapshot(store) == before


RAW = [  # (body bytes, status, detail)
    (b'{"text": "\xff\xfe bad bytes"}', 422, "the request body is not valid UTF-8 (byte 10)"),
    (b'{"text": "\\ud800"}', 422, "invalid request: text: Value error, the text is not valid Unicode: "
                                  "a lone surrogate at character 0"),
    (b'{"text": "fine \\udfff"}', 422, "invalid request: text: Value error, the text is not valid Unicode: "
                                       "a lone surrogate at character 5"),
    (b'{"texts": ["fine", "\\ud83d"]}', 422, "invalid request: texts.1: Value error, the text is not valid "
                                            "Unicode: a lone surrogate at character 0"),
    (b'{"text": "unterminated', 422, "invalid request: the body is not JSON (from character 9)"),
    (b'not json at all', 422, "invalid request: the body is not JSON (from character 0)"),
    (b'[]', 422, "invalid request: body: Input should be a valid dictionary or object to extract fields from"),
    (b'null', 422, "invalid request: body: Field required"),
    (b'"text"', 422, "invalid request: body: Input should be a valid dictionary or object to extract fields from"),
    (b'{"text": 42}', 422, "invalid request: text: Input should be a valid string"),
    (b'{"texts": {"a": "b"}}', 422, "invalid request: texts: Input should be a valid list"),
    (b'{"texts": ["good", null]}', 422, "invalid request: texts.1: Input should be a valid string"),
    (b'{"text": "good", "model_version": "2"}', 422, "invalid request: model_version: Extra inputs are not "
                                                     "permitted"),
    (b'{"text": "\\u2003\\u00a0\\t"}', 422, "text 0 is empty"),
    (b'{"texts": ["\\u001f\\u0085"]}', 422, "text 0 is empty"),  # blank to str.isspace, not to ECMA \\s
    (b'{"texts": ["good", "good", "good", "good", "good"]}', 413, "5 texts in one request; the limit is "
                                                                   "serve.max_batch = 4"),
    (b'{"text": "' + b"y" * 51 + b'"}', 413, "text 0 has 51 characters; the limit is serve.max_text_chars = 50"),
    (b"[" * 100_000 + b"]" * 100_000, 422, "invalid request: the body nests JSON more than 32 levels deep"),
    (b'{"texts": ' + b"[" * 40 + b'"deep"' + b"]" * 40 + b"}", 422,
     "invalid request: the body nests JSON more than 32 levels deep"),
    (b'{"texts": ["' + b"[{" * 500 + b'"]}', 413, "text 0 has 1000 characters; the limit is serve.max_text_chars = 50"),
]


@pytest.mark.parametrize("raw, status, detail", RAW, ids=range(len(RAW)))
def test_malformed_or_undecodable_predict_bodies_get_a_4xx_naming_the_problem(client, store, logged, raw, status,
                                                                              detail):
    before = snapshot(store)
    response = client.post("/predict", content=raw, headers={**bearer("web"), "content-type": "application/json"})
    assert_refused(response, status, detail)
    assert len(response.content) < 400  # nothing of the input comes back
    assert snapshot(store) == before


def test_wrong_method_and_unknown_path_are_json_errors(client):
    assert_refused(client.get("/predict"), 405, "Method Not Allowed")
    assert client.get("/predict").headers["allow"] == "POST"
    assert_refused(client.post("/admin", json={}), 404, "Not Found")


# --- feedback ----------------------------------------------------------------------------------

ONE_MB_ID = "r" * 1_000_000


@pytest.mark.parametrize("body, status, detail", [
    ({"request_id": ONE_MB_ID, "label": "positive"}, 422, "invalid request: request_id: String should match "
                                                          "pattern '^[A-Za-z0-9_-]{1,64}$'"),
    ({"request_id": "' OR 1=1 --", "label": "positive"}, 422, "invalid request: request_id: String should match "
                                                              "pattern '^[A-Za-z0-9_-]{1,64}$'"),
    ({"request_id": "../../etc/passwd", "label": "positive"}, 422, "invalid request: request_id: String should "
                                                                   "match pattern '^[A-Za-z0-9_-]{1,64}$'"),
    ({"request_id": "", "label": "positive"}, 422, "invalid request: request_id: String should match pattern "
                                                   "'^[A-Za-z0-9_-]{1,64}$'"),
    ({"request_id": "a" * 32, "label": "L" * 10_000}, 422, "invalid request: label: String should have at most "
                                                           "128 characters"),
    ({"request_id": "a" * 32, "label": ""}, 422, "invalid request: label: String should have at least 1 character"),
    ({"request_id": "a" * 32, "label": "positive", "correction": "maybe"}, 422,
     "invalid request: correction: Input should be a valid boolean"),
    ({"request_id": "a" * 32, "label": "positive", "correction": "yes"}, 422,
     "invalid request: correction: Input should be a valid boolean"),
    ({"request_id": "a" * 32, "label": "positive", "correction": "true"}, 422,
     "invalid request: correction: Input should be a valid boolean"),
    ({"request_id": "a" * 32, "label": "positive", "correction": 1}, 422,
     "invalid request: correction: Input should be a valid boolean"),
    ({"request_id": "a" * 32, "label": "positive", "by": "admin"}, 422, "invalid request: by: Extra inputs are not "
                                                                        "permitted"),
    ({"request_id": "a" * 32, "label": "positive"}, 404, f"no predictions with request_id '{'a' * 32}'"),
])
def test_malformed_feedback_is_refused_without_echoing_it(client, store, logged, body, status, detail):
    before = snapshot(store)
    response = client.post("/feedback", json=body, headers=bearer("labeller"))
    assert_refused(response, status, detail, "r" * 100, "L" * 200)
    assert snapshot(store) == before


@pytest.mark.parametrize("raw, detail", [
    (b'{"request_id": "\\ud800", "label": "positive"}', "invalid request: request_id: Input should be a valid "
                                                        "string, unable to parse raw data as a unicode string"),
    (b'{"request_id": "abc", "label": "pos\\udc80"}', "invalid request: label: Input should be a valid string, "
                                                      "unable to parse raw data as a unicode string"),
])
def test_lone_surrogates_in_feedback_are_422_not_a_database_error(client, store, logged, raw, detail):
    before = snapshot(store)
    response = client.post("/feedback", content=raw,
                           headers={**bearer("labeller"), "content-type": "application/json"})
    assert_refused(response, 422, detail)
    assert snapshot(store) == before


def test_a_different_second_label_is_a_409_and_the_first_label_stays(client, store, logged):
    before = snapshot(store)
    response = client.post("/feedback", json={"request_id": logged["single"], "label": "positive"},
                           headers=bearer("admin"))
    assert_refused(response, 409, f"request {logged['single']} item(s) [0] already have a different label; send "
                                  '"correction": true to replace it (every change is kept)')
    assert snapshot(store) == before
    assert store.request(logged["single"])[["true_label", "feedback_by"]].values.tolist() == [["negative", "labeller"]]


def test_explicit_correction_false_is_still_a_409(client, store, logged):
    before = snapshot(store)
    response = client.post("/feedback", json={"request_id": logged["single"], "label": "positive",
                                              "correction": False}, headers=bearer("labeller"))
    assert response.status_code == 409
    assert snapshot(store) == before


def test_the_same_label_again_changes_nothing_and_adds_no_history(client, store, logged):
    before = snapshot(store)
    response = client.post("/feedback", json={"request_id": logged["single"], "label": "negative"},
                           headers=bearer("admin"))
    assert (response.status_code, response.json()) == (200, {"request_id": logged["single"], "updated": 0})
    assert snapshot(store) == before


def test_a_batch_with_one_clashing_label_changes_none_of_its_items(client, store, logged):
    pair = logged["pair"]
    assert client.post("/feedback", json={"request_id": pair, "labels": ["negative", "positive"]},
                       headers=bearer("labeller")).json()["updated"] == 2
    before = snapshot(store)
    response = client.post("/feedback", json={"request_id": pair, "labels": ["negative", "negative"]},
                           headers=bearer("labeller"))
    assert response.status_code == 409 and "item(s) [1] already have a different label" in response.json()["detail"]
    assert snapshot(store) == before


def test_a_correction_replaces_the_label_and_keeps_who_when_old_and_new(client, store, logged):
    response = client.post("/feedback", json={"request_id": logged["single"], "label": "positive",
                                              "correction": True}, headers=bearer("admin"))
    assert response.json() == {"request_id": logged["single"], "updated": 1}
    assert store.request(logged["single"])[["true_label", "feedback_by"]].values.tolist() == [["positive", "admin"]]
    history = store.feedback_history(logged["single"])
    assert history[["item", "by", "old_label", "new_label", "action"]].values.tolist() == [
        [0, "labeller", None, "negative", "label"], [0, "admin", "negative", "positive", "correction"]]
    assert history["ts"].is_monotonic_increasing


def test_feedback_label_count_and_unknown_labels_are_422_and_change_nothing(client, store, logged):
    before = snapshot(store)
    count = client.post("/feedback", json={"request_id": logged["pair"], "labels": ["negative"]},
                        headers=bearer("labeller"))
    assert_refused(count, 422, f"request {logged['pair']} has 2 predictions; got 1 labels")
    unknown = client.post("/feedback", json={"request_id": logged["pair"], "labels": ["negative", "spam"]},
                          headers=bearer("labeller"))
    assert_refused(unknown, 422, "unknown label(s) ['spam']; the model's labels are ['negative', 'positive']")
    assert snapshot(store) == before


# --- personal data and retention ------------------------------------------------------------------


def test_emails_phones_and_cards_are_masked_in_the_store_but_the_answer_is_unchanged(client, store):
    text = "mail jo@example.com or +44 20 7946 0958, card 4111 1111 1111 1111"
    body = client.post("/predict", json={"text": text[:50]}, headers=bearer("web"))
    assert body.status_code == 200
    assert store.request(body.json()["request_id"])["text"].tolist() == ["mail [email] or [phone], card 4111"]
    assert mask_pii(text) == "mail [email] or [phone], card [card]"


def test_ordinary_numbers_are_not_mistaken_for_personal_data():
    text = "the 1999-2001 seasons, 10/10, score 3-2, 2019 2020 2021, 1234 5678 9012 3456"
    assert mask_pii(text) == text


def test_exported_training_rows_carry_who_labelled_them_and_are_masked(tmp_path, store):
    store.log([Prediction("r1", 0, "call me on 555-123-4567", "positive", 0.9, {"negative": 0.1, "positive": 0.9}, "1"),
               Prediction("r2", 0, "plain", "negative", 0.8, {"negative": 0.8, "positive": 0.2}, "1")])
    store.attach_feedback("r1", ["negative"], by="labeller")
    store.attach_feedback("r2", ["negative"])
    path, rows = export_feedback(store.labelled(), tmp_path / "incoming", utcnow(), mask=True)
    assert rows == 2
    assert pd.read_csv(path).values.tolist() == [["call me on [phone]", "negative", "labeller"],
                                                 ["plain", "negative", "anonymous"]]


def test_retention_deletes_predictions_and_their_history_older_than_the_window(store):
    old, new = utcnow() - timedelta(days=100), utcnow()
    probabilities = {"negative": 0.5, "positive": 0.5}
    store.log([Prediction("old", 0, "a", "negative", 0.5, probabilities, "1", ts=old),
               Prediction("new", 0, "b", "negative", 0.5, probabilities, "1", ts=new)])
    store.attach_feedback("old", ["negative"], by="labeller")
    assert store.purge(utcnow() - timedelta(days=90)) == 1
    assert store.window()["request_id"].tolist() == ["new"]
    assert store.feedback_history().empty


def test_a_store_made_before_feedback_provenance_gains_the_column_and_keeps_its_rows(tmp_path):
    import sqlalchemy as sa

    url = f"sqlite:///{tmp_path}/old.db"
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE predictions (id INTEGER PRIMARY KEY, request_id VARCHAR(64), item INTEGER,"
                             " ts DATETIME, text TEXT, label VARCHAR(128), confidence FLOAT, probabilities TEXT, "
                             "model_version VARCHAR(32), true_label VARCHAR(128), feedback_ts DATETIME)"))
        conn.execute(sa.text("INSERT INTO predictions VALUES (1, 'r', 0, '2026-01-01 00:00:00', 't', 'negative', 0.5,"
                             " '{}', '1', NULL, NULL)"))
    store = PredictionStore(url)
    assert store.attach_feedback("r", ["positive"], by="labeller") == 1
    assert store.request("r")[["text", "true_label", "feedback_by"]].values.tolist() == [["t", "positive", "labeller"]]


# --- paths from tags and flags -------------------------------------------------------------------


@pytest.mark.parametrize("tags, message", [
    ({"data.md5": "../../../x", "data.size": "1", "data.path": "a.csv"}, "data.md5 is not in its format"),
    ({"data.md5": "A" * 32, "data.size": "1", "data.path": "a.csv"}, "data.md5 is not in its format"),
    ({"data.md5": "0" * 31, "data.size": "1", "data.path": "a.csv"}, "data.md5 is not in its format"),
    ({"data.md5": "0" * 32, "data.size": "-1", "data.path": "a.csv"}, "data.size is not in its format"),
    ({"data.md5": "0" * 32, "data.size": "1", "data.path": "../../etc/passwd"}, "data.path is not in its format"),
    ({"data.md5": "0" * 32, "data.size": "1", "data.path": "data/.."}, "data.path is not in its format"),
    ({"data.md5": "0" * 32, "data.size": "1"}, "data.path is missing"),
])
def test_tags_that_would_escape_the_project_are_refused_before_use(tags, message):
    from tuneloop.tasks import registry

    with pytest.raises(registry.TagError) as refused:
        registry.checked_tags(tags, ("data.md5", "data.size", "data.path"))
    assert message in str(refused.value) and "../" not in str(refused.value)


def test_well_formed_data_tags_pass():
    from tuneloop.tasks import registry

    tags = {"data.md5": "6e3d7759" + "0" * 24, "data.size": "123", "data.path": "data/raw/movie+incoming.csv"}
    assert registry.checked_tags(tags, ("data.md5", "data.size", "data.path")) == tags


@pytest.mark.parametrize("version", ["../1", "0", "1.5", "v1", "", "1; rm -rf /"])
def test_restore_data_refuses_a_version_that_is_not_a_number_and_writes_nothing(tmp_path, version):
    from typer.testing import CliRunner

    from tuneloop.cli import app

    result = CliRunner().invoke(app, ["restore-data", version, "--root", str(tmp_path)])
    assert result.exit_code == 2
    assert "restore-data refused: a version is a positive whole number" in result.output
    assert list(tmp_path.iterdir()) == []


def test_demo_never_deletes_a_folder_it_did_not_create(tmp_path):
    from typer.testing import CliRunner

    from tuneloop.cli import app

    precious = tmp_path / "thesis"
    precious.mkdir()
    (precious / "chapter1.tex").write_text("years of work")
    result = CliRunner().invoke(app, ["demo", "--workspace", str(precious), "--root", str(tmp_path / "project")])
    assert result.exit_code == 2
    assert "was not created by the demo (no .tuneloop-demo file): it is left untouched" in result.output
    assert (precious / "chapter1.tex").read_text() == "years of work"


def test_demo_workspace_overlapping_the_project_is_refused(tmp_path):
    from tuneloop.demo import DemoError, fresh_workspace

    project = tmp_path / "project"
    (project / "src").mkdir(parents=True)
    for workspace in (project, project / "src", tmp_path):
        with pytest.raises(DemoError, match="overlaps the project"):
            fresh_workspace(workspace, project)
    assert (project / "src").is_dir()


def test_demo_recreates_only_its_own_marked_workspace(tmp_path):
    from tuneloop.demo import MARKER, fresh_workspace

    workspace = fresh_workspace(tmp_path / "demo", tmp_path / "project")
    (workspace / "old-registry.db").write_text("stale")
    fresh_workspace(workspace, tmp_path / "project")
    assert sorted(p.name for p in workspace.iterdir()) == [MARKER]


# === round two (issue 21) ========================================================================

# --- the service bounds time: slow clients, on a real socket -------------------------------------

SERVER = Path(__file__).with_name("serve_process.py")
HEAD_SECONDS, BODY_SECONDS = 2.0, 4.0  # the test's deadlines (the defaults are 10 s and 30 s)


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def rss_mib(pid: int) -> float:
    """The process's resident memory (VmRSS), MiB."""
    line = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def open_sockets(pid: int) -> int:
    """Sockets the process holds: its listening socket and every connection it has not closed."""
    import os

    return sum(1 for fd in Path(f"/proc/{pid}/fd").iterdir() if os.readlink(fd).startswith("socket:"))


def answer_of(connection, wait: float) -> tuple[int | None, str | None, float]:
    """(status, detail, seconds until the server closed) of what the server sent back on `connection`."""
    import time

    started, data = time.monotonic(), b""
    connection.settimeout(wait)
    try:
        while chunk := connection.recv(65536):
            data += chunk
    except (TimeoutError, ConnectionResetError):
        pass
    seconds = time.monotonic() - started
    if not data:
        return None, None, seconds
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)["detail"], seconds


def send_raw(port: int, raw: bytes):
    import socket

    connection = socket.create_connection(("127.0.0.1", port))
    connection.sendall(raw)
    return connection


def post_head(length: int, token: str | None = None) -> bytes:
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    return (f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n{auth}"
            f"Content-Length: {length}\r\n\r\n").encode()


@pytest.fixture(scope="module")
def service(trained, tiny_bert, tmp_path_factory):
    """`tuneloop serve`'s app and protocol in a process of its own, on a free loopback port."""
    import http.client
    import os
    import subprocess
    import sys
    import time

    store_url = f"sqlite:///{tmp_path_factory.mktemp('slow-store')}/predictions.db"
    port = free_port()
    tokens = " ".join(f"{name}:{'predict,feedback' if name == 'admin' else 'predict' if name == 'web' else 'feedback'}"
                      f":{secret}" for name, secret in SECRETS.items())
    env = {**os.environ, "TUNELOOP_TOKENS": tokens, "PYTHONPATH": str(SERVER.parent)}
    process = subprocess.Popen([sys.executable, str(SERVER), str(trained), str(tiny_bert), store_url, str(port),
                                str(HEAD_SECONDS), str(BODY_SECONDS)], env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    while True:
        assert process.poll() is None and time.monotonic() < deadline, "the service did not start"
        try:
            probe = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            probe.request("GET", "/health")
            if probe.getresponse().status == 200:
                probe.close()
                break
        except OSError:
            time.sleep(0.5)
    try:
        yield {"port": port, "pid": process.pid, "store": PredictionStore(store_url)}
    finally:
        process.terminate()
        process.wait(timeout=60)


def predict_over_http(port: int, text: str) -> dict:
    import http.client

    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    connection.request("POST", "/predict", json.dumps({"text": text}),
                       {**bearer("web"), "Content-Type": "application/json"})
    response = connection.getresponse()
    assert response.status == 200
    answer = json.loads(response.read())
    connection.close()
    return answer


@pytest.mark.parametrize("sent", [b"", b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Le"])
def test_a_request_head_that_never_completes_gets_408_at_its_deadline_and_is_disconnected(service, sent):
    status, detail, seconds = answer_of(send_raw(service["port"], sent), wait=HEAD_SECONDS + 20)
    assert (status, detail) == (408, f"the request head did not arrive within {HEAD_SECONDS:g} s")
    assert HEAD_SECONDS - 0.5 < seconds < HEAD_SECONDS + 15


def test_a_body_that_stops_short_of_its_declared_length_gets_408_at_its_deadline(service):
    before = snapshot(service["store"])
    connection = send_raw(service["port"], post_head(1000, SECRETS["web"]) + b'{"text": "')
    status, detail, seconds = answer_of(connection, wait=BODY_SECONDS + 20)
    assert (status, detail) == (408, f"the request body did not arrive within {BODY_SECONDS:g} s (10 bytes came)")
    assert BODY_SECONDS - 0.5 < seconds < BODY_SECONDS + 15
    assert snapshot(service["store"]) == before


@pytest.mark.parametrize("token, status, detail", [
    (None, 401, NO_BEARER),
    ("guessed-secret-0123456789", 401, "the bearer token is not a known token"),
    (SECRETS["labeller"], 403, "token 'labeller' has scopes ['feedback'], not 'predict'"),
])
def test_a_caller_without_the_right_token_is_refused_before_its_body_is_read(service, token, status, detail):
    connection = send_raw(service["port"], post_head(1_000_000, token))  # the head alone: no body byte sent
    answered = answer_of(connection, wait=BODY_SECONDS + 20)
    assert answered[:2] == (status, detail)
    assert answered[2] < BODY_SECONDS / 2  # at once: the body's deadline never came into it


def test_two_hundred_slow_bodies_cannot_hold_the_service_and_its_memory_returns_to_baseline(service, record_property):
    """200 connections each send a valid head and 900 KB of a declared 1,000,000-byte body, then stall.
    At most 32 bodies are read at once (the rest get 503 at once, unread); those 32 get 408 at the body
    deadline and every connection is closed; the server's memory comes back to its baseline."""
    import time
    from concurrent.futures import ThreadPoolExecutor

    port, pid, store = service["port"], service["pid"], service["store"]
    predict_over_http(port, "the film was good")  # warm: the model has answered once
    before_rows = snapshot(store)
    time.sleep(1.0)
    baseline = {"rss_mib": rss_mib(pid), "sockets": open_sockets(pid)}
    head, part = post_head(1_000_000, SECRETS["web"]), b'{"text": "' + b"a" * 899_990

    def slow_client(_: int):
        connection = send_raw(port, head)
        try:
            connection.sendall(part)
        except OSError:  # refused and closed while sending: the server read none of it
            pass
        return connection, time.monotonic()

    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=40) as pool:
        connections = list(pool.map(slow_client, range(200)))
    time.sleep(0.5)
    during = {"rss_mib": rss_mib(pid), "sockets": open_sockets(pid)}
    answers = [answer_of(connection, wait=BODY_SECONDS + 30) for connection, _ in connections]
    sending = max(sent for _, sent in connections) - started
    seconds = time.monotonic() - started
    for connection, _ in connections:
        connection.close()
    time.sleep(1.0)
    after = {"rss_mib": rss_mib(pid), "sockets": open_sockets(pid)}
    statuses = {status: sum(1 for a in answers if a[0] == status) for status in {a[0] for a in answers}}
    figures = {"baseline": baseline, "during": during, "after": after, "statuses": statuses,
               "all_answered_within_s": round(seconds, 1), "sending_took_s": round(sending, 1)}
    record_property("slow_clients", json.dumps(figures))
    print("slow clients:", json.dumps(figures))

    assert set(statuses) <= {408, 503} and sum(statuses.values()) == 200
    assert statuses[408] >= 32 and statuses[503] >= 100
    for status, detail, _ in answers:
        assert detail == (f"the request body did not arrive within {BODY_SECONDS:g} s (900000 bytes came)"
                          if status == 408 else "32 requests are sending their bodies, the most the service reads "
                                                "at once; retry shortly")
    assert seconds < BODY_SECONDS * 3 + 30  # every connection was answered and closed
    assert during["sockets"] - baseline["sockets"] <= 33 and after["sockets"] == baseline["sockets"]
    assert after["rss_mib"] - baseline["rss_mib"] < 16
    assert snapshot(store) == before_rows  # no prediction was logged for any of them
    predict_over_http(port, "the film was good")  # and the service still answers


# --- the one-line refusals of the CLI, and nothing written ---------------------------------------


def tuneloop_main(capsys, *args: str) -> tuple[int, str, str]:
    """The real `tuneloop` entry point (main(), which turns expected failures into one line
    and exit 2) in this process: (exit code, stdout, stderr)."""
    import signal
    import sys

    from tuneloop.cli import main

    capsys.readouterr()  # only what this command writes counts
    argv, sigterm = sys.argv, signal.getsignal(signal.SIGTERM)
    sys.argv = ["tuneloop", *args]
    try:
        main()
        code = 0
    except SystemExit as exited:
        code = exited.code or 0
    finally:
        sys.argv = argv
        signal.signal(signal.SIGTERM, sigterm)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def files_under(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


GOOD_CSV = "text,label\n" + "".join(f"film number {i} was {'good' if i % 2 else 'bad'},{'pos' if i % 2 else 'neg'}\n"
                                    for i in range(40))
SHIPPED_PARAMS = (Path(__file__).resolve().parents[2] / "params.yaml").read_text()


@pytest.mark.parametrize("files, args, message", [
    ({"latin.yaml": "finetune:\n  device: caf\xe9\n".encode("latin-1")}, ["status", "--params", "latin.yaml"],
     "{root}/latin.yaml is not UTF-8 (line 2, byte 23): save it as UTF-8"),
    ({"folder.yaml/x": b""}, ["status", "--params", "folder.yaml"],
     "{root}/folder.yaml is a folder, not a params file: pass --params FILE"),
    ({"deep.yaml": b"[" * 20_000 + b"]" * 20_000}, ["status", "--params", "deep.yaml"],
     "{root}/deep.yaml nests its values too deeply to read (thousands of levels)"),
    ({"params.yaml": SHIPPED_PARAMS.encode()}, ["status", "--set", "finetune.batch_size=0"],
     "{root}/params.yaml with --set finetune.batch_size=0 is not valid: finetune.batch_size must be at least 1, "
     "got 0"),
    ({"params.yaml": SHIPPED_PARAMS.encode()}, ["status", "--set", "finetune.device=tpu"],
     "{root}/params.yaml with --set finetune.device=tpu is not valid: finetune.device must be auto, cpu, cuda, "
     "cuda:N or mps, got 'tpu'"),
    ({"params.yaml": SHIPPED_PARAMS.encode()}, ["status", "--set", "finetune.learning_rate=.nan"],
     "{root}/params.yaml with --set finetune.learning_rate=.nan is not valid: finetune.learning_rate must be a "
     "finite number, got nan"),
    ({"params.yaml": b"finetune:\n  epochs: -3\n"}, ["validate"],
     "{root}/params.yaml is not valid: finetune.epochs must be at least 1, got -3"),
    ({"params.yaml": b"finetune:\n  epochs: 2\n  epochs: 3\n"}, ["validate"],
     "{root}/params.yaml: key 'epochs' is written twice in one section (line 3, column 3); YAML would keep only "
     "the last, remove one"),
    ({"params.yaml": b""}, ["run"],
     "{root}/params.yaml is empty: tuneloop does not fall back to its shipped defaults (they train on its own "
     "movie reviews); write your sections, or let `tuneloop init DATA` write them"),
    ({"params.yaml": SHIPPED_PARAMS.encode()}, ["serve", "--port", "99999"],
     "serve refused: serve.port must be 0-65535, got 99999"),
    ({"good.csv": GOOD_CSV.encode()}, ["init", "good.csv", "good.csv"],
     "the project folder {root}/good.csv cannot be used: {root}/good.csv is not a folder; name a folder as the "
     "second argument (`tuneloop init DATA DIR`)"),
    ({"nul.csv": b'text,label\n"Th\x00is film",pos\n'}, ["init", "nul.csv", "project"],
     "{root}/nul.csv: column 'text', row 1 holds a NUL character, which cannot be kept as written (1 rows in all); "
     "remove it from the file"),
    ({"mac.csv": GOOD_CSV.replace("\n", "\r").encode()}, ["init", "mac.csv", "project"],
     "{root}/mac.csv ends its lines with CR alone (classic Mac); save it with LF or CRLF line ends"),
    ({"surrogate.jsonl": b'{"text": "fine \\udfff", "label": "a"}\n'}, ["init", "surrogate.jsonl", "project"],
     "{root}/surrogate.jsonl: column 'text', row 1 holds a lone surrogate (a \\ud800-\\udfff escape), which cannot "
     "be kept as written (1 rows in all); remove it from the file"),
    ({"header.csv": b"text,label\n"}, ["init", "header.csv", "project"],
     "{root}/header.csv has a header but no rows: nothing to learn from"),
    ({}, ["restore-data", "1", "--out", "/dev/null/x"],
     "restore-data refused, nothing was written: --out /dev/null/x: /dev/null is not a folder"),
], ids=["latin-1", "folder", "deep", "batch_size=0", "device=tpu", "lr=nan", "epochs=-3", "duplicate-key", "empty",
        "port", "init-into-file", "nul", "cr-only", "surrogate", "header-only", "out-under-a-device"])
def test_every_hostile_file_setting_and_flag_ends_in_one_line_and_exit_2_writing_nothing(
        tmp_path, monkeypatch, capsys, files, args, message):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    for name, content in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(content)
    before = files_under(tmp_path)
    code, out, err = tuneloop_main(capsys, *args, "--root" if args[0] != "init" else "--force", *(
        [str(tmp_path)] if args[0] != "init" else []))
    assert (code, out, err) == (2, "", message.format(root=tmp_path) + "\n")
    assert files_under(tmp_path) == before and sorted(tmp_path.iterdir()) == sorted(
        tmp_path / name.split("/")[0] for name in files)


@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_a_pipe_or_device_as_source_ends_init_and_ingest_in_one_line_without_reading_it(
        tmp_path, monkeypatch, capsys, kind):
    import os

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    source = tmp_path / "data.csv"
    os.mkfifo(source) if kind == "fifo" else source.symlink_to("/dev/zero")
    message = "data source {} is not a regular file (a pipe or a device?); copy the data to a file\n"
    assert tuneloop_main(capsys, "init", str(source), str(tmp_path / "project")) == (
        2, "", message.format(source.resolve()))  # init names the file the link leads to
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.csv"]
    (tmp_path / "params.yaml").write_text("ingest: {source: data.csv}\n")
    assert tuneloop_main(capsys, "ingest", "--root", str(tmp_path)) == (2, "", message.format(source))
    assert not (tmp_path / "data").exists()  # no snapshot, no prepared data


def test_restoring_a_well_formed_but_unknown_data_version_ends_in_one_line_and_leaves_no_folder(
        mlflow_sandbox, mlflow_model_name, tmp_path, capsys):
    import yaml

    from tuneloop.plumbing.tracking import start_pipeline_run
    from tuneloop.tasks import registry
    from tuneloop.tasks.ingest import open_dvc_repo
    from tuneloop.values.workspace import Workspace

    model = tmp_path / "model"
    model.mkdir()
    (model / "weights.bin").write_bytes(b"w")
    run_id = start_pipeline_run(mlflow_sandbox.config(model_name=mlflow_model_name), Workspace(tmp_path / "reg"), {})
    md5 = "0123456789abcdef" * 2
    registry.create_version(mlflow_model_name, run_id, model, {"data.md5": md5, "data.size": "12",
                                                               "data.path": "data/raw/x.csv"})
    project = tmp_path / "project"
    project.mkdir()
    (project / "params.yaml").write_text(yaml.safe_dump({"mlflow": {
        "tracking_uri": mlflow_sandbox.tracking_uri, "experiment": mlflow_sandbox.experiment,
        "model_name": mlflow_model_name}}))
    open_dvc_repo(project, ".dvc-remote").close()
    code, out, err = tuneloop_main(capsys, "restore-data", "1", "--root", str(project))
    assert (code, out, err) == (2, "", f"DVC could not restore data version {md5}: neither the project's DVC cache "
                                       "nor the remote .dvc-remote holds it; nothing was written\n")
    assert not (project / "data").exists()


# --- a champion loaded as the README shows still serves, evaluates and rolls back -----------------

SCORES = {"accuracy": 0.9, "macro_f1": 0.875, "ece": 0.05, "latency_ms_per_example": 1.0}


def register_versions(root: Path, trained: Path, base: Path, mlflow_section: dict, count: int, first: int = 0):
    """A project whose register stage made `count` versions of the trained model, each promoted in
    turn (the last is `champion`), with its params.yaml written for the CLI. Returns its params.
    Each registration scores differently from `first` on, so none is taken for an earlier one."""
    import shutil
    from dataclasses import asdict

    import yaml

    from tuneloop.pipeline import stages
    from tuneloop.pipeline.params import parse_params
    from tuneloop.plumbing.integrity import folder_manifest
    from tuneloop.plumbing.tracking import start_pipeline_run
    from tuneloop.tasks.ingest import DataVersion
    from tuneloop.values.workspace import Workspace, write_json

    ws = Workspace(root)
    ws.splits.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"text": ["the film was bad", "the film was good"], "label": ["negative", "positive"],
                  "split": "test"}).to_parquet(ws.splits)
    write_json(ws.data_version, asdict(DataVersion("e" * 32, 1, "data/raw/x.csv", "x.csv", 2, 0)))
    if not ws.challenger_dir.exists():
        shutil.copytree(trained, ws.challenger_dir)
    params = parse_params({"model": {"base": str(base)}, "validate": {"labels": ["negative", "positive"]},
                           "mlflow": mlflow_section})
    (root / "params.yaml").write_text(yaml.safe_dump(params.model_dump(mode="json", by_alias=True)))
    for number in range(first, first + count):
        write_json(ws.evaluation, {"models": {"challenger": {**SCORES, "macro_f1": 0.8 + number / 100}},
                                   "challenger_files": folder_manifest(ws.challenger_dir)})
        write_json(ws.decision, {"promote": True, "reasons": [f"better, try {number}"]})
        start_pipeline_run(params.mlflow, ws, {"data.md5": "e" * 32})
        stages.register(params, ws)
    return params


def version_folder(name: str, version: str) -> Path:
    """Where the local store keeps a version's files (its source, a file:// URI)."""
    from urllib.parse import urlparse
    from urllib.request import url2pathname

    from tuneloop.tasks import registry

    return Path(url2pathname(urlparse(registry.get_version(name, version).source).path))


def test_loading_the_champion_as_the_readme_shows_never_takes_it_out_of_service(
        trained, tiny_bert, mlflow_sandbox, tmp_path, capsys, caplog):
    import mlflow

    from tuneloop.pipeline import stages
    from tuneloop.plumbing.integrity import MANIFEST_TAG, folder_manifest
    from tuneloop.service.serve import registry_loader, registry_lookup
    from tuneloop.tasks import registry
    from tuneloop.values.workspace import Workspace

    name, root = "tl-hostile-readme-user", tmp_path / "project"
    params = register_versions(root, trained, tiny_bert, {"tracking_uri": mlflow_sandbox.tracking_uri,
                                                          "experiment": mlflow_sandbox.experiment,
                                                          "model_name": name}, 2)
    folder = version_folder(name, "2")
    recorded = json.loads(registry.get_version(name, "2").tags[MANIFEST_TAG])
    assert folder_manifest(folder) == recorded

    model = mlflow.pyfunc.load_model(f"models:/{name}@champion")  # exactly the README's lines
    assert model.predict(pd.DataFrame({"text": ["what a film"]}))["label"].tolist()[0] in {"negative", "positive"}
    assert sorted(set(folder_manifest(folder)) - set(recorded)) == ["registered_model_meta"]  # MLflow wrote it there

    # serve: the follower loads the untouched champion; /health is 200
    follower = ChampionFollower(name, str(tiny_bert), registry_lookup(name),
                                registry_loader(name, tmp_path / "serve-cache", str(tiny_bert), "cpu"), 60.0)
    with caplog.at_level("WARNING", logger="tuneloop.integrity"):
        with TestClient(create_app(follower, PredictionStore(f"sqlite:///{tmp_path}/p.db"), LIMITS, TOKENS)) as client:
            health = client.get("/health")
    assert (health.status_code, health.json()["version"], health.json()["last_error"]) == (200, "2", None)
    assert any("also holds registered_model_meta, written by MLflow" in r.getMessage() for r in caplog.records)

    # evaluate: the champion is scored, not refused
    candidate = stages.champion_candidate(params, Workspace(root))
    assert candidate is not None and "v2" in str(vars(candidate))

    # rollback, and forward again onto the loaded version
    code, out, err = tuneloop_main(capsys, "rollback", "--root", str(root), "--why", "test")
    assert (code, err) == (0, "") and "from version 2 to version 1" in out
    code, out, err = tuneloop_main(capsys, "rollback", "--root", str(root), "--why", "test")
    assert (code, err) == (0, "") and "from version 1 to version 2" in out
    assert registry.alias_version(name, registry.CHAMPION).version == "2"
    assert {k: v for k, v in folder_manifest(folder).items() if k != "registered_model_meta"} == recorded


@pytest.mark.parametrize("change, problem", [
    ("flip", "artifacts/classifier/labels.json: sha256"),
    ("remove", "artifacts/classifier/labels.json: missing"),
    ("add", "model.safetensors: not recorded for this version"),
])
def test_beside_mlflows_own_file_a_changed_missing_or_added_file_is_still_refused(tmp_path, change, problem):
    from tuneloop.plumbing.integrity import IntegrityError, check_folder, folder_manifest

    (tmp_path / "artifacts" / "classifier").mkdir(parents=True)
    (tmp_path / "MLmodel").write_text("flavors: {}\n")
    (tmp_path / "artifacts" / "classifier" / "labels.json").write_text('["negative", "positive"]')
    recorded = folder_manifest(tmp_path)
    (tmp_path / "registered_model_meta").write_text("model_name: m\nmodel_version: '1'\n")
    check_folder(tmp_path, recorded, "version 1")  # MLflow's file alone: loads
    labels = tmp_path / "artifacts" / "classifier" / "labels.json"
    if change == "flip":
        labels.write_text('["positive", "negative"]')
    elif change == "remove":
        labels.unlink()
    else:
        (tmp_path / "model.safetensors").write_bytes(b"other weights")
    with pytest.raises(IntegrityError) as refused:
        check_folder(tmp_path, recorded, "version 1")
    assert f"refusing to load it: {problem}" in str(refused.value)
    assert "registered_model_meta" not in str(refused.value)


# --- a copied project is a project of its own ----------------------------------------------------


def test_a_project_copied_with_cp_a_reads_and_writes_only_its_own_artefacts(
        trained, tiny_bert, tmp_path, monkeypatch, capsys):
    import shutil
    import sqlite3
    import subprocess

    import mlflow

    from tuneloop.plumbing.integrity import folder_manifest
    from tuneloop.tasks import registry

    previous_uri = mlflow.get_tracking_uri()
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    name, original, copy = "tl-hostile-copied", tmp_path / "original", tmp_path / "copy"
    original.mkdir()
    try:
        register_versions(original, trained, tiny_bert, {"experiment": "copied", "model_name": name}, 1)
        before = folder_manifest(original)  # every file, mlflow.db and mlartifacts/ included
        subprocess.run(["cp", "-a", str(original), str(copy)], check=True)

        code, out, err = tuneloop_main(capsys, "status", "--json", "--root", str(copy))  # the copy runs
        assert (code, err, json.loads(out)["champion"]["version"]) == (0, "", "1")
        mlflow.pyfunc.load_model(f"models:/{name}@champion")  # MLflow writes beside the copy's files
        assert version_folder(name, "1").is_relative_to(copy)
        register_versions(copy, trained, tiny_bert, {"experiment": "copied", "model_name": name}, 1, 1)  # version 2
        assert version_folder(name, "2").is_relative_to(copy)
        assert folder_manifest(original) == before  # the original was neither read into nor written

        with sqlite3.connect(copy / "mlflow.db") as db:
            named = [row for table, column in (("experiments", "artifact_location"), ("runs", "artifact_uri"),
                                               ("model_versions", "source"), ("model_versions", "storage_location"))
                     for row in db.execute(f"SELECT {column} FROM {table}") if str(original) in str(row[0])]
        assert named == []

        shutil.rmtree(original)  # the copy stands alone: both versions load, rollback works
        for version in ("1", "2"):
            registry.verified_version(name, version, tmp_path / "fresh-cache", str(tiny_bert))
        code, out, err = tuneloop_main(capsys, "rollback", "--root", str(copy), "--why", "test")
        assert code == 0 and "from version 2 to version 1" in out and "Traceback" not in err
    finally:
        mlflow.set_tracking_uri(previous_uri)


# --- validate: bounded regexes, and data that cannot train refused before any model loads ---------


def test_a_nested_quantifier_pii_pattern_is_matched_in_bounded_time_by_the_guarded_engine(tmp_path):
    from tuneloop.tasks.validate import validate_dataset
    from tuneloop.values.config import ValidateConfig

    texts = ["a" * 1999 + "!", "aaaa", "a fine film", "a" * 30 + "b"] * 5
    frame = pd.DataFrame({"row": range(1, 21), "text": texts, "label": ["pos", "neg"] * 10})
    config = ValidateConfig(pii_patterns={"evil": r"^(a+)+$"}, min_rows_per_class=1)
    result = next(r for r in validate_dataset(frame, config, tmp_path).results if r.rule == "pii")
    assert (result.passed, result.example_rows) == (False, (2, 6, 10, 14, 18))
    assert result.message.startswith("pii: 5 rows contain personal data (evil): rows 2 (evil: 'aaaa')")


def test_a_catastrophic_pii_pattern_stops_at_its_time_budget_naming_it():
    import time

    from tuneloop.tasks.validate import PatternTimeout, pii_matches

    texts = pd.Series(["fine", "a" * 40 + "!"])
    started = time.monotonic()
    with pytest.raises(PatternTimeout) as stopped:
        pii_matches(texts, {"email": "@", "evil": r"(a|aa)+$"}, pd.Series([7, 8]), seconds=1.0)
    assert time.monotonic() - started < 10
    assert str(stopped.value) == ("validate.pii_patterns['evil'] ran past the 1 s the PII check may take (searching "
                                  "row 8): it backtracks catastrophically on some texts; rewrite it without nested "
                                  "repeats such as (a+)+ or (a|aa)+")


def untrainable(texts: list[str], labels: list[str]) -> pd.DataFrame:
    return pd.DataFrame({"row": range(1, len(texts) + 1), "text": texts, "label": labels})


@pytest.mark.parametrize("frame, message", [
    (untrainable([], []), "the data has no rows (after ingest.exclude_labels): nothing to train on"),
    (untrainable([f"review {i}" for i in range(60)], ["pos"] * 60),
     "the data holds 1 label (['pos']): a classifier needs at least 2"),
    (untrainable(["Great film!"] * 30 + ["great film"] * 30, ["pos", "neg"] * 30),
     "after the split, validation has no rows (train 60, validation 0, test 0); after the split, test has no rows "
     "(train 60, validation 0, test 0); the data holds 1 distinct texts (after normalising) and rows with one "
     "text share a split: add rows with other texts"),
], ids=["no-rows", "one-class", "all-duplicates"])
def test_data_that_cannot_train_is_refused_by_validate_before_any_model_loads(
        mlflow_sandbox, tmp_path, capsys, frame, message):
    from dataclasses import asdict

    from tuneloop.pipeline import stages
    from tuneloop.pipeline.params import parse_params
    from tuneloop.plumbing.tracking import start_pipeline_run
    from tuneloop.tasks.ingest import DataVersion
    from tuneloop.tasks.split import UntrainableData
    from tuneloop.values.workspace import Workspace, write_json

    ws = Workspace(tmp_path)
    ws.dataset.parent.mkdir(parents=True)
    frame.to_parquet(ws.dataset)
    write_json(ws.data_version, asdict(DataVersion("e" * 32, 1, "data/raw/x.csv", "x.csv", len(frame), 0,
                                                   labels=sorted(set(frame["label"])))))
    params = parse_params({"mlflow": {"tracking_uri": mlflow_sandbox.tracking_uri,
                                      "experiment": mlflow_sandbox.experiment},
                           "validate": {"min_rows_per_class": 1, "max_class_imbalance": 100.0}})
    start_pipeline_run(params.mlflow, ws, {"data.md5": "e" * 32})
    with pytest.raises(UntrainableData) as refused:
        stages.validate(params, ws)
    assert str(refused.value) == f"the data cannot train a classifier: {message}"
    assert not ws.splits.exists() and not (tmp_path / "models").exists()


def test_the_service_can_hand_freed_body_memory_back_on_glibc():
    """Refused bodies' chunks are returned to the OS with glibc's malloc_trim (the slow-client
    test above needs it under load: without it the heap stayed 22.8 MiB up in CI)."""
    import platform

    from tuneloop.service import limits

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("malloc_trim is glibc's")
    assert limits.MALLOC_TRIM is not None
    limits.release_memory()  # callable, returns nothing, never raises
