"""`nvdp demo`: the real daemon on a simulated GPU node, against an embedded kubelet emulator.

Everything but the GPUs and the kubelet is real: the fake libnvidia-ml is driven through pynvml by nvdp's NVML
adapter, the grpclib servers bind Unix sockets in a temporary plugin directory, and the emulator talks to them over
gRPC (grpcio) as the kubelet would.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

import trio

from nvdp.core.config.settings import Settings
from nvdp.daemon import run_daemon
from nvdp.testing.kubelet_emulator import KubeletEmulator

RESOURCE = "nvidia.com/gpu"


class Report:
    def __init__(self, out: TextIO | None = None) -> None:
        import sys

        self.out = out or sys.stdout

    def heading(self, text: str) -> None:
        print(f"\n== {text}", file=self.out)

    def line(self, text: str = "") -> None:
        print(f"   {text}", file=self.out)


def _show_devices(report: Report, kubelet: KubeletEmulator) -> None:
    for resource in kubelet.resources():
        endpoint = kubelet.endpoint(resource)
        assert endpoint is not None
        healthy = sum(h == "Healthy" for h in endpoint.devices.values())
        report.line(f"{resource}: {healthy}/{len(endpoint.devices)} healthy, socket {endpoint.endpoint}")
        for device_id, health in endpoint.devices.items():
            numa = ",".join(map(str, endpoint.topology.get(device_id, ()))) or "-"
            report.line(f"  {device_id}  {health}  NUMA {numa}")


async def _until(kubelet: KubeletEmulator, predicate: Callable[[KubeletEmulator], bool], limit_s: float) -> bool:
    return await trio.to_thread.run_sync(kubelet.wait_for, predicate, limit_s)


async def run_demo(simulate: Path | None = None, settings: Settings | None = None, out: TextIO | None = None) -> int:
    """The demo on the node `simulate` (default: the built-in 4-GPU node) with `settings` (default: a fresh
    install's: envvar device list, no device specs); the kubelet socket and the node are the demo's own."""
    from nvdp import sim

    report = Report(out)
    node_file = simulate or sim.default_node_path()
    # Read first: a bad node file is the user's to fix, and says so before anything starts (sim.SimNodeError).
    sim.load_node(node_file)
    base = settings or Settings()
    with tempfile.TemporaryDirectory(prefix="nvdp-demo-") as tmp:
        plugin_dir = Path(tmp) / "device-plugins"
        kubelet = KubeletEmulator(plugin_dir)
        await trio.to_thread.run_sync(kubelet.start)
        try:
            settings = dataclasses.replace(base, simulate=node_file, kubelet_socket=kubelet.socket)
            report.heading(f"nvdp on a simulated node ({node_file})")
            report.line(f"settings: device list strategy {','.join(settings.device_list_strategy)}, device IDs "
                        f"{settings.device_id_strategy}, passDeviceSpecs {str(settings.pass_device_specs).lower()}, "
                        f"MIG strategy {settings.mig_strategy}, config {settings.config_file or 'none (defaults)'}")
            report.line(f"kubelet emulator listening on {kubelet.socket}")
            async with trio.open_nursery() as nursery:
                started = time.monotonic()
                await nursery.start(lambda task_status: run_daemon(
                    settings, handle_signals=False, task_status=task_status))
                report.line(f"every resource registered {1000 * (time.monotonic() - started):.0f} ms after start")
                await _until(kubelet, lambda k: all(k.devices(r) for r in k.resources()), 5)

                report.heading("What the kubelet sees (ListAndWatch)")
                _show_devices(report, kubelet)

                resources = list(kubelet.resources())
                if not resources:
                    report.line("no resource registered: nothing to allocate")
                    nursery.cancel_scope.cancel()
                    return 1
                # The plain GPU resource where the config keeps it; else the first one (a renamed or MIG one).
                resource = RESOURCE if RESOURCE in resources else resources[0]
                devices = list(kubelet.devices(resource))
                report.heading(f"Allocate one {resource} ({devices[0]})")
                response = await trio.to_thread.run_sync(kubelet.allocate, resource, devices[:1])
                container = response.container_responses[0]
                for key, value in sorted(container.envs.items()):
                    report.line(f"env    {key}={value}")
                for spec in container.devices:
                    report.line(f"device {spec.container_path} <- {spec.host_path} ({spec.permissions})")
                for mount in container.mounts:
                    report.line(f"mount  {mount.container_path} <- {mount.host_path}")
                if not container.devices:
                    report.line("device nodes: none in the response (passDeviceSpecs is off, as in a default "
                                "install; --pass-device-specs to see them)")

                if len(devices) >= 2:
                    report.heading(f"GetPreferredAllocation: 2 of {len(devices)} {resource} devices, best connected")
                    preferred = await trio.to_thread.run_sync(kubelet.preferred_allocation, resource, devices, [], 2)
                    report.line(", ".join(preferred))

                report.heading("Kubelet restart: sockets wiped, kubelet.sock re-created")
                before = len(kubelet.registrations)
                await trio.to_thread.run_sync(kubelet.restart)
                ok = await _until(kubelet, lambda k: len(k.registrations) > before and all(
                    k.devices(r) for r in k.resources()), 5)
                if not ok:
                    report.line("nvdp did not register again within 5 s")
                    return 1
                elapsed = 1000 * (kubelet.registrations[-1].at - kubelet.started_at)
                report.line(f"re-registered {', '.join(kubelet.resources())} {elapsed:.0f} ms after kubelet.sock "
                            "was created")
                _show_devices(report, kubelet)

                report.heading("Shutdown")
                nursery.cancel_scope.cancel()
            left = sorted(p.name for p in plugin_dir.iterdir() if p.name != "kubelet.sock")
            report.line(f"plugin sockets left behind: {', '.join(left) if left else 'none'}")
        finally:
            await trio.to_thread.run_sync(kubelet.stop)
    return 0 if not left else 1
