"""The dedicated shm tmpfs that MPS clients get as /dev/shm, so that client pods need no hostIPC.

MPS clients and the MPS server exchange data through POSIX shared memory. Rather than share the host's IPC
namespace, nvdp mounts one tmpfs at `<mpsRoot>/shm` and every MPS client container gets it at /dev/shm.

`ensure_shm()` leaves an existing tmpfs alone (one nvdp mounted before a restart, or one the host provides) and
otherwise mounts one, which needs CAP_SYS_ADMIN in nvdp's mount namespace plus mount propagation to the host. Where
nvdp lacks that privilege the error says what to provide instead: the Helm chart's `mps.shmFromHost` mode, which
ships a systemd .mount unit that mounts the tmpfs on the host. Blocking: call it through `trio.to_thread`.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from nvdp.mps.errors import ShmError

log = logging.getLogger(__name__)

MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
#: Upstream's size when /proc/meminfo cannot be read (65536k).
FALLBACK_SIZE_BYTES = 64 * 1024 * 1024

_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")


@dataclass(frozen=True, slots=True)
class Mount:
    mount_point: str
    fstype: str
    source: str
    options: str


def parse_mountinfo(text: str) -> list[Mount]:
    """`/proc/<pid>/mountinfo` lines, in order (later lines are mounted later, on top of earlier ones)."""
    mounts = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if not sep or len(fields) < 6 or len(tail) < 2:
            continue
        mounts.append(Mount(
            mount_point=_unescape(fields[4]),
            fstype=tail[0],
            source=_unescape(tail[1]),
            options=tail[2] if len(tail) > 2 else "",
        ))
    return mounts


def _unescape(field: str) -> str:
    # The kernel writes space, tab, newline and backslash in paths as \040, \011, \012 and \134.
    return _OCTAL_ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field)


def mount_at(path: Path, mountinfo_text: str) -> Mount | None:
    """The mount visible at `path` if `path` is a mount point (the topmost of stacked mounts), else None."""
    target = os.path.normpath(str(path))
    found = None
    for mount in parse_mountinfo(mountinfo_text):
        if mount.mount_point == target:
            found = mount
    return found


def is_tmpfs(path: Path, mountinfo: Path = Path("/proc/self/mountinfo")) -> bool:
    mount = mount_at(path.resolve(), mountinfo.read_text())
    return mount is not None and mount.fstype == "tmpfs"


def default_size_bytes(meminfo_text: str) -> int:
    """Half of MemTotal, as upstream sizes its shm tmpfs."""
    for line in meminfo_text.splitlines():
        name, _, value = line.partition(":")
        if name == "MemTotal":
            amount, *unit = value.split()
            scale = {"kB": 1024, "mB": 1024**2, "gB": 1024**3}.get(unit[0] if unit else "", 1)
            return int(amount) * scale // 2
    return FALLBACK_SIZE_BYTES


def _mount(source: str, target: str, fstype: str, flags: int, data: str) -> None:
    """mount(2); raises OSError. A seam for tests."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mount(source.encode(), target.encode(), fstype.encode(), ctypes.c_ulong(flags), data.encode()) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), target)


def ensure_shm(
    path: Path,
    size_bytes: int | None = None,
    *,
    mountinfo: Path = Path("/proc/self/mountinfo"),
    meminfo: Path = Path("/proc/meminfo"),
) -> bool:
    """Make sure a tmpfs is mounted at `path`; True when this call mounted it, False when one was there already."""
    path = Path(os.path.abspath(path))
    existing = mount_at(path.resolve() if path.exists() else path, mountinfo.read_text())
    if existing is not None:
        if existing.fstype == "tmpfs":
            log.info("MPS shm: a tmpfs is already mounted at %s (%s); using it", path, existing.options)
            return False
        # Mounting over it would hide whatever the host meant to provide there.
        raise ShmError(f"MPS shm: {path} is a {existing.fstype} mount, not a tmpfs; unmount it or mount a tmpfs "
                       "there (the Helm chart's mps.shmFromHost mode ships a systemd .mount unit for this)")
    if size_bytes is None:
        try:
            size_bytes = default_size_bytes(meminfo.read_text())
        except OSError:
            size_bytes = FALLBACK_SIZE_BYTES
    if size_bytes <= 0:
        raise ShmError(f"MPS shm: the size must be positive, got {size_bytes} bytes")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ShmError(f"MPS shm: cannot create {path}: {exc.strerror or exc}") from None
    # mode=1777 as /dev/shm has it: clients of any UID create their segments there.
    options = f"size={size_bytes},mode=1777"
    try:
        _mount("tmpfs", str(path), "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, options)
    except OSError as exc:
        if exc.errno in (errno.EPERM, errno.EACCES):
            raise ShmError(
                f"MPS shm: not permitted to mount a tmpfs at {path}. Either give nvdp CAP_SYS_ADMIN (and mount "
                f"propagation to the host for that path), or provide a tmpfs mounted at {path} on the host: the "
                "Helm chart's mps.shmFromHost mode ships a systemd .mount unit for this") from None
        raise ShmError(f"MPS shm: mounting a tmpfs at {path} failed: {exc.strerror or exc}") from None
    log.info("MPS shm: mounted a tmpfs of %d MiB at %s (rw,nosuid,nodev,noexec)", size_bytes // 2**20, path)
    return True
