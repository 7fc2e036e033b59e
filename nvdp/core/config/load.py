"""Reading a config file into `nvdp.core.config.schema.Config`."""

from __future__ import annotations

from pathlib import Path

import msgspec
import yaml

from nvdp.core.config.errors import ConfigError
from nvdp.core.config.schema import Config

# msgspec reports e.g. "Expected `str`, got `bool` - at `$.flags.migStrategy`".
_BOOL_HINT = " (YAML reads yes/no/on/off/y/n as booleans: quote the value)"


def parse_config(text: str | bytes, source: str) -> Config:
    """Parse YAML (or JSON) text. An empty document means every default, as upstream."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from None
    except RecursionError:
        raise ConfigError(f"{source}: not a config: the document is nested too deeply") from None
    if data is None:
        return Config()
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
    try:
        return msgspec.convert(data, Config, str_keys=True)
    except msgspec.ValidationError as exc:
        message = str(exc)
        where = ""
        if " - at `" in message:
            message, _, where = message.partition(" - at `")
            where = where.rstrip("`")
        if "got `bool`" in message and "`str" in message:
            message += _BOOL_HINT
        return _raise(source, where, message)


def _raise(source: str, where: str, message: str) -> Config:
    location = f"{source}: {where}" if where else source
    raise ConfigError(f"{location}: {message[0].lower()}{message[1:]}")


def load_config_file(path: Path) -> Config:
    try:
        text = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc.strerror or exc}") from None
    return parse_config(text, str(path))
