"""The prediction store: every served prediction, and the true labels fed back.

SQLite in the project by default; any SQLAlchemy URL (PostgreSQL in
production) by config. The serving service writes it, the monitoring flow
reads windows of it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Sequence

import pandas as pd
import sqlalchemy as sa

from tuneloop.values.config import ServeConfig
from tuneloop.values.workspace import Workspace

STORE_URL_VARIABLE = "TUNELOOP_STORE_URL"  # beats serve.store_url: keeps database passwords out of params.yaml


def store_url(config: ServeConfig, root: Path) -> str:
    """$TUNELOOP_STORE_URL beats `serve.store_url` beats SQLite under `state/`."""
    url = os.environ.get(STORE_URL_VARIABLE) or config.store_url
    if url:
        return url
    path = Workspace(Path(root)).predictions_db.resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


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
    sa.Column("feedback_by", sa.String(64), nullable=True),  # the token that labelled it: provenance
    sa.Column("abstained", sa.Boolean, nullable=True),  # the model said "none of these" (None: logged before)
    sa.UniqueConstraint("request_id", "item", name="uq_request_item"),
    sa.Index("ix_predictions_version_ts", "model_version", "ts"),  # the monitor's window: one range scan
)
COLUMNS = [c.name for c in PREDICTIONS.columns]
BULKY = ("text", "probabilities")  # what a window without texts leaves out
TEXT_CHUNK = 500  # ids per IN (...) query: under SQLite's bound on parameters
# Every label a prediction was given, first labels and corrections alike: nothing is overwritten unseen.
FEEDBACK_HISTORY = sa.Table(
    "feedback_history", METADATA,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("request_id", sa.String(64), nullable=False, index=True),
    sa.Column("item", sa.Integer, nullable=False),
    sa.Column("ts", sa.DateTime(timezone=True), nullable=False, index=True),
    sa.Column("by", sa.String(64), nullable=False),
    sa.Column("old_label", sa.String(128), nullable=True),  # None: the first label
    sa.Column("new_label", sa.String(128), nullable=False),
    sa.Column("action", sa.String(16), nullable=False),  # "label" | "correction"
)
HISTORY_COLUMNS = [c.name for c in FEEDBACK_HISTORY.columns]
# The shadow version's answers to the requests the champion answered (tasks/shadow.py): a table of
# their own, so the champion's rows, which monitoring and feedback read, stay exactly as they were.
# No text: the champion's row of the same (request_id, item) holds it.
SHADOW_PREDICTIONS = sa.Table(
    "shadow_predictions", METADATA,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("request_id", sa.String(64), nullable=False, index=True),
    sa.Column("item", sa.Integer, nullable=False),
    sa.Column("ts", sa.DateTime(timezone=True), nullable=False, index=True),
    sa.Column("label", sa.String(128), nullable=False),
    sa.Column("confidence", sa.Float, nullable=False),
    sa.Column("probabilities", sa.Text, nullable=False),  # JSON {label: p}
    sa.Column("model_version", sa.String(32), nullable=False),
    sa.Column("abstained", sa.Boolean, nullable=False),
    sa.UniqueConstraint("request_id", "item", "model_version", name="uq_shadow_request_item_version"),
    sa.Index("ix_shadow_version_ts", "model_version", "ts"),
)
SHADOW_COLUMNS = [c.name for c in SHADOW_PREDICTIONS.columns]
PAIR_COLUMNS = ["request_id", "item", "ts", "champion_label", "champion_confidence", "true_label", "shadow_label",
                "shadow_confidence"]
# columns newer than the first stores: added in place
ADDED_COLUMNS = {"feedback_by": "VARCHAR(64)", "abstained": "BOOLEAN"}


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
    abstained: bool = False


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def as_utc(value: datetime) -> datetime:
    """SQLite hands back naive datetimes; every timestamp here is UTC."""
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


class FeedbackConflict(ValueError):
    """Feedback would replace labels already given without saying it is a correction."""

    def __init__(self, request_id: str, items: list[int]):
        super().__init__(f"request {request_id} item(s) {items} already have a different label; send "
                         '"correction": true to replace it (every change is kept)')
        self.items = items


def add_missing_columns(engine: sa.Engine) -> None:
    """Stores created before a column existed get it (nullable, so old rows stay valid)."""
    present = {c["name"] for c in sa.inspect(engine).get_columns("predictions")}
    with engine.begin() as conn:
        for name, kind in ADDED_COLUMNS.items():
            if name not in present:
                conn.execute(sa.text(f"ALTER TABLE predictions ADD COLUMN {name} {kind}"))


def engine_url(url: str) -> str:
    """A plain `postgresql://` URL means psycopg 3 (the `team` extra's driver), not
    SQLAlchemy's default psycopg2, which tuneloop does not install."""
    scheme, _, rest = url.partition("://")
    return f"postgresql+psycopg://{rest}" if scheme in {"postgresql", "postgres"} else url


def add_missing_indexes(engine: sa.Engine) -> None:
    """Stores created before an index existed get it."""
    for index in PREDICTIONS.indexes:
        index.create(engine, checkfirst=True)


class PredictionStore:
    """A thin handle on one database; safe to share across threads."""

    def __init__(self, url: str):
        self.url = url
        args = {"check_same_thread": False} if url.startswith("sqlite") else {}
        self.engine = sa.create_engine(engine_url(url), connect_args=args, pool_pre_ping=True)
        METADATA.create_all(self.engine)
        add_missing_columns(self.engine)
        add_missing_indexes(self.engine)

    def log(self, predictions: Iterable[Prediction]) -> int:
        """Appends predictions; returns how many were written."""
        rows = [{
            "request_id": p.request_id, "item": p.item, "ts": p.ts or utcnow(), "text": p.text,
            "label": p.label, "confidence": float(p.confidence), "probabilities": json.dumps(p.probabilities),
            "model_version": str(p.model_version), "abstained": bool(p.abstained),
        } for p in predictions]
        if rows:
            with self.engine.begin() as conn:
                conn.execute(PREDICTIONS.insert(), rows)
        return len(rows)

    def log_shadow(self, predictions: Iterable[Prediction]) -> int:
        """Appends a shadow version's answers (their text is not kept); returns how many were written."""
        rows = [{
            "request_id": p.request_id, "item": p.item, "ts": p.ts or utcnow(), "label": p.label,
            "confidence": float(p.confidence), "probabilities": json.dumps(p.probabilities),
            "model_version": str(p.model_version), "abstained": bool(p.abstained),
        } for p in predictions]
        if rows:
            with self.engine.begin() as conn:
                conn.execute(SHADOW_PREDICTIONS.insert(), rows)
        return len(rows)

    def shadow(self, request_id: str) -> pd.DataFrame:
        """One request's shadow answers, in item order (empty when there are none)."""
        query = (sa.select(SHADOW_PREDICTIONS).where(SHADOW_PREDICTIONS.c.request_id == request_id)
                 .order_by(SHADOW_PREDICTIONS.c.item))
        with self.engine.connect() as conn:
            return pd.DataFrame(conn.execute(query).mappings().all(), columns=SHADOW_COLUMNS)

    def shadow_pairs(self, shadow_version: str, champion_version: str, start: datetime | None = None) -> pd.DataFrame:
        """The champion's predictions since `start` that `shadow_version` also scored, one row
        each: both labels and confidences and the feedback label (None: none yet), oldest first."""
        p, s = PREDICTIONS.c, SHADOW_PREDICTIONS.c
        query = (sa.select(p.request_id, p.item, p.ts, p.label, p.confidence, p.true_label, s.label, s.confidence)
                 .join(SHADOW_PREDICTIONS, sa.and_(s.request_id == p.request_id, s.item == p.item))
                 .where(p.model_version == str(champion_version), s.model_version == str(shadow_version))
                 .order_by(p.ts, p.id))
        if start is not None:
            query = query.where(p.ts >= start)
        with self.engine.connect() as conn:
            frame = pd.DataFrame(conn.execute(query).all(), columns=PAIR_COLUMNS)
        if not frame.empty:
            frame["ts"] = frame["ts"].map(as_utc)
        return frame

    def attach_feedback(self, request_id: str, true_labels: Sequence[str], by: str = "anonymous",
                        correction: bool = False) -> int:
        """Sets true labels on a request's predictions, in item order, and keeps
        every change (who, when, old, new) in the feedback history. In one
        transaction: a conflict changes nothing.

        A label equal to the one already there changes nothing; a different one
        needs `correction`.

        Returns:
            The number of predictions whose label changed (0 when the request is unknown).
        Raises:
            FeedbackConflict: a label differs from one already given and `correction` is False.
        """
        now, changes = utcnow(), []
        with self.engine.begin() as conn:
            where = PREDICTIONS.c.request_id == request_id
            current = dict(conn.execute(sa.select(PREDICTIONS.c.item, PREDICTIONS.c.true_label).where(where))
                           .tuples().all())
            wanted = {item: label for item, label in enumerate(true_labels) if item in current}
            clashes = [item for item, label in wanted.items() if current[item] not in (None, label)]
            if clashes and not correction:
                raise FeedbackConflict(request_id, clashes)
            for item, label in wanted.items():
                if current[item] == label:
                    continue
                # the old label in the WHERE: a concurrent writer makes this match nothing, not overwrite
                was = current[item]
                old = PREDICTIONS.c.true_label.is_(None) if was is None else PREDICTIONS.c.true_label == was
                done = conn.execute(PREDICTIONS.update().where(where, PREDICTIONS.c.item == item, old)
                                    .values(true_label=label, feedback_ts=now, feedback_by=by))
                if done.rowcount != 1:
                    raise FeedbackConflict(request_id, [item])
                changes.append({"request_id": request_id, "item": item, "ts": now, "by": by,
                                "old_label": current[item], "new_label": label,
                                "action": "correction" if current[item] is not None else "label"})
            if changes:
                conn.execute(FEEDBACK_HISTORY.insert(), changes)
        return len(changes)

    def feedback_history(self, request_id: str | None = None) -> pd.DataFrame:
        """Every label change (of one request, or all), oldest first."""
        query = sa.select(FEEDBACK_HISTORY).order_by(FEEDBACK_HISTORY.c.id)
        if request_id is not None:
            query = query.where(FEEDBACK_HISTORY.c.request_id == request_id)
        with self.engine.connect() as conn:
            frame = pd.DataFrame(conn.execute(query).mappings().all(), columns=HISTORY_COLUMNS)
        if not frame.empty:
            frame["ts"] = frame["ts"].map(as_utc)
        return frame

    def purge(self, before: datetime) -> int:
        """Deletes predictions (and their feedback history) made before `before`.

        Returns:
            The number of predictions deleted.
        """
        with self.engine.begin() as conn:
            old = sa.select(PREDICTIONS.c.request_id).where(PREDICTIONS.c.ts < before)
            conn.execute(FEEDBACK_HISTORY.delete().where(FEEDBACK_HISTORY.c.request_id.in_(old)))
            conn.execute(SHADOW_PREDICTIONS.delete().where(SHADOW_PREDICTIONS.c.ts < before))
            return conn.execute(PREDICTIONS.delete().where(PREDICTIONS.c.ts < before)).rowcount

    def request(self, request_id: str) -> pd.DataFrame:
        """One request's predictions in item order (empty when the id is unknown)."""
        query = sa.select(PREDICTIONS).where(PREDICTIONS.c.request_id == request_id).order_by(PREDICTIONS.c.item)
        with self.engine.connect() as conn:
            frame = pd.DataFrame(conn.execute(query).mappings().all(), columns=COLUMNS)
        if not frame.empty:
            frame["ts"] = frame["ts"].map(as_utc)
        return frame

    def window(self, start: datetime | None = None, end: datetime | None = None,
               model_version: str | None = None, limit: int | None = None, texts: bool = True) -> pd.DataFrame:
        """Predictions with start <= ts < end (newest `limit` if given), oldest first.

        `texts=False` leaves out the text and the probabilities (most of a row's
        bytes): a window of a million predictions then fits in ~100 MB, and
        `texts(ids)` fetches the few texts a caller needs."""
        columns = [c for c in PREDICTIONS.columns if texts or c.name not in BULKY]
        query = sa.select(*columns)
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
            frame = pd.DataFrame(conn.execute(query).all(), columns=[c.name for c in columns])
        if not frame.empty:
            frame["ts"] = frame["ts"].map(as_utc)
        return frame.iloc[::-1].reset_index(drop=True)

    def texts(self, ids: Sequence[int]) -> dict[int, str]:
        """The logged text of each prediction id (ids not in the store are left out)."""
        ids, out = sorted({int(i) for i in ids}), {}
        with self.engine.connect() as conn:
            for start in range(0, len(ids), TEXT_CHUNK):
                chunk = ids[start : start + TEXT_CHUNK]
                out.update(conn.execute(sa.select(PREDICTIONS.c.id, PREDICTIONS.c.text)
                                        .where(PREDICTIONS.c.id.in_(chunk))).tuples().all())
        return out

    def probabilities(self, ids: Sequence[int]) -> dict[int, dict[str, float]]:
        """The logged {label: calibrated probability} of each prediction id (ids not in the store are left out)."""
        ids, out = sorted({int(i) for i in ids}), {}
        with self.engine.connect() as conn:
            for start in range(0, len(ids), TEXT_CHUNK):
                chunk = ids[start : start + TEXT_CHUNK]
                out.update((i, json.loads(p)) for i, p in conn.execute(
                    sa.select(PREDICTIONS.c.id, PREDICTIONS.c.probabilities).where(PREDICTIONS.c.id.in_(chunk))))
        return out

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
