"""What a supervisor decides, as plain functions: which children to start, stop or keep, how long to wait before a
restart, and when restarts have become frequent enough to tell the operator.

`nvdp.supervise` carries these decisions out with trio; every child supervisor of nvdp (resource servers, MPS
control daemons, the NVML health loop, the watches, the HTTP endpoint) goes through it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
S = TypeVar("S")


@dataclass(frozen=True, slots=True)
class Actions(Generic[K]):
    """A reconcile's outcome. Stops come first: a changed child must release what it holds (a socket, a pipe
    directory) before its replacement takes it."""

    stop: tuple[K, ...]
    start: tuple[K, ...]
    keep: tuple[K, ...]

    @property
    def changes(self) -> bool:
        return bool(self.stop or self.start)


def reconcile(wanted: Mapping[K, S], running: Mapping[K, S]) -> Actions[K]:
    """Wanted children vs running ones: a running child whose spec differs from the wanted one is stopped *and*
    started again; an unchanged one is kept untouched (its streams and clients never notice a reload). Orders
    follow the mappings' own orders, so the outcome is deterministic."""
    stop = tuple(key for key, spec in running.items() if key not in wanted or wanted[key] != spec)
    start = tuple(key for key, spec in wanted.items() if key not in running or running[key] != spec)
    keep = tuple(key for key in running if key not in stop)
    return Actions(stop=stop, start=start, keep=keep)


@dataclass(frozen=True, slots=True)
class Backoff:
    """Capped exponential backoff with jitter, in seconds.

    The n-th consecutive failure waits `first_s * factor**(n-1)`, capped at `max_s`, then spread by ±`jitter`
    (a fraction) so that the children of many nodes restarting together (a kubelet upgrade) do not retry in step.
    A child that ran for at least `reset_after_s` before failing starts again from `first_s`: that was not a crash
    loop.
    """

    first_s: float = 0.5
    max_s: float = 30.0
    factor: float = 2.0
    jitter: float = 0.2
    reset_after_s: float = 60.0

    def __post_init__(self) -> None:
        if not (0 < self.first_s <= self.max_s and self.factor >= 1 and 0 <= self.jitter < 1
                and self.reset_after_s >= 0):
            raise ValueError(f"invalid backoff {self!r}")

    def delay(self, failures: int, unit: float) -> float:
        """The wait before restart number `failures` (1 for the first); `unit` is a random number in [0, 1)."""
        if failures < 1:
            raise ValueError("failures counts from 1")
        # min() before the power: no float overflow however long a child keeps failing.
        exponent = min(failures - 1, 64)
        base = min(self.first_s * self.factor ** exponent, self.max_s)
        return base * (1 - self.jitter + 2 * self.jitter * unit)

    def failures_after(self, failures: int, ran_s: float) -> int:
        """The consecutive-failure count after one more failure of a child that ran `ran_s` seconds."""
        return 1 if ran_s >= self.reset_after_s else failures + 1


@dataclass(slots=True)
class RestartWindow:
    """Restarts of one child within a sliding window of `window_s`: when `threshold` of them fall inside it, the
    child is flapping and the operator should hear of it (a Node Event), once per window, not once per restart."""

    threshold: int = 3
    window_s: float = 600.0
    _times: deque[float] = field(default_factory=deque)
    _reported_at: float | None = None

    def record(self, now: float) -> bool:
        """Counts a restart at `now`; True when this one makes the child flapping and it was not reported within
        the last window."""
        self._times.append(now)
        while self._times and self._times[0] <= now - self.window_s:
            self._times.popleft()
        if len(self._times) < self.threshold:
            return False
        if self._reported_at is not None and now - self._reported_at < self.window_s:
            return False
        self._reported_at = now
        return True

    @property
    def recent(self) -> int:
        return len(self._times)
