"""`nvdp demo`: the real daemon on a simulated GPU node, against an embedded kubelet emulator.

Everything but the GPUs and the kubelet is real: the fake libnvidia-ml is driven through pynvml by nvdp's NVML
adapter, the grpclib servers bind Unix sockets in a temporary plugin directory, and the emulator talks to them over
gRPC (grpcio) as the kubelet would. With `--dra`, one GPU goes to DRA: the daemon publishes it as a ResourceSlice to an
in-process fake Kubernetes API server (plain http, `nvdp.testing.fake_apiserver`) and a DRA kubelet emulator
prepares and unprepares a ResourceClaim for it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

import trio

from nvdp.core.config.settings import Settings
from nvdp.daemon import run_daemon
from nvdp.testing.kubelet_emulator import KubeletEmulator

RESOURCE = "nvidia.com/gpu"
#: The demo's node name (its ResourceSlices' pool and nodeName) and its DRA claim.
NODE = "demo-node"
CLAIM = ("default", "demo-claim-uid", "demo-claim")


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


def _dra_settings(settings: Settings, root: Path, gpus: int) -> Settings:
    """DRA on the demo's own directories; without `dra.devices` in the config, the last GPU only, so the device
    plugin keeps the others to show."""
    import msgspec

    from nvdp.core.config.dra import Dra

    config = settings.config
    dra = config.dra or Dra()
    if dra.devices is None:
        config = msgspec.structs.replace(config, dra=Dra(enabled=dra.enabled, driver_name=dra.driver_name,
                                                         devices=[gpus - 1]))
    return dataclasses.replace(
        settings, config=config, node_name=NODE, cdi_root=root / "cdi",
        kubelet_registry_dir=root / "plugins_registry", kubelet_plugins_dir=root / "plugins")


def _claim(driver: str, device: str) -> dict[str, Any]:
    """A ResourceClaim for one GPU, as the scheduler leaves it: allocated to `device` and reserved for a pod."""
    namespace, uid, name = CLAIM
    return {
        "apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaim",
        "metadata": {"name": name, "namespace": namespace, "uid": uid},
        "spec": {"devices": {"requests": [{"name": "gpu", "exactly": {"deviceClassName": "gpu.nvidia.com"}}]}},
        "status": {"allocation": {"devices": {"results": [
            {"request": "gpu", "driver": driver, "pool": NODE, "device": device}], "config": []}},
            "reservedFor": [{"resource": "pods", "name": "demo-pod", "uid": "demo-pod-uid"}]},
    }


def _attribute(device: dict[str, Any], name: str) -> str:
    value = device.get("attributes", {}).get(name, {})
    return str(next(iter(value.values()))) if value else "-"


def resolve_cdi_id(cdi_root: Path, cdi_id: str) -> tuple[Path, dict[str, Any]] | None:
    """The spec file under `cdi_root` that defines `cdi_id` (`vendor/class=name`) and that device's entry, as a
    container runtime would look it up; None when no spec does."""
    kind, _, name = cdi_id.partition("=")
    for path in sorted(cdi_root.glob("*.json")):
        spec = json.loads(path.read_text())
        if spec.get("kind") == kind:
            for device in spec.get("devices", []):
                if device.get("name") == name:
                    return path, device
    return None


async def _show_dra(report: Report, settings: Settings, fake: Any, dra: Any) -> bool:
    driver = settings.dra_driver_name
    with trio.move_on_after(10):
        await fake.wait_for(lambda: any(s["spec"].get("devices") for s in fake.resourceslices(NODE)))
    if not any(s["spec"].get("devices") for s in fake.resourceslices(NODE)):
        report.line(f"DRA: nvdp published no ResourceSlice device for node {NODE} within 10 s")
        return False
    report.heading(f"DRA: the ResourceSlices nvdp published (driver {driver}, node {NODE})")
    devices = [d for s in fake.resourceslices(NODE) for d in s["spec"].get("devices", [])]
    for device in devices:
        report.line(f"{device['name']}  {_attribute(device, 'productName')}  architecture "
                    f"{_attribute(device, 'architecture')}  compute capability "
                    f"{_attribute(device, 'cudaComputeCapability')}  uuid {_attribute(device, 'uuid')}")

    device = devices[0]["name"]
    namespace, uid, name = CLAIM
    report.heading(f"DRA: NodePrepareResources for ResourceClaim {namespace}/{name} (one GPU: {device})")
    await trio.to_thread.run_sync(dra.wait_for, lambda d: driver in d.plugins, 10)
    fake.set_resourceclaim(_claim(driver, device))
    answer = (await trio.to_thread.run_sync(dra.prepare, driver, [CLAIM]))[uid]
    if answer.error:
        report.line(f"prepare failed: {answer.error}")
        return False
    resolved_all = True
    for _requests, pool, prepared, cdi_ids, _share in answer.devices:
        report.line(f"prepared {pool}/{prepared}")
        for cdi_id in cdi_ids:
            report.line(f"CDI ID {cdi_id}")
            found = resolve_cdi_id(settings.cdi_root or Path(), cdi_id)
            if found is None:
                report.line("  no CDI spec defines it")
                resolved_all = False
                continue
            path, spec_device = found
            report.line(f"  defined in {path.name}")
            for node in spec_device.get("containerEdits", {}).get("deviceNodes", []):
                report.line(f"  device node {node['path']}")

    report.heading(f"DRA: NodeUnprepareResources for {namespace}/{name}")
    error = (await trio.to_thread.run_sync(dra.unprepare, driver, [CLAIM]))[uid]
    left = sorted(p.name for p in (settings.cdi_root or Path()).glob("*.json") if uid in p.name)
    report.line(f"unprepared: {error or 'ok'}; claim spec files left: {', '.join(left) if left else 'none'}")
    return resolved_all and not error and not left


async def run_demo(simulate: Path | None = None, settings: Settings | None = None, out: TextIO | None = None) -> int:
    """The demo on the node `simulate` (default: the built-in 4-GPU node) with `settings` (default: a fresh
    install's: envvar device list, no device specs); the kubelet socket and the node are the demo's own."""
    from nvdp import sim

    report = Report(out)
    node_file = simulate or sim.default_node_path()
    # Read first: a bad node file is the user's to fix, and says so before anything starts (sim.SimNodeError).
    node = sim.load_node(node_file)
    base = settings or Settings()
    async with contextlib.AsyncExitStack() as stack:
        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="nvdp-demo-"))
        plugin_dir = Path(tmp) / "device-plugins"
        kubelet = KubeletEmulator(plugin_dir)
        await trio.to_thread.run_sync(kubelet.start)
        try:
            settings = dataclasses.replace(base, simulate=node_file, kubelet_socket=kubelet.socket)
            node_config = fake = dra = None
            if settings.dra_enabled:
                from nvdp.daemon import NodeConfig
                from nvdp.testing.dra_emulator import DraKubeletEmulator

                try:
                    from nvdp.testing.fake_apiserver import open_fake_apiserver
                except ModuleNotFoundError as exc:
                    if exc.name != "hypercorn":
                        raise
                    report.line("--dra: the fake API server needs hypercorn, which is not installed: "
                                "pip install 'nvdp[emulator]'")
                    return 1

                settings = _dra_settings(settings, Path(tmp), len(node.gpus))
                fake = await stack.enter_async_context(open_fake_apiserver(tls=False))
                fake.set_node(NODE)
                dra = stack.enter_context(DraKubeletEmulator(settings.kubelet_registry_dir))
                dra_settings = settings
                node_config = NodeConfig(None, fake.api_config(token=fake.token), lambda c, s: dra_settings)
            report.heading(f"nvdp on a simulated node ({node_file})")
            report.line(f"settings: device list strategy {','.join(settings.device_list_strategy)}, device IDs "
                        f"{settings.device_id_strategy}, passDeviceSpecs {str(settings.pass_device_specs).lower()}, "
                        f"MIG strategy {settings.mig_strategy}, config {settings.config_file or 'none (defaults)'}")
            report.line(f"kubelet emulator listening on {kubelet.socket}")
            async with trio.open_nursery() as nursery:
                started = time.monotonic()
                await nursery.start(lambda task_status: run_daemon(
                    settings, handle_signals=False, node_config=node_config, task_status=task_status))
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

                if dra is not None and not await _show_dra(report, settings, fake, dra):
                    nursery.cancel_scope.cancel()
                    return 1

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
