"""`nvdp.inotify.DirectoryWatch` (real inotify) and the plugin-directory watch built on it."""

from __future__ import annotations

import errno
import re
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from nvdp import inotify
from nvdp.inotify import DirectoryWatch, DirEvent, InotifyError
from nvdp.inotify import flags as F
from nvdp.kubelet.socket_watch import SocketEvent, watch_plugin_dir

MASK = F.CREATE | F.DELETE | F.MOVED_TO


async def until(watch: DirectoryWatch, kind: str, name: str = "", flag: int = 0) -> list[DirEvent]:
    """Every event up to and including the first of `kind` for `name` (with `flag` in its mask, if given)."""
    seen: list[DirEvent] = []
    with trio.fail_after(5):
        while True:
            for event in await watch.wait():
                seen.append(event)
                if event.kind == kind and event.name == name and (not flag or event.mask & flag):
                    return seen


async def test_entries_of_an_existing_directory(tmp_path: Path) -> None:
    with DirectoryWatch(tmp_path, MASK) as watch:
        assert watch.watching
        (tmp_path / "a").write_bytes(b"")
        await until(watch, "entry", "a", F.CREATE)
        (tmp_path / "a").unlink()
        await until(watch, "entry", "a", F.DELETE)


async def test_a_directory_created_later_removed_and_created_again(tmp_path: Path) -> None:
    directory = tmp_path / "plugins"
    with DirectoryWatch(directory, MASK) as watch:
        assert not watch.watching
        directory.mkdir()
        await until(watch, "appeared")
        assert watch.watching
        (directory / "a").write_bytes(b"")
        await until(watch, "entry", "a", F.CREATE)

        (directory / "a").unlink()
        directory.rmdir()
        await until(watch, "removed")
        assert not watch.watching
        # Moved into place counts as created.
        (tmp_path / "staging").mkdir()
        (tmp_path / "staging").rename(directory)
        await until(watch, "appeared")
        (directory / "b").write_bytes(b"")
        await until(watch, "entry", "b", F.CREATE)


async def test_nothing_is_reported_for_siblings(tmp_path: Path) -> None:
    directory = tmp_path / "plugins"
    directory.mkdir()
    with DirectoryWatch(directory, MASK) as watch:
        (tmp_path / "sibling").mkdir()
        (tmp_path / "file").write_bytes(b"")
        (directory / "mine").write_bytes(b"")
        # The first event we get is ours: the parent's events about other names are dropped.
        assert [(e.kind, e.name) for e in await until(watch, "entry", "mine", F.CREATE)] == [("entry", "mine")]


@pytest.mark.parametrize(("code", "hint"), [(errno.ENOSPC, "fs.inotify.max_user_watches"),
                                            (errno.EACCES, "")])
def test_inotify_errors_become_nvdp_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int,
                                           hint: str) -> None:
    closed: list[bool] = []

    class Failing(inotify.INotify):  # type: ignore[misc]
        def add_watch(self, path: Any, mask: int) -> int:
            raise OSError(code, "injected")

        def close(self) -> None:
            closed.append(True)
            super().close()

    monkeypatch.setattr(inotify, "INotify", Failing)
    with pytest.raises(InotifyError, match=re.escape(f"cannot watch {tmp_path.parent}: injected")) as info:
        DirectoryWatch(tmp_path, MASK)
    assert hint in str(info.value)
    assert closed == [True]  # the inotify descriptor does not leak


def test_the_c_library_is_the_processs_own_and_errno_still_reaches_python(tmp_path: Path) -> None:
    """nvdp.inotify gives inotify_simple the process's own symbols, so it never runs `ldconfig` to find libc; the
    kernel's errno must still come through (what `_error` turns into hints)."""
    import inotify_simple

    assert inotify_simple._libc is not None and inotify_simple._libc._name is None  # dlopen(NULL), not a search
    with inotify.INotify() as raw, pytest.raises(FileNotFoundError):
        raw.add_watch(tmp_path / "missing", MASK)


def test_no_inotify_instance_left(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(inotify, "INotify", refuse)
    with pytest.raises(InotifyError, match=r"fs\.inotify\.max_user_instances"):
        DirectoryWatch(tmp_path, MASK)


async def _events(kubelet_socket: Path, send: trio.MemorySendChannel[SocketEvent]) -> None:
    async for event in watch_plugin_dir(kubelet_socket):
        await send.send(event)


async def _next(receive: trio.MemoryReceiveChannel[SocketEvent]) -> SocketEvent:
    with trio.fail_after(5):
        return await receive.receive()


def _bind(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(path))
    return sock


@pytest.fixture
async def plugin_dir(tmp_path: Path) -> AsyncIterator[tuple[Path, trio.MemoryReceiveChannel[SocketEvent]]]:
    directory = tmp_path / "device-plugins"
    directory.mkdir()
    send, receive = trio.open_memory_channel[SocketEvent](16)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_events, directory / "kubelet.sock", send)
        await trio.testing.wait_all_tasks_blocked()
        yield directory, receive
        nursery.cancel_scope.cancel()


async def test_plugin_dir_kubelet_start_and_deleted_sockets(
        plugin_dir: tuple[Path, trio.MemoryReceiveChannel[SocketEvent]]) -> None:
    directory, events = plugin_dir
    mine = _bind(directory / "nvidia-gpu.sock")
    kubelet = _bind(directory / "kubelet.sock")
    try:
        assert await _next(events) == SocketEvent("kubelet-started", "kubelet.sock")
        (directory / "nvidia-gpu.sock").unlink()
        assert await _next(events) == SocketEvent("deleted", "nvidia-gpu.sock")
        (directory / "kubelet.sock").unlink()  # the kubelet's own socket going is not ours to report
        (directory / "kubelet.sock").mkdir()  # (any creation of the name counts)
        assert await _next(events) == SocketEvent("kubelet-started", "kubelet.sock")
    finally:
        mine.close()
        kubelet.close()


async def test_plugin_dir_removed_and_created_again_with_the_kubelet_socket(
        plugin_dir: tuple[Path, trio.MemoryReceiveChannel[SocketEvent]]) -> None:
    directory, events = plugin_dir
    directory.rmdir()
    staging = directory.parent / "staging"
    staging.mkdir()
    kubelet = _bind(staging / "kubelet.sock")
    try:
        staging.rename(directory)  # appears with kubelet.sock already inside: no event of its own for the file
        assert await _next(events) == SocketEvent("kubelet-started", "kubelet.sock")
    finally:
        kubelet.close()


async def test_async_exit_closes_off_the_trio_thread_and_even_when_cancelled(tmp_path: Path) -> None:
    """Closing an inotify descriptor with watches waits for the kernel (issue 17: ~8 ms of every shutdown on the
    trio thread); `async with` closes it in a worker thread, and a cancelled scope still closes it."""
    import threading

    closed_in: list[threading.Thread] = []
    with trio.CancelScope() as scope:
        async with DirectoryWatch(tmp_path, F.CREATE) as watch:
            real = watch._inotify.close

            def close() -> None:
                closed_in.append(threading.current_thread())
                real()

            watch._inotify.close = close  # type: ignore[method-assign]
            scope.cancel()
            await trio.sleep_forever()
    assert len(closed_in) == 1 and closed_in[0] is not threading.main_thread()
    assert watch._inotify.closed
