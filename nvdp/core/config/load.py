"""Reading a config file into `nvdp.core.config.schema.Config`.

Bounds (issue 14, items 7 and 9), so that whatever sits at the config path cannot wedge or bloat the daemon, and
errors never quote bytes of a file that is not a config:

- `read_config_bytes` opens without blocking (a FIFO in place of the file is refused at once, not waited on),
  accepts regular files only, and reads at most `MAX_CONFIG_BYTES` (a ConfigMap's own maximum, 1 MiB; real
  configs are a few KiB): a larger file is refused without being read;
- `parse_config` refuses text above the same bound before parsing, parses with libyaml where available (about 4x
  faster than pure-Python PyYAML: a 1 MiB config in about 0.8 s instead of 3 s on the development VM), and its
  errors never quote the document: YAML errors give the problem and line/column without the source snippet, and
  an unknown key is quoted only when it looks like a config key.

Time bounds and leaving the event loop are the callers' part (`nvdp.cli` for the static file,
`nvdp.node_config.sources` for the config directory): this module is the pure core and has no threads.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

import msgspec
import yaml

from nvdp.core.config.errors import ConfigError
from nvdp.core.config.schema import Config

#: Largest config accepted, in bytes: a ConfigMap's limit (its whole data, so no key can be larger).
MAX_CONFIG_BYTES = 1 << 20

# msgspec reports e.g. "Expected `str`, got `bool` - at `$.flags.migStrategy`".
_BOOL_HINT = " (YAML reads yes/no/on/off/y/n as booleans: quote the value)"
#: What a config key looks like; anything else named in an error is replaced (it may be a line of /etc/shadow).
_KEY_LIKE = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,63}$")
_UNKNOWN_FIELD = re.compile(r"unknown field `([^`]*)`")
#: A quoted word in a YAML problem description (an alias or tag name, say; not "',' or ']'").
_QUOTED = re.compile(r"'[^'\s]{2,}'|\"[^\"\s]{2,}\"")

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _size_error(source: str, size: int) -> ConfigError:
    return ConfigError(f"{source}: config too large: {size} bytes, at most {MAX_CONFIG_BYTES} (1 MiB, as a "
                       "ConfigMap) are accepted")


def read_config_bytes(path: Path, max_bytes: int = MAX_CONFIG_BYTES) -> bytes:
    """The file's bytes, or ConfigError if it cannot be read, is not a regular file (a FIFO, a device, a
    directory) or is larger than `max_bytes`. Never blocks on a FIFO; never reads more than `max_bytes` + 1."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc.strerror or exc}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(f"{path}: not a regular file (a config must be a file, not a FIFO, device or "
                              "directory)")
        if info.st_size > max_bytes:
            raise _size_error(str(path), info.st_size)
        chunks = []
        left = max_bytes + 1
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 16))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        data = b"".join(chunks)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    if len(data) > max_bytes:
        raise _size_error(str(path), len(data))  # grew while being read
    return data


def parse_config(text: str | bytes, source: str) -> Config:
    """Parse YAML (or JSON) text. An empty document means every default, as upstream."""
    size = len(text.encode() if isinstance(text, str) else text)
    if size > MAX_CONFIG_BYTES:
        raise _size_error(source, size)
    try:
        data = yaml.load(text, Loader=_Loader)  # a safe loader: libyaml's or PyYAML's
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {yaml_problem(exc)}") from None
    except RecursionError:
        raise ConfigError(f"{source}: not a config: the document is nested too deeply") from None
    if data is None:
        return Config()
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
    try:
        return msgspec.convert(data, Config, str_keys=True)
    except msgspec.ValidationError as exc:
        message = _UNKNOWN_FIELD.sub(_unknown_field, str(exc))
        where = ""
        if " - at `" in message:
            message, _, where = message.partition(" - at `")
            where = where.rstrip("`")
        if "got `bool`" in message and "`str" in message:
            message += _BOOL_HINT
        return _raise(source, where, message)


def yaml_problem(exc: yaml.YAMLError) -> str:
    """What went wrong and where, without the source snippet PyYAML quotes (it may be any file's first line)."""
    if isinstance(exc, yaml.reader.ReaderError):
        return f"unacceptable character #x{_codepoint(exc.character):04x}: {exc.reason} (position {exc.position})"
    problem = getattr(exc, "problem", None) or getattr(exc, "context", None) or type(exc).__name__
    problem = _QUOTED.sub("'...'", str(problem))[:200]
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    if mark is not None:
        return f"{problem} (line {mark.line + 1}, column {mark.column + 1})"
    return problem


def _codepoint(character: int | str | bytes) -> int:
    if isinstance(character, int):
        return character
    return ord(character[:1]) if character else 0


def _unknown_field(match: re.Match[str]) -> str:
    name = match.group(1)
    if _KEY_LIKE.match(name):
        return match.group(0)
    return f"unknown field `<{len(name)} characters, not shown: not a config key>`"


def _raise(source: str, where: str, message: str) -> Config:
    location = f"{source}: {where}" if where else source
    raise ConfigError(f"{location}: {message[0].lower()}{message[1:]}")


def load_config_file(path: Path) -> Config:
    return parse_config(read_config_bytes(path), str(path))
