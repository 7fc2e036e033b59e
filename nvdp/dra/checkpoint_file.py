"""The DRA checkpoint on disk: read once at start, written whole and atomically on every change.

A write goes to a temporary file beside the checkpoint, is fsync'ed, renamed over it and the directory fsync'ed,
so a crash or power cut leaves the old checkpoint or the new one, never half of either. Writes run on the trio
thread: the file is small (bounded by `MAX_BYTES`), each write is one fsync, and a write that cannot be
interrupted by cancellation keeps "started" and "completed" in the order the preparer wrote them.

Reading never fails the daemon: a missing file is an empty checkpoint; a file that cannot be read or parsed, is
larger than the bound or has another format version is logged, moved aside to `<name>.corrupt` (replacing an
older one, so at most one is kept) and treated as empty. Claims it held are then unknown: their CDI specs are
removed as orphans and the kubelet's next Prepare prepares them again.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from nvdp.core.dra.checkpoint import Checkpoint, CheckpointFormatError, decode, encode

log = logging.getLogger(__name__)

#: The largest checkpoint nvdp reads or writes. A claim with 32 devices is ~10 KiB, so this is hundreds of claims
#: more than a node can hold; a bigger file is not one nvdp wrote.
MAX_BYTES = 4 << 20


class CheckpointWriteError(Exception):
    """The checkpoint could not be written; the claim being prepared or unprepared fails with this message."""


class CheckpointFile:
    def __init__(self, path: Path, max_bytes: int = MAX_BYTES) -> None:
        self.path = path
        self.max_bytes = max_bytes

    def __repr__(self) -> str:
        return f"CheckpointFile({str(self.path)!r})"

    @property
    def aside_path(self) -> Path:
        return self.path.with_name(self.path.name + ".corrupt")

    def load(self) -> Checkpoint | None:
        """The checkpoint on disk, or None when there is none (missing, or unusable and moved aside)."""
        try:
            with open(self.path, "rb") as f:
                data = f.read(self.max_bytes + 1)
        except FileNotFoundError:
            return None
        except OSError as e:
            self._set_aside(f"cannot be read ({e})")
            return None
        if len(data) > self.max_bytes:
            self._set_aside(f"is larger than {self.max_bytes} bytes")
            return None
        try:
            return decode(data)
        except CheckpointFormatError as e:
            self._set_aside(str(e))
            return None

    def _set_aside(self, why: str) -> None:
        try:
            os.replace(self.path, self.aside_path)
        except OSError as e:
            log.error("DRA checkpoint %s %s, and cannot be moved aside (%s); starting with an empty checkpoint",
                      self.path, why, e)
            return
        log.error("DRA checkpoint %s %s; moved it to %s and starting with an empty checkpoint (claims it held "
                  "will be prepared again)", self.path, why, self.aside_path)

    def save(self, checkpoint: Checkpoint) -> None:
        """Replace the checkpoint atomically; `CheckpointWriteError` if it cannot be written."""
        data = encode(checkpoint)
        if len(data) > self.max_bytes:
            raise CheckpointWriteError(
                f"checkpoint would be {len(data)} bytes, over the bound of {self.max_bytes}")
        temporary = self.path.with_name(f".{self.path.name}.tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(temporary, self.path)
            directory = os.open(self.path.parent, os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.fsync(directory)
            finally:
                os.close(directory)
        except OSError as e:
            raise CheckpointWriteError(f"cannot write the checkpoint {self.path}: {e}") from e
