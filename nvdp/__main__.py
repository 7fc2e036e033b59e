"""`python -m nvdp` and the `nvdp` console script."""

import contextlib
import gc
import importlib.util
import logging
import os
import re
import signal
import sys
import threading
import types
from types import FrameType
from typing import NoReturn

#: Imported as on a Python built without `ssl`, which both support (`ssl = None`, TLS refused): they carry nvdp's
#: gRPC, and that only ever runs over the kubelet's Unix sockets. asyncio reads `ssl` attributes at import
#: (`asyncio.sslproto`) and grpclib's channel on every construction, so deferring `ssl` alone would not keep
#: OpenSSL out.
WITHOUT_TLS = ("asyncio", "grpclib.client")
#: What trio imports at `import trio` (`trio._ssl`, `trio._highlevel_ssl_helpers`, `trio._dtls`) and reads only
#: inside the functions that use them: their code (OpenSSL's initialisation, libcrypto and libssl mapped: ~5.6 MiB
#: and ~5 ms) runs at the first use of one of their names, e.g. when the Kubernetes API client makes its TLS context.
DEFERRED = ("ssl", "hmac")


def _exit_before_start(signum: int, frame: FrameType | None) -> None:
    # Nothing exists yet (no socket, no child, no NVML session): leaving at once is the orderly exit.
    os._exit(0)


def main() -> NoReturn:
    """The process's entry point (`python -m nvdp`, the `nvdp` script): it does not return."""
    # Importing nvdp takes a few hundred ms; until the daemon's own signal watcher takes over (its first act),
    # SIGTERM and SIGINT must still end in exit 0, not in death by signal.
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _exit_before_start)
    # Importing creates many objects and no garbage worth collecting: the cyclic collector's passes over them cost
    # ~8 % of start-up. Collected from here on; what the imports made is frozen out of every later pass.
    gc.disable()
    import_lean()
    from nvdp.cli import main as cli_main

    gc.freeze()
    gc.enable()
    _leave(cli_main())


def import_lean() -> None:
    """Keep what no configuration of the daemon uses out of its start-up (docs/performance.md, "Start-up, shutdown
    and memory"): `WITHOUT_TLS` imported without `ssl`, `DEFERRED` run on first use, betterproto2's version read
    without `importlib.metadata`. Only `python -m nvdp` does this, before anything else is imported; a module
    already imported is left as it is."""
    for name in DEFERRED:
        if name not in sys.modules:
            sys.modules[name] = _deferred_module(name)
    _import_without(WITHOUT_TLS, "ssl")
    _import_betterproto2()


class _Deferred(types.ModuleType):
    """A module whose code has not run yet: it runs, in this same module object (so every importer holds the real
    module), when any attribute but `__spec__` is read. `import` itself reads only `__spec__`, which is why
    `importlib.util.LazyLoader` cannot be used here: on Python 3.11 that read already runs the module."""

    def __getattribute__(self, name: str) -> object:
        if name == "__spec__":
            return super().__getattribute__(name)
        spec = super().__getattribute__("__spec__")
        with spec.loader_state:
            if type(self) is _Deferred:  # not run by another thread meanwhile
                self.__class__ = types.ModuleType  # type: ignore[assignment]
                spec.loader.exec_module(self)
        return getattr(self, name)


def _deferred_module(name: str) -> types.ModuleType:
    spec = importlib.util.find_spec(name)
    assert spec is not None and spec.loader is not None, name
    spec.loader_state = threading.RLock()
    module = importlib.util.module_from_spec(spec)
    module.__class__ = _Deferred
    return module


def _import_without(names: tuple[str, ...], missing: str) -> None:
    """Import `names` as if `missing` were not installed (a None entry in sys.modules makes `import` raise
    ImportError), then make `missing` importable again."""
    if all(name in sys.modules for name in names):
        return
    held = sys.modules.get(missing)
    sys.modules[missing] = None  # type: ignore[assignment]
    try:
        for name in names:
            importlib.import_module(name)
    finally:
        if held is None:
            del sys.modules[missing]
        else:
            sys.modules[missing] = held


def _import_betterproto2() -> None:
    """betterproto2 sets `__version__` from `importlib.metadata.version("betterproto2")` at import, and
    `importlib.metadata` brings `email`, `zipfile` and `csv` (~5 ms, ~1.4 MiB). For that one import it gets a stand-in
    whose `version()` reads the same `Version:` line from the first `betterproto2-*.dist-info/METADATA` on
    `sys.path` (where importlib.metadata finds it too), and defers to the real module for any other layout."""
    if "betterproto2" in sys.modules or "importlib.metadata" in sys.modules:
        return
    stand_in = types.ModuleType("importlib.metadata")
    stand_in.version = _dist_version  # type: ignore[attr-defined]
    sys.modules["importlib.metadata"] = stand_in
    try:
        importlib.import_module("betterproto2")
    finally:
        if sys.modules.get("importlib.metadata") is stand_in:
            del sys.modules["importlib.metadata"]


def _dist_version(name: str) -> str:
    wanted = _normalize(name)
    for entry in sys.path:
        try:
            names = os.listdir(entry or ".")
        except OSError:
            continue
        found = [n for n in names if n.endswith(".dist-info") and _normalize(n.partition("-")[0]) == wanted]
        if len(found) == 1:
            read = _metadata_version(os.path.join(entry or ".", found[0], "METADATA"))
            if read is not None:
                return read
        if found or any(n.endswith(".egg-info") and _normalize(n.partition("-")[0]) == wanted for n in names):
            break
    # Some other layout: the real module answers.
    if getattr(sys.modules.get("importlib.metadata"), "version", None) is _dist_version:
        del sys.modules["importlib.metadata"]
    from importlib import metadata

    return metadata.version(name)


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def _metadata_version(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.startswith("Version:"):
                    return line.partition(":")[2].strip()
                if not line.strip():  # the headers end at the first empty line
                    return None
    except OSError:
        return None
    return None


def _leave(code: int) -> NoReturn:
    """Exit without the interpreter's teardown. By now the command has released everything it owns, in order (the
    daemon: sockets removed, MPS daemons stopped or left to the MPS host, NVML shut down or handed to the one
    abandoned event-wait thread still inside it); the teardown would only free every object one by one and join
    nothing that matters, which took 30-90 ms of every SIGTERM -> exit on 2 cores. Output is flushed first."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
