"""The measuring instruments: nvdp as a child process next to a kubelet emulator, /proc readings, statistics."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from nvdp.kubelet.api import v1beta1 as api
from nvdp.testing.kubelet_emulator import KubeletEmulator

ROOT = Path(__file__).resolve().parent.parent
#: The fake `nvidia-cuda-mps-control` lives here; MPS scenarios put this directory first on PATH.
SIM_BIN = ROOT / "nvdp" / "sim"
PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024


class Unavailable(Exception):
    """The figure cannot be measured on this tree (its feature is not wired yet); the message says why."""


class FigureError(Exception):
    """Something that should work did not: the benchmark run fails."""


# -------------------------------------------------------------------------------------------------- statistics


def percentile(ordered: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default); `ordered` must be sorted."""
    if not ordered:
        raise ValueError("no samples")
    pos = (len(ordered) - 1) * q
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def latency_stats(samples_ms: Iterable[float]) -> dict[str, float]:
    ordered = sorted(samples_ms)
    return {
        "n": float(len(ordered)),
        "p50": percentile(ordered, 0.50),
        "p90": percentile(ordered, 0.90),
        "p99": percentile(ordered, 0.99),
        "max": ordered[-1],
    }


# -------------------------------------------------------------------------------------------------- /proc


def rss_mib(pid: int) -> float:
    """Resident set size of a process in MiB (VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise FigureError(f"no VmRSS for pid {pid}")


def thread_cpu_ns(pid: int) -> dict[int, int]:
    """CPU time per thread of a process (ns, from /proc/<pid>/task/*/schedstat)."""
    times = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            times[int(task.name)] = int((task / "schedstat").read_text().split()[0])
        except (FileNotFoundError, ProcessLookupError, ValueError):
            continue
    return times


def cpu_seconds_between(before: dict[int, int], after: dict[int, int]) -> float:
    """CPU seconds spent between two `thread_cpu_ns` readings by the threads alive at the second one.

    Per thread, so that a worker thread exiting in between (trio's thread cache retires idle workers after 10 s)
    does not subtract its whole lifetime from the total, as a plain sum would.
    """
    return sum(max(0, ns - before.get(tid, 0)) for tid, ns in after.items()) / 1e9


def thread_count(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/task").iterdir()))


# -------------------------------------------------------------------------------------------------- the child


#: Where the child's TMPDIR goes: `--simulate` writes the simulated node's host root and driver files there (~65 files
#: at every start, which a real node does not write). tmpfs where there is one: on the development VM a file created
#: in /tmp costs ~0.25 ms, ten times one in /work on the same disk, which put ~17 ms of the simulator's own writing
#: into the start-up figure (docs/performance.md).
SCRATCH_PARENT = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None


@dataclass
class Nvdp:
    """`python -m nvdp --simulate NODE` in a child process, registered with a kubelet emulator in this process.

    The emulator's plugin directory is a short temp directory (Unix socket paths are limited to 107 bytes); the
    child's log goes to `<workdir>/nvdp.log` so a full pipe never stalls it.
    """

    workdir: Path
    node: Path
    args: Sequence[str] = ()
    env: dict[str, str] = field(default_factory=dict)
    config: Path | None = None
    process: subprocess.Popen[bytes] | None = None
    kubelet: KubeletEmulator | None = None
    spawned_at: float = 0.0
    _plugin_tmp: tempfile.TemporaryDirectory[str] | None = None
    _scratch: tempfile.TemporaryDirectory[str] | None = None

    @property
    def log_path(self) -> Path:
        return self.workdir / "nvdp.log"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self) -> None:
        self._plugin_tmp = tempfile.TemporaryDirectory(prefix="nvdp-b-")
        self.kubelet = KubeletEmulator(Path(self._plugin_tmp.name) / "device-plugins")
        self.kubelet.start()
        argv = [sys.executable, "-m", "nvdp", "--simulate", str(self.node),
                "--kubelet-socket", str(self.kubelet.socket), *self.args]
        if self.config is not None:
            argv += ["--config-file", str(self.config)]
        # No metrics endpoint unless a scenario asks for one: :9400 may be taken on a shared machine.
        env = {**os.environ, "METRICS_ADDRESS": "", **self.env}
        if SCRATCH_PARENT is not None and "TMPDIR" not in self.env:
            self._scratch = tempfile.TemporaryDirectory(prefix="nvdp-b-", dir=SCRATCH_PARENT)
            env["TMPDIR"] = self._scratch.name
        # The child imports the working tree's nvdp, whatever the caller's directory.
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
        log = self.log_path.open("wb")
        self.spawned_at = time.monotonic()
        self.process = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        log.close()

    def log_tail(self, lines: int = 6) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def wait_for(self, predicate: Callable[[KubeletEmulator], bool], timeout: float) -> bool:
        """Wait for a kubelet-side condition, giving up early if the child exits."""
        assert self.kubelet is not None
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            if self.kubelet.wait_for(predicate, min(remaining, 0.25)):
                return True
            if not self.alive():
                return self.kubelet.wait_for(predicate, 0)

    def wait_resources(self, names: Iterable[str], timeout: float = 30.0) -> bool:
        """Every named resource registered and its device list received."""
        wanted = set(names)
        return self.wait_for(lambda k: all(k.devices(n) for n in wanted), timeout)

    def registered_at(self, names: Iterable[str]) -> float:
        """When the kubelet received the latest Register among the named resources (monotonic)."""
        assert self.kubelet is not None
        wanted = set(names)
        return max(r.at for r in self.kubelet.registrations if r.resource in wanted)

    def sighup(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGHUP)

    def terminate_timed(self, expect_zero: bool = True) -> float:
        """SIGTERM -> the process has exited, in ms (the benchmark process reaps it, so this includes the exit's
        last steps: sockets removed, threads ended, the interpreter torn down)."""
        assert self.process is not None
        # A pidfd turns readable the moment the process exits; `Popen.wait(timeout)` polls with sleeps of up to
        # 50 ms, which would be most of the figure.
        pidfd = os.pidfd_open(self.process.pid)
        try:
            started = time.monotonic()
            self.process.send_signal(signal.SIGTERM)
            exited, _, _ = select.select([pidfd], [], [], 10.0)
            elapsed = 1000 * (time.monotonic() - started)
        finally:
            os.close(pidfd)
        if not exited:
            raise FigureError(f"still running 10 s after SIGTERM; log tail:\n{self.log_tail()}")
        self.process.wait(10)
        if expect_zero and self.process.returncode != 0:
            raise FigureError(f"exit code {self.process.returncode} after SIGTERM; log tail:\n{self.log_tail()}")
        return elapsed

    def plugin_sockets(self) -> list[Path]:
        """The plugin's sockets in the kubelet's directory (not the kubelet's own)."""
        assert self.kubelet is not None
        return [p for p in self.kubelet.socket.parent.glob("*.sock") if p != self.kubelet.socket]

    def stop(self) -> int | None:
        code = None
        if self.process is not None:
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGTERM)
                try:
                    self.process.wait(10)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait(10)
            code = self.process.returncode
        if self.kubelet is not None:
            self.kubelet.stop()
        if self._plugin_tmp is not None:
            self._plugin_tmp.cleanup()
        if self._scratch is not None:
            self._scratch.cleanup()
        return code

    def __enter__(self) -> Nvdp:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- raw calls: the request is encoded once, the response is not decoded in the timed loop ------------------

    def raw_method(self, resource: str, name: str) -> Callable[..., bytes]:
        assert self.kubelet is not None
        endpoint = self.kubelet.endpoint(resource)
        if endpoint is None:
            raise FigureError(f"{resource} is not registered")
        return endpoint.channel.unary_unary(f"/v1beta1.DevicePlugin/{name}")  # type: ignore[return-value]


def allocate_request(device_ids: Sequence[str]) -> bytes:
    return bytes(api.AllocateRequest(container_requests=[api.ContainerAllocateRequest(devices_ids=list(device_ids))]))


def preferred_request(available: Sequence[str], size: int) -> bytes:
    return bytes(api.PreferredAllocationRequest(container_requests=[api.ContainerPreferredAllocationRequest(
        available_deviceIDs=list(available), must_include_deviceIDs=[], allocation_size=size)]))


def time_calls(call: Callable[..., bytes], request: bytes, calls: int, warmup: int) -> list[float]:
    """Round trips in ms of `calls` unary calls after `warmup` untimed ones."""
    for _ in range(warmup):
        call(request, timeout=5.0)
    samples = []
    clock = time.perf_counter_ns
    for _ in range(calls):
        start = clock()
        call(request, timeout=5.0)
        samples.append((clock() - start) / 1e6)
    return samples


def repeat_calls(call: Callable[..., bytes], request: bytes, calls: int) -> None:
    for _ in range(calls):
        call(request, timeout=5.0)


def concurrent_calls(socket_path: Path, method: str, request: bytes, clients: int, seconds: float) -> float:
    """Calls per second that `clients` threads complete together, each with a connection of its own (as that many
    kubelets would have), each calling back to back for `seconds`. The client is Python (grpcio), so past a few
    clients this is bounded by the benchmark process as much as by the plugin."""
    import grpc  # the emulator's dependency, imported only where used

    channels = [grpc.insecure_channel(f"unix:{socket_path}", options=[("grpc.default_authority", "localhost"),
                                                                      ("grpc.use_local_subchannel_pool", 1)])
                for _ in range(clients)]
    counts = [0] * clients
    finished = [0.0] * clients
    start = threading.Barrier(clients + 1)

    def client(i: int) -> None:
        call = channels[i].unary_unary(f"/v1beta1.DevicePlugin/{method}")
        call(request, timeout=5.0)  # connected before the clock starts
        start.wait()
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            call(request, timeout=5.0)
            counts[i] += 1
        finished[i] = time.monotonic()

    threads = [threading.Thread(target=client, args=(i,), name=f"bench-client-{i}") for i in range(clients)]
    try:
        for t in threads:
            t.start()
        start.wait(30)
        began = time.monotonic()
        for t in threads:
            t.join(seconds + 30)
        elapsed = max(finished) - began
    finally:
        for channel in channels:
            channel.close()
    return sum(counts) / elapsed
