"""What the `emotr` command prints: results, errors a user can fix as one line, nothing native.

Every command prints through `console` (results, stdout) and `errors` (errors and logs, stderr),
which mask the password of any URI in the strings they print. Keras is imported inside
`load_keras_quietly` alone: only the commands that build models on the driver need it.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

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


settings = Settings()


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
    expected; anything else is a bug and keeps its traceback. --debug shows the traceback of
    expected errors too.
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


def quiet_native_logs() -> None:
    """Keep TensorFlow's and gRPC's start-up lines off the console; set before either loads."""
    if not settings.debug:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # CPU-feature and TensorRT notices
        os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
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


def load_keras_quietly() -> None:
    """Import Keras (and so TensorFlow) and make a first tensor, its native start-up lines held.

    Both print: the import its absl/oneDNN lines, the first tensor the device probe (cuInit).
    """
    with native_stderr_held():
        import keras

        keras.ops.convert_to_tensor([0.0])
