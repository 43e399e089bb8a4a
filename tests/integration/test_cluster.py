"""The cluster path for real: PostgreSQL, an S3 endpoint, `mlflow server`, `ray start` nodes and
`ray job submit`, each a real process started (and stopped) by the tests."""

from __future__ import annotations

import psycopg
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.cluster]


def test_postgres_server_needs_its_password_and_can_be_stopped(postgres_server):
    name = postgres_server.new_database()
    with psycopg.connect(postgres_server.dsn(name)) as connection:
        assert connection.info.server_version >= 150000
    wrong = postgres_server.dsn(name).replace(postgres_server.password, "wrong")
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(wrong)
    with postgres_server.stopped(), pytest.raises(psycopg.OperationalError):
        psycopg.connect(postgres_server.dsn(name))
    psycopg.connect(postgres_server.dsn(name)).close()
