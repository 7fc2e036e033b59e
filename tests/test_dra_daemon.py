"""DRA end to end on the simulated node: the daemon in-process with the device-plugin kubelet emulator, the DRA
kubelet emulator and the fake API server (resource.k8s.io/v1). GPU 1 of a 2-GPU node goes to DRA, GPU 0 stays with
the device plugin."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import trio

from nvdp.controller import NodeConfig
from nvdp.core.config.load import parse_config
from nvdp.core.config.settings import Settings
from nvdp.observe.metrics import Metrics
from nvdp.testing.dra_emulator import DraKubeletEmulator
from nvdp.testing.kubelet_emulator import KubeletEmulator
from tests.fake_apiserver import FakeApiServer, open_fake_apiserver, write_kubeconfig
from tests.harness import GPU0, daemon, eventually, wait_for
from tests.helpers import gpu, write_node

NODE = "node-a"
DRIVER = "gpu.nvidia.com"
GPU1_UUID = gpu(1)["uuid"]
LIMIT_S = 60.0


@dataclass
class DraNode:
    root: Path
    fake: FakeApiServer
    kubelet: KubeletEmulator
    dra: DraKubeletEmulator
    settings: Settings
    metrics: Metrics

    @property
    def cdi_root(self) -> Path:
        return self.root / "cdi"

    @property
    def checkpoint(self) -> Path:
        return self.root / "plugins" / DRIVER / "checkpoint.json"

    async def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return await trio.to_thread.run_sync(lambda: fn(*args, **kwargs))


def claim(uid: str, device: str, name: str = "") -> dict[str, Any]:
    return {
        "apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaim",
        "metadata": {"name": name or f"claim-{uid}", "namespace": "default", "uid": uid, "resourceVersion": "3"},
        "spec": {"devices": {"requests": [{"name": "gpu", "exactly": {"deviceClassName": "gpu.nvidia.com"}}]}},
        "status": {"allocation": {"devices": {"results": [
            {"request": "gpu", "driver": DRIVER, "pool": NODE, "device": device}], "config": []}},
            "reservedFor": [{"resource": "pods", "name": "p", "uid": "pod-1"}]},
    }


@contextlib.asynccontextmanager
async def dra_node(short_dir: Path, kubelet: KubeletEmulator, config: str = "dra:\n  enabled: true\n  devices: [1]\n",
                   reload: Callable[[Settings], Settings] | None = None, gpus: list[dict[str, Any]] | None = None,
                   **overrides: Any) -> AsyncIterator[DraNode]:
    (short_dir / "xids").write_text("")
    node_file = write_node(short_dir / "node.yaml", gpus or [gpu(0), gpu(1)], eventsFile=str(short_dir / "xids"))
    settings = Settings(simulate=node_file, kubelet_socket=kubelet.socket, config=parse_config(config, "test"),
                        **overrides,
                        dra_enabled=True, node_name=NODE, cdi_root=short_dir / "cdi",
                        kubelet_registry_dir=short_dir / "plugins_registry", kubelet_plugins_dir=short_dir / "plugins")
    async with open_fake_apiserver() as fake:
        fake.set_node(NODE)
        node_config = NodeConfig(None, fake.api_config(token="token-1"), lambda config, source: settings)
        with DraKubeletEmulator(settings.kubelet_registry_dir) as dra:
            extra: dict[str, Any] = {}
            if reload is not None:
                extra = {"handle_signals": True, "reload_settings": lambda: reload(settings)}
            metrics = Metrics()
            async with daemon(settings, node_config=node_config, metrics=metrics, **extra):
                # A bound on the whole test: the fake API server's waits have none of their own.
                with trio.fail_after(LIMIT_S):
                    yield DraNode(short_dir, fake, kubelet, dra, settings, metrics)


def registered(dra: DraKubeletEmulator) -> Any:
    return dra.plugins.get(DRIVER)


def slice_devices(fake: FakeApiServer) -> list[str]:
    return [d["name"] for s in fake.resourceslices(NODE) for d in s["spec"].get("devices", [])]


async def test_a_gpu_goes_to_dra_and_is_prepared_and_unprepared_end_to_end(
    short_dir: Path, kubelet: KubeletEmulator,
) -> None:
    async with dra_node(short_dir, kubelet) as node:
        # The device plugin advertises GPU 0 only; GPU 1 is DRA's.
        assert await wait_for(kubelet, lambda k: k.devices("nvidia.com/gpu") == {GPU0: "Healthy"})
        plugin = await node.call(node.dra.wait_for, registered)
        assert plugin.dra_version == "v1.DRAPlugin"
        await node.fake.wait_for(lambda: slice_devices(node.fake) == ["gpu-1"])
        (published,) = node.fake.resourceslices(NODE)
        assert published["spec"]["nodeName"] == NODE and published["spec"]["pool"]["name"] == NODE
        await node.call(node.dra.wait_for, lambda d: registered(d).devices)
        assert set(registered(node.dra).devices) == {(NODE, "gpu-1")}

        node.fake.set_resourceclaim(claim("uid-1", "gpu-1"))
        answer = await node.call(node.dra.prepare, DRIVER, [("default", "uid-1", "claim-uid-1")])
        assert answer["uid-1"].error == ""
        ((requests, pool, device, cdi_ids, _),) = answer["uid-1"].devices
        assert (requests, pool, device) == (("gpu",), NODE, "gpu-1")
        assert cdi_ids == ("k8s.gpu.nvidia.com/claim=uid-1-gpu-1",)
        # The CDI ID resolves to the spec nvdp wrote: kind, device name, the GPU's device node.
        spec_file = node.cdi_root / "k8s.gpu.nvidia.com-claim_uid-1.json"
        spec = json.loads(spec_file.read_text())
        kind, _, name = cdi_ids[0].partition("=")
        assert spec["kind"] == kind
        (spec_device,) = [d for d in spec["devices"] if d["name"] == name]
        assert [n["path"] for n in spec_device["containerEdits"]["deviceNodes"]] == ["/dev/nvidia1"]
        assert "NVIDIA_VISIBLE_DEVICES=void" in spec["containerEdits"]["env"]
        assert "uid-1" in node.checkpoint.read_text()

        # Prepare again (a kubelet restart): the same answer.
        again = await node.call(node.dra.prepare, DRIVER, [("default", "uid-1", "claim-uid-1")])
        assert again == answer

        # A claim for GPU 0 (the device plugin's) is refused for that claim only.
        node.fake.set_resourceclaim(claim("uid-2", "gpu-0"))
        refused = await node.call(node.dra.prepare, DRIVER, [("default", "uid-2", "claim-uid-2")])
        assert refused["uid-2"].error and refused["uid-2"].devices == ()
        # ... and said once on the Node (the good prepares before it said nothing).
        await eventually(lambda: [b["message"] for _, b in node.fake.posted_events if b["reason"] == "DraPrepareFailed"]
                         == ["1 of 1 claim(s) in a DRA prepare call failed; each claim's error is in its pod's events "
                             "(nvdp's log has them too)"], "a DraPrepareFailed Event")

        assert await node.call(node.dra.unprepare, DRIVER, [("default", "uid-1", "claim-uid-1")]) == {"uid-1": ""}
        assert not spec_file.exists()
        assert "uid-1" not in node.checkpoint.read_text()
        sample = node.metrics.registry.get_sample_value
        assert sample("nvdp_dra_claims_total", {"call": "prepare", "result": "ok"}) == 2
        assert sample("nvdp_dra_claims_total", {"call": "prepare", "result": "error"}) == 1
        assert sample("nvdp_dra_call_duration_seconds_count", {"call": "unprepare"}) == 1
        # Reported once the API server is seen to hold the slices as wanted.
        await eventually(lambda: sample("nvdp_dra_slices_devices", {"driver": DRIVER}) == 1, "slices reported")
        assert sample("nvdp_dra_slice_writes_total", {"driver": DRIVER, "operation": "create", "result": "ok"}) == 1


def mps_claim(uid: str, **mps_config: Any) -> dict[str, Any]:
    mps = claim(uid, "gpu-1")
    sharing: dict[str, Any] = {"strategy": "MPS"}
    if mps_config:
        sharing["mpsConfig"] = mps_config
    mps["status"]["allocation"]["devices"]["config"] = [{"source": "FromClaim", "opaque": {
        "driver": DRIVER, "parameters": {"apiVersion": "resource.nvidia.com/v1beta1", "kind": "GpuConfig",
                                         "sharing": sharing}}}]
    return mps


async def test_an_mps_claim_gets_its_gpus_control_daemon_and_limits(
    short_dir: Path, kubelet: KubeletEmulator, mps_root: Path,
) -> None:
    async with dra_node(short_dir, kubelet, mps_root=str(mps_root)) as node:
        await node.call(node.dra.wait_for, registered)
        node.fake.set_resourceclaim(mps_claim("uid-m", defaultActiveThreadPercentage=50,
                                              defaultPinnedDeviceMemoryLimit="10Gi"))
        answer = await node.call(node.dra.prepare, DRIVER, [("default", "uid-m", "claim-uid-m")])
        assert answer["uid-m"].error == ""
        pipe = mps_root / GPU1_UUID / "pipe"
        assert (pipe / "control").exists()  # GPU 1's control daemon runs and listens
        spec = json.loads((node.cdi_root / "k8s.gpu.nvidia.com-claim_uid-m.json").read_text())
        (device,) = spec["devices"]
        edits = device["containerEdits"]
        assert f"CUDA_MPS_PIPE_DIRECTORY={pipe}" in edits["env"]
        assert "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=50" in edits["env"]
        assert "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT=0=10240M" in edits["env"]
        assert {(m["hostPath"], m["containerPath"]) for m in edits["mounts"]} >= {
            (str(pipe), str(pipe)), (str(mps_root / "shm"), "/dev/shm")}
        # The last claim using MPS on the GPU goes: its daemon is told to quit.
        assert await node.call(node.dra.unprepare, DRIVER, [("default", "uid-m", "claim-uid-m")]) == {"uid-m": ""}
        commands = mps_root / GPU1_UUID / "commands.log"
        await eventually(lambda: commands.exists() and commands.read_text().splitlines()[-1:] == ["quit"],
                         "the daemon told to quit")


async def test_an_mps_claim_without_an_mps_root_fails_and_says_why(short_dir: Path, kubelet: KubeletEmulator) -> None:
    async with dra_node(short_dir, kubelet) as node:
        await node.call(node.dra.wait_for, registered)
        node.fake.set_resourceclaim(mps_claim("uid-m"))
        answer = await node.call(node.dra.prepare, DRIVER, [("default", "uid-m", "claim-uid-m")])
    assert "MPS needs --mps-root" in answer["uid-m"].error


def taints(fake: FakeApiServer) -> list[tuple[str, str, str]]:
    return [(t.get("key", ""), t.get("value", ""), t.get("effect", ""))
            for s in fake.resourceslices(NODE) for d in s["spec"].get("devices", []) for t in d.get("taints", [])]


def health(dra: DraKubeletEmulator) -> str:
    seen = registered(dra).devices.get((NODE, "gpu-1")) if registered(dra) else None
    return seen.health if seen is not None else ""


async def test_an_xid_reaches_the_health_stream_and_a_taint_and_recovery_removes_both(
    short_dir: Path, kubelet: KubeletEmulator,
) -> None:
    async with dra_node(short_dir, kubelet, health_quiet_period=1.0) as node:
        await node.call(node.dra.wait_for, lambda d: health(d) == "HEALTHY")
        await node.fake.wait_for(lambda: slice_devices(node.fake) == ["gpu-1"])
        assert taints(node.fake) == []
        with (short_dir / "xids").open("a") as events:
            events.write(f"xid {GPU1_UUID} 48\n")
        await node.call(node.dra.wait_for, lambda d: health(d) == "UNHEALTHY")
        assert "XID 48" in registered(node.dra).devices[(NODE, "gpu-1")].message
        await node.fake.wait_for(lambda: taints(node.fake) == [(f"{DRIVER}/xid", "48", "NoSchedule")])
        # GPU 0 (the device plugin's) is untouched.
        assert await wait_for(kubelet, lambda k: k.devices("nvidia.com/gpu") == {GPU0: "Healthy"})
        # No new XID for the quiet period: probed, healthy again, the taint gone.
        await node.call(node.dra.wait_for, lambda d: health(d) == "HEALTHY")
        await node.fake.wait_for(lambda: taints(node.fake) == [])


async def test_without_api_access_dra_does_not_start(short_dir: Path, kubelet: KubeletEmulator) -> None:
    from nvdp.daemon import StartupError, run_daemon

    settings = Settings(simulate=write_node(short_dir / "node.yaml", [gpu(0)]), kubelet_socket=kubelet.socket,
                        dra_enabled=True, node_name=NODE, cdi_root=short_dir / "cdi")
    with pytest.raises(StartupError, match="no Kubernetes API access"):
        await run_daemon(settings, handle_signals=False)


async def test_slices_the_kubelet_wipes_come_back(short_dir: Path, kubelet: KubeletEmulator) -> None:
    async with dra_node(short_dir, kubelet) as node:
        await node.fake.wait_for(lambda: slice_devices(node.fake) == ["gpu-1"])
        assert node.fake.wipe_resourceslices(NODE) == 1
        assert slice_devices(node.fake) == []
        await node.fake.wait_for(lambda: slice_devices(node.fake) == ["gpu-1"])


async def test_after_a_restart_prepare_gives_the_same_answer_from_the_checkpoint(
    short_dir: Path, kubelet: KubeletEmulator,
) -> None:
    async with dra_node(short_dir, kubelet) as node:
        await node.call(node.dra.wait_for, registered)
        node.fake.set_resourceclaim(claim("uid-1", "gpu-1"))
        first = await node.call(node.dra.prepare, DRIVER, [("default", "uid-1", "claim-uid-1")])
        spec_file = node.cdi_root / "k8s.gpu.nvidia.com-claim_uid-1.json"
        written = spec_file.stat().st_mtime_ns
    # nvdp stopped; its sockets are gone and the kubelet forgot the driver.
    assert not (short_dir / "plugins_registry" / f"{DRIVER}-reg.sock").exists()
    async with dra_node(short_dir, kubelet) as node:
        await node.call(node.dra.wait_for, registered)
        # This API server has never heard of the claim: a completed claim is answered from the checkpoint.
        again = await node.call(node.dra.prepare, DRIVER, [("default", "uid-1", "claim-uid-1")])
        assert spec_file.stat().st_mtime_ns == written
    assert first["uid-1"].error == "" and again == first


async def test_turning_dra_off_withdraws_the_slices_and_gives_the_gpu_back_to_the_device_plugin(
    short_dir: Path, kubelet: KubeletEmulator,
) -> None:
    def dra_off(settings: Settings) -> Settings:
        return replace(settings, dra_enabled=False)

    async with dra_node(short_dir, kubelet, reload=dra_off) as node:
        await node.fake.wait_for(lambda: slice_devices(node.fake) == ["gpu-1"])
        await node.call(node.dra.wait_for, registered)
        signal.raise_signal(signal.SIGHUP)
        assert await wait_for(kubelet, lambda k: set(k.devices("nvidia.com/gpu")) == {GPU0, GPU1_UUID})
        await node.fake.wait_for(lambda: node.fake.resourceslices(NODE) == [])
        # The kubelet no longer finds the driver: its registration socket is gone.
        await node.call(node.dra.wait_for, lambda d: not registered(d))


async def test_a_mig_device_is_published_and_prepared_with_its_parent_and_capability_nodes(
    short_dir: Path, kubelet: KubeletEmulator,
) -> None:
    from nvdp.sim import mig_minor

    mig = {"uuid": "MIG-11111111-1111-1111-1111-111111111111", "profile": "1g.5gb", "memoryMiB": 4864, "gi": 7,
           "ci": 0}
    gpus = [gpu(0), gpu(1, migEnabled=True, migDevices=[mig])]
    async with dra_node(short_dir, kubelet, gpus=gpus) as node:
        await node.fake.wait_for(lambda: len(slice_devices(node.fake)) == 1)
        (name,) = slice_devices(node.fake)
        assert name.startswith("gpu-1-mig-1g5gb-")
        (device,) = [d for s in node.fake.resourceslices(NODE) for d in s["spec"]["devices"]]
        assert device["attributes"]["type"] == {"string": "mig"}
        assert device["attributes"]["parentUUID"] == {"string": GPU1_UUID}
        # The whole GPU 1 is DRA's too: the device plugin has GPU 0 only.
        assert await wait_for(kubelet, lambda k: k.devices("nvidia.com/gpu") == {GPU0: "Healthy"})

        node.fake.set_resourceclaim(claim("uid-g", name))
        answer = await node.call(node.dra.prepare, DRIVER, [("default", "uid-g", "claim-uid-g")])
        assert answer["uid-g"].error == ""
        spec = json.loads((node.cdi_root / "k8s.gpu.nvidia.com-claim_uid-g.json").read_text())
        (spec_device,) = spec["devices"]
        assert spec_device["name"] == f"uid-g-{name}"
        assert [n["path"] for n in spec_device["containerEdits"]["deviceNodes"]] == [
            "/dev/nvidia1", f"/dev/nvidia-caps/nvidia-cap{mig_minor(1, 7)}",
            f"/dev/nvidia-caps/nvidia-cap{mig_minor(1, 7, 0)}"]


async def test_nvdp_run_with_dra_registers_and_removes_its_sockets_on_sigterm(
    short_dir: Path, kubelet: KubeletEmulator, two_gpu_node: Path,
) -> None:
    registry, plugins = short_dir / "plugins_registry", short_dir / "plugins"
    async with open_fake_apiserver() as fake:
        fake.set_node(NODE)
        kubeconfig = write_kubeconfig(short_dir / "kubeconfig", fake, token="token-1")
        with DraKubeletEmulator(registry) as dra, (short_dir / "out.log").open("w") as log_file:
            process = await trio.lowlevel.open_process(
                [sys.executable, "-m", "nvdp", "--kubelet-socket", str(kubelet.socket), "--simulate",
                 str(two_gpu_node), "--dra", "--node-name", NODE, "--kubeconfig", str(kubeconfig), "--cdi-root",
                 str(short_dir / "cdi"), "--kubelet-registry-dir", str(registry), "--kubelet-plugins-dir",
                 str(plugins)],
                env={**os.environ, "METRICS_ADDRESS": ""}, stdout=log_file, stderr=subprocess.STDOUT)
            try:
                await trio.to_thread.run_sync(dra.wait_for, registered, LIMIT_S)
                await fake.wait_for(lambda: len(slice_devices(fake)) == 2)
                process.send_signal(signal.SIGTERM)
                with trio.fail_after(LIMIT_S):
                    await process.wait()
            finally:
                if process.returncode is None:
                    process.kill()
                    await process.wait()
    out = (short_dir / "out.log").read_text()
    assert process.returncode == 0, out
    assert list(registry.iterdir()) == [] and list((plugins / DRIVER).glob("*.sock")) == [], out
    # The slices stay (a restarting nvdp finds them in sync); the kubelet removes them 30 s after the plugin went.
    assert len(slice_devices(fake)) == 2
