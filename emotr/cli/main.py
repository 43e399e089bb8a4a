"""The `emotr` app assembled: every command and the `emotr cache` group, registered on import."""

from __future__ import annotations

import sys

import typer

from emotr.cli import cache, doctor, jobs
from emotr.cli.options import main_options

app = typer.Typer(
    help="Image emotion recognition by transfer learning: VGG16 features on Ray, heads tuned "
    "with Optuna, tracked in MLflow.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.callback()(main_options)
app.command("demo-data")(jobs.demo_data)
app.command()(jobs.extract)
app.command()(jobs.tune)
app.command()(jobs.run)
app.command()(jobs.promote)
app.command()(jobs.predict)
app.command()(doctor.doctor)

cache_app = typer.Typer(help="Inspect, verify and export the feature cache.", no_args_is_help=True)
cache_app.command("ls")(cache.cache_ls)
cache_app.command("verify")(cache.cache_verify)
cache_app.command("gc")(cache.cache_gc)
cache_app.command("compact")(cache.cache_compact)
cache_app.command("export")(cache.cache_export)
app.add_typer(cache_app, name="cache")


def main() -> None:  # pragma: no cover - console script shim
    """Entry point for `python -m emotr.cli` and `python -m emotr.cli.main`."""
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
