"""`python -m nvdp` and the `nvdp` console script."""

import os
import signal
import sys
from types import FrameType


def _exit_before_start(signum: int, frame: FrameType | None) -> None:
    # Nothing exists yet (no socket, no child, no NVML session): leaving at once is the orderly exit.
    os._exit(0)


def main() -> int:
    # Importing nvdp takes a few hundred ms; until the daemon's own signal watcher takes over (its first act),
    # SIGTERM and SIGINT must still end in exit 0, not in death by signal.
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _exit_before_start)
    from nvdp.cli import main as cli_main

    return cli_main()


if __name__ == "__main__":
    sys.exit(main())
