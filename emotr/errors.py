"""emotr's own error types: the ones the CLI turns into one clear line (anything else is a bug).

Each message says what is wrong, where (the path, URI or config key) and how to fix it.
"""

from __future__ import annotations


class EmotrError(Exception):
    """A problem a user can fix; the CLI prints its message alone and exits 1."""


class DataError(EmotrError, ValueError):
    """Data that cannot be used; the message says what, where (path or key) and how to fix it."""
