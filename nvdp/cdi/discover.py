"""Scan the driver root and the dev root into `DriverFiles`, the way NVIDIA's spec generator looks (docs/cdi.md).

Blocking file-system work: `scan_driver_files` runs in a worker thread (`discover_driver_files`). Every read is
bounded: the ld.so.cache (`LDCACHE_MAX_BYTES`), directory listings (`MAX_DIR_ENTRIES`), symlink chains
(`MAX_SYMLINK_HOPS`), small proc and sysfs files (`SMALL_FILE_MAX_BYTES`). Nothing found is never an error: what is
missing is left out of the specs and noted.
"""

from __future__ import annotations

import fnmatch
import os
import posixpath
import stat
from dataclasses import dataclass
from pathlib import Path

import trio

from nvdp.core.cdi import ldcache
from nvdp.core.cdi.build import IMEX_CHANNEL_DIR, DriverFiles, Library, NodeInfo, sysfs_pci_address
from nvdp.core.inventory import NodeInventory

LDCACHE_MAX_BYTES = 32 << 20
MAX_DIR_ENTRIES = 20_000
MAX_SYMLINK_HOPS = 40
SMALL_FILE_MAX_BYTES = 64 << 10
#: How long one scan may take before the caller gives up on it (a hung NFS driver root must not hold a reload).
SCAN_TIMEOUT_S = 30.0

CONTROL_NODES = ("/dev/nvidia-modeset", "/dev/nvidia-uvm-tools", "/dev/nvidia-uvm", "/dev/nvidiactl")
#: Where NVIDIA's generator looks for libcuda first, before the ld.so.cache (container paths).
LIBRARY_SEARCH_DIRS = (
    "/", "/usr/lib64", "/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu",
    "/usr/lib/x86_64-linux-gnu/nvidia/current", "/usr/lib/aarch64-linux-gnu/nvidia/current", "/lib64",
    "/lib/x86_64-linux-gnu", "/lib/aarch64-linux-gnu", "/lib/x86_64-linux-gnu/nvidia/current",
    "/lib/aarch64-linux-gnu/nvidia/current",
)
BINARIES = ("nvidia-smi", "nvidia-debugdump", "nvidia-persistenced", "nvidia-cuda-mps-control",
            "nvidia-cuda-mps-server", "nvidia-imex", "nvidia-imex-ctl")
BINARY_DIRS = ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin")
IPC_SOCKETS = ("nvidia-persistenced/socket", "nvidia-fabricmanager/socket")


@dataclass(frozen=True, slots=True)
class ScanRoots:
    """Where to look, as this process sees the node. `driver_root`/`dev_root` are what the specs' host paths are
    rewritten from (to `--nvidia-driver-root`/`--nvidia-dev-root`)."""

    driver_root: Path
    dev_root: Path
    #: sysfs (DRM nodes of a GPU) and procfs (/proc/devices) roots; "/" but on a simulated node.
    sys_root: Path = Path("/")
    proc_root: Path = Path("/")
    #: On a simulated node device nodes may be plain files holding "major:minor".
    plain_file_nodes: bool = False
    kernel_release: str = ""


def choose_roots(container_driver_root: Path, driver_root: Path, dev_root: Path) -> tuple[ScanRoots, str]:
    """Upstream's layout: the host's driver root mounted at `--container-driver-root` (its /dev used when it has
    one). Without that mount (nvdp on the host, or a chart that mounts the driver root at its own path) nvdp looks
    at `--nvidia-driver-root` / `--nvidia-dev-root` themselves and nothing needs moving. Returns the roots and a
    sentence saying which was chosen."""
    release = os.uname().release
    if container_driver_root.is_dir() and container_driver_root != driver_root:
        scan_dev = container_driver_root if (container_driver_root / "dev").is_dir() else Path("/")
        return (ScanRoots(container_driver_root, scan_dev, kernel_release=release),
                f"driver files from {container_driver_root} (the host's {driver_root}), device nodes from "
                f"{scan_dev} (the host's {dev_root})")
    return (ScanRoots(driver_root, dev_root, kernel_release=release),
            f"driver files from {driver_root}, device nodes from {dev_root} ({container_driver_root} does not exist)")


def _under(root: Path, path: str) -> Path:
    return root / path.lstrip("/")


def _resolve(root: Path, path: str) -> str | None:
    """`path` (a container path) with its symlinks followed inside `root`, as a container path; None when missing
    or the chain is too long."""
    parts = [p for p in path.split("/") if p]
    done: list[str] = []
    hops = 0
    while parts:
        part = parts.pop(0)
        if part == "..":
            if done:
                done.pop()
            continue
        if part == ".":
            continue
        candidate = _under(root, "/".join([*done, part]))
        try:
            if candidate.is_symlink():
                hops += 1
                if hops > MAX_SYMLINK_HOPS:
                    return None
                target = os.readlink(candidate)
                if target.startswith("/"):
                    done = []
                parts = [p for p in target.split("/") if p] + parts
                continue
            if not candidate.exists():
                return None
        except OSError:
            return None
        done.append(part)
    return "/" + "/".join(done)


def _listdir(path: Path) -> list[str]:
    try:
        with os.scandir(path) as it:
            names = []
            for entry in it:
                names.append(entry.name)
                if len(names) >= MAX_DIR_ENTRIES:
                    break
    except OSError:
        return []
    return sorted(names)


def _read_small(path: Path) -> str | None:
    try:
        with path.open("rb") as f:
            return f.read(SMALL_FILE_MAX_BYTES).decode("utf-8", "replace")
    except OSError:
        return None


def _node(roots: ScanRoots, path: str) -> NodeInfo | None:
    """A character device at `path` under the dev root, or (simulated node) a plain file saying "major:minor"."""
    full = _under(roots.dev_root, path)
    try:
        st = full.stat()
    except OSError:
        return None
    if stat.S_ISCHR(st.st_mode):
        return NodeInfo(path, os.major(st.st_rdev), os.minor(st.st_rdev), stat.S_IMODE(st.st_mode), st.st_gid)
    if roots.plain_file_nodes and stat.S_ISREG(st.st_mode):
        text = (_read_small(full) or "").strip()
        major, sep, minor = text.partition(":")
        if sep and major.isdigit() and minor.isdigit():
            return NodeInfo(path, int(major), int(minor), stat.S_IMODE(st.st_mode), st.st_gid)
    return None


def _nodes_matching(roots: ScanRoots, directory: str, pattern: str) -> tuple[NodeInfo, ...]:
    found = []
    for name in _listdir(_under(roots.dev_root, directory)):
        if fnmatch.fnmatchcase(name, pattern):
            info = _node(roots, posixpath.join(directory, name))
            if info is not None:
                found.append(info)
    return tuple(found)


def _caps_major(roots: ScanRoots) -> int | None:
    text = _read_small(_under(roots.proc_root, "/proc/devices")) or ""
    for line in text.splitlines():
        number, _, name = line.strip().partition(" ")
        if name.strip() == "nvidia-caps" and number.isdigit():
            return int(number)
    return None


def _ldcache_paths(roots: ScanRoots, notes: list[str]) -> list[str]:
    """64-bit library paths the driver root's ld.so.cache lists, resolved inside the root."""
    path = _under(roots.driver_root, "/etc/ld.so.cache")
    try:
        with path.open("rb") as f:
            data = f.read(LDCACHE_MAX_BYTES + 1)
    except OSError as exc:
        notes.append(f"cannot read {path}: {exc.strerror or exc}")
        return []
    if len(data) > LDCACHE_MAX_BYTES:
        notes.append(f"{path} is larger than {LDCACHE_MAX_BYTES} bytes: not read")
        return []
    try:
        entries = ldcache.parse(data)
    except ldcache.LdCacheError as exc:
        notes.append(f"{path}: {exc}")
        return []
    resolved = (_resolve(roots.driver_root, e.path) for e in entries if e.bits == 64)
    return list(dict.fromkeys(p for p in resolved if p is not None))


def _versioned(name: str, stem: str) -> str | None:
    """The version of `stem.<x>.<y>[...]` (e.g. libcuda.so.580.95.05 -> 580.95.05), else None."""
    if not name.startswith(stem):
        return None
    version = name[len(stem):]
    return version if "." in version and all(p.isdigit() for p in version.split(".") if p) else None


def _find_libraries(roots: ScanRoots, version: str, notes: list[str]) -> tuple[str, list[str]]:
    """(driver version, library dirs): the dirs holding `lib*.so.<version>`, searched like NVIDIA's generator: the
    standard dirs first, then the ld.so.cache."""
    candidates: list[str] = []
    for directory in LIBRARY_SEARCH_DIRS:
        candidates.extend(posixpath.join(directory, n) for n in _listdir(_under(roots.driver_root, directory))
                          if n.startswith("lib") and ".so." in n)
    for source in ("dirs", "ldcache"):
        if source == "ldcache":
            candidates = _ldcache_paths(roots, notes)
        resolved = [p for p in (_resolve(roots.driver_root, c) for c in candidates) if p is not None]
        if not version:
            for stem in ("libcuda.so.", "libnvidia-ml.so."):
                version = next((v for p in resolved if (v := _versioned(posixpath.basename(p), stem))), "")
                if version:
                    break
        if not version:
            continue
        dirs = [posixpath.dirname(p) for p in resolved
                if posixpath.basename(p).startswith("lib") and posixpath.basename(p).endswith(f".so.{version}")]
        if dirs:
            return version, list(dict.fromkeys(dirs))
    notes.append(f"no driver library (lib*.so.{version or '<version>'}) under {roots.driver_root} in "
                 f"{', '.join(LIBRARY_SEARCH_DIRS[1:4])}, ... or its ld.so.cache")
    return version, []


def _libraries(roots: ScanRoots, version: str, dirs: list[str]) -> tuple[Library, ...]:
    found: list[str] = []
    for directory in dirs:
        for sub, pattern in ((directory, f"*.so.{version}"), (posixpath.join(directory, "vdpau"), f"*.so.{version}"),
                             (directory, "libnvidia-nvvm70.so.*")):
            for name in _listdir(_under(roots.driver_root, sub)):
                if fnmatch.fnmatchcase(name, pattern):
                    resolved = _resolve(roots.driver_root, posixpath.join(sub, name))
                    if resolved is not None:
                        found.append(resolved)
    libraries = []
    for path in dict.fromkeys(found):
        directory, name = posixpath.split(path)
        libraries.append(Library(path, _links_to(roots, directory, name)))
    return tuple(libraries)


def _links_to(roots: ScanRoots, directory: str, name: str) -> tuple[tuple[str, str], ...]:
    """Symlinks beside a library that point at it, directly or through one another link (the soname link and the
    development `.so` link): (link, target) as the host has them."""
    links: dict[str, str] = {}
    for entry in _listdir(_under(roots.driver_root, directory)):
        full = _under(roots.driver_root, posixpath.join(directory, entry))
        try:
            if entry.startswith(name.split(".so")[0] + ".so") and full.is_symlink():
                links[entry] = os.readlink(full)
        except OSError:
            continue
    points_at = {name}
    chosen: list[tuple[str, str]] = []
    for _ in range(2):
        for link, target in links.items():
            if posixpath.basename(target) in points_at and (link, target) not in chosen:
                chosen.append((link, target))
        points_at |= {link for link, _ in chosen}
    return tuple(chosen)


def _firmware(roots: ScanRoots, version: str) -> tuple[str, ...]:
    if not version:
        return ()
    release = roots.kernel_release
    dirs = [f"/lib/firmware/updates/{release}", "/lib/firmware/updates", f"/lib/firmware/{release}", "/lib/firmware"]
    custom = (_read_small(_under(roots.sys_root, "/sys/module/firmware_class/parameters/path")) or "").strip()
    if custom.startswith("/"):
        dirs.insert(0, custom)
    found: list[str] = []
    for directory in dict.fromkeys(dirs):
        sub = posixpath.join(directory, "nvidia", version)
        found.extend(posixpath.join(sub, n) for n in _listdir(_under(roots.driver_root, sub))
                     if fnmatch.fnmatchcase(n, "gsp*.bin"))
    return tuple(dict.fromkeys(found))


def _binaries(roots: ScanRoots) -> tuple[str, ...]:
    found = []
    for binary in BINARIES:
        for directory in BINARY_DIRS:
            full = _under(roots.driver_root, posixpath.join(directory, binary))
            if full.is_file() and os.access(full, os.X_OK):
                found.append(posixpath.join(directory, binary))
                break
    return tuple(found)


def _ipc(roots: ScanRoots) -> tuple[str, ...]:
    found = []
    for socket in IPC_SOCKETS:
        for run in ("/run", "/var/run"):
            if _under(roots.driver_root, posixpath.join(run, socket)).exists():
                found.append(posixpath.join(run, socket))
                break
    if _under(roots.driver_root, "/tmp/nvidia-mps").exists():
        found.append("/tmp/nvidia-mps")
    return tuple(found)


def _drm(roots: ScanRoots, inventory: NodeInventory) -> tuple[dict[str, tuple[NodeInfo, ...]],
                                                               dict[str, tuple[tuple[str, str], ...]]]:
    nodes: dict[str, tuple[NodeInfo, ...]] = {}
    links: dict[str, tuple[tuple[str, str], ...]] = {}
    for gpu in inventory.gpus:
        bus = sysfs_pci_address(gpu.pci_bus_id)
        names = _listdir(_under(roots.sys_root, f"/sys/bus/pci/devices/{bus}/drm"))
        found: list[NodeInfo] = [n for n in (_node(roots, f"/dev/dri/{name}") for name in names
                             if name.startswith(("card", "renderD"))) if n is not None]
        if not found:
            continue
        nodes[bus] = tuple(found)
        paths = {n.path for n in found}
        bus_links = []
        for kind in ("card", "render"):
            link = f"/dev/dri/by-path/pci-{bus}-{kind}"
            try:
                target = os.readlink(_under(roots.dev_root, link))
            except OSError:
                continue
            if posixpath.normpath(posixpath.join(posixpath.dirname(link), target)) in paths:
                bus_links.append((target, link))
        links[bus] = tuple(bus_links)
    return nodes, links


def scan_driver_files(roots: ScanRoots, inventory: NodeInventory) -> DriverFiles:
    """Everything the specs describe, found under `roots` (blocking; see the module docstring for the bounds)."""
    notes: list[str] = []
    version, dirs = _find_libraries(roots, inventory.driver_version, notes)
    gpu_nodes = {g.minor: n for g in inventory.gpus if (n := _node(roots, f"/dev/nvidia{g.minor}")) is not None}
    caps = {n.minor: n for n in _nodes_matching(roots, "/dev/nvidia-caps", "nvidia-cap*")}
    imex = _node(roots, f"{IMEX_CHANNEL_DIR}/channel0")
    gds_nodes = _nodes_matching(roots, "/dev", "nvidia-fs*")
    gds_mounts = tuple(p for p in ("/run/udev", "/etc/cufile.json") if _under(roots.driver_root, p).exists())
    mofed = _nodes_matching(roots, "/dev/infiniband", "uverbs*") + _nodes_matching(roots, "/dev/infiniband",
                                                                                   "rdma_cm")
    gdrcopy = tuple(n for n in (_node(roots, "/dev/gdrdrv"),) if n is not None)
    drm_nodes, drm_links = _drm(roots, inventory)
    return DriverFiles(
        driver_root=str(roots.driver_root),
        dev_root=str(roots.dev_root),
        driver_version=version,
        control_nodes=tuple(n for n in (_node(roots, p) for p in CONTROL_NODES) if n is not None),
        gpu_nodes=gpu_nodes,
        cap_nodes=caps,
        caps_major=_caps_major(roots),
        mig_minors=dict(inventory.mig_minors),
        libraries=_libraries(roots, version, dirs) if version else (),
        library_dirs=tuple(dirs),
        firmware=_firmware(roots, version),
        binaries=_binaries(roots),
        ipc_sockets=_ipc(roots),
        drm_nodes=drm_nodes,
        drm_links=drm_links,
        imex_channels={0: imex} if imex is not None else {},
        gds_nodes=gds_nodes,
        gds_mounts=gds_mounts if gds_nodes else (),
        mofed_nodes=mofed,
        gdrcopy_nodes=gdrcopy,
        notes=tuple(notes),
    )


async def discover_driver_files(roots: ScanRoots, inventory: NodeInventory) -> DriverFiles:
    """`scan_driver_files` in a worker thread, abandoned after `SCAN_TIMEOUT_S` (raises trio.TooSlowError)."""
    with trio.fail_after(SCAN_TIMEOUT_S):
        return await trio.to_thread.run_sync(scan_driver_files, roots, inventory, abandon_on_cancel=True)
