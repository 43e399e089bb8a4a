"""Configs in and out: defaults <- YAML file(s) <- ``a.b=value`` overrides -> a validated
Config (emotr.config, the schema); errors that name the key; the config as YAML and flat params.
"""

from __future__ import annotations

import difflib
from importlib.resources import files
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from emotr.config import Config, ConfigError

# Shipped inside the package, so that a wheel (`pip install .`, the Docker image) finds it too;
# conf/default.yaml is the user-facing copy of the same bytes (a unit test keeps them equal).
# Wheels install as files, so the resource is a real path that `-c` can show and load.
DEFAULT_CONFIG = Path(str(files("emotr").joinpath("default.yaml")))


def load_config(
    files: list[str | Path] | None = None, overrides: list[str] | None = None
) -> Config:
    """Build the validated Config: defaults <- YAML files (in order) <- ``a.b=value`` overrides."""
    merged: dict[str, Any] = {}
    for path in files or []:
        _deep_merge(merged, _read_yaml(Path(path)))
    for item in overrides or []:
        key, value = _parse_override(item)
        _set_dotted(merged, key, value)
    try:
        return Config.model_validate(merged)
    except ValidationError as error:
        raise ConfigError(_describe(error, merged)) from None


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pass an existing file with -c")
    try:
        content = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"config file {path} is not valid YAML: {error}") from None
    if not isinstance(content, dict):
        raise ConfigError(
            f"config file {path} must hold a mapping of sections, got {type(content).__name__}"
        )
    return content


def _parse_override(item: str) -> tuple[str, Any]:
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(
            f"override {item!r} must look like section.key=value, e.g. tune.n_trials=10"
        )
    # YAML parsing gives 10 -> int, 1e-4 -> float, [a, b] -> list, null -> None, like the files do.
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def _set_dotted(target: dict[str, Any], key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    node = target
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {key}: {part} is a value, not a section")
        node = child
    node[leaf] = value


def _deep_merge(base: dict[str, Any], update: dict[str, Any]) -> None:
    for key, value in update.items():
        # search_space entries replace each other whole: merging bounds of two specs would mislead.
        if isinstance(value, dict) and isinstance(base.get(key), dict) and key != "search_space":
            _deep_merge(base[key], value)
        else:
            base[key] = value


def _describe(error: ValidationError, merged: dict[str, Any]) -> str:
    lines = []
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"]) or "config"
        if item["type"] == "extra_forbidden":
            hint = _closest_key(item["loc"])
            hint = f"did you mean {hint}? " if hint else ""
            lines.append(f"{key}: unknown key; {hint}every key is in {DEFAULT_CONFIG}")
            continue
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] != "value_error":  # our own validators already say what they got
            message += f", got {item.get('input')!r}"
        lines.append(f"{key}: {message}")
    return "invalid config:\n  " + "\n  ".join(lines)


def _closest_key(loc: tuple[int | str, ...]) -> str | None:
    """The known key nearest to a misspelled one (`tune.n_trails` -> `tune.n_trials`), if any."""
    node: Any = Config().model_dump()
    for part in loc[:-1]:
        if not isinstance(node, dict) or part not in node:
            return None  # e.g. inside a search space entry: no fixed set of keys to suggest
        node = node[part]
    if not isinstance(node, dict):
        return None
    close = difflib.get_close_matches(str(loc[-1]), list(node), n=1)
    return ".".join([*map(str, loc[:-1]), close[0]]) if close else None


def to_flat_dict(config: Config) -> dict[str, Any]:
    """The config as ``{"section.key": value}``, e.g. for logging as MLflow params."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and prefix.split(".")[-1] not in {"search_space", "baseline"}:
            for key, child in value.items():
                walk(f"{prefix}.{key}" if prefix else key, child)
        else:
            flat[prefix] = value

    walk("", config.model_dump(mode="json"))
    return flat


def to_yaml(config: Config) -> str:
    """The resolved config as YAML, logged with every run."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
