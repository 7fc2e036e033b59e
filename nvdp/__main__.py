"""`python -m nvdp` and the `nvdp` console script."""

import contextlib
import gc
import logging
import os
import signal
import sys
from types import FrameType
from typing import NoReturn


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
    from nvdp.cli import main as cli_main

    gc.freeze()
    gc.enable()
    _leave(cli_main())


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
