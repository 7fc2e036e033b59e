"""The scenarios: each starts nvdp on one simulated node with one config and measures the figures that need it.

A scenario returns `{figure key: {statistic: value}}` for one repeat. A figure whose feature this tree does not have
yet comes back as an `Unavailable` (a reason, not a failure); anything else that goes wrong raises `FigureError` and
fails the run.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from bench import nodes
from bench.against import Foreign
from bench.harness import (
    ROOT,
    SIM_BIN,
    FigureError,
    Nvdp,
    Unavailable,
    allocate_request,
    concurrent_calls,
    cpu_seconds_between,
    latency_stats,
    preferred_request,
    repeat_calls,
    rss_mib,
    thread_cpu_ns,
    time_calls,
)
from nvdp.kubelet.api import v1beta1 as api
from nvdp.testing.kubelet_emulator import KubeletEmulator

GPU = "nvidia.com/gpu"
MIG_1G = "nvidia.com/mig-1g.5gb"
START_TIMEOUT_S = 30.0
#: How long a sharing config may take to show its devices before the feature is declared not wired.
FEATURE_TIMEOUT_S = 15.0

Stats = dict[str, float | str]
Results = dict[str, Stats | Unavailable]


@dataclass(frozen=True)
class Params:
    repeats: int
    #: Timed calls per latency figure, after `warmup` untimed ones.
    calls: int
    warmup: int
    #: Allocates in total before the "after N allocates" RSS reading.
    leak_calls: int
    idle_s: float
    idle_no_health_s: float
    health_events: int
    reloads: int
    kubelet_restarts: int
    startups: int
    encode_runs: int
    #: After registration, before RSS and idle CPU are read: let start-up stragglers (threads, GC) finish.
    settle_s: float
    #: How long `CONCURRENT_CLIENTS` clients call Allocate together (the throughput figure).
    concurrent_s: float


FULL = Params(repeats=3, calls=2000, warmup=200, leak_calls=10_000, idle_s=30.0, idle_no_health_s=30.0,
              health_events=56, reloads=20, kubelet_restarts=50, startups=5, encode_runs=20, settle_s=1.0,
              concurrent_s=3.0)
QUICK = Params(repeats=1, calls=200, warmup=30, leak_calls=1000, idle_s=1.0, idle_no_health_s=0.5,
               health_events=8, reloads=3, kubelet_restarts=2, startups=1, encode_runs=3, settle_s=0.3,
               concurrent_s=0.5)
#: After registration, before SIGTERM: the health loop is inside its NVML event wait by then (the case that used to
#: hold shutdown for up to the wait's 500 ms bound).
PRE_STOP_S = 0.1
#: Clients calling Allocate at once for the throughput figure (the issue's comparison used 8).
CONCURRENT_CLIENTS = 8


# -------------------------------------------------------------------------------------------------- helpers


def _started(n: Nvdp, resources: list[str]) -> None:
    if not n.wait_resources(resources, START_TIMEOUT_S):
        raise FigureError(f"nvdp did not register {', '.join(resources)} within {START_TIMEOUT_S:.0f} s; "
                          f"log tail:\n{n.log_tail()}")


def _feature_devices(n: Nvdp, resource: str, check: Callable[[dict[str, str]], bool], feature: str) -> list[str]:
    """The resource's device IDs once `check` accepts them; Unavailable if the feature does not show up."""
    assert n.kubelet is not None
    if n.wait_for(lambda k: check(k.devices(resource)), FEATURE_TIMEOUT_S):
        return list(n.kubelet.devices(resource))
    if not n.alive():
        last = n.log_tail(1).strip() or "(no output)"
        raise Unavailable(f"{feature}: nvdp exited with code {n.process.returncode if n.process else '?'}: {last}")
    seen = {r: len(n.kubelet.devices(r)) for r in n.kubelet.resources()}
    raise Unavailable(f"{feature}: config accepted but the kubelet holds {seen or 'nothing'} "
                      f"after {FEATURE_TIMEOUT_S:.0f} s (not wired into the plan yet)")


def _allocate_figure(n: Nvdp, p: Params, resource: str, ids: list[str],
                     check: Callable[[api.AllocateResponse], bool]) -> Stats:
    call = n.raw_method(resource, "Allocate")
    request = allocate_request(ids)
    response = api.AllocateResponse.parse(call(request, timeout=5.0))
    if not check(response):
        raise FigureError(f"unexpected Allocate response for {resource} {ids}: {response}")
    return latency_stats(time_calls(call, request, p.calls, p.warmup))


def _idle_cpu_percent(pid: int, seconds: float) -> float:
    before = thread_cpu_ns(pid)
    time.sleep(seconds)
    return 100.0 * cpu_seconds_between(before, thread_cpu_ns(pid)) / seconds


def _has_visible_devices(response: api.AllocateResponse) -> bool:
    return "NVIDIA_VISIBLE_DEVICES" in response.container_responses[0].envs


# -------------------------------------------------------------------------------------------------- scenarios


def _plugin(wd: Path, node: Path, against: Path | None, args: list[str] | None = None,
            env: dict[str, str] | None = None) -> Nvdp:
    """nvdp, or with `against` the foreign plugin at that path (bench/against.py), on the same node."""
    if against is not None:
        return Foreign(wd, node, binary=against)
    return Nvdp(wd, node, args or (), env or {})


def base(p: Params, wd: Path, against: Path | None = None) -> Results:
    """4 whole GPUs, default flags: Allocate (latency, plugin CPU per call), RSS before/after many Allocates and
    kubelet restarts, idle CPU, kubelet restarts. With `against`: the same for a foreign plugin."""
    out: Results = {}
    with _plugin(wd, nodes.four_gpus(wd / "node.yaml"), against) as n:
        assert n.kubelet is not None
        _started(n, [GPU])
        time.sleep(p.settle_s)
        registered = rss_mib(n.pid)
        out["memory.rss_registered"] = {"value": registered}
        out["idle_cpu.default"] = {"value": _idle_cpu_percent(n.pid, p.idle_s)}
        first = next(iter(n.kubelet.devices(GPU)))
        cpu_before = thread_cpu_ns(n.pid)
        out["allocate.whole_gpu"] = _allocate_figure(n, p, GPU, [first], _has_visible_devices)
        calls = p.calls + p.warmup + 1
        out["allocate.cpu_per_call"] = {
            "value": 1e6 * cpu_seconds_between(cpu_before, thread_cpu_ns(n.pid)) / calls, "calls": float(calls)}
        call = n.raw_method(GPU, "Allocate")
        request = allocate_request([first])
        warm = rss_mib(n.pid)
        done = p.calls + p.warmup + 1
        repeat_calls(call, request, max(0, p.leak_calls - done))
        after = rss_mib(n.pid)
        out["memory.rss_after_allocates"] = {"value": after, "allocates": float(max(done, p.leak_calls))}
        out["memory.rss_growth"] = {"value": after - warm}
        samples = []
        for _ in range(p.kubelet_restarts):
            n.kubelet.restart()
            started = n.kubelet.started_at
            if not n.wait_for(lambda k, s=started: bool(k.devices(GPU)) and any(
                    r.at >= s for r in k.registrations if r.resource == GPU), START_TIMEOUT_S):
                raise FigureError(f"no re-registration after a kubelet restart; log tail:\n{n.log_tail()}")
            samples.append(1000 * (n.registered_at([GPU]) - started))
        out["startup.kubelet_restart"] = latency_stats(samples)
        time.sleep(p.settle_s)
        final = rss_mib(n.pid)
        out["memory.rss_after_restarts"] = {"value": final, "allocates": float(max(done, p.leak_calls)),
                                            "restarts": float(p.kubelet_restarts)}
        out["memory.rss_growth_total"] = {"value": final - registered}
        # Last: its calls are not in the memory figures' counts.
        endpoint = n.kubelet.endpoint(GPU)
        assert endpoint is not None
        out["allocate.concurrent"] = {"value": concurrent_calls(
            n.kubelet.socket.parent / endpoint.endpoint, "Allocate", request, CONCURRENT_CLIENTS, p.concurrent_s),
            "clients": float(CONCURRENT_CLIENTS)}
    return out


def startup(p: Params, wd: Path, against: Path | None = None) -> Results:
    """Process start (the exec of `python -m nvdp`) to every resource registered, on 4 whole GPUs; then SIGTERM to
    exit (health checks on, the NVML event wait in progress), which must leave no socket behind.

    nvdp is started with its modules byte-compiled (as in the image), and again with no .pyc at all (a fresh
    `PYTHONPYCACHEPREFIX`, nothing written): every module, the standard library's included, compiled at start."""
    node = nodes.four_gpus(wd / "node.yaml")
    out: Results = {}
    if against is None:
        subprocess.run([sys.executable, "-m", "compileall", "-q", str(ROOT / "nvdp")], check=True,
                       stdout=subprocess.DEVNULL)
    registered, devices, stops = [], [], []
    for _ in range(p.startups):
        with _plugin(wd, node, against) as n:
            _started(n, [GPU])
            held = time.monotonic()
            setup = n.setup_ms if isinstance(n, Foreign) else 0.0
            registered.append(1000 * (n.registered_at([GPU]) - n.spawned_at) - setup)
            devices.append(1000 * (held - n.spawned_at) - setup)
            time.sleep(PRE_STOP_S)
            stops.append(n.terminate_timed(expect_zero=against is None))
            left = n.plugin_sockets()
            if against is None and left:
                raise FigureError(f"sockets left behind after SIGTERM: {[str(s) for s in left]}")
    out["startup.process"] = {**{k: v for k, v in latency_stats(registered).items() if k in ("n", "p50", "max")},
                              "devices_p50": latency_stats(devices)["p50"]}
    out["shutdown.sigterm_to_exit"] = {k: v for k, v in latency_stats(stops).items() if k in ("n", "p50", "max")}
    if against is None:
        cold = []
        for _ in range(p.startups):
            with tempfile.TemporaryDirectory(prefix="nvdp-pyc-") as empty, Nvdp(
                    wd, node, env={"PYTHONPYCACHEPREFIX": empty, "PYTHONDONTWRITEBYTECODE": "1"}) as n:
                _started(n, [GPU])
                cold.append(1000 * (n.registered_at([GPU]) - n.spawned_at))
        out["startup.process_uncompiled"] = {k: v for k, v in latency_stats(cold).items() if k in ("n", "p50", "max")}
    return out


def idle_no_health(p: Params, wd: Path) -> Results:
    """Idle CPU with health checks off (DP_DISABLE_HEALTHCHECKS=all): what nvdp costs without the fake NVML's
    5 ms event-wait polling, which a real driver does not do."""
    with Nvdp(wd, nodes.four_gpus(wd / "node.yaml"), env={"DP_DISABLE_HEALTHCHECKS": "all"}) as n:
        _started(n, [GPU])
        time.sleep(p.settle_s)
        return {"idle_cpu.health_checks_disabled": {"value": _idle_cpu_percent(n.pid, p.idle_no_health_s)}}


def nvlink8(p: Params, wd: Path) -> Results:
    """8 GPUs on an NVLink hybrid cube mesh, volume-mounts + passDeviceSpecs: 4-GPU Allocate, preferred 2 and 4."""
    out: Results = {}
    args = ["--device-list-strategy", "volume-mounts", "--pass-device-specs", "true"]
    with Nvdp(wd, nodes.eight_gpus_nvlink(wd / "node.yaml"), args) as n:
        assert n.kubelet is not None
        _started(n, [GPU])
        ids = list(n.kubelet.devices(GPU))
        if len(ids) != 8:
            raise FigureError(f"expected 8 GPUs, the kubelet holds {len(ids)}")

        def four_mounts(response: api.AllocateResponse) -> bool:
            container = response.container_responses[0]
            return len(container.mounts) >= 4 and len(container.devices) >= 4

        out["allocate.four_gpu_volume_mounts"] = _allocate_figure(n, p, GPU, ids[:4], four_mounts)
        call = n.raw_method(GPU, "GetPreferredAllocation")
        for size in (2, 4):
            request = preferred_request(ids, size)
            response = api.PreferredAllocationResponse.parse(call(request, timeout=5.0))
            chosen = list(response.container_responses[0].device_i_ds)  # type: ignore[attr-defined]
            if len(chosen) != size:
                raise FigureError(f"GetPreferredAllocation size {size} answered {chosen}")
            out[f"preferred.nvlink8_size{size}"] = latency_stats(time_calls(call, request, p.calls, p.warmup))
    return out


def time_slicing(p: Params, wd: Path) -> Results:
    """4 GPUs x 4 time-slicing replicas: Allocate of one replica."""
    config = nodes.config(wd / "config.yaml", nodes.time_slicing([{"name": GPU, "replicas": 4}]))
    with Nvdp(wd, nodes.four_gpus(wd / "node.yaml"), config=config) as n:
        try:
            ids = _feature_devices(n, GPU, lambda d: len(d) == 16, "time-slicing")
        except Unavailable as exc:
            return {"allocate.time_slicing": exc}
        return {"allocate.time_slicing": _allocate_figure(n, p, GPU, [ids[0]], _has_visible_devices)}


def mps(p: Params, wd: Path) -> Results:
    """One GPU split into two 10 GB MPS slices (the fork's dialect): Allocate of one slice."""
    resource = "nvidia.com/gpu-10gb"
    key = "allocate.mps"
    control = SIM_BIN / "nvidia-cuda-mps-control"
    if not control.exists():
        return {key: Unavailable(f"MPS: no fake control daemon at {control.relative_to(SIM_BIN.parent.parent)}")}
    mps_root = wd / "mps"
    mps_root.mkdir(exist_ok=True)
    config = nodes.config(wd / "config.yaml", {"sharing": {"mps": {"resources": [
        {"name": GPU, "rename": "gpu-10gb", "memoryGB": 10, "replicas": 2, "devices": ["0"]}]}}})
    env = {"PATH": f"{SIM_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    with Nvdp(wd, nodes.four_gpus(wd / "node.yaml"), ["--mps-root", str(mps_root)], env, config) as n:
        try:
            ids = _feature_devices(n, resource, lambda d: len(d) == 2, "MPS")
        except Unavailable as exc:
            return {key: exc}
        return {key: _allocate_figure(n, p, resource, [ids[0]], lambda r: bool(r.container_responses))}


def health(p: Params, wd: Path) -> Results:
    """XID 48 written to the simulated events file -> the kubelet holds that device Unhealthy.

    56 MIG 1g.5gb devices (8 GPUs x 7) under --mig-strategy mixed: an XID that names a MIG device marks only that
    device, so each event is measured from a clean state without waiting for recovery.
    """
    key = "health.xid_to_unhealthy"
    events = wd / "events"
    events.write_text("")
    node = nodes.eight_gpus_mig(wd / "node.yaml")
    data = yaml.safe_load(node.read_text())
    nodes.write(node, {**data, "eventsFile": str(events)})
    with Nvdp(wd, node, ["--mig-strategy", "mixed"]) as n:
        assert n.kubelet is not None
        _started(n, [MIG_1G])
        time.sleep(0.3)  # the health loop registers its event set after start-up; earlier lines are history
        targets = [nodes.mig_uuid(i % 8, i // 8) for i in range(min(p.health_events, 56))]
        samples: list[float] = []
        for i, uuid in enumerate(targets):
            time.sleep(0.02)
            started = time.monotonic()
            with events.open("a") as f:
                f.write(f"xid {uuid} 48\n")
            if not n.wait_for(lambda k, u=uuid: k.devices(MIG_1G).get(u) == "Unhealthy", 3.0):
                if i == 0:
                    return {key: Unavailable("health loop: no Unhealthy device on ListAndWatch within 3 s of "
                                             "an XID 48 (not wired yet)")}
                raise FigureError(f"XID 48 on {uuid} not propagated within 3 s (event {i})")
            samples.append(1000 * (time.monotonic() - started))
            unhealthy = sum(h == "Unhealthy" for h in n.kubelet.devices(MIG_1G).values())
            if unhealthy != i + 1:
                raise FigureError(f"after {i + 1} MIG XIDs the kubelet holds {unhealthy} Unhealthy devices: "
                                  "an XID that names a MIG instance must mark only that instance")
        return {key: latency_stats(samples)}


#: (name, node writer, config A, config B, extra args): B changes one resource and leaves at least one alone.
RELOAD_CANDIDATES: list[tuple[str, Callable[[Path], Path], dict[str, object], dict[str, object]]] = [
    ("time-slicing of mig-1g.5gb, 2 <-> 4 replicas, --mig-strategy mixed", nodes.mixed_mig,
     nodes.time_slicing([{"name": MIG_1G, "replicas": 2}], migStrategy="mixed"),
     nodes.time_slicing([{"name": MIG_1G, "replicas": 4}], migStrategy="mixed")),
    ("time-slicing of GPUs 0-1 renamed gpu-shared, 2 <-> 4 replicas", nodes.four_gpus,
     nodes.time_slicing([{"name": GPU, "rename": "gpu-shared", "devices": [0, 1], "replicas": 2}]),
     nodes.time_slicing([{"name": GPU, "rename": "gpu-shared", "devices": [0, 1], "replicas": 4}])),
]


def _snapshot(k: KubeletEmulator) -> dict[str, frozenset[str]]:
    return {r: frozenset(k.devices(r)) for r in k.resources()}


def _settled(n: Nvdp, timeout: float) -> dict[str, frozenset[str]]:
    """The kubelet's device sets once registrations stop arriving for 0.5 s."""
    assert n.kubelet is not None
    deadline = time.monotonic() + timeout
    last = (-1, {})
    while time.monotonic() < deadline:
        current = (len(n.kubelet.registrations), _snapshot(n.kubelet))
        if current == last and current[1] and all(current[1].values()):
            return current[1]
        last = current
        time.sleep(0.5)
    return last[1]


def _changed_and_unchanged(state_a: dict[str, frozenset[str]],
                           state_b: dict[str, frozenset[str]]) -> tuple[list[str], list[str]]:
    changed = sorted(r for r in set(state_a) | set(state_b) if state_a.get(r) != state_b.get(r))
    unchanged = sorted(r for r in state_a if state_a[r] == state_b.get(r))
    return changed, unchanged


def _time_switches(n: Nvdp, switches: int, states: tuple[dict[str, frozenset[str]], dict[str, frozenset[str]]],
                   changed: list[str], prepare: Callable[[int], None], trigger: Callable[[int], None],
                   what: str) -> list[float]:
    """Switch `switches` times between the two states (0 -> state A, 1 -> state B, ...); each sample is `trigger`
    -> the kubelet holds the target device set, all Healthy, for every changed resource."""
    samples = []
    for i in range(switches):
        target = states[i % 2]
        prepare(i)
        time.sleep(0.05)
        started = time.monotonic()
        trigger(i)
        ok = n.wait_for(lambda k, t=target: all(
            frozenset(k.devices(r)) == t[r] and all(h == "Healthy" for h in k.devices(r).values())
            for r in changed if r in t), 10.0)
        if not ok:
            raise FigureError(f"{what} {i} not seen by the kubelet within 10 s; log tail:\n{n.log_tail()}")
        samples.append(1000 * (time.monotonic() - started))
    return samples


def _broken_streams(k: KubeletEmulator, unchanged: list[str]) -> int:
    """ListAndWatch streams of the unchanged resources that ended, plus their re-registrations."""
    broken = 0
    for r in unchanged:
        broken += k.broken_streams.get(r, 0)
        broken += sum(reg.resource == r for reg in k.registrations) - 1
    return broken


def _first_switch(
    n: Nvdp, switch: Callable[[], None], name: str, reasons: list[str]
) -> tuple[dict[str, frozenset[str]], dict[str, frozenset[str]], list[str], list[str]] | None:
    """Switch once from config A to B and tell the resources that changed from those that did not; None (with the
    reason appended) when this candidate cannot measure a reload: nvdp exited, or nothing or everything changed."""
    state_a = _settled(n, FEATURE_TIMEOUT_S)
    switch()
    n.wait_for(lambda k, a=state_a: _snapshot(k) != a, 5.0)
    state_b = _settled(n, FEATURE_TIMEOUT_S)
    changed, unchanged = _changed_and_unchanged(state_a, state_b)
    if not n.alive() or not changed or not unchanged:
        seen = {r: len(v) for r, v in state_b.items()}
        reasons.append(f"{name}: {'nvdp exited: ' + n.log_tail(1) if not n.alive() else seen}")
        return None
    return state_a, state_b, changed, unchanged


def reload_file(p: Params, wd: Path) -> Results:
    """Config file changed + SIGHUP -> the kubelet holds the new device set; unchanged resources' streams kept."""
    key, broken_key = "reload.file", "reload.file_broken_unchanged_streams"
    reasons = []
    for name, node_writer, config_a, config_b in RELOAD_CANDIDATES:
        sub = wd / f"candidate{len(reasons)}"
        sub.mkdir()
        config = nodes.config(sub / "config.yaml", config_a)
        with Nvdp(sub, node_writer(sub / "node.yaml"), config=config) as n:
            assert n.kubelet is not None

            def switch_to_b(path: Path = config, data: dict[str, Any] = config_b) -> None:
                nodes.config(path, data)
                n.sighup()

            probe = _first_switch(n, switch_to_b, name, reasons)
            if probe is None:
                continue
            state_a, state_b, changed, unchanged = probe

            def rewrite(i: int, path: Path = config, data: tuple[dict[str, Any], ...] = (config_a, config_b)) -> None:
                nodes.config(path, data[i % 2])

            samples = _time_switches(n, p.reloads, (state_a, state_b), changed, rewrite,
                                     lambda i: n.sighup(), f"reload ({name})")
            return {key: {**latency_stats(samples), "note": name},
                    broken_key: {"value": float(_broken_streams(n.kubelet, unchanged)),
                                 "unchanged_resources": float(len(unchanged)), "reloads": float(p.reloads + 1)}}
    reason = "config reload did not change one resource while keeping another: " + "; ".join(reasons)
    return {key: Unavailable(reason), broken_key: Unavailable(reason)}


NODE_NAME = "gpu-node-bench"
NODE_LABEL = "nvidia.com/device-plugin.config"


def reload_node_label(p: Params, wd: Path) -> Results:
    """Node label changed on the fake API server -> the kubelet holds the new device set.

    nvdp gets a directory of two named configs (`CONFIG_FILE_SRCDIR`), its node name and a kubeconfig for the fake
    API server (real TLS, a bearer token), which runs in this process on its own trio thread. Each switch is one
    label PATCH (a MODIFIED event on nvdp's Node watch); unchanged resources must keep their streams.
    """
    key, broken_key = "reload.node_label", "reload.node_label_broken_unchanged_streams"
    try:
        from bench.apiserver import ApiServerThread
        from tests.fake_apiserver import write_kubeconfig
    except ImportError as exc:  # hypercorn / trustme are test extras
        reason = f"the fake API server needs the test extras ({exc})"
        return {key: Unavailable(reason), broken_key: Unavailable(reason)}
    reasons = []
    with ApiServerThread() as api:
        for name, node_writer, config_a, config_b in RELOAD_CANDIDATES:
            sub = wd / f"candidate{len(reasons)}"
            configs_dir = sub / "configs"
            configs_dir.mkdir(parents=True)
            labels = ("a", "b")
            nodes.config(configs_dir / labels[0], config_a)
            nodes.config(configs_dir / labels[1], config_b)
            api.call(api.fake.set_node, NODE_NAME, {NODE_LABEL: labels[0]})
            kubeconfig = write_kubeconfig(sub / "kubeconfig", api.fake, token=api.fake.token)
            env = {"CONFIG_FILE_SRCDIR": str(configs_dir), "NODE_NAME": NODE_NAME, "KUBECONFIG": str(kubeconfig),
                   "METRICS_ADDRESS": "127.0.0.1:0"}

            def relabel(i: int, names: tuple[str, str] = labels) -> None:
                api.call(api.fake.patch_node_labels, NODE_NAME, {NODE_LABEL: names[i % 2]})

            with Nvdp(sub, node_writer(sub / "node.yaml"), env=env) as n:
                assert n.kubelet is not None
                probe = _first_switch(n, lambda: relabel(1), name, reasons)
                if probe is None:
                    continue
                state_a, state_b, changed, unchanged = probe
                samples = _time_switches(n, p.reloads, (state_a, state_b), changed, lambda i: None, relabel,
                                         f"node-label switch ({name})")
                return {key: {**latency_stats(samples), "note": name},
                        broken_key: {"value": float(_broken_streams(n.kubelet, unchanged)),
                                     "unchanged_resources": float(len(unchanged)),
                                     "switches": float(p.reloads + 1)}}
    reason = "a node-label switch did not change one resource while keeping another: " + "; ".join(reasons)
    return {key: Unavailable(reason), broken_key: Unavailable(reason)}


#: (description, node writer, config, extra args, resource, expected devices)
SCALE_CANDIDATES: list[tuple[str, Callable[[Path], Path], dict[str, object], list[str], str]] = [
    ("8 GPUs x 7 MIG 1g.5gb x 48 time-slicing replicas", nodes.eight_gpus_mig,
     nodes.time_slicing([{"name": MIG_1G, "replicas": 48}]), ["--mig-strategy", "mixed"], MIG_1G),
    ("8 whole GPUs x 336 time-slicing replicas (time-slicing of MIG devices unavailable)", nodes.eight_gpus_nvlink,
     nodes.time_slicing([{"name": GPU, "replicas": 336}]), [], GPU),
]
SCALE_DEVICES = 8 * 7 * 48


def scale(p: Params, wd: Path) -> Results:
    """A node advertising ~2 700 devices: ListAndWatch size and encode time, start-up, Allocate, RSS."""
    out: Results = {"scale.list_and_watch_encode": _encode_figure(p)}
    reasons = []
    for description, node_writer, config_data, args, resource in SCALE_CANDIDATES:
        sub = wd / f"candidate{len(reasons)}"
        sub.mkdir()
        config = nodes.config(sub / "config.yaml", config_data)
        with Nvdp(sub, node_writer(sub / "node.yaml"), args, config=config) as n:
            try:
                ids = _feature_devices(n, resource, lambda d: len(d) == SCALE_DEVICES, description)
            except Unavailable as exc:
                reasons.append(str(exc))
                continue
            held = time.monotonic()
            out["scale.startup"] = {"registered": 1000 * (n.registered_at([resource]) - n.spawned_at),
                                    "devices": 1000 * (held - n.spawned_at), "device_count": float(len(ids)),
                                    "note": description}
            time.sleep(p.settle_s)
            out["scale.rss_registered"] = {"value": rss_mib(n.pid)}
            # The last replica of the last GPU: a scan from the front would be slowest here.
            out["scale.allocate"] = _allocate_figure(n, p, resource, [ids[-1]], _has_visible_devices)
            return out
    reason = "no config reaches 2 688 devices on this tree: " + "; ".join(reasons)
    for k in ("scale.startup", "scale.rss_registered", "scale.allocate"):
        out[k] = Unavailable(reason)
    return out


def _encode_figure(p: Params) -> Stats:
    """Encode the ListAndWatch message of 2 688 devices with nvdp's own encoder (in this process).

    The plan is synthetic (the MIG-replica IDs the scale node would advertise), so the figure does not depend on
    sharing being wired. The statistics are per update (`DeviceListEncoder.encode`, what each health change costs
    on nvdp's asyncio thread); `encode_build_ms` is the one-time cost of building a server's encoder, and
    `betterproto2_ms` one encode of the same message through betterproto2 (the path before the encoder), whose
    bytes the encoder's must equal.
    """
    from nvdp.core.plan.model import Device, Resource, Sharing
    from nvdp.kubelet.plugin_server import DeviceListEncoder, list_and_watch_response

    devices = []
    for g in range(8):
        for slot in range(7):
            mig = nodes.mig_uuid(g, slot)
            for replica in range(48):
                devices.append(Device(id=f"{mig}::{replica}", physical_id=mig, index=f"{g}:{slot}",
                                      gpu_uuid=nodes.gpu_uuid(g), gpu_index=g, paths=(f"/dev/nvidia{g}",),
                                      numa_node=g // 4, replica=replica, mig_placement=(7 + slot, 0)))
    resource = Resource(MIG_1G, tuple(devices), Sharing.TIME_SLICING)
    unhealthy = {devices[0].id: "XID 48"}
    # Built once per server (it encodes every device's Healthy entry): timed apart from the updates.
    started = time.perf_counter_ns()
    encoder = DeviceListEncoder(resource)
    build_ms = (time.perf_counter_ns() - started) / 1e6
    # The bytes must be the message betterproto2 would send; its own encode is timed once, for comparison.
    started = time.perf_counter_ns()
    reference = bytes(list_and_watch_response(resource, unhealthy))
    betterproto_ms = (time.perf_counter_ns() - started) / 1e6
    if encoder.encode(unhealthy) != reference:
        raise FigureError("DeviceListEncoder's bytes differ from betterproto2's ListAndWatchResponse")
    # Per update: what each health change costs on the asyncio thread (the first update above filled the
    # Unhealthy entry's cache, as a server's first update after a health change does).
    samples, size = [], 0
    for _ in range(p.encode_runs):
        started = time.perf_counter_ns()
        size = len(encoder.encode(unhealthy))
        samples.append((time.perf_counter_ns() - started) / 1e6)
    stats = latency_stats(samples)
    return {"p50": stats["p50"], "max": stats["max"], "encode_build_ms": build_ms,
            "betterproto2_ms": betterproto_ms, "bytes": float(size), "devices": float(len(devices))}


#: In run order. Figures that need a fresh node each get their own process.
SCENARIOS: list[tuple[str, Callable[[Params, Path], Results]]] = [
    ("startup", startup),
    ("base", base),
    ("idle_no_health", idle_no_health),
    ("nvlink8", nvlink8),
    ("time_slicing", time_slicing),
    ("mps", mps),
    ("health", health),
    ("reload_file", reload_file),
    ("reload_node_label", reload_node_label),
    ("scale", scale),
]

#: The scenarios `--against` runs a foreign plugin through: the figures that mean the same for any device plugin.
FOREIGN_SCENARIOS = ("startup", "base")
