"""The daemon on a simulated node writes the device plugin's CDI specs and follows the plan with them."""

from __future__ import annotations

import json
import signal
from dataclasses import replace
from pathlib import Path

from nvdp.core.config.settings import Settings
from nvdp.testing.kubelet_emulator import KubeletEmulator
from tests.harness import GPU0, GPU1, LogWatch, daemon, eventually, wait_for
from tests.helpers import gpu, write_node

MIG1 = "MIG-aaaaaaaa-0000-0000-0000-000000000001"
MIG2 = "MIG-aaaaaaaa-0000-0000-0000-000000000002"
GPU_SPEC = "k8s.device-plugin.nvidia.com-gpu.json"


def mig_node(tmp_path: Path) -> Path:
    a100 = gpu(0, migEnabled=True, migDevices=[
        {"uuid": MIG1, "profile": "1g.5gb", "memoryMiB": 4864, "gi": 7, "ci": 0},
        {"uuid": MIG2, "profile": "1g.5gb", "memoryMiB": 4864, "gi": 8, "ci": 0},
    ])
    return write_node(tmp_path / "node.yaml", [a100, gpu(1)])


def spec_devices(cdi_root: Path) -> dict[str, list[str]]:
    """Device name -> its device nodes' container paths, from the gpu spec file."""
    spec = json.loads((cdi_root / GPU_SPEC).read_text())
    return {d["name"]: [n["path"] for n in d["containerEdits"]["deviceNodes"]] for d in spec["devices"]}


async def test_specs_appear_follow_a_reload_that_removes_a_resource_and_go_when_cdi_is_off(
    tmp_path: Path, kubelet: KubeletEmulator, logs: LogWatch
) -> None:
    from nvdp.sim import mig_minor

    cdi_root = tmp_path / "cdi"
    # The device-list-strategy check may still refuse CDI strategies; the settings object is built directly.
    first = Settings(simulate=mig_node(tmp_path), kubelet_socket=kubelet.socket, cdi_root=cdi_root,
                     device_list_strategy=("cdi-cri",), mig_strategy="mixed")
    reloads = [replace(first, mig_strategy="none"), replace(first, device_list_strategy=("envvar",))]
    (cdi_root).mkdir()
    (cdi_root / "other-vendor.json").write_text("{}")  # not nvdp's: never touched
    async with daemon(first, handle_signals=True, reload_settings=lambda: reloads.pop(0)):
        assert await wait_for(kubelet, lambda k: len(k.devices("nvidia.com/mig-1g.5gb")) == 2)
        # The spec is there as soon as the devices are advertised.
        caps = [f"/dev/nvidia-caps/nvidia-cap{mig_minor(0, 7)}", f"/dev/nvidia-caps/nvidia-cap{mig_minor(0, 7, 0)}"]
        assert spec_devices(cdi_root) == {
            MIG1: ["/dev/nvidia0", *caps],
            MIG2: ["/dev/nvidia0", f"/dev/nvidia-caps/nvidia-cap{mig_minor(0, 8)}",
                   f"/dev/nvidia-caps/nvidia-cap{mig_minor(0, 8, 0)}"],
            GPU1: ["/dev/nvidia1"],
        }
        spec = json.loads((cdi_root / GPU_SPEC).read_text())
        assert spec["cdiVersion"] == "0.5.0"  # hostPath under the simulated root
        assert "NVIDIA_VISIBLE_DEVICES=void" in spec["containerEdits"]["env"]

        # mig-strategy none: the MIG resource goes, the A100 is advertised whole.
        signal.raise_signal(signal.SIGHUP)
        assert await wait_for(kubelet, lambda k: set(k.devices("nvidia.com/gpu")) == {GPU0, GPU1})
        # Written before the changed server started advertising: no waiting for the file.
        assert spec_devices(cdi_root) == {GPU0: ["/dev/nvidia0"], GPU1: ["/dev/nvidia1"]}

        signal.raise_signal(signal.SIGHUP)
        await eventually(lambda: not (cdi_root / GPU_SPEC).exists(), "the spec file removed")
        await logs.wait(r"CDI: removed .*k8s.device-plugin.nvidia.com-gpu.json")
    assert sorted(p.name for p in cdi_root.iterdir()) == ["other-vendor.json"]


async def test_specs_stay_when_nvdp_stops(tmp_path: Path, kubelet: KubeletEmulator) -> None:
    """Containers created while nvdp restarts still resolve their devices (upstream leaves its specs too)."""
    s = Settings(simulate=write_node(tmp_path / "node.yaml", [gpu(0)]), kubelet_socket=kubelet.socket,
                 cdi_root=tmp_path / "cdi", device_list_strategy=("envvar", "cdi-annotations"),
                 device_id_strategy="index")
    async with daemon(s):
        assert await wait_for(kubelet, lambda k: k.devices("nvidia.com/gpu") == {GPU0: "Healthy"})
        written = (tmp_path / "cdi" / GPU_SPEC).read_text()
    assert (tmp_path / "cdi" / GPU_SPEC).read_text() == written
    assert spec_devices(tmp_path / "cdi") == {"0": ["/dev/nvidia0"]}


async def test_a_spec_that_cannot_be_written_is_logged_and_serving_goes_on(
    tmp_path: Path, kubelet: KubeletEmulator, logs: LogWatch
) -> None:
    not_a_dir = tmp_path / "cdi"
    not_a_dir.write_text("a file where the CDI directory should be")
    s = Settings(simulate=write_node(tmp_path / "node.yaml", [gpu(0)]), kubelet_socket=kubelet.socket,
                 cdi_root=not_a_dir, device_list_strategy=("cdi-cri",))
    async with daemon(s):
        assert await wait_for(kubelet, lambda k: k.devices("nvidia.com/gpu") == {GPU0: "Healthy"})
        (record,) = logs.matching("CDI specs in")
    assert f"CDI specs in {not_a_dir} not updated: cannot list the CDI directory" in record.getMessage()
    assert "unresolvable CDI devices" in record.getMessage() and "serving continues" in record.getMessage()
