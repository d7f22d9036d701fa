"""The prediction store's URL: what a team writes is what connects."""

from __future__ import annotations

import pytest

from tuneloop.service.store import engine_url


@pytest.mark.parametrize("given, used", [
    ("postgresql://u:p@db:5432/predictions", "postgresql+psycopg://u:p@db:5432/predictions"),
    ("postgres://u:p@db/predictions", "postgresql+psycopg://u:p@db/predictions"),
    ("postgresql+psycopg://u:p@db/predictions", "postgresql+psycopg://u:p@db/predictions"),
    ("postgresql+psycopg2://u:p@db/predictions", "postgresql+psycopg2://u:p@db/predictions"),
    ("sqlite:////srv/state/predictions.db", "sqlite:////srv/state/predictions.db"),
])
def test_a_plain_postgresql_url_connects_with_psycopg_3_and_any_other_url_is_unchanged(given, used):
    assert engine_url(given) == used
