"""Issue 16's acceptance, end to end: what Allocate hands the kubelet names only CDI devices defined in the spec files
nvdp wrote, each with its own device nodes, on a simulated 2-GPU node and a simulated MIG node.

The kubelet side is the grpcio emulator, so the CDI fields are read as the kubelet decodes them (field 4 for the
annotation, field 5 for `cdi_devices`).
"""

from __future__ import annotations

import json
import re
import signal
from dataclasses import replace
from pathlib import Path

import trio

from nvdp.core.config.settings import Settings
from nvdp.testing.kubelet_emulator import KubeletEmulator
from tests.harness import GPU0, GPU1, LogWatch, daemon, eventually, plugin_connection_leak, wait_for
from tests.helpers import gpu, write_node

MIG1 = "MIG-aaaaaaaa-0000-0000-0000-000000000001"
MIG2 = "MIG-aaaaaaaa-0000-0000-0000-000000000002"
ANNOTATION_KEY = re.compile(r"^cdi\.k8s\.io/nvidia-device-plugin_"
                            r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")


def defined_devices(cdi_root: Path) -> dict[str, list[str]]:
    """Every fully-qualified device name defined by the spec files in `cdi_root` -> its device nodes (container
    paths). A name defined twice fails the test: the runtime drops both."""
    defined: dict[str, list[str]] = {}
    for path in sorted(cdi_root.glob("*.json")):
        spec = json.loads(path.read_text())
        for device in spec["devices"]:
            name = f"{spec['kind']}={device['name']}"
            assert name not in defined, f"{name} defined twice"
            defined[name] = [n["path"] for n in device["containerEdits"].get("deviceNodes", [])]
    return defined


def node(tmp_path: Path) -> Path:
    a100 = gpu(0, migEnabled=True, migDevices=[
        {"uuid": MIG1, "profile": "1g.5gb", "memoryMiB": 4864, "gi": 7, "ci": 0},
        {"uuid": MIG2, "profile": "1g.5gb", "memoryMiB": 4864, "gi": 8, "ci": 0},
    ])
    return write_node(tmp_path / "node.yaml", [a100, gpu(1)])


async def allocate(kubelet: KubeletEmulator, resource: str, ids: list[str]):  # type: ignore[no-untyped-def]
    response = await trio.to_thread.run_sync(kubelet.allocate, resource, ids)
    (container,) = response.container_responses
    return container


async def test_cdi_cri_names_resolve_to_each_devices_own_nodes_and_a_reload_leaves_no_stale_device(
    tmp_path: Path, kubelet: KubeletEmulator
) -> None:
    from nvdp.sim import mig_minor

    cdi_root = tmp_path / "cdi"
    first = Settings(simulate=node(tmp_path), kubelet_socket=kubelet.socket, cdi_root=cdi_root,
                     device_list_strategy=("cdi-cri",), mig_strategy="mixed")
    reloads = [replace(first, mig_strategy="none")]
    async with daemon(first, handle_signals=True, reload_settings=lambda: reloads.pop(0)):
        assert await wait_for(kubelet, lambda k: len(k.devices("nvidia.com/mig-1g.5gb")) == 2)
        defined = defined_devices(cdi_root)

        whole = await allocate(kubelet, "nvidia.com/gpu", [GPU1])
        assert [d.name for d in whole.cdi_devices] == [f"k8s.device-plugin.nvidia.com/gpu={GPU1}"]
        assert defined[whole.cdi_devices[0].name] == ["/dev/nvidia1"]
        mig = await allocate(kubelet, "nvidia.com/mig-1g.5gb", [MIG2])
        assert [d.name for d in mig.cdi_devices] == [f"k8s.device-plugin.nvidia.com/gpu={MIG2}"]
        assert defined[mig.cdi_devices[0].name] == [
            "/dev/nvidia0", f"/dev/nvidia-caps/nvidia-cap{mig_minor(0, 8)}",
            f"/dev/nvidia-caps/nvidia-cap{mig_minor(0, 8, 0)}"]
        # Every strategy is CDI: nothing else tells the runtime about devices.
        for container in (whole, mig):
            assert "NVIDIA_VISIBLE_DEVICES" not in container.envs
            assert not container.devices and not container.annotations

        # The MIG resource goes away: its devices leave the specs, the whole A100 comes in, no stale file.
        signal.raise_signal(signal.SIGHUP)
        assert await wait_for(kubelet, lambda k: set(k.devices("nvidia.com/gpu")) == {GPU0, GPU1})
        await eventually(lambda: f"k8s.device-plugin.nvidia.com/gpu={MIG1}" not in defined_devices(cdi_root),
                         "the MIG devices gone from the specs")
        after = defined_devices(cdi_root)
        assert set(after) == {f"k8s.device-plugin.nvidia.com/gpu={GPU0}", f"k8s.device-plugin.nvidia.com/gpu={GPU1}"}
        assert [p.name for p in cdi_root.iterdir()] == ["k8s.device-plugin.nvidia.com-gpu.json"]
        again = await allocate(kubelet, "nvidia.com/gpu", [GPU0])
        assert after[again.cdi_devices[0].name] == ["/dev/nvidia0"]


@plugin_connection_leak  # a server restarted under a connected kubelet (docs/faults.md, finding 1)
async def test_cdi_annotations_alone_and_beside_envvar(
    tmp_path: Path, kubelet: KubeletEmulator, logs: LogWatch
) -> None:
    cdi_root = tmp_path / "cdi"
    first = Settings(simulate=write_node(tmp_path / "node.yaml", [gpu(0), gpu(1)]), kubelet_socket=kubelet.socket,
                     cdi_root=cdi_root, device_list_strategy=("cdi-annotations",), device_id_strategy="index")
    reloads = [replace(first, device_list_strategy=("envvar", "cdi-annotations"))]
    async with daemon(first, handle_signals=True, reload_settings=lambda: reloads.pop(0)):
        assert await wait_for(kubelet, lambda k: set(k.devices("nvidia.com/gpu")) == {GPU0, GPU1})
        defined = defined_devices(cdi_root)
        one = await allocate(kubelet, "nvidia.com/gpu", [GPU1, GPU0])
        ((key, value),) = one.annotations.items()
        assert ANNOTATION_KEY.match(key), key
        assert value == "k8s.device-plugin.nvidia.com/gpu=1,k8s.device-plugin.nvidia.com/gpu=0"
        assert all(name in defined for name in value.split(","))
        assert not one.cdi_devices and "NVIDIA_VISIBLE_DEVICES" not in one.envs
        two = await allocate(kubelet, "nvidia.com/gpu", [GPU1, GPU0])
        assert set(two.annotations) != set(one.annotations), "a fresh annotation key per response"

        before = kubelet.endpoint("nvidia.com/gpu")
        signal.raise_signal(signal.SIGHUP)
        await logs.wait(r"serving \(generation 2\)")
        # The restarted server registers again: wait for the kubelet's new endpoint (the old channel is closed).
        assert await wait_for(kubelet, lambda k: (e := k.endpoint("nvidia.com/gpu")) is not before and e is not None
                              and set(e.devices) == {GPU0, GPU1})
        container = await allocate(kubelet, "nvidia.com/gpu", [GPU0])
        assert container.envs["NVIDIA_VISIBLE_DEVICES"] == "0"
        assert list(container.annotations.values()) == ["k8s.device-plugin.nvidia.com/gpu=0"]


async def test_a_feature_whose_nodes_are_missing_is_not_named(tmp_path: Path, kubelet: KubeletEmulator) -> None:
    """gds and mofed on, but the simulated node has neither `/dev/nvidia-fs*` nor `/dev/infiniband`: no spec for them,
    so Allocate names neither (the runtime would refuse the container), while the env vars still say enabled."""
    cdi_root = tmp_path / "cdi"
    s = Settings(simulate=write_node(tmp_path / "node.yaml", [gpu(0)]), kubelet_socket=kubelet.socket,
                 cdi_root=cdi_root, device_list_strategy=("cdi-cri",), gds_enabled=True, mofed_enabled=True)
    async with daemon(s):
        assert await wait_for(kubelet, lambda k: k.devices("nvidia.com/gpu") == {GPU0: "Healthy"})
        container = await allocate(kubelet, "nvidia.com/gpu", [GPU0])
        assert [d.name for d in container.cdi_devices] == [f"k8s.device-plugin.nvidia.com/gpu={GPU0}"]
        assert (container.envs["NVIDIA_GDS"], container.envs["NVIDIA_MOFED"]) == ("enabled", "enabled")
        assert set(defined_devices(cdi_root)) == {f"k8s.device-plugin.nvidia.com/gpu={GPU0}"}


async def test_the_imex_channel_is_named_only_with_its_spec(tmp_path: Path, kubelet: KubeletEmulator) -> None:
    cdi_root = tmp_path / "cdi"
    s = Settings(simulate=write_node(tmp_path / "node.yaml", [gpu(0)], imexChannels=[0]),
                 kubelet_socket=kubelet.socket, cdi_root=cdi_root, device_list_strategy=("cdi-cri",),
                 imex_channel_ids=(0,))
    async with daemon(s):
        assert await wait_for(kubelet, lambda k: k.devices("nvidia.com/gpu") == {GPU0: "Healthy"})
        container = await allocate(kubelet, "nvidia.com/gpu", [GPU0])
        defined = defined_devices(cdi_root)
        names = [d.name for d in container.cdi_devices]
        assert names == [f"k8s.device-plugin.nvidia.com/gpu={GPU0}", "k8s.device-plugin.nvidia.com/imex-channel=0"]
        assert defined["k8s.device-plugin.nvidia.com/imex-channel=0"] == ["/dev/nvidia-caps-imex-channels/channel0"]
