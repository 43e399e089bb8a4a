"""The page of `emotr serve` (GET /): one self-contained HTML file, its script and style inline,
hand-written; nothing is fetched from outside the application."""

from __future__ import annotations

import functools
from importlib.resources import files


@functools.cache
def page_html() -> str:
    """The page's HTML (emotr/serve/page.html, shipped in the package)."""
    return files("emotr.serve").joinpath("page.html").read_text(encoding="utf-8")
