"""Passwords in URIs never reach a log line, an artifact or a param: emotr.redaction."""

from __future__ import annotations

import logging

import pytest

from emotr.redaction import RedactingFilter, redact


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("postgresql://optuna:s3cret@db:5432/optuna", "postgresql://optuna:***@db:5432/optuna"),
        (
            "postgresql+psycopg2://emotr:p%40ss:w/rd@127.0.0.1/x",
            "postgresql+psycopg2://emotr:***@127.0.0.1/x",
        ),
        ("http://admin:hunter2@mlflow:5000", "http://admin:***@mlflow:5000"),
        ("s3://AKIAXYZ:wJalrSECRET@bucket/cache", "s3://AKIAXYZ:***@bucket/cache"),
        # an unencoded "@" in the password leaves no part of it behind
        ("mysql://u:p@ss@host/db", "mysql://u:***@host/db"),
        (
            "postgresql://db/optuna?user=x&password=s3cret",
            "postgresql://db/optuna?user=x&password=***",
        ),
        (
            "https://b.s3.amazonaws.com/k?X-Amz-Signature=abc123&X-Amz-Expires=60",
            "https://b.s3.amazonaws.com/k?X-Amz-Signature=***&X-Amz-Expires=60",
        ),
    ],
)
def test_the_password_of_a_uri_is_masked(text: str, expected: str):
    assert redact(text) == expected
    assert redact(expected) == expected  # idempotent


@pytest.mark.parametrize(
    "text",
    [
        "postgresql://emotr@db:5432/optuna",  # the password comes from PGPASSWORD / ~/.pgpass
        "s3://bucket/emotr/cache",
        "http://127.0.0.1:5000/#/experiments",
        "sqlite:////abs/path/optuna.db",
        "mlflow-artifacts:/emotr",
        "models:/emotr@champion",
        "user@example.org wrote: host:port",
    ],
)
def test_text_without_a_password_is_unchanged(text: str):
    assert redact(text) == text


def test_every_uri_in_a_text_is_masked():
    text = (
        "tune:\n  storage: postgresql://optuna:pw1@db/optuna\n"
        "mlflow:\n  tracking_uri: 'http://me:pw2@mlflow:5000'\n"
    )
    redacted = redact(text)
    assert "pw1" not in redacted and "pw2" not in redacted
    assert "postgresql://optuna:***@db/optuna" in redacted
    assert "'http://me:***@mlflow:5000'" in redacted


def test_log_records_are_redacted_whatever_logger_sends_them(caplog):
    logger = logging.getLogger("some.library")
    caplog.handler.addFilter(RedactingFilter())
    with caplog.at_level(logging.INFO):
        logger.info("connecting to %s", "postgresql://optuna:s3cret@db/optuna")
        logger.warning("plain %d", 3)
    assert "s3cret" not in caplog.text
    assert "postgresql://optuna:***@db/optuna" in caplog.text
    assert "plain 3" in caplog.text


def test_no_config_file_in_the_repository_holds_a_password():
    from emotr.config_io import load_config, to_flat_dict
    from tests.conftest import REPO

    for path in sorted((REPO / "conf").glob("*.yaml")):
        values = [str(value) for value in to_flat_dict(load_config([path])).values()]
        assert [value for value in values if redact(value) != value] == [], path.name
