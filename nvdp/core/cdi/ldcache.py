"""`/etc/ld.so.cache` as bytes: parse (both formats glibc's loader has known) and encode (for the simulated node).

Formats (glibc `sysdeps/generic/dl-cache.h`), all little-endian on the architectures NVIDIA ships drivers for:

* old, `ld.so-1.7.0\\0` + nlibs (u32), then nlibs entries of (flags i32, key u32, value u32); key and value are
  offsets of NUL-terminated strings counted from the end of the entry table;
* new, `glibc-ld.so.cache` `1.1` + nlibs, string-table length, flags, extension offset (48-byte header), then nlibs
  entries of (flags i32, key u32, value u32, osversion u32, hwcap u64); offsets count from the header's start;
* both: the old table, padding to 8 bytes, then a complete new-format cache (glibc before 2.32 wrote this by
  default). Its new part is authoritative.

Every offset and count is checked against the data: a corrupt or hostile cache raises `LdCacheError`, never reads out
of bounds, and the caller bounds how much it reads.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

OLD_MAGIC = b"ld.so-1.7.0\0"
NEW_MAGIC = b"glibc-ld.so.cache1.1"
_OLD_HEADER = struct.Struct("<12sI")
_OLD_ENTRY = struct.Struct("<iII")
_NEW_HEADER = struct.Struct("<20sIIB3xI12x")
_NEW_ENTRY = struct.Struct("<iIIIQ")

FLAG_TYPE_MASK, FLAG_ELF = 0x00FF, 0x0001
#: glibc's `FLAG_ELF_LIBC6`: what ldconfig marks every glibc library with.
FLAG_ELF_LIBC6 = 0x0003
#: Architecture flags -> word size (x86-64, AArch64, ppc64le: 64; i386, x32, ARM hard-float: 32).
ARCH_BITS = {0x0300: 64, 0x0A00: 64, 0x0500: 64, 0x0000: 32, 0x0800: 32, 0x0900: 32}
FLAG_X8664_LIB64 = 0x0300


class LdCacheError(ValueError):
    """Not an ld.so.cache, or a corrupt one; the message says what is wrong."""


@dataclass(frozen=True, slots=True)
class LdCacheEntry:
    #: The soname, e.g. `libcuda.so.1`.
    name: str
    #: The library's path as the cache holds it (absolute, inside the root the cache belongs to).
    path: str
    bits: int


def _string(data: bytes, offset: int) -> str:
    if offset >= len(data):
        raise LdCacheError(f"string offset {offset} beyond the end of the cache ({len(data)} bytes)")
    end = data.find(b"\0", offset)
    if end < 0:
        raise LdCacheError(f"unterminated string at offset {offset}")
    return data[offset:end].decode("utf-8", "surrogateescape")


def _entry(flags: int, name: str, path: str) -> LdCacheEntry | None:
    if not flags & FLAG_TYPE_MASK & FLAG_ELF:
        return None
    bits = ARCH_BITS.get(flags & 0xFF00)
    if bits is None or not name or not path:
        return None
    return LdCacheEntry(name, path, bits)


def _parse_new(data: bytes, start: int) -> list[LdCacheEntry]:
    if len(data) - start < _NEW_HEADER.size:
        raise LdCacheError("truncated new-format header")
    magic, nlibs, _, _, _ = _NEW_HEADER.unpack_from(data, start)
    if magic != NEW_MAGIC:
        raise LdCacheError("not a glibc-ld.so.cache1.1 cache")
    table = start + _NEW_HEADER.size
    if nlibs > (len(data) - table) // _NEW_ENTRY.size:
        raise LdCacheError(f"{nlibs} entries do not fit in the cache")
    view = data[start:]
    entries = []
    for i in range(nlibs):
        flags, key, value, _, _ = _NEW_ENTRY.unpack_from(data, table + i * _NEW_ENTRY.size)
        entry = _entry(flags, _string(view, key), _string(view, value))
        if entry is not None:
            entries.append(entry)
    return entries


def parse(data: bytes) -> list[LdCacheEntry]:
    """The ELF entries of a cache of any of the three layouts, in the cache's order (ldconfig sorts them by
    preference: the first entry for a name is the one the loader uses)."""
    if data.startswith(NEW_MAGIC):
        return _parse_new(data, 0)
    if not data.startswith(OLD_MAGIC):
        raise LdCacheError("not an ld.so.cache (unknown magic)")
    if len(data) < _OLD_HEADER.size:
        raise LdCacheError("truncated old-format header")
    _, nlibs = _OLD_HEADER.unpack_from(data, 0)
    if nlibs > (len(data) - _OLD_HEADER.size) // _OLD_ENTRY.size:
        raise LdCacheError(f"{nlibs} entries do not fit in the cache")
    end = _OLD_HEADER.size + nlibs * _OLD_ENTRY.size
    new_start = (end + 7) & ~7
    if data[new_start:new_start + len(NEW_MAGIC)] == NEW_MAGIC:
        return _parse_new(data, new_start)
    strings = data[end:]
    entries = []
    for i in range(nlibs):
        flags, key, value = _OLD_ENTRY.unpack_from(data, _OLD_HEADER.size + i * _OLD_ENTRY.size)
        entry = _entry(flags, _string(strings, key), _string(strings, value))
        if entry is not None:
            entries.append(entry)
    return entries


def encode(entries: Sequence[tuple[str, str]], *, layout: str = "new",
           flags: int = FLAG_ELF_LIBC6 | FLAG_X8664_LIB64) -> bytes:
    """A cache listing (soname, path) pairs, in `layout` "new", "old" or "both"."""
    if layout == "old":
        strings, offsets = _strings(entries, 0)
        head = _OLD_HEADER.pack(OLD_MAGIC, len(entries))
        table = b"".join(_OLD_ENTRY.pack(flags, k, v) for k, v in offsets)
        return head + table + strings
    table_size = _NEW_HEADER.size + len(entries) * _NEW_ENTRY.size
    strings, offsets = _strings(entries, table_size)
    new = (_NEW_HEADER.pack(NEW_MAGIC, len(entries), len(strings), 0, 0)
           + b"".join(_NEW_ENTRY.pack(flags, k, v, 0, 0) for k, v in offsets) + strings)
    if layout == "new":
        return new
    if layout != "both":
        raise ValueError(f"unknown ld.so.cache layout {layout!r}")
    # The old table of a combined cache: glibc pointed its offsets into the new part's strings; nvdp (like the
    # loader) reads only the new part of such a file, so they only need to be in range.
    old_end = _OLD_HEADER.size + len(entries) * _OLD_ENTRY.size
    pad = ((old_end + 7) & ~7) - old_end
    old = _OLD_HEADER.pack(OLD_MAGIC, len(entries)) + b"".join(
        _OLD_ENTRY.pack(flags, k + pad, v + pad) for k, v in offsets)
    return old + b"\0" * pad + new


def _strings(entries: Sequence[tuple[str, str]], base: int) -> tuple[bytes, list[tuple[int, int]]]:
    blob = bytearray()
    offsets = []
    for name, path in entries:
        key = base + len(blob)
        blob += name.encode() + b"\0"
        value = base + len(blob)
        blob += path.encode() + b"\0"
        offsets.append((key, value))
    return bytes(blob), offsets
