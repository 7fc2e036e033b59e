"""Soak: `python -m nvdp` on a simulated node under steady Allocate load, with XIDs, SIGHUP reloads and kubelet
restarts on a timer. What must hold: no errors, every Allocate answered correctly, memory and latency flat, the
right devices registered and Healthy at the end.

CI runs a short version (`test_soak_short`, ~25 s) in the slow lane (`python -m pytest -m slow`). The long one is run
by hand and its figures go in docs/reliability.md:

    .venv/bin/python -m tests.test_soak --minutes 60            # the issue's schedule: XID every 3 s, reload every
                                                                # minute, kubelet restart every five
    .venv/bin/python -m tests.test_soak --minutes 2 --xid-every 1 --reload-every 5 --restart-every 10

Each interval prints RSS, Allocate count and p50/p99/max latency, and the error count so far.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
import yaml

from nvdp.testing.kubelet_emulator import KubeletEmulator

GPUS = 4
SHARED_GPU = 3
REPLICAS = 4


def _uuid(i: int) -> str:
    return f"GPU-{i:08d}-aaaa-bbbb-cccc-000000000000"


def config_text(strategy: str) -> str:
    """The config a reload alternates: GPU 3 time-sliced, and the device ID strategy flipped each time, so every
    reload changes the Allocate responses and restarts both servers (the heavier reload path)."""
    entry = f"{{name: gpu, rename: gpu-shared, replicas: {REPLICAS}, devices: [{SHARED_GPU}]}}"
    return (f"version: v1\nflags:\n  plugin:\n    deviceIDStrategy: {strategy}\n"
            f"sharing:\n  timeSlicing:\n    resources:\n      - {entry}\n")


WHOLE = {_uuid(i) for i in range(GPUS) if i != SHARED_GPU}
SHARED = {f"{_uuid(SHARED_GPU)}::{r}" for r in range(REPLICAS)}
EXPECTED = {"nvidia.com/gpu": WHOLE, "nvidia.com/gpu-shared": SHARED}


@dataclass
class Interval:
    at_s: float
    rss_kib: int
    latencies_ms: list[float]
    errors: int
    retried: int

    def line(self) -> str:
        lat = sorted(self.latencies_ms) or [0.0]
        p50 = statistics.median(lat)
        p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))]
        return (f"{self.at_s:8.0f} s  rss {self.rss_kib / 1024:7.1f} MiB  allocates {len(self.latencies_ms):6d}  "
                f"p50 {p50:6.2f} ms  p99 {p99:6.2f} ms  max {lat[-1]:7.2f} ms  errors {self.errors}  "
                f"retried {self.retried}")


@dataclass
class SoakResult:
    intervals: list[Interval] = field(default_factory=list)
    allocates: int = 0
    #: Wrong answers, refused requests, Allocates that failed even after their resource was registered again.
    errors: list[str] = field(default_factory=list)
    #: Allocates that hit a server being replaced (reload or kubelet restart) and succeeded on the next try.
    retried: int = 0
    xids: int = 0
    reloads: int = 0
    restarts: int = 0
    log_problems: list[str] = field(default_factory=list)
    final_devices: dict[str, dict[str, str]] = field(default_factory=dict)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


class _Load:
    """Allocate in a loop from one thread, as a kubelet starting pods back to back would."""

    def __init__(self, kubelet: KubeletEmulator, result: SoakResult, quiet: threading.Lock) -> None:
        self.kubelet = kubelet
        self.result = result
        self.quiet = quiet
        self.stop = threading.Event()
        self.paused = threading.Event()
        self.latencies: list[float] = []
        self.strategy = "uuid"
        self.thread = threading.Thread(target=self._run, name="soak-load", daemon=True)
        self._rng = random.Random(1)

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """The harness's turn: no Allocate in flight until the block ends (a plain Lock is not fair)."""
        self.paused.set()
        try:
            with self.quiet:
                yield
        finally:
            self.paused.clear()

    def _expected(self, resource: str, device: str) -> str:
        gpu = device.split("::")[0]
        return gpu if self.strategy == "uuid" else str(int(gpu[4:12]))

    def _run(self) -> None:
        while not self.stop.is_set():
            if self.paused.is_set():
                time.sleep(0.005)
                continue
            resource = self._rng.choice(sorted(EXPECTED))
            device = self._rng.choice(sorted(EXPECTED[resource]))
            # Not while the harness swaps config or kubelet: a real kubelet does not Allocate on a plugin it has
            # not (re-)registered; the quiet lock marks that window.
            with self.quiet:
                strategy = self.strategy
                for attempt in range(2):
                    started = time.perf_counter()
                    try:
                        response = self.kubelet.allocate(resource, [device], timeout=5)
                    except (grpc.RpcError, LookupError) as exc:
                        if attempt == 0:
                            # A server stopped by a reload between the kubelet's look-up and the call: wait for
                            # the resource to be registered again, then retry once.
                            self.result.retried += 1
                            self.kubelet.wait_for(lambda k, r=resource: bool(k.devices(r)), 10)
                            continue
                        self.result.errors.append(f"Allocate {resource} {device}: {exc}")
                        break
                    self.latencies.append((time.perf_counter() - started) * 1000)
                    self.result.allocates += 1
                    got = response.container_responses[0].envs.get("NVIDIA_VISIBLE_DEVICES")
                    want = self._expected(resource, device)
                    if got != want and self.strategy == strategy:
                        self.result.errors.append(f"Allocate {resource} {device}: got {got!r}, want {want!r}")
                    break


def _write_node(workdir: Path) -> Path:
    gpus = [{"uuid": _uuid(i), "name": "NVIDIA A100-SXM4-40GB", "memoryMiB": 40960, "computeCapability": "8.0",
             "pciBusId": f"00000000:{0x10 + i:02x}:00.0", "minorNumber": i, "numaNode": i // 2}
            for i in range(GPUS)]
    node = {"driverVersion": "580.82.07", "cudaDriverVersion": 13000, "eventsFile": str(workdir / "events"),
            "gpus": gpus, "nvlinks": [[0, 1, 12], [2, 3, 12]]}
    path = workdir / "node.yaml"
    path.write_text(yaml.safe_dump(node, sort_keys=False))
    return path


@contextlib.contextmanager
def _nvdp(kubelet: KubeletEmulator, workdir: Path, config: Path) -> Iterator[subprocess.Popen[bytes]]:
    log = (workdir / "nvdp.log").open("wb")
    env = {**os.environ, "METRICS_ADDRESS": "127.0.0.1:0", "HEALTH_QUIET_PERIOD": "2", "LOG_FORMAT": "text"}
    env.pop("NVDP_SIM_EVENT_WAIT_MAX_MS", None)  # a measurement: the simulated NVML waits as asked (tests/conftest.py)
    process = subprocess.Popen(
        [sys.executable, "-m", "nvdp", "--simulate", str(_write_node(workdir)), "--kubelet-socket",
         str(kubelet.socket), "--config-file", str(config)],
        env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)
        log.close()


def _every(period_s: float, start: float) -> Iterator[float]:
    t = start
    while True:
        t += period_s
        yield t


def run_soak(duration_s: float, *, xid_every_s: float, reload_every_s: float, restart_every_s: float,
             interval_s: float, report: Callable[[str], None] = print) -> SoakResult:
    result = SoakResult()
    with tempfile.TemporaryDirectory(prefix="nvdp-soak-") as tmp:
        workdir = Path(tmp)
        config = workdir / "config.yaml"
        config.write_text(config_text("uuid"))
        with KubeletEmulator(workdir / "dp") as kubelet, _nvdp(kubelet, workdir, config) as process:
            registered = lambda k: all(set(k.devices(r)) == ids for r, ids in EXPECTED.items())  # noqa: E731
            if not kubelet.wait_for(registered, 30):
                raise RuntimeError(f"nvdp did not register: {kubelet!r}\n{(workdir / 'nvdp.log').read_text()}")
            quiet = threading.Lock()
            load = _Load(kubelet, result, quiet)
            load.thread.start()
            started = time.monotonic()
            end = started + duration_s
            next_xid, next_reload = _every(xid_every_s, started), _every(reload_every_s, started)
            next_restart, next_report = _every(restart_every_s, started), _every(interval_s, started)
            due = {"xid": next(next_xid), "reload": next(next_reload), "restart": next(next_restart),
                   "report": next(next_report)}
            errors_seen = retried_seen = 0
            events = workdir / "events"
            while (now := time.monotonic()) < end:
                kind = min(due, key=lambda k: due[k])
                if due[kind] > end:
                    time.sleep(max(0.0, end - now))
                    break
                time.sleep(max(0.0, due[kind] - now))
                if process.poll() is not None:
                    result.errors.append(f"nvdp exited with {process.returncode}")
                    break
                if kind == "xid":
                    # A critical (48, double-bit ECC) and an ignored (13) XID in turn, on the GPUs in turn.
                    code = 48 if result.xids % 2 == 0 else 13
                    with events.open("a") as f:
                        f.write(f"xid {_uuid(result.xids % GPUS)} {code}\n")
                    result.xids += 1
                    due[kind] = next(next_xid)
                elif kind == "reload":
                    with load.held():
                        load.strategy = "index" if load.strategy == "uuid" else "uuid"
                        config.write_text(config_text(load.strategy))
                        before = len(kubelet.registrations)
                        process.send_signal(signal.SIGHUP)
                        # Both servers restart (the responses changed) and register again.
                        if not kubelet.wait_for(lambda k, n=before: len(k.registrations) >= n + 2
                                                and registered(k), 20):
                            result.errors.append(f"reload {result.reloads}: not re-registered: {kubelet!r}")
                    result.reloads += 1
                    due[kind] = next(next_reload)
                elif kind == "restart":
                    with load.held():
                        kubelet.restart()
                        if not kubelet.wait_for(registered, 20):
                            result.errors.append(f"kubelet restart {result.restarts}: not re-registered")
                    result.restarts += 1
                    due[kind] = next(next_restart)
                else:
                    latencies, load.latencies = load.latencies, []
                    interval = Interval(time.monotonic() - started, rss_kib(process.pid), latencies,
                                        len(result.errors) - errors_seen, result.retried - retried_seen)
                    errors_seen, retried_seen = len(result.errors), result.retried
                    result.intervals.append(interval)
                    report(interval.line())
                    due[kind] = next(next_report)
            load.stop.set()
            load.thread.join(10)
            # XIDs have stopped: after the quiet period (2 s) every GPU is probed and comes back.
            healthy = lambda k: all(k.devices(r) == dict.fromkeys(ids, "Healthy")  # noqa: E731
                                    for r, ids in EXPECTED.items())
            if not kubelet.wait_for(healthy, 20):
                result.errors.append(f"devices not all Healthy at the end: {kubelet!r}")
            result.final_devices = {r: kubelet.devices(r) for r in EXPECTED}
        for line in (workdir / "nvdp.log").read_text(errors="replace").splitlines():
            # Text log lines carry the level; tracebacks have no level but start with "Traceback".
            if " ERROR " in line or " CRITICAL " in line or line.startswith("Traceback"):
                result.log_problems.append(line)
    return result


@pytest.mark.slow
def test_soak_short() -> None:
    lines: list[str] = []
    result = run_soak(20, xid_every_s=1, reload_every_s=5, restart_every_s=10, interval_s=5, report=lines.append)
    summary = "\n".join(lines)
    assert not result.errors, f"{result.errors[:5]}\n{summary}"
    assert not result.log_problems, f"{result.log_problems[:5]}\n{summary}"
    assert result.allocates > 100 and result.xids >= 15 and result.reloads >= 3 and result.restarts >= 1, summary
    assert all(interval.latencies_ms for interval in result.intervals), f"an interval without Allocates\n{summary}"
    # Loose on purpose: 20 s is too short to tell a leak from warm-up; the long run's figures are the real check.
    growth = result.intervals[-1].rss_kib - result.intervals[0].rss_kib
    assert growth < 40 * 1024, f"RSS grew by {growth} KiB in 20 s\n{summary}"
    print(summary)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=60)
    parser.add_argument("--xid-every", type=float, default=3, help="seconds between XIDs")
    parser.add_argument("--reload-every", type=float, default=60, help="seconds between SIGHUP reloads")
    parser.add_argument("--restart-every", type=float, default=300, help="seconds between kubelet restarts")
    parser.add_argument("--interval", type=float, default=60, help="seconds per reported interval")
    args = parser.parse_args(argv)
    result = run_soak(args.minutes * 60, xid_every_s=args.xid_every, reload_every_s=args.reload_every,
                      restart_every_s=args.restart_every, interval_s=args.interval, report=lambda s: print(s,
                                                                                                        flush=True))
    first, last = result.intervals[0], result.intervals[-1]
    everything = sorted(x for i in result.intervals for x in i.latencies_ms) or [0.0]
    print(f"allocates {result.allocates}, xids {result.xids}, reloads {result.reloads}, kubelet restarts "
          f"{result.restarts}, retried {result.retried}, errors {len(result.errors)}, log errors "
          f"{len(result.log_problems)}")
    print(f"rss first interval {first.rss_kib / 1024:.1f} MiB, last {last.rss_kib / 1024:.1f} MiB; allocate p50 "
          f"{statistics.median(everything):.2f} ms, p99 {everything[int(len(everything) * 0.99) - 1]:.2f} ms")
    for problem in (result.errors + result.log_problems)[:20]:
        print("PROBLEM", problem)
    return 1 if result.errors or result.log_problems else 0


if __name__ == "__main__":
    sys.exit(main())
