"""What the `emotr` command prints: results, errors a user can fix as one line, nothing native.

Every command prints through `console` (results, stdout) and `errors` (errors and logs, stderr),
which mask the password of any URI in the strings they print. Keras is imported inside
`load_keras_quietly` alone: only the commands that build models on the driver need it; Ray Data
inside `quiet_ray_data_console`, which only commands that start Ray call.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO, Any

import typer
from rich.console import Console

from emotr.cli.messages import describe_os_error
from emotr.config import Config
from emotr.errors import EmotrError
from emotr.redaction import redact


@dataclass
class Settings:
    """The options shared by every command, set once by the app's callback."""

    debug: bool = False  # show tracebacks and native start-up lines
    stderr_moved: bool = False  # sys.stderr writes to a copy of descriptor 2 (quiet_native_logs)


settings = Settings()
# While set, what native code writes to file descriptor 2 (hold_native_stderr).
_held_native: IO[bytes] | None = None


class _RedactingConsole(Console):
    """A console that masks the password of any URI in the strings it prints (config values)."""

    def print(self, *objects: Any, **kwargs: Any) -> None:
        super().print(*(redact(o) if isinstance(o, str) else o for o in objects), **kwargs)


console = _RedactingConsole()
errors = _RedactingConsole(stderr=True, soft_wrap=True)


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print `error: message` on stderr; returns the Exit (code 1, 2 for bad input) to raise."""
    errors.print(f"[bold red]error:[/] {message}", highlight=False)
    return typer.Exit(code)


@contextmanager
def guard(cfg: Config | None = None) -> Iterator[None]:
    """Turn errors a user can fix, raised in the block, into one clear line and exit code 1.

    Only emotr's own errors and OSErrors (named by path and by the key of `cfg` it came from) are
    expected; anything else is a bug and keeps its traceback, after the native lines held since
    Ray started. --debug shows the traceback of expected errors too.
    """
    try:
        yield
    except EmotrError as error:
        if settings.debug:
            raise
        raise fail(str(error)) from None
    except OSError as error:
        if settings.debug:
            raise
        raise fail(describe_os_error(error, cfg)) from None
    except BaseException:
        show_held_native_stderr()  # any other failure shows what native code said too
        raise


def quiet_native_logs() -> None:
    """Keep TensorFlow's and gRPC's start-up lines off the console; set before either loads.

    Python's own stderr (sys.stderr) moves to a copy of file descriptor 2, so that
    `hold_native_stderr` can hold what native code writes there and nothing of Python's: done
    here, before MLflow and the log handlers take hold of sys.stderr.
    """
    if not settings.debug:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # CPU-feature and TensorRT notices
        os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
        if _on_descriptor_2(sys.stderr):
            settings.stderr_moved = True
            sys.stderr.flush()
            sys.stderr = os.fdopen(
                os.dup(2), "w", buffering=1, encoding=sys.stderr.encoding, errors="backslashreplace"
            )
    # MLflow's artifact download bars (registering and loading models) would cut into the output.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


@contextmanager
def native_stderr_held() -> Iterator[None]:
    """TensorFlow's C++ start-up lines go to a file, shown only if the block fails (or --debug).

    TensorFlow 2.21 logs them through absl before TF_CPP_MIN_LOG_LEVEL applies, straight to
    file descriptor 2, so only redirecting the descriptor keeps them off the console.
    """
    if settings.debug:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        except BaseException:
            sys.stderr.flush()
            os.dup2(saved, 2)
            held.seek(0)
            sys.stderr.write(held.read().decode(errors="replace"))
            raise
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


def _on_descriptor_2(stream: Any) -> bool:
    """Whether `stream` writes to file descriptor 2 (False for a test runner's captured stream)."""
    try:
        return stream.fileno() == 2
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is an OSError
        return False


def quiet_ray_auth_notice(cfg: Config) -> None:
    """A private local Ray's token authentication, Ray's default, chosen explicitly: Ray warns
    when it chooses it. Ray reads RAY_AUTH_MODE once, on import: set before that."""
    if not settings.debug and not cfg.ray.address and not os.environ.get("RAY_ADDRESS"):
        os.environ.setdefault("RAY_AUTH_MODE", "token")


def hold_native_stderr() -> None:
    """From now on, what native code writes to stderr goes to a file, shown if a `guard` block
    fails (or --debug: straight to the console).

    Ray's core worker in the driver logs its errors to stderr as well as to Ray's own log file
    (python-core-driver-*.log), among them one that every Ray Data actor pool prints: Ray Data
    passes the actors its own ObjectRefs (ray#57733). Ray's only knob, RAY_BACKEND_LOG_LEVEL,
    would empty every Ray process's log files too. Python's lines (emotr's, Ray's, MLflow's)
    still reach the console: `quiet_native_logs` moved sys.stderr off descriptor 2.
    """
    global _held_native
    if settings.debug or _held_native is not None or not settings.stderr_moved:
        return
    sys.stderr.flush()
    _held_native = tempfile.TemporaryFile()  # noqa: SIM115 - held until the process ends
    os.dup2(_held_native.fileno(), 2)


def show_held_native_stderr() -> None:
    """Print what native code wrote while held, and send its later lines to the console."""
    global _held_native
    if _held_native is None:
        return
    os.dup2(sys.stderr.fileno(), 2)
    _held_native.seek(0)
    sys.stderr.write(_held_native.read().decode(errors="replace"))
    sys.stderr.flush()
    _held_native.close()
    _held_native = None


# Ray Data's issue detectors warn on the console of a healthy run: "uses 2.5GiB of memory per
# worker ... consider setting memory=" for every extraction (VGG's actor holds that much, as it
# should), with a paragraph on how to tune the detector.
RAY_DATA_ISSUE_LOGGERS = "ray.data._internal.issue_detection"


def _not_an_issue_detector(record: logging.LogRecord) -> bool:
    return not record.name.startswith(RAY_DATA_ISSUE_LOGGERS)


def quiet_ray_data_console() -> None:
    """Ray Data's INFO lines (each dataset's start, plan and finish) and its issue detectors'
    warnings to its log file only.

    Importing ray.data configures its loggers: a "file" handler (ray-data.log in Ray's session
    folder, every level) and a "console" handler (INFO), which this raises to WARNING.
    """
    if settings.debug:
        return
    import ray.data  # noqa: F401 - configures the "ray.data" loggers

    for handler in logging.getLogger("ray.data").handlers:
        if handler.name == "console":
            handler.setLevel(logging.WARNING)
            if _not_an_issue_detector not in handler.filters:
                handler.addFilter(_not_an_issue_detector)


def quiet_serve_console() -> None:
    """Ray Serve's INFO lines on the driver ("Started Serve", "Application ... is ready") off
    the console; its replicas and controller log to Ray's files. Set once Serve is imported:
    importing it configures its logger."""
    if settings.debug:
        return
    import ray.serve  # noqa: F401 - configures the "ray.serve" logger

    logging.getLogger("ray.serve").setLevel(logging.WARNING)


# MLflow announces the tables it creates in a new SQL store ("Creating initial MLflow database
# tables...", "Updating database tables") at INFO, and alembic each migration: a first run's
# console is emotr's lines. They stay in --debug.
STORE_CREATION_LOGGERS = ("mlflow.store.db.utils", "alembic")


def quiet_store_creation() -> None:
    """MLflow's and alembic's lines about creating a new store's tables off the console."""
    if settings.debug:
        return
    for name in STORE_CREATION_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def load_keras_quietly() -> None:
    """Import Keras (and so TensorFlow) and make a first tensor, its native start-up lines held.

    Both print: the import its absl/oneDNN lines, the first tensor the device probe (cuInit).
    """
    with native_stderr_held():
        import keras

        keras.ops.convert_to_tensor([0.0])
