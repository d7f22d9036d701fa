"""The monitor's window at volume: one index scan, texts only where they are needed."""

from __future__ import annotations

from datetime import timedelta

import sqlalchemy as sa

from tuneloop.pipeline import monitoring
from tuneloop.pipeline.params import parse_params
from tuneloop.service.store import Prediction, PredictionStore, utcnow
from tuneloop.tasks.drift import sample
from tuneloop.values.workspace import Workspace


def logged(store: PredictionStore, rows: int, version: str, labelled_every: int = 0) -> None:
    now = utcnow()
    store.log(Prediction(f"{version}-{i}", 0, f"text {version} {i}", "pos", 0.9, {"pos": 0.9, "neg": 0.1}, version,
                         ts=now - timedelta(seconds=rows - i), abstained=False) for i in range(rows))
    if labelled_every:
        for i in range(0, rows, labelled_every):
            store.attach_feedback(f"{version}-{i}", ["neg"])


def test_window_reads_only_the_sampled_and_labelled_texts_of_the_champion(tmp_path) -> None:
    params = parse_params({"serve": {"store_url": f"sqlite:///{tmp_path}/p.db"},
                           "monitor": {"sample_rows": 50, "window_rows": None}})
    store = PredictionStore(params.serve.store_url)
    logged(store, 2000, "1", labelled_every=100)
    logged(store, 300, "2")

    window = monitoring.read_window(params, Workspace(tmp_path), "1")

    assert len(window) == 2000 and set(window["model_version"]) == {"1"}
    has_text = window["text"].notna()
    drawn = set(sample(window, 50, params.monitor.seed)["id"])
    labelled = set(window.loc[window["true_label"].notna(), "id"])
    assert len(labelled) == 20 and set(window.loc[has_text, "id"]) == drawn | labelled
    assert "probabilities" not in window
    row = window[has_text].iloc[0]
    assert row["text"] == f"text 1 {int(row['request_id'].split('-')[1])}"  # each row its own text


def test_existing_stores_get_the_version_time_index(tmp_path) -> None:
    url = f"sqlite:///{tmp_path}/old.db"
    PredictionStore(url)
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text("DROP INDEX ix_predictions_version_ts"))
    PredictionStore(url)  # opening an older store adds what it lacks
    names = {index["name"] for index in sa.inspect(engine).get_indexes("predictions")}
    assert "ix_predictions_version_ts" in names
    with engine.connect() as conn:
        plan = " ".join(str(r) for r in conn.execute(sa.text(
            "EXPLAIN QUERY PLAN SELECT id FROM predictions WHERE model_version = '1' AND ts >= '2026-01-01' "
            "ORDER BY ts DESC")))
    assert "ix_predictions_version_ts" in plan
