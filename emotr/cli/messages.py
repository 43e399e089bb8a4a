"""An OSError as one line a user can act on: the path or URI, and the config key it came from.

The CLI prints this instead of a traceback; `--debug` shows the traceback.
"""

from __future__ import annotations

import os
from pathlib import Path

from emotr.config import Config, configured_paths
from emotr.storage import WORKING_DIR_GONE


def describe_os_error(error: OSError, cfg: Config | None) -> str:
    """An OSError as one line naming the path or URI and the config key it came from."""
    reason = error.strerror or str(error) or type(error).__name__
    if not error.filename and _working_dir_gone():
        # Checked first: resolving the config's relative paths below would fail the same way.
        where = os.environ.get("PWD", "")
        return f"{reason}: the working directory {where} no longer exists. {WORKING_DIR_GONE}"
    paths = configured_paths(cfg) if cfg is not None else {}
    if error.filename:
        where = str(error.filename)
        key = _config_key_of(where, paths)
        text = f"{reason}: {where}"
    else:  # pyarrow's errors carry the path in their text only
        key = _config_key_in(reason, paths)
        text = f"{type(error).__name__}: {reason}"
    source = f" (from {key}={paths[key]})" if key else ""
    return f"{text}{source}; check that it exists and that this user may use it"


def _working_dir_gone() -> bool:
    try:
        os.getcwd()
    except FileNotFoundError:
        return True
    return False


def _config_key_in(text: str, paths: dict[str, str]) -> str | None:
    """The config key whose path appears in an error's text, if any."""
    for key, value in paths.items():
        if any(c in text for c in _path_forms(value)):
            return key
    return None


def _path_forms(value: str) -> set[str]:
    """A configured location as written and, for local paths, made absolute."""
    value = value.removeprefix("sqlite:///")
    if not value:
        return set()
    forms = {value.rstrip("/")}
    if "://" not in value:
        forms.add(str(Path(value).expanduser().resolve()))
    return forms


def _config_key_of(path: str, paths: dict[str, str]) -> str | None:
    """The config key whose value holds `path` (as given or resolved), if any."""
    for key, value in paths.items():
        if any(path == c or path.startswith(c + "/") for c in _path_forms(value)):
            return key
    return None
