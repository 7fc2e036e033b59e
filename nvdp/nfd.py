"""The NFD local feature file: where the sharing labels of `nvdp.core.plan.labels` reach node-feature-discovery."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from nvdp.core.plan.labels import render_features


def write_features_file(path: Path, labels: dict[str, str]) -> bool:
    """Replace `path` with `labels`, atomically: a temporary file in the same directory, fsync'ed, renamed over.
    Returns False (and writes nothing) when the file already holds exactly these labels, so the NFD worker sees no
    churn from a reload that changed nothing it publishes. Creates the directory if needed.

    The temporary name starts with a dot: NFD's local source skips hidden files, so it never reads a partial one.
    Blocking I/O: call it through `trio.to_thread.run_sync`.
    """
    content = render_features(labels)
    try:
        if path.read_text() == content:
            return False
    except (FileNotFoundError, UnicodeDecodeError):
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as file:
            file.write(content)
            file.flush()
            os.fsync(file.fileno())
        # NFD runs as another user on some hosts; mkstemp's 0600 would hide the labels from it.
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return True
