"""The kubelet's Prepare and Unprepare calls, carried from the gRPC handlers (asyncio) to the claim preparer (trio).

The DRA servers run on grpclib's asyncio thread (`nvdp.kubelet.aio`); what prepares a claim (API reads, CDI spec
files, MPS daemons, the checkpoint) is trio code in the supervisor tree. `ClaimCalls` is the one crossing in that
direction: a handler hands its call over with `TrioToken.run_sync_soon` and awaits an asyncio future that the trio
side settles. Its bounds (docs/security.md): `MAX_PENDING_CALLS` calls at once (more are answered at once with a
per-claim error), each one cancelled after `CALL_DEADLINE_S` (its open claims then answer with an error), and a
call whose client went away is cancelled on the trio side too.

Whatever goes wrong is an error per claim, never a gRPC error: the kubelet shows a claim's error in the pod's
events, and one bad claim must not fail its neighbours.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import trio

from nvdp.core.dra.plugin import (
    CALL_DEADLINE_S,
    MAX_PENDING_CALLS,
    claim_problem,
    complete_prepare,
    complete_unprepare,
    unique_claims,
)
from nvdp.core.dra.types import ClaimRef, PrepareResult, UnprepareResult

log = logging.getLogger(__name__)

Kind = Literal["prepare", "unprepare"]


class ClaimPreparer(Protocol):
    """What prepares and unprepares claims (`nvdp.dra.prepare`). Runs on trio, one call at a time or several (it
    serializes what must be). Returns an entry per claim UID; an exception fails every claim of the call."""

    async def prepare(self, claims: Sequence[ClaimRef]) -> Mapping[str, PrepareResult]: ...

    async def unprepare(self, claims: Sequence[ClaimRef]) -> Mapping[str, UnprepareResult]: ...


class CallObserver(Protocol):
    """Where each call is reported (metrics); called on trio."""

    def dra_call(self, kind: str, seconds: float, claims: int, failed: int) -> None: ...


@dataclass(eq=False)
class _Call:
    kind: Kind
    claims: tuple[ClaimRef, ...]
    future: asyncio.Future[Mapping[str, Any]]
    loop: asyncio.AbstractEventLoop
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    answered: bool = False

    def answer(self, result: Mapping[str, Any]) -> None:
        """Settle the handler's future (from trio), once."""
        if self.answered:
            return
        self.answered = True
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
            self.loop.call_soon_threadsafe(_settle, self.future, result)


def _settle(future: asyncio.Future[Mapping[str, Any]], result: Mapping[str, Any]) -> None:
    if not future.done():
        future.set_result(result)


def _errors(kind: Kind, claims: Sequence[ClaimRef], message: str) -> dict[str, Any]:
    if kind == "prepare":
        return {c.uid: PrepareResult(error=message) for c in claims}
    return {c.uid: UnprepareResult(error=message) for c in claims}


class ClaimCalls:
    """Runs the kubelet's calls on trio for the handlers on the asyncio loop; `serve()` is its trio side."""

    def __init__(self, preparer: ClaimPreparer, *, deadline_s: float = CALL_DEADLINE_S,
                 max_pending: int = MAX_PENDING_CALLS, observer: CallObserver | None = None) -> None:
        self.preparer = preparer
        self.deadline_s = deadline_s
        self.max_pending = max_pending
        self.observer = observer
        self._token: trio.lowlevel.TrioToken | None = None
        self._nursery: trio.Nursery | None = None
        #: Calls accepted and not yet answered.
        self.pending = 0
        #: Calls refused because `max_pending` were running, and calls cut by the deadline.
        self.refused = 0
        self.timed_out = 0

    def __repr__(self) -> str:
        return (f"<ClaimCalls serving={self._nursery is not None} pending={self.pending} refused={self.refused} "
                f"timed_out={self.timed_out}>")

    # -- trio side -----------------------------------------------------------------------------------------------------

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Accept calls until cancelled; calls still running then are answered with an error."""
        async with trio.open_nursery() as nursery:
            self._token = trio.lowlevel.current_trio_token()
            self._nursery = nursery
            try:
                task_status.started()
                await trio.sleep_forever()
            finally:
                self._nursery = None

    def _accept(self, call: _Call) -> None:
        """On trio (through `run_sync_soon`): start the call, or refuse it at once."""
        nursery = self._nursery
        if nursery is None:
            call.answer(_errors(call.kind, call.claims, "nvdp's DRA plugin is stopping; the kubelet will retry"))
        elif self.pending >= self.max_pending:
            self.refused += 1
            log.warning("DRA %s of %d claim(s) refused: %d calls already running", call.kind, len(call.claims),
                        self.pending)
            call.answer(_errors(call.kind, call.claims,
                                f"nvdp is busy ({self.pending} prepare/unprepare calls running); the kubelet "
                                "will retry"))
        else:
            self.pending += 1
            nursery.start_soon(self._run, call)

    async def _run(self, call: _Call) -> None:
        started = time.perf_counter()
        result: Mapping[str, Any] = {}
        missing = f"nvdp gave no answer for this claim ({call.kind})"
        try:
            with call.scope:
                call.scope.deadline = trio.current_time() + self.deadline_s
                try:
                    if call.kind == "prepare":
                        result = await self.preparer.prepare(call.claims)
                    else:
                        result = await self.preparer.unprepare(call.claims)
                except Exception as exc:
                    log.exception("DRA %s failed for claims %s", call.kind, [c.uid for c in call.claims])
                    result = _errors(call.kind, call.claims, f"nvdp failed to {call.kind} the claim: "
                                                              f"{type(exc).__name__}: {exc}")
            if call.scope.cancelled_caught:
                self.timed_out += 1
                missing = f"{call.kind} did not finish within {self.deadline_s:g} s; the kubelet will retry"
                log.warning("DRA %s of %d claim(s) cut after %g s", call.kind, len(call.claims), self.deadline_s)
            answer: Mapping[str, Any]
            if call.kind == "prepare":
                answer = complete_prepare(call.claims, result, missing)
            else:
                answer = complete_unprepare(call.claims, result, missing)
            call.answer(answer)
            if self.observer is not None:
                failed = sum(1 for r in answer.values() if r.error)
                self.observer.dra_call(call.kind, time.perf_counter() - started, len(call.claims), failed)
        finally:
            self.pending -= 1
            # Cancelled from outside (nvdp stopping): the handler still gets an answer.
            call.answer(_errors(call.kind, call.claims, f"nvdp stopped during the {call.kind}; the kubelet will "
                                                        "retry"))

    # -- asyncio side --------------------------------------------------------------------------------------------------

    async def call(self, kind: Kind, claims: Sequence[ClaimRef]) -> dict[str, Any]:
        """On the asyncio loop: an answer for every claim (by UID), never an exception for a claim's failure."""
        claims = unique_claims(claims)
        answer: dict[str, Any] = {}
        good: list[ClaimRef] = []
        for claim in claims:
            problem = claim_problem(claim)
            if problem:
                answer.update(_errors(kind, [claim], problem))
            else:
                good.append(claim)
        if not good:
            return answer
        token = self._token
        loop = asyncio.get_running_loop()
        call = _Call(kind, tuple(good), loop.create_future(), loop)
        try:
            if token is None:
                raise trio.RunFinishedError
            token.run_sync_soon(self._accept, call)
        except trio.RunFinishedError:
            answer.update(_errors(kind, good, "nvdp's DRA plugin is not running; the kubelet will retry"))
            return answer
        try:
            answer.update(await call.future)
        except asyncio.CancelledError:
            # The kubelet gave up (or the server is stopping): stop the work it no longer waits for.
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(call.scope.cancel)
            raise
        return answer
