"""The fake Kubernetes API server (`nvdp/testing/fake_apiserver.py`) for the synchronous benchmark: its own
`trio.run` in a background thread, driven from the benchmark's thread through `trio.from_thread`."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any

import trio

from bench.harness import FigureError

if TYPE_CHECKING:
    from tests.fake_apiserver import FakeApiServer

#: How long the server thread may take to listen, and to shut down.
START_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 10.0


class ApiServerThread:
    """`with ApiServerThread() as api: api.call(api.fake.set_node, ...)`.

    Everything that touches the fake server's state (which wakes trio events) goes through `call`, which runs it
    on the server's trio thread and returns when it has run.
    """

    def __init__(self, **kwargs: Any) -> None:
        self._kwargs = kwargs
        self._fake: FakeApiServer | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._stop: trio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="bench-fake-apiserver", daemon=True)

    @property
    def fake(self) -> FakeApiServer:
        if self._fake is None:
            raise FigureError("the fake API server is not running")
        return self._fake

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run a synchronous function on the server's trio thread."""
        return trio.from_thread.run_sync(fn, *args, trio_token=self._token)

    def _run(self) -> None:
        try:
            trio.run(self._main)
        except BaseException as exc:  # reported by __enter__ or __exit__ in the benchmark's thread
            self._error = exc
        finally:
            self._ready.set()

    async def _main(self) -> None:
        from tests.fake_apiserver import open_fake_apiserver

        async with open_fake_apiserver(**self._kwargs) as fake:
            self._stop = trio.Event()
            self._token = trio.lowlevel.current_trio_token()
            self._fake = fake
            self._ready.set()
            with trio.move_on_after(3600):  # never outlive a forgotten benchmark
                await self._stop.wait()

    def __enter__(self) -> ApiServerThread:
        self._thread.start()
        if not self._ready.wait(START_TIMEOUT_S) or self._fake is None:
            self.__exit__(None, None, None)
            raise FigureError(f"the fake API server did not start within {START_TIMEOUT_S:.0f} s: {self._error!r}")
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._stop is not None and self._thread.is_alive():
            with contextlib.suppress(trio.RunFinishedError):
                self.call(self._stop.set)
        self._thread.join(STOP_TIMEOUT_S)
        if self._thread.is_alive():
            raise FigureError(f"the fake API server did not stop within {STOP_TIMEOUT_S:.0f} s")
        if self._error is not None and exc is None:
            raise FigureError(f"the fake API server failed: {self._error!r}") from self._error
