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

Compatibility (issue 15): where upstream (v0.14 to v0.20) or the nebuly fork accepts a config, nvdp accepts it too
and serves the meaning that project gives it; each difference is a `ConfigWarning` (file, key path, what nvdp does)
instead of an error. `parse_config_with_warnings` returns both; `parse_config` returns the config with its warnings
attached (`config_warnings`), so every existing caller gets the lenient result and `resolve()` can turn warnings
into errors under `--strict-config`. What no project accepts (YAML garbage, a wrong type, a duplicate key) stays a
`ConfigError`. See docs/compatibility.md, "Config warnings".

Time bounds and leaving the event loop are the callers' part (`nvdp.cli` for the static file,
`nvdp.node_config.sources` for the config directory): this module is the pure core and has no threads.
"""

from __future__ import annotations

import functools
import os
import re
import stat
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import msgspec

from nvdp.core.config.errors import ConfigError
from nvdp.core.config.schema import Config
from nvdp.core.config.sharing import _check_devices

if TYPE_CHECKING:
    import yaml

#: Largest config accepted, in bytes: a ConfigMap's limit (its whole data, so no key can be larger).
MAX_CONFIG_BYTES = 1 << 20

# msgspec reports e.g. "Expected `str`, got `bool` - at `$.flags.migStrategy`".
_BOOL_HINT = " (YAML reads yes/no/on/off/y/n as booleans: quote the value)"
#: What a config key looks like; anything else named in an error is replaced (it may be a line of /etc/shadow).
_KEY_LIKE = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,63}$")
_UNKNOWN_FIELD = re.compile(r"unknown field `([^`]*)`")
#: A quoted word in a YAML problem description (an alias or tag name, say; not "',' or ']'").
_QUOTED = re.compile(r"'[^'\s]{2,}'|\"[^\"\s]{2,}\"")

_MERGE_TAG = "tag:yaml.org,2002:merge"


class _DuplicateKey(Exception):
    def __init__(self, key: str, first_line: int, line: int) -> None:
        super().__init__(key)
        self.key, self.first_line, self.line = key, first_line, line


@functools.cache
def _loader() -> Any:
    """The YAML loader class, built on first use: PyYAML is imported only when a config is parsed, so a node that
    has no config file never pays for it at start-up."""
    import yaml

    base = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

    class Loader(base):  # type: ignore[misc,valid-type]
        """A safe loader (libyaml's where available) that refuses a key given twice in one mapping: YAML says
        keys are unique, and PyYAML's silent last-one-wins would serve half of what the user wrote. Merge keys
        (`<<`) may still be overridden, as YAML intends."""

        def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
            seen: dict[tuple[str, str], int] = {}
            for key_node, _ in node.value:
                if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == _MERGE_TAG:
                    continue
                key = (key_node.tag, key_node.value)
                line = key_node.start_mark.line + 1
                if key in seen:
                    raise _DuplicateKey(key_node.value, seen[key], line)
                seen[key] = line
            mapping: dict[Any, Any] = super().construct_mapping(node, deep=deep)
            return mapping

    return Loader


@dataclass(frozen=True, slots=True)
class ConfigWarning:
    """A config that upstream or the fork accepts, which nvdp serves with that project's meaning, and how."""

    #: The file (or `<dir>/<name>`, `ConfigMap ns/name key`) as given to the parser.
    source: str
    #: The key path, as in errors: `$.sharing.timeSlicing.resources[0].devices`.
    path: str
    #: What differs and what nvdp does about it.
    message: str

    def __str__(self) -> str:
        return f"{self.source}: {self.path}: {self.message}"


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
    """Parse YAML (or JSON) text. An empty document means every default, as upstream. The config's warnings are
    attached to it: `config_warnings(config)`."""
    config, _ = parse_config_with_warnings(text, source)
    return config


def parse_config_with_warnings(text: str | bytes, source: str) -> tuple[Config, tuple[ConfigWarning, ...]]:
    """Parse YAML (or JSON) text into the config nvdp serves and the warnings about it (in document order).

    Raises `ConfigError` for what no project accepts. The warnings are also attached to the config
    (`config_warnings`), so that `resolve()` can report them and refuse them under `--strict-config`."""
    size = len(text.encode() if isinstance(text, str) else text)
    if size > MAX_CONFIG_BYTES:
        raise _size_error(source, size)
    import yaml

    try:
        data = yaml.load(text, Loader=_loader())  # a safe loader: libyaml's or PyYAML's
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {yaml_problem(exc)}") from None
    except _DuplicateKey as dup:
        raise ConfigError(f"{source}: line {dup.line}: duplicate key {_show_key(dup.key)} (first given at line "
                          f"{dup.first_line}): a key may appear once in a mapping; remove one of them") from None
    except RecursionError:
        raise ConfigError(f"{source}: not a config: the document is nested too deeply") from None
    if data is None:
        return _with_warnings(Config(), ()), ()
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
    warnings: list[ConfigWarning] = []
    _upstream_meaning(data, source, warnings.append)
    try:
        config = msgspec.convert(data, Config, str_keys=True)
    except msgspec.ValidationError as exc:
        message = _UNKNOWN_FIELD.sub(_unknown_field, str(exc))
        where = ""
        if " - at `" in message:
            message, _, where = message.partition(" - at `")
            where = where.rstrip("`")
        if "got `bool`" in message and "`str" in message:
            message += _BOOL_HINT
        near = [w for w in warnings if w.path.startswith(f"${where.removeprefix('$')}")]
        if near:
            # `replica: 2` for `replicas`: the error is that replicas is missing; the ignored key says why.
            message += "; note: " + "; ".join(f"{w.path}: {w.message}" for w in near[:3])
        _raise(source, where, message)
    found = tuple(warnings)
    return _with_warnings(config, found), found


def config_warnings(config: Config) -> tuple[ConfigWarning, ...]:
    """The warnings `parse_config` found in the file `config` came from (none for a config built in code)."""
    found: tuple[ConfigWarning, ...] = config.__dict__.get("_warnings", ())
    return found


def _with_warnings(config: Config, warnings: tuple[ConfigWarning, ...]) -> Config:
    config.__dict__["_warnings"] = warnings
    return config


def load_config_file_with_warnings(path: Path) -> tuple[Config, tuple[ConfigWarning, ...]]:
    """`read_config_bytes` and `parse_config_with_warnings`."""
    return parse_config_with_warnings(read_config_bytes(path), str(path))


# -- what upstream and the fork accept, served with their meaning ------------------------------------------------

Warn = Callable[[ConfigWarning], None]


def _show_key(key: object) -> str:
    text = str(key)
    return f"`{text}`" if _KEY_LIKE.match(text) else f"`<{len(text)} characters, not shown: not a config key>`"


def _struct_type(annotation: Any) -> tuple[str, Any] | None:
    """("struct", cls) or ("list", cls) for a field holding a Struct or a list of them, else None."""
    for arg in (typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)):
        if isinstance(arg, type) and issubclass(arg, msgspec.Struct):
            return "struct", arg
        if typing.get_origin(arg) is list:
            (item,) = typing.get_args(arg) or (None,)
            if isinstance(item, type) and issubclass(item, msgspec.Struct):
                return "list", item
    return None


def _drop_unknown(data: dict[Any, Any], cls: type[msgspec.Struct], path: str, source: str, warn: Warn) -> None:
    """Upstream decodes with Go's encoding/json: a key it does not know is ignored. nvdp ignores it too, with a
    warning naming it (a misspelt `replica:` is then reported by the check that `replicas` is missing)."""
    fields = {f.encode_name: f for f in msgspec.structs.fields(cls)}
    for key in list(data):
        field = fields.get(key) if isinstance(key, str) else None
        if field is None:
            if not (isinstance(key, str) and _KEY_LIKE.match(key)):
                # Not even shaped like a key (a line of /etc/shadow, say): this file is not a config, whatever
                # Go's decoder would make of it. Refused, and never quoted.
                _raise(source, path, f"unknown field {_show_key(key)}")
            del data[key]
            warn(ConfigWarning(source, f"{path}.{key}", f"unknown key `{key}` ignored (as upstream ignores it); "
                               "check its spelling and place"))
            continue
        inner = _struct_type(field.type)
        value = data[key]
        if inner is None:
            continue
        kind, sub = inner
        if kind == "struct" and isinstance(value, dict):
            _drop_unknown(value, sub, f"{path}.{key}", source, warn)
        elif kind == "list" and isinstance(value, list):
            for i, item in enumerate(value):
                if isinstance(item, dict):
                    _drop_unknown(item, sub, f"{path}.{key}[{i}]", source, warn)


def _upstream_meaning(data: dict[Any, Any], source: str, warn: Warn) -> None:
    """Edit the decoded document, in place, into what nvdp serves, reporting each edit (see the module docstring)."""
    _drop_unknown(data, Config, "$", source, warn)
    if data.get("resources"):
        warn(ConfigWarning(source, "$.resources", "the `resources` section (renaming patterns) is ignored, as "
                           "upstream ignores it; rename shared resources with sharing.*.resources[].rename"))
    sharing = data.get("sharing")
    if not isinstance(sharing, dict):
        return
    listed: dict[str, list[Any]] = {}
    for kind in ("timeSlicing", "mps"):
        section = sharing.get(kind)
        resources = section.get("resources") if isinstance(section, dict) else None
        if not isinstance(resources, list):
            continue
        listed[kind] = resources
        for i, resource in enumerate(resources):
            if isinstance(resource, dict):
                _sharing_resource(resource, kind, f"$.sharing.{kind}.resources[{i}]", source, warn)
    if len(listed) == 2 and not all(isinstance(r, dict) and r.get("devices") not in (None, "all")
                                    for r in listed["timeSlicing"] + listed["mps"]):
        # Upstream serves mps and ignores timeSlicing. nvdp applies both only when every entry names its devices
        # (and so its own GPUs); otherwise both would claim every GPU, which no project serves.
        del sharing["timeSlicing"]
        warn(ConfigWarning(source, "$.sharing.timeSlicing", "both timeSlicing and mps are configured: upstream "
                           "serves mps and ignores timeSlicing, and so does nvdp; to use both on different GPUs, "
                           "give every entry of both a rename and its devices"))


def _sharing_resource(resource: dict[Any, Any], kind: str, path: str, source: str, warn: Warn) -> None:
    if kind == "timeSlicing":
        for key in ("memoryGB", "computePercent"):
            if key in resource:
                # Not a time-slicing key upstream: ignored there, so ignored here (time-slicing limits nothing).
                del resource[key]
                warn(ConfigWarning(source, f"{path}.{key}", f"{key} applies to sharing.mps only and is ignored "
                                   "for time-slicing (as upstream ignores it): time-slicing enforces no limits"))
    devices = resource.get("devices")
    if devices is None or devices == "all" or resource.get("rename") is not None:
        return
    if kind == "mps" and resource.get("memoryGB") is not None:
        return  # the fork's dialect: fixed-size slices of the listed GPUs
    try:
        _check_devices(devices)
    except ValueError:
        return  # refused by every project: the schema reports it
    del resource["devices"]
    warn(ConfigWarning(source, f"{path}.devices", f"devices {devices!r} without rename: upstream ignores `devices` "
                       "and shares every device, and so does nvdp; set `rename` to share only the listed devices "
                       "under their own resource name"))


def yaml_problem(exc: yaml.YAMLError) -> str:
    """What went wrong and where, without the source snippet PyYAML quotes (it may be any file's first line)."""
    import yaml.reader

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


def _raise(source: str, where: str, message: str) -> NoReturn:
    location = f"{source}: {where}" if where else source
    raise ConfigError(f"{location}: {message[0].lower()}{message[1:]}")


def load_config_file(path: Path) -> Config:
    """The file's config, its warnings attached (`config_warnings`)."""
    return parse_config(read_config_bytes(path), str(path))
