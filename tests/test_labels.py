"""Sharing labels (GFD's names and values) and the NFD local feature file."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from nvdp.core.inventory import Gpu, MigDevice, NodeInventory
from nvdp.core.plan.labels import render_features, sanitise, sharing_labels
from nvdp.core.plan.model import Device, Plan, Resource, Sharing
from nvdp.nfd import write_features_file

MIG_UUID = "MIG-11111111-2222-3333-4444-555555555555"


def _gpu(index: int, name: str = "NVIDIA A100-SXM4-40GB", migs: tuple[MigDevice, ...] = ()) -> Gpu:
    return Gpu(index=index, uuid=f"GPU-{index}", name=name, memory_mib=40960, minor=index,
               pci_bus_id=f"0000:{index:02x}:00.0", compute_capability="8.0", mig_enabled=bool(migs),
               mig_devices=migs)


INVENTORY = NodeInventory(
    driver_version="580.82.07", cuda_driver_version=13000,
    gpus=(_gpu(0), _gpu(1, migs=(MigDevice(MIG_UUID, 0, "1g.10gb+me", 9856, 1, 0),))),
)


def _devices(gpu: int, replicas: int = 1) -> tuple[Device, ...]:
    uuid = f"GPU-{gpu}"
    if replicas == 1:
        return (Device(uuid, uuid, str(gpu), uuid, gpu, (f"/dev/nvidia{gpu}",)),)
    return tuple(Device(f"{uuid}::{n}", uuid, str(gpu), uuid, gpu, (f"/dev/nvidia{gpu}",), replica=n)
                 for n in range(replicas))


def _mig_devices(replicas: int = 1) -> tuple[Device, ...]:
    return tuple(Device(MIG_UUID if replicas == 1 else f"{MIG_UUID}::{n}", MIG_UUID, "1:0", "GPU-1", 1,
                        ("/dev/nvidia1",), mig_placement=(1, 0), replica=None if replicas == 1 else n)
                 for n in range(replicas))


def test_no_sharing() -> None:
    plan = Plan((Resource("nvidia.com/gpu", _devices(0)),))
    assert sharing_labels(plan, INVENTORY) == {
        "nvidia.com/gpu.product": "NVIDIA-A100-SXM4-40GB",
        "nvidia.com/gpu.replicas": "1",
        "nvidia.com/gpu.sharing-strategy": "none",
        "nvidia.com/mps.capable": "false",
    }


@pytest.mark.parametrize(("sharing", "strategy", "mps"), [
    (Sharing.TIME_SLICING, "time-slicing", "false"),
    (Sharing.MPS, "mps", "true"),
])
def test_shared_gpu(sharing: Sharing, strategy: str, mps: str) -> None:
    # Replicas are per physical GPU (4), not the node's total (8), as upstream emits them.
    plan = Plan((Resource("nvidia.com/gpu", _devices(0, 4) + _devices(1, 4), sharing),))
    labels = sharing_labels(plan, INVENTORY)
    assert labels["nvidia.com/gpu.replicas"] == "4"
    assert labels["nvidia.com/gpu.sharing-strategy"] == strategy
    assert labels["nvidia.com/gpu.product"] == "NVIDIA-A100-SXM4-40GB-SHARED"
    assert labels["nvidia.com/mps.capable"] == mps


def test_renamed_shared_resource_has_no_suffix() -> None:
    plan = Plan((Resource("nvidia.com/gpu.shared", _devices(0, 2), Sharing.TIME_SLICING),
                 Resource("nvidia.com/gpu-10gb", _devices(1, 3), Sharing.MPS)))
    labels = sharing_labels(plan, INVENTORY)
    assert labels["nvidia.com/gpu.shared.product"] == "NVIDIA-A100-SXM4-40GB"
    assert labels["nvidia.com/gpu.shared.replicas"] == "2"
    assert labels["nvidia.com/gpu-10gb.product"] == "NVIDIA-A100-SXM4-40GB"
    assert labels["nvidia.com/gpu-10gb.sharing-strategy"] == "mps"
    assert labels["nvidia.com/mps.capable"] == "true"


def test_mps_with_one_replica_is_not_sharing() -> None:
    plan = Plan((Resource("nvidia.com/gpu", _devices(0), Sharing.MPS),))
    labels = sharing_labels(plan, INVENTORY)
    assert labels["nvidia.com/gpu.sharing-strategy"] == "none"
    assert labels["nvidia.com/gpu.product"] == "NVIDIA-A100-SXM4-40GB"
    assert labels["nvidia.com/mps.capable"] == "false"


def test_mig_resource() -> None:
    plan = Plan((Resource("nvidia.com/mig-1g.10gb.me", _mig_devices(2), Sharing.TIME_SLICING),
                 Resource("nvidia.com/mig-unused", ())))
    labels = sharing_labels(plan, INVENTORY)
    assert labels["nvidia.com/mig-1g.10gb.me.product"] == "NVIDIA-A100-SXM4-40GB-MIG-1g.10gb+me-SHARED"
    assert labels["nvidia.com/mig-1g.10gb.me.replicas"] == "2"
    assert not any(key.startswith("nvidia.com/mig-unused") for key in labels)


def test_mig_single_strategy_keeps_the_suffix() -> None:
    plan = Plan((Resource("nvidia.com/gpu", _mig_devices(2), Sharing.TIME_SLICING),))
    assert sharing_labels(plan, INVENTORY)["nvidia.com/gpu.product"] == "NVIDIA-A100-SXM4-40GB-MIG-1g.10gb+me-SHARED"


@pytest.mark.parametrize(("raw", "clean"), [
    ("a space separated string", "a-space-separated-string"),
    ("some(thing)else", "somethingelse"),
    ("some ( thing )else", "some-thing-else"),
    ("NVIDIA-TITAN-X-(Pascal)", "NVIDIA-TITAN-X-Pascal"),
    (" input  with multiple   spaces   ", "input-with-multiple-spaces"),
    ("some [ / thing / ]else", "some-thing-else"),
    ("some-thing.else_new", "some-thing.else_new"),
])
def test_sanitise(raw: str, clean: str) -> None:
    assert sanitise(raw) == clean


def test_features_file_is_replaced_atomically(tmp_path: Path) -> None:
    path = tmp_path / "features.d" / "nvdp"
    assert write_features_file(path, {"nvidia.com/gpu.replicas": "4", "nvidia.com/mps.capable": "false"})
    assert path.read_text() == "nvidia.com/gpu.replicas=4\nnvidia.com/mps.capable=false\n"
    assert oct(path.stat().st_mode & 0o777) == oct(0o644)
    inode = path.stat().st_ino
    # Unchanged labels: no write, so NFD sees no event.
    assert not write_features_file(path, {"nvidia.com/mps.capable": "false", "nvidia.com/gpu.replicas": "4"})
    assert path.stat().st_ino == inode
    assert write_features_file(path, {"nvidia.com/gpu.replicas": "2"})
    assert path.read_text() == "nvidia.com/gpu.replicas=2\n"
    assert path.stat().st_ino != inode  # a new file renamed over the old one, never rewritten in place
    assert os.listdir(path.parent) == ["nvdp"]  # no temporary left behind


def test_render_is_sorted_key_value_lines() -> None:
    assert render_features({"b": "2", "a": "1"}) == "a=1\nb=2\n"
    assert render_features({}) == ""
