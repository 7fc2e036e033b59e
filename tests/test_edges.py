"""Foreign errors stop at the edge where they enter nvdp: the asyncio bridge, kubelet registration and the NVML
binding each turn whatever they meet into nvdp's own error type, so callers (and supervisors) see one vocabulary."""

from __future__ import annotations

import asyncio
import socket
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from nvdp.kubelet.aio import AsyncioCallError, open_asyncio_thread
from nvdp.kubelet.registration import RegistrationError, register
from nvdp.nvml import adapter


async def test_the_bridge_wraps_what_the_caller_did_not_declare() -> None:
    async def raises(exc: Exception) -> None:
        await asyncio.sleep(0)
        raise exc

    async with open_asyncio_thread("test-bridge") as host:
        with pytest.raises(AsyncioCallError, match="KeyError") as info:
            await host.run(raises, KeyError("x"))
        assert isinstance(info.value.__cause__, KeyError)
        # Declared types pass as themselves.
        with pytest.raises(ConnectionRefusedError):
            await host.run(raises, ConnectionRefusedError(111, "refused"), passthrough=(OSError,))
        # Results still come back.

        async def answer() -> int:
            return 42

        assert await host.run(answer) == 42


@pytest.fixture
def rude_kubelet() -> Iterator[Path]:
    """A kubelet.sock that accepts every connection and closes it at once (or sends garbage first)."""
    with tempfile.TemporaryDirectory(prefix="nvdp-e-") as tmp:
        path = Path(tmp) / "kubelet.sock"
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(str(path))
        server.listen(8)
        server.settimeout(0.2)
        stop = threading.Event()

        def serve() -> None:
            garbage = False
            while not stop.is_set():
                try:
                    conn, _ = server.accept()
                except TimeoutError:
                    continue
                with conn:
                    if garbage:
                        conn.sendall(b"\x00\x00\x04\x07\x00\x00\x00\x00\x00not http/2")
                    garbage = not garbage

        thread = threading.Thread(target=serve, name="rude-kubelet")
        thread.start()
        try:
            yield path
        finally:
            stop.set()
            thread.join()
            server.close()


async def test_a_kubelet_that_accepts_and_hangs_up_is_a_registration_error(rude_kubelet: Path) -> None:
    async with open_asyncio_thread("test-register") as host:
        for _ in range(4):  # both behaviours, twice
            with trio.fail_after(20), pytest.raises(RegistrationError, match=str(rude_kubelet)):
                await host.run(register, rude_kubelet, "nvidia-gpu.sock", "nvidia.com/gpu",
                               passthrough=(RegistrationError,))


def test_a_failure_of_the_binding_itself_becomes_an_nvml_error() -> None:
    def broken() -> None:
        raise AttributeError("'NoneType' object has no attribute 'contents'")

    with pytest.raises(adapter.NvmlError) as info:
        adapter._call("nvmlDeviceGetThing", broken)
    assert info.value.code == adapter.ERROR_UNKNOWN
    assert "nvmlDeviceGetThing" in str(info.value) and "AttributeError" in str(info.value)
