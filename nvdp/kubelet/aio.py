"""Hosting grpclib (asyncio-only) inside a trio program.

One asyncio event loop runs in one dedicated thread for the whole life of the daemon. `open_asyncio_thread()` is a
trio async context manager that owns it: it wraps the daemon's main nursery, so the loop outlives every task that
uses it and is stopped only after they have all finished. Why this shape (see docs/architecture.md):

* grpclib needs a running asyncio loop; trio-asyncio would share trio's thread but has an import-order trap on
  Python >= 3.12, crashes trio when an async iterator is cancelled, and has no future on 3.14.
* Protobuf encoding then happens on the asyncio thread, so a large `ListAndWatch` message never stalls trio.

Traffic crosses the boundary in two ways only: trio awaits a coroutine on the loop with `AsyncioThread.run()`
(cancellation of the trio side cancels the coroutine), and trio pushes immutable snapshots to the loop with
`AsyncioThread.call_soon()`. Code running on the loop never touches trio objects.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import trio

log = logging.getLogger(__name__)

T = TypeVar("T")

#: How long teardown waits for coroutines on the loop to finish after they were cancelled.
CANCEL_GRACE_S = 2.0


class AsyncioCallError(Exception):
    """A coroutine run on the asyncio loop raised something its caller did not declare (see `AsyncioThread.run`):
    a foreign error (grpclib, h2, asyncio) never reaches trio as itself."""


class AsyncioThread:
    """Handle on the asyncio loop thread; valid inside `open_asyncio_thread()`."""

    def __init__(self, loop: asyncio.AbstractEventLoop, thread: threading.Thread) -> None:
        self.loop = loop
        self._thread = thread

    def __repr__(self) -> str:
        return f"<AsyncioThread {self._thread.name} alive={self._thread.is_alive()}>"

    def call_soon(self, fn: Callable[..., Any], *args: Any) -> None:
        """Schedule a plain function on the loop (fire and forget; used to publish snapshots)."""
        self.loop.call_soon_threadsafe(fn, *args)

    async def run(
        self, fn: Callable[..., Awaitable[T]], *args: Any, passthrough: tuple[type[Exception], ...] = ()
    ) -> T:
        """Run `fn(*args)` on the loop and return its result to trio.

        Exceptions of the `passthrough` types reach the caller as they are; any other exception becomes an
        `AsyncioCallError` (the original chained), so a caller's handlers see nvdp's types only.

        If the trio caller is cancelled, the coroutine is cancelled too and given `CANCEL_GRACE_S` to finish, so
        nothing it started outlives the caller.
        """
        token = trio.lowlevel.current_trio_token()
        done = trio.Event()

        def wake(_: object) -> None:
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(done.set)

        future = asyncio.run_coroutine_threadsafe(_as_coroutine(fn, *args), self.loop)
        future.add_done_callback(wake)
        try:
            await done.wait()
        except BaseException:
            future.cancel()
            with trio.move_on_after(CANCEL_GRACE_S) as scope:
                scope.shield = True
                await done.wait()
            raise
        try:
            return future.result()
        except passthrough:
            raise
        except (Exception, asyncio.CancelledError) as exc:
            name = getattr(fn, "__qualname__", repr(fn))
            raise AsyncioCallError(f"{name} failed on the asyncio loop: {type(exc).__name__}: {exc}") from exc


async def _as_coroutine(fn: Callable[..., Awaitable[T]], *args: Any) -> T:
    return await fn(*args)


def _run_loop(loop: asyncio.AbstractEventLoop) -> None:
    asyncio.set_event_loop(loop)
    try:
        loop.run_forever()
        # A few more iterations first: a connection accepted in the loop's last moments has its setup task and
        # callbacks queued; run them (a stopped server then closes the connection) rather than cancel them before
        # they start, which would leave the accepted socket to the garbage collector. Until nothing is ready, not
        # for a fixed time: a fixed 20 ms was half of SIGTERM -> exit.
        _drain(loop)
        # Whatever is still scheduled (normally nothing: every `run()` caller has finished) is cancelled here, so the
        # thread never leaves a coroutine behind.
        pending = asyncio.all_tasks(loop)
        for task in pending:
            task.cancel()
        if pending:
            loop.run_until_complete(asyncio.wait(pending, timeout=CANCEL_GRACE_S))
        loop.run_until_complete(loop.shutdown_asyncgens())
        _drain(loop)
    finally:
        loop.close()


#: Iterations `_drain` runs at most (each one runs every callback that was ready when it began).
DRAIN_ITERATIONS = 50


def _drain(loop: asyncio.AbstractEventLoop) -> None:
    """Run the loop until no callback is ready (bounded). The timed grace above can end in the middle of a chain
    (accept -> connection_made -> close -> connection_lost) when the thread was not scheduled for a while; a
    transport whose `connection_lost` never runs keeps its socket until the garbage collector finds it."""
    for _ in range(DRAIN_ITERATIONS):
        # `_ready` is the selector loop's queue of due callbacks (CPython's, unchanged since 3.4); without it, run
        # the fixed number of iterations.
        ready = getattr(loop, "_ready", None)
        if ready is not None and not ready:
            return
        loop.run_until_complete(asyncio.sleep(0))


@contextlib.asynccontextmanager
async def open_asyncio_thread(name: str = "nvdp-grpc") -> AsyncIterator[AsyncioThread]:
    """Start an asyncio loop in a thread; stop it and join the thread on exit."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=_run_loop, args=(loop,), name=name, daemon=True)
    thread.start()
    try:
        yield AsyncioThread(loop, thread)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        with trio.CancelScope(shield=True):
            # Bounded: the loop has nothing left to run but the cancelled remainder.
            await trio.to_thread.run_sync(thread.join, CANCEL_GRACE_S + 1.0)
        if thread.is_alive():
            log.error("asyncio thread %s did not stop within %.0f s", name, CANCEL_GRACE_S + 1.0)
