"""The options every command shares (--debug, --config, overrides) and the config they load.

One grammar for every command that reads a config: `emotr COMMAND [-c FILE] [section.key=value]...`
(`emotr predict` takes its inputs after the overrides). `COMMAND --help` shows it.
"""

from __future__ import annotations

import logging
import re
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.logging import RichHandler

from emotr.cli.output import (
    errors,
    fail,
    quiet_native_logs,
    quiet_ray_auth_notice,
    quiet_store_creation,
    settings,
)
from emotr.config import Config, ConfigError
from emotr.config_io import load_config
from emotr.redaction import RedactingFilter

OVERRIDE_METAVAR = "section.key=value"
# The usage line of `emotr predict`: its one list of arguments holds overrides, then inputs.
PREDICT_OPTIONS_METAVAR = f"[OPTIONS] [{OVERRIDE_METAVAR}]..."
# The epilog of every command that reads a config: the grammar they share, said the same way.
GRAMMAR = (
    "Config: defaults <- -c FILE (default: emotr's packaged default.yaml, the same as "
    "conf/default.yaml) <- section.key=value overrides, e.g. tune.n_trials=10; "
    "an override that names no key fails at once, naming it."
)
# `a.b=...` with a dotted identifier left of the first `=`: a path (`./a=b.jpg`,
# `photos/x=1.jpg`, `a=b.jpg`) never looks like this, so `emotr predict` can tell them apart.
_OVERRIDE = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+=")

ConfigOption = Annotated[
    Path,
    typer.Option(
        "--config", "-c", help="YAML config: defaults <- this file <- section.key=value overrides."
    ),
]
Overrides = Annotated[
    list[str] | None,
    typer.Argument(
        help="Overrides, applied after -c FILE, e.g. tune.n_trials=10 "
        "mlflow.tracking_uri=sqlite:///other.db.",
        metavar=OVERRIDE_METAVAR,
        show_default=False,
    ),
]
OverridesThenInputs = Annotated[
    list[str],
    typer.Argument(
        help="Image files, folders (every image below) or manifests, after any "
        "section.key=value overrides; a file whose name looks like one: write ./NAME.",
        metavar="INPUT",
        show_default=False,
    ),
]
# A registered model and the batch size, for the commands that run one (predict, explain).
ModelOption = Annotated[
    str | None,
    typer.Option(help="models:/NAME@ALIAS, models:/NAME/N, or a version or alias."),
]
BatchOption = Annotated[
    int | None,
    typer.Option(min=1, help="Images per VGG forward pass (default: extract.batch_size)."),
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


def is_override(argument: str) -> bool:
    """Whether a command-line argument is a `section.key=value` override (not a path)."""
    return _OVERRIDE.match(argument) is not None


def split_overrides(arguments: list[str]) -> tuple[list[str], list[str]]:
    """`emotr predict`'s arguments as (overrides, inputs), each in the order given."""
    overrides = [argument for argument in arguments if is_override(argument)]
    return overrides, [argument for argument in arguments if not is_override(argument)]


def load_command_config(config: Path, overrides: list[str] | None) -> Config:
    """Set up logging and load the config; a config that cannot be used exits 2, naming the key."""
    quiet_native_logs()
    handler = _log_handler()
    handler.addFilter(RedactingFilter())  # on the handler: Ray's, MLflow's and Optuna's lines too
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    quiet_store_creation()
    try:
        cfg = load_config([config], overrides or [])
    except ConfigError as error:
        raise fail(str(error) + _file_hint(overrides or []), code=2) from None
    quiet_ray_auth_notice(cfg)
    return cfg


def load_inputs_config(
    config: Path, arguments: list[str], batch: int | None
) -> tuple[Config, list[str]]:
    """The config and the inputs of a command that takes overrides then inputs (predict,
    explain); --batch is extract.batch_size. No input exits 2, saying what to name."""
    overrides, inputs = split_overrides(arguments)
    if batch:
        overrides.append(f"extract.batch_size={batch}")
    cfg = load_command_config(config, overrides)
    if not inputs:
        raise fail("no input given: name image files, folders or manifests after the overrides", 2)
    return cfg, inputs


def _log_handler() -> logging.Handler:
    """Rich's log lines in a terminal; in a log file (stderr redirected) one plain line each.

    Rich would fold a record into a column 30 characters wide beside the time, level and
    source path: ten lines for one warning, that grep finds in pieces.
    """
    if errors.is_terminal:
        return RichHandler(console=errors, show_path=settings.debug)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    return handler


def _file_hint(overrides: list[str]) -> str:
    """For an override that is also a file here: how to give the file instead."""
    files = [item for item in overrides if Path(item).exists()]
    if not files:
        return ""
    return f"\n  ({files[0]} is also a file: to give it as an input, write ./{files[0]})"
