"""Keep secrets out of what emotr writes: passwords in URIs, in logs, artifacts, params and output.

A leaf module (standard library only): the tracker, the CLI and the checks all use it.
Credentials belong in the environment or the libraries' own credential files (PGPASSWORD,
~/.pgpass, AWS_*, MLFLOW_TRACKING_PASSWORD); a password written into a URI anyway is shown as
`***` wherever emotr prints or records that URI.
"""

from __future__ import annotations

import logging
import re

MASK = "***"

# scheme://user:password@host -- the password runs to the last "@" of the token (a password
# with an unencoded "@" still leaves nothing behind); quotes and whitespace end a token.
_USERINFO = re.compile(
    r"(?P<head>\b[A-Za-z][A-Za-z0-9+.\-]*://[^:/?#@\s\"'<>]*):(?P<secret>[^\s\"'<>]+)@"
)
# ...?password=... and signed-URL parameters (libpq's DSN parameters, presigned S3 URLs).
_QUERY = re.compile(
    r"(?P<head>[?&](?:password|passwd|pwd|secret|token|access_token|X-Amz-Signature|"
    r"X-Amz-Credential|X-Amz-Security-Token|sig)=)(?P<secret>[^&#\s\"'<>]+)",
    re.IGNORECASE,
)


def redact(text: str) -> str:
    """`text` with the password of every `scheme://user:password@host` replaced by `***`."""
    text = _USERINFO.sub(lambda match: f"{match['head']}:{MASK}@", text)
    return _QUERY.sub(lambda match: f"{match['head']}{MASK}", text)


class RedactingFilter(logging.Filter):
    """A handler filter that redacts each record's message (all loggers that reach the handler)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = redact(message)
        if redacted != message:
            # The formatted message replaces msg and args: an arg may hold the secret.
            record.msg, record.args = redacted, None
        return True
