"""The options every command shares (--debug, --config, overrides) and the config they load."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer
from rich.logging import RichHandler

from emotr.cli.output import errors, fail, quiet_native_logs, settings
from emotr.config import Config, ConfigError
from emotr.config_io import load_config
from emotr.redaction import RedactingFilter

ConfigOption = Annotated[
    Path, typer.Option("--config", "-c", help="YAML config: defaults <- this file <- overrides.")
]
Overrides = Annotated[
    list[str] | None,
    typer.Argument(
        help="Overrides as section.key=value, e.g. tune.n_trials=10.", show_default=False
    ),
]


def main_options(
    debug: Annotated[
        bool,
        typer.Option(
            "--debug", envvar="EMOTR_DEBUG", help="Show the traceback of errors (or EMOTR_DEBUG=1)."
        ),
    ] = False,
) -> None:
    """Options shared by every command."""
    settings.debug = debug


def load_command_config(config: Path, overrides: list[str] | None) -> Config:
    """Set up logging and load the config; a config that cannot be used exits 2, naming the key."""
    quiet_native_logs()
    handler = RichHandler(console=errors)
    handler.addFilter(RedactingFilter())  # on the handler: Ray's, MLflow's and Optuna's lines too
    logging.basicConfig(level=logging.INFO, format="%(message)s", handlers=[handler])
    try:
        return load_config([config], overrides or [])
    except ConfigError as error:
        raise fail(str(error), code=2) from None
