"""The `emotr` app assembled: every command and the `emotr cache` group, registered on import."""

from __future__ import annotations

import sys
from functools import partial

import typer

from emotr.cli import audit, cache, doctor, explain, jobs, serve
from emotr.cli.options import GRAMMAR, PREDICT_OPTIONS_METAVAR, main_options

app = typer.Typer(
    help="Image emotion recognition by transfer learning: VGG features on Ray, heads tuned "
    "with Optuna, tracked in MLflow.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.callback()(main_options)
app.command("demo-data")(jobs.demo_data)
# Every command that reads a config ends its --help with the grammar they share.
command = partial(app.command, epilog=GRAMMAR)
command()(jobs.extract)
command()(jobs.tune)
command()(jobs.run)
command()(jobs.promote)
command(options_metavar=PREDICT_OPTIONS_METAVAR)(jobs.predict)
command(options_metavar=PREDICT_OPTIONS_METAVAR)(explain.explain)
command()(audit.audit)
command()(doctor.doctor)
command()(serve.serve)

cache_app = typer.Typer(help="Inspect, verify and export the feature cache.", no_args_is_help=True)
cache_command = partial(cache_app.command, epilog=GRAMMAR)
cache_command("ls")(cache.cache_ls)
cache_command("verify")(cache.cache_verify)
cache_command("gc")(cache.cache_gc)
cache_command("compact")(cache.cache_compact)
cache_command("export")(cache.cache_export)
app.add_typer(cache_app, name="cache")


def main() -> None:  # pragma: no cover - console script shim
    """Entry point for `python -m emotr.cli` and `python -m emotr.cli.main`."""
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
