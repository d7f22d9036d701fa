"""The prediction store: every served prediction, and the true labels fed back.

SQLite in the project by default; any SQLAlchemy URL (PostgreSQL in
production) by config. The serving service writes it, the monitoring flow
reads windows of it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Iterable, Sequence

import pandas as pd
import sqlalchemy as sa

METADATA = sa.MetaData()
PREDICTIONS = sa.Table(
    "predictions", METADATA,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("request_id", sa.String(64), nullable=False, index=True),
    sa.Column("item", sa.Integer, nullable=False, default=0),  # position in a batch request
    sa.Column("ts", sa.DateTime(timezone=True), nullable=False, index=True),
    sa.Column("text", sa.Text, nullable=False),
    sa.Column("label", sa.String(128), nullable=False),
    sa.Column("confidence", sa.Float, nullable=False),
    sa.Column("probabilities", sa.Text, nullable=False),  # JSON {label: p}
    sa.Column("model_version", sa.String(32), nullable=False, index=True),
    sa.Column("true_label", sa.String(128), nullable=True),
    sa.Column("feedback_ts", sa.DateTime(timezone=True), nullable=True),
    sa.UniqueConstraint("request_id", "item", name="uq_request_item"),
)
COLUMNS = [c.name for c in PREDICTIONS.columns]


@dataclass(frozen=True)
class Prediction:
    request_id: str
    item: int
    text: str
    label: str
    confidence: float
    probabilities: dict[str, float]
    model_version: str
    ts: datetime | None = None


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def as_utc(value: datetime) -> datetime:
    """SQLite hands back naive datetimes; every timestamp here is UTC."""
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


class PredictionStore:
    """A thin handle on one database; safe to share across threads."""

    def __init__(self, url: str):
        self.url = url
        args = {"check_same_thread": False} if url.startswith("sqlite") else {}
        self.engine = sa.create_engine(url, connect_args=args, pool_pre_ping=True)
        METADATA.create_all(self.engine)

    def log(self, predictions: Iterable[Prediction]) -> int:
        """Appends predictions; returns how many were written."""
        rows = [{
            "request_id": p.request_id, "item": p.item, "ts": p.ts or utcnow(), "text": p.text,
            "label": p.label, "confidence": float(p.confidence), "probabilities": json.dumps(p.probabilities),
            "model_version": str(p.model_version),
        } for p in predictions]
        if rows:
            with self.engine.begin() as conn:
                conn.execute(PREDICTIONS.insert(), rows)
        return len(rows)

    def attach_feedback(self, request_id: str, true_labels: Sequence[str]) -> int:
        """Sets true labels on a request's predictions, in item order.

        Returns:
            The number of predictions updated (0 when the request is unknown).
        """
        updated = 0
        with self.engine.begin() as conn:
            for item, label in enumerate(true_labels):
                result = conn.execute(
                    PREDICTIONS.update()
                    .where(PREDICTIONS.c.request_id == request_id, PREDICTIONS.c.item == item)
                    .values(true_label=label, feedback_ts=utcnow()))
                updated += result.rowcount
        return updated

    def request(self, request_id: str) -> pd.DataFrame:
        """One request's predictions in item order (empty when the id is unknown)."""
        query = sa.select(PREDICTIONS).where(PREDICTIONS.c.request_id == request_id).order_by(PREDICTIONS.c.item)
        with self.engine.connect() as conn:
            frame = pd.DataFrame(conn.execute(query).mappings().all(), columns=COLUMNS)
        if not frame.empty:
            frame["ts"] = frame["ts"].map(as_utc)
        return frame

    def window(self, start: datetime | None = None, end: datetime | None = None,
               model_version: str | None = None, limit: int | None = None) -> pd.DataFrame:
        """Predictions with start <= ts < end (newest `limit` if given), oldest first."""
        query = sa.select(PREDICTIONS)
        if start is not None:
            query = query.where(PREDICTIONS.c.ts >= start)
        if end is not None:
            query = query.where(PREDICTIONS.c.ts < end)
        if model_version is not None:
            query = query.where(PREDICTIONS.c.model_version == str(model_version))
        query = query.order_by(PREDICTIONS.c.ts.desc(), PREDICTIONS.c.id.desc())
        if limit is not None:
            query = query.limit(limit)
        with self.engine.connect() as conn:
            frame = pd.DataFrame(conn.execute(query).mappings().all(), columns=COLUMNS)
        if not frame.empty:
            frame["ts"] = frame["ts"].map(as_utc)
        return frame.iloc[::-1].reset_index(drop=True)

    def labelled(self, since: datetime | None = None) -> pd.DataFrame:
        """Predictions whose true label arrived after `since` (all when None), in feedback order."""
        query = sa.select(PREDICTIONS).where(PREDICTIONS.c.true_label.is_not(None))
        if since is not None:
            query = query.where(PREDICTIONS.c.feedback_ts > since)
        query = query.order_by(PREDICTIONS.c.feedback_ts, PREDICTIONS.c.id)
        with self.engine.connect() as conn:
            frame = pd.DataFrame(conn.execute(query).mappings().all(), columns=COLUMNS)
        for column in ("ts", "feedback_ts") if not frame.empty else ():
            frame[column] = frame[column].map(as_utc)
        return frame

    def count(self) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(sa.select(sa.func.count()).select_from(PREDICTIONS)).scalar_one())
