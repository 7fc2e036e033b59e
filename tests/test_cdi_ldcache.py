"""The ld.so.cache codec: both formats glibc's loader has known, a cache glibc's own ldconfig wrote, corrupt input."""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from nvdp.core.cdi import ldcache
from nvdp.core.cdi.ldcache import LdCacheEntry, LdCacheError

ENTRIES = [("libcuda.so.1", "/usr/lib/x86_64-linux-gnu/libcuda.so.1"),
           ("libnvidia-ml.so.1", "/usr/lib/x86_64-linux-gnu/libnvidia-ml.so.1")]


@pytest.mark.parametrize("layout", ["new", "old", "both"])
def test_each_layout_round_trips(layout: str) -> None:
    data = ldcache.encode(ENTRIES, layout=layout)
    magic = {"new": b"glibc-ld.so.cache1.1", "old": b"ld.so-1.7.0\0", "both": b"ld.so-1.7.0\0"}[layout]
    assert data.startswith(magic)
    assert ldcache.parse(data) == [LdCacheEntry(name, path, 64) for name, path in ENTRIES]


def test_32_bit_and_non_elf_entries_are_told_apart() -> None:
    i386 = ldcache.encode(ENTRIES[:1], flags=ldcache.FLAG_ELF_LIBC6)
    assert ldcache.parse(i386) == [LdCacheEntry(*ENTRIES[0], bits=32)]
    assert ldcache.parse(ldcache.encode(ENTRIES[:1], flags=0x0300)) == []  # not ELF
    assert ldcache.parse(ldcache.encode(ENTRIES[:1], flags=0x7703)) == []  # unknown architecture


@pytest.mark.skipif(shutil.which("ldconfig") is None, reason="no ldconfig on this machine")
def test_a_cache_written_by_glibcs_ldconfig_is_read(tmp_path: Path) -> None:
    libc = next((p for p in (Path("/lib/x86_64-linux-gnu/libz.so.1"), Path("/usr/lib64/libz.so.1")) if p.exists()),
                None)
    if libc is None:
        pytest.skip("no libz.so.1 to list")
    libdir = tmp_path / "lib"
    libdir.mkdir()
    shutil.copy(libc, libdir / "libnvdpfake.so.1.2.3")
    (libdir / "libz.so.1").symlink_to("libnvdpfake.so.1.2.3")
    cache = tmp_path / "ld.so.cache"
    # -X: write the cache only, never the links in the system's library directories.
    subprocess.run(["ldconfig", "-X", "-C", str(cache), "-f", "/dev/null", str(libdir)], check=True,
                   capture_output=True, timeout=60)
    entries = ldcache.parse(cache.read_bytes())
    assert LdCacheEntry("libz.so.1", str(libdir / "libz.so.1"), 64) in entries


@pytest.mark.parametrize(
    ("data", "message"),
    [
        pytest.param(b"", "unknown magic", id="empty"),
        pytest.param(b"\x7fELF" + b"\0" * 60, "unknown magic", id="not a cache"),
        pytest.param(b"glibc-ld.so.cache1.1" + b"\0" * 10, "truncated", id="truncated header"),
        pytest.param(struct.pack("<20sIIB3xI12x", b"glibc-ld.so.cache1.1", 1_000_000, 0, 0, 0), "do not fit",
                     id="more entries than bytes"),
        pytest.param(struct.pack("<20sIIB3xI12x", b"glibc-ld.so.cache1.1", 1, 0, 0, 0)
                     + struct.pack("<iIIIQ", 0x0303, 10_000, 10_001, 0, 0), "beyond the end", id="offset out of range"),
        pytest.param(struct.pack("<20sIIB3xI12x", b"glibc-ld.so.cache1.1", 1, 0, 0, 0)
                     + struct.pack("<iIIIQ", 0x0303, 72, 72, 0, 0) + b"no-nul", "unterminated", id="no NUL"),
        pytest.param(struct.pack("<12sI", b"ld.so-1.7.0\0", 99), "do not fit", id="old: more entries than bytes"),
    ],
)
def test_corrupt_caches_are_refused_without_reading_out_of_bounds(data: bytes, message: str) -> None:
    with pytest.raises(LdCacheError, match=message):
        ldcache.parse(data)


@pytest.mark.skipif(not Path("/etc/ld.so.cache").exists(), reason="no /etc/ld.so.cache")
def test_this_machines_cache_parses() -> None:
    entries = ldcache.parse(Path("/etc/ld.so.cache").read_bytes())
    assert any(e.name == "libc.so.6" for e in entries)
