"""Two MIG devices of one profile on one GPU, end to end: NVIDIA's naming (`gpu-<parent minor>-mig-<profile>-<GI
profile id>-<placement start>`) keeps them apart in the ResourceSlice, and each claim gets its own capability nodes."""

from __future__ import annotations

import json
from pathlib import Path

from nvdp.sim import mig_minor
from nvdp.testing.kubelet_emulator import KubeletEmulator
from tests.harness import GPU0, wait_for
from tests.helpers import gpu
from tests.test_dra_daemon import DRIVER, claim, dra_node, slice_devices

#: NVML_GPU_INSTANCE_PROFILE_1_SLICE: the GI profile id of a plain 1g.5gb on an A100 40GB.
PROFILE_1_SLICE = 0


def mig(n: int, gi: int, placement_start: int) -> dict[str, object]:
    return {"uuid": f"MIG-{n:08d}-1111-1111-1111-111111111111", "profile": "1g.5gb", "memoryMiB": 4864, "gi": gi,
            "ci": 0, "placementStart": placement_start}


async def test_two_mig_devices_of_one_profile_get_distinct_names_and_each_its_own_capability_nodes(
    short_dir: Path, kubelet: KubeletEmulator,
) -> None:
    migs = [mig(1, gi=9, placement_start=4), mig(2, gi=7, placement_start=2)]
    gpus = [gpu(0), gpu(1, migEnabled=True, migDevices=migs)]
    async with dra_node(short_dir, kubelet, gpus=gpus) as node:
        await node.fake.wait_for(lambda: len(slice_devices(node.fake)) == 2)
        # In placement order, whatever the order the node lists them in.
        names = slice_devices(node.fake)
        assert names == [f"gpu-1-mig-1g5gb-{PROFILE_1_SLICE}-2", f"gpu-1-mig-1g5gb-{PROFILE_1_SLICE}-4"]
        assert await wait_for(kubelet, lambda k: k.devices("nvidia.com/gpu") == {GPU0: "Healthy"})

        for uid, name, gi in (("uid-a", names[0], 7), ("uid-b", names[1], 9)):
            node.fake.set_resourceclaim(claim(uid, name))
            answer = await node.call(node.dra.prepare, DRIVER, [("default", uid, f"claim-{uid}")])
            assert answer[uid].error == ""
            ((_, _, device, cdi_ids, _),) = answer[uid].devices
            assert device == name and cdi_ids == (f"k8s.gpu.nvidia.com/claim={uid}-{name}",)
            spec = json.loads((node.cdi_root / f"k8s.gpu.nvidia.com-claim_{uid}.json").read_text())
            (spec_device,) = spec["devices"]
            assert spec_device["name"] == f"{uid}-{name}"
            assert [n["path"] for n in spec_device["containerEdits"]["deviceNodes"]] == [
                "/dev/nvidia1", f"/dev/nvidia-caps/nvidia-cap{mig_minor(1, gi)}",
                f"/dev/nvidia-caps/nvidia-cap{mig_minor(1, gi, 0)}"]
        # Both prepared at once, each with its own CDI spec.
        checkpoint = node.checkpoint.read_text()
        assert "uid-a" in checkpoint and "uid-b" in checkpoint
