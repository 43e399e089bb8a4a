"""The `emotr` command: parse, load the config, call pipeline verbs, print for a person.

The top of the graph: may import anything; nothing of emotr imports it.
"""

from emotr.cli.main import app, main

__all__ = ["app", "main"]
