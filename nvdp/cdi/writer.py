"""Write CDI spec files the way a runtime can always read them, and remove the ones nvdp no longer wants.

* Atomic: a temporary file in the same directory (a dot-name without `.json`, which runtimes ignore), written,
  fsynced, chmod 0644, renamed over the target, then the directory fsynced. A runtime sees the old spec or the new
  one, never half of one.
* Unchanged content is not rewritten: runtimes refresh their caches on every file event.
* nvdp removes only files it owns: names starting with its prefix (`k8s.device-plugin.nvidia.com-` for the device
  plugin), and its own leftover temporary files.
* Stale files go first, so that two of nvdp's files never define the same device (a runtime drops both).

Blocking I/O runs in a worker thread, bounded by `WRITE_TIMEOUT_S`; every OS error becomes `CdiError` naming the file.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import trio

from nvdp.cdi import CdiError
from nvdp.core.cdi.spec import CdiSpecError, Spec, render

#: A spec file larger than this is not read back for comparison (nvdp's are a few hundred KiB at most): rewritten.
COMPARE_MAX_BYTES = 16 << 20
WRITE_TIMEOUT_S = 30.0
_TMP_SUFFIX = ".nvdp-tmp"


@dataclass(frozen=True, slots=True)
class SyncResult:
    written: tuple[str, ...] = ()
    unchanged: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    #: (file, why) for files that could not be removed.
    failed_removals: tuple[tuple[str, str], ...] = field(default_factory=tuple)


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc)


def _same_content(path: Path, text: bytes) -> bool:
    try:
        with path.open("rb") as f:
            return f.read(COMPARE_MAX_BYTES + 1) == text
    except OSError:
        return False


def write_file(directory: Path, name: str, text: str) -> bool:
    """Atomically write `directory/name` (mode 0644) unless it already holds `text`; True when written."""
    data = text.encode()
    target = directory / name
    if _same_content(target, data):
        return False
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=0o755)
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=_TMP_SUFFIX, dir=directory)
    except OSError as exc:
        raise CdiError(f"cannot write CDI spec {target}: {_reason(exc)}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
            os.fchmod(f.fileno(), 0o644)
        os.replace(tmp, target)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise CdiError(f"cannot write CDI spec {target}: {_reason(exc)}") from None
    _fsync_dir(directory)
    return True


def _fsync_dir(directory: Path) -> None:
    # The rename is durable only once the directory is; /var/run/cdi is usually tmpfs, where this is free.
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def remove_file(directory: Path, name: str) -> bool:
    """Remove `directory/name`; True when it existed."""
    try:
        os.unlink(directory / name)
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise CdiError(f"cannot remove CDI spec {directory / name}: {_reason(exc)}") from None
    return True


def owned_files(directory: Path, prefix: str) -> list[str]:
    """Spec files (and leftover temporary files) in `directory` whose names start with `prefix`."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise CdiError(f"cannot list the CDI directory {directory}: {_reason(exc)}") from None
    spec = [n for n in names if n.startswith(prefix) and n.endswith((".json", ".yaml"))]
    leftovers = [n for n in names if n.startswith(f".{prefix}") and n.endswith(_TMP_SUFFIX)]
    return sorted(spec + leftovers)


def render_all(specs: Mapping[str, Spec]) -> dict[str, str]:
    """Each spec's text; refuses a set in which one qualified device name appears twice."""
    seen: dict[str, str] = {}
    texts = {}
    for name, spec in specs.items():
        for qualified in spec.qualified_names:
            if qualified in seen:
                raise CdiError(f"CDI device {qualified} would be defined in both {seen[qualified]} and {name}")
            seen[qualified] = name
        try:
            texts[name] = render(spec)
        except CdiSpecError as exc:
            raise CdiError(f"CDI spec {name} is invalid: {exc}") from None
    return texts


def sync_files(directory: Path, texts: Mapping[str, str], prefix: str) -> SyncResult:
    """Make nvdp's files in `directory` (names starting with `prefix`) exactly `texts`: stale ones removed first,
    then each wanted one written unless unchanged."""
    for name in texts:
        if not name.startswith(prefix) or "/" in name:
            raise CdiError(f"CDI spec file name {name!r} is not one of nvdp's ({prefix}*)")
    removed: list[str] = []
    failed: list[tuple[str, str]] = []
    for name in owned_files(directory, prefix):
        if name in texts:
            continue
        try:
            if remove_file(directory, name):
                removed.append(name)
        except CdiError as exc:
            failed.append((name, str(exc)))
    written: list[str] = []
    unchanged: list[str] = []
    for name, text in texts.items():
        (written if write_file(directory, name, text) else unchanged).append(name)
    return SyncResult(tuple(written), tuple(unchanged), tuple(removed), tuple(failed))


async def sync_specs(directory: Path, specs: Mapping[str, Spec], prefix: str) -> SyncResult:
    """`sync_files` for rendered `specs`, off the event loop and bounded by `WRITE_TIMEOUT_S`."""
    texts = render_all(specs)
    try:
        with trio.fail_after(WRITE_TIMEOUT_S):
            return await trio.to_thread.run_sync(sync_files, directory, texts, prefix, abandon_on_cancel=True)
    except trio.TooSlowError:
        raise CdiError(f"writing CDI specs to {directory} took longer than {WRITE_TIMEOUT_S:.0f} s") from None


async def write_spec(directory: Path, name: str, spec: Spec) -> bool:
    """One spec file (DRA's per-claim specs), atomically, unless unchanged; True when written."""
    text = render_all({name: spec})[name]
    try:
        with trio.fail_after(WRITE_TIMEOUT_S):
            return await trio.to_thread.run_sync(write_file, directory, name, text, abandon_on_cancel=True)
    except trio.TooSlowError:
        raise CdiError(f"writing CDI spec {directory / name} took longer than {WRITE_TIMEOUT_S:.0f} s") from None


async def remove_spec(directory: Path, name: str) -> bool:
    """Remove one spec file (DRA's Unprepare); True when it existed."""
    try:
        with trio.fail_after(WRITE_TIMEOUT_S):
            return await trio.to_thread.run_sync(remove_file, directory, name, abandon_on_cancel=True)
    except trio.TooSlowError:
        raise CdiError(f"removing CDI spec {directory / name} took longer than {WRITE_TIMEOUT_S:.0f} s") from None
