"""An OSError as one line a user can act on: the path or URI, and the config key it came from.

The CLI prints this instead of a traceback; `--debug` shows the traceback.
"""

from __future__ import annotations

import os
from pathlib import Path

from emotr.config import Config


def describe_os_error(error: OSError, cfg: Config | None) -> str:
    """An OSError as one line naming the path or URI and the config key it came from."""
    reason = error.strerror or str(error) or type(error).__name__
    if not error.filename and _working_dir_gone():
        # Checked first: resolving the config's relative paths below would fail the same way.
        from emotr.storage import WORKING_DIR_GONE

        where = os.environ.get("PWD", "")
        return f"{reason}: the working directory {where} no longer exists. {WORKING_DIR_GONE}"
    if error.filename:
        where = str(error.filename)
        key = _config_key_of(where, cfg) if cfg is not None else None
        text = f"{reason}: {where}"
    else:  # pyarrow's errors carry the path in their text only
        key = _config_key_in(reason, cfg) if cfg is not None else None
        text = f"{type(error).__name__}: {reason}"
    source = f" (from {key}={_config_value(cfg, key)})" if key and cfg is not None else ""
    return f"{text}{source}; check that it exists and that this user may use it"


def _working_dir_gone() -> bool:
    try:
        os.getcwd()
    except FileNotFoundError:
        return True
    return False


# Config keys that name files or folders, most specific first.
_PATH_KEYS = (
    "data.manifest",
    "data.root",
    "cache.root",
    "mlflow.artifact_location",
    "mlflow.tracking_uri",
    "tune.storage",
    "backbone.weights",
    "extract.compilation_cache_dir",
)


def _config_value(cfg: Config, key: str) -> str:
    section, name = key.split(".")
    return str(getattr(getattr(cfg, section), name) or "")


def _config_key_in(text: str, cfg: Config) -> str | None:
    """The config key whose path appears in an error's text, if any."""
    for key in _PATH_KEYS:
        if any(c in text for c in _path_forms(_config_value(cfg, key))):
            return key
    return None


def _path_forms(value: str) -> set[str]:
    """A configured location as written and, for local paths, made absolute."""
    value = value.removeprefix("sqlite:///")
    if not value or value in {"imagenet", "none", "hed-bsds500"}:
        return set()
    forms = {value.rstrip("/")}
    if "://" not in value:
        forms.add(str(Path(value).expanduser().resolve()))
    return forms


def _config_key_of(path: str, cfg: Config) -> str | None:
    """The config key whose value holds `path` (as given or resolved), if any."""
    for key in _PATH_KEYS:
        if any(path == c or path.startswith(c + "/") for c in _path_forms(_config_value(cfg, key))):
            return key
    return None
