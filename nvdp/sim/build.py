"""Compiles the fake `libnvidia-ml.so.1` from the C source shipped in this package, once per source version."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import zlib
from pathlib import Path

SONAME = "libnvidia-ml.so.1"
SOURCE = "libnvidia-ml.c"
#: Beside this module: nvdp is installed as files (never zipped), so no `importlib.resources` (and its `zipfile`).
SOURCE_PATH = Path(__file__).with_name(SOURCE)

# The soname is what makes pynvml's `CDLL("libnvidia-ml.so.1")` find the already loaded fake.
_FLAGS = ("-shared", "-fPIC", "-O1", "-pthread", f"-Wl,-soname,{SONAME}")


class SimBuildError(RuntimeError):
    """The fake NVML library could not be built (no C compiler, or it failed)."""


def find_compiler() -> str:
    """`$CC`, else `cc`, else `gcc`."""
    for candidate in (os.environ.get("CC"), "cc", "gcc"):
        if candidate and shutil.which(candidate):
            return candidate
    raise SimBuildError(
        "building the simulated NVML library needs a C compiler: install gcc (e.g. `apt-get install gcc`) "
        "or point $CC at one"
    )


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "nvdp"


def _writable_dir(preferred: Path) -> Path:
    try:
        preferred.mkdir(parents=True, exist_ok=True)
        if os.access(preferred, os.W_OK | os.X_OK):
            return preferred
    except OSError:
        pass
    # Read-only homes (CI containers, distroless images) still get a per-user cache.
    fallback = Path(tempfile.gettempdir()) / f"nvdp-{os.getuid()}"
    fallback.mkdir(mode=0o700, parents=True, exist_ok=True)
    return fallback


def build_fake_nvml(cache_dir: Path | None = None) -> Path:
    """Returns the path of the compiled fake library, building it if this source version has not been built.

    A build is reused only for the same source and flags, byte for byte (kept beside it, compared on each use), so
    an edited source never reuses a stale build; concurrent builders are safe because each compiles to its own
    temporary name and renames into place. The directory's name is a CRC of them, not a cryptographic hash:
    `hashlib` maps OpenSSL's libcrypto (~3 MiB of the simulated daemon's RSS, which a real node does not pay).
    """
    source = SOURCE_PATH.read_bytes()
    built_from = source + "\0".join(_FLAGS).encode()
    key = f"{zlib.crc32(built_from):08x}{len(built_from):08x}"
    out_dir = _writable_dir(cache_dir if cache_dir is not None else default_cache_dir()) / f"fake-nvml-{key}"
    target, stamp = out_dir / SONAME, out_dir / "built-from"
    if target.is_file() and _read(stamp) == built_from:
        return target
    compiler = find_compiler()
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=".build-", suffix=".so", dir=out_dir)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        result = subprocess.run(
            [compiler, *_FLAGS, "-o", str(tmp), str(SOURCE_PATH)], capture_output=True, text=True, check=False
        )
        if result.returncode != 0:
            raise SimBuildError(f"{compiler} failed to build the simulated NVML library:\n{result.stderr.strip()}")
        tmp.replace(target)
        _write_atomically(stamp, built_from)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


def _write_atomically(path: Path, data: bytes) -> None:
    fd, tmp_name = tempfile.mkstemp(prefix=".stamp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
