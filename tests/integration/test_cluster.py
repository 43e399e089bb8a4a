"""The cluster path for real: PostgreSQL, an S3 endpoint, `mlflow server`, `ray start` nodes and
`ray job submit`, each a real process started (and stopped) by the tests."""

from __future__ import annotations

import psycopg2
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.cluster]


def test_postgres_server_needs_its_password_and_can_be_stopped(postgres_server):
    name = postgres_server.new_database()
    where = {"host": postgres_server.host, "port": postgres_server.port, "dbname": name}
    with psycopg2.connect(user="emotr", password=postgres_server.password, **where) as connection:
        assert connection.server_version >= 150000
    with pytest.raises(psycopg2.OperationalError, match="password authentication failed"):
        psycopg2.connect(user="emotr", password="wrong", **where)
    with postgres_server.stopped(), pytest.raises(psycopg2.OperationalError):
        psycopg2.connect(user="emotr", password=postgres_server.password, **where)
    psycopg2.connect(user="emotr", password=postgres_server.password, **where).close()
