"""GetPreferredAllocation: topology-aware for whole GPUs, greedy spread for replicas and MIG (upstream §5, §10.7)."""

from __future__ import annotations

import itertools
import random
from collections import Counter

import pytest

from nvdp.core.inventory import Gpu, Link, NodeInventory
from nvdp.core.plan import preferred
from nvdp.core.plan.model import Device, Resource, Sharing
from nvdp.core.plan.preferred import PreferredAllocationError, link_score, preferred_allocation

# --- small builders ---------------------------------------------------------------------------------------------


def gpu_device(index: int) -> Device:
    uuid = f"GPU-{index}"
    return Device(
        id=uuid, physical_id=uuid, index=str(index), gpu_uuid=uuid, gpu_index=index, paths=(f"/dev/nvidia{index}",)
    )


def replica_devices(gpu_count: int, per_gpu: int) -> list[Device]:
    """`GPU-<g>::<r>` for every GPU g and replica r, in resource order."""
    devices = []
    for g in range(gpu_count):
        base = gpu_device(g)
        for r in range(per_gpu):
            devices.append(
                Device(
                    id=f"{base.id}::{r}",
                    physical_id=base.physical_id,
                    index=base.index,
                    gpu_uuid=base.gpu_uuid,
                    gpu_index=g,
                    paths=base.paths,
                    replica=r,
                )
            )
    return devices


def mig_device(gpu_index: int, mig_index: int) -> Device:
    return Device(
        id=f"MIG-{gpu_index}-{mig_index}",
        physical_id=f"MIG-{gpu_index}-{mig_index}",
        index=f"{gpu_index}:{mig_index}",
        gpu_uuid=f"GPU-{gpu_index}",
        gpu_index=gpu_index,
        paths=(f"/dev/nvidia{gpu_index}",),
        mig_placement=(mig_index + 1, 0),
    )


def resource(devices: list[Device], name: str = "nvidia.com/gpu") -> Resource:
    shared = any(d.is_replica for d in devices)
    return Resource(name=name, devices=tuple(devices), sharing=Sharing.TIME_SLICING if shared else Sharing.NONE)


def inventory(gpu_count: int, links: dict[tuple[int, int], Link] | None = None) -> NodeInventory:
    gpus = tuple(
        Gpu(
            index=i,
            uuid=f"GPU-{i}",
            name="NVIDIA A100-SXM4-40GB",
            memory_mib=40960,
            minor=i,
            pci_bus_id=f"00000000:{i:02x}:00.0",
            compute_capability="8.0",
        )
        for i in range(gpu_count)
    )
    return NodeInventory(driver_version="550.54", cuda_driver_version=12040, gpus=gpus, links=links or {})


def nvlink_groups(gpu_count: int, group: int, links: int = 12) -> dict[tuple[int, int], Link]:
    """All-to-all NVLink inside each block of `group` GPUs, PCIe across CPUs between blocks."""
    return {
        (a, b): Link(nvlinks=links) if a // group == b // group else Link(pcie_level=50)
        for a, b in itertools.combinations(range(gpu_count), 2)
    }


def ids(*indices: int) -> list[str]:
    return [f"GPU-{i}" for i in indices]


def per_gpu(result: list[str]) -> list[int]:
    """How many devices were taken from each physical GPU, largest first."""
    return sorted(Counter(r.split("::")[0] for r in result).values(), reverse=True)


DGX = inventory(8, nvlink_groups(8, 4))
DGX_GPUS = resource([gpu_device(i) for i in range(8)])

#: 4 GPUs on PCIe only: 0-1 and 2-3 behind their own switches, the pairs on different CPUs.
PCIE = inventory(
    4,
    {
        (0, 1): Link(pcie_level=10),
        (2, 3): Link(pcie_level=10),
        (0, 2): Link(pcie_level=50),
        (0, 3): Link(pcie_level=50),
        (1, 2): Link(pcie_level=50),
        (1, 3): Link(pcie_level=50),
    },
)


# --- link scores --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("link", "score"),
    [
        pytest.param(Link(nvlinks=12, pcie_level=0), 1200, id="nvlinks count 100 each and beat pcie"),
        pytest.param(Link(nvlinks=1), 100, id="a single nvlink beats the best pcie path"),
        pytest.param(Link(pcie_level=0), 60, id="same board"),
        pytest.param(Link(pcie_level=10), 50, id="single switch"),
        pytest.param(Link(pcie_level=20), 40, id="multiple switches"),
        pytest.param(Link(pcie_level=30), 30, id="host bridge"),
        pytest.param(Link(pcie_level=40), 20, id="same numa node"),
        pytest.param(Link(pcie_level=50), 10, id="across cpus"),
        pytest.param(Link(), 0, id="unknown link scores nothing"),
        pytest.param(Link(pcie_level=99), 0, id="an unrecognised pcie level scores nothing"),
    ],
)
def test_link_score(link: Link, score: int) -> None:
    assert link_score(link) == score


# --- whole GPUs: topology -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("inv", "available", "must", "size", "expected"),
    [
        pytest.param(DGX, ids(*range(8)), [], 2, ids(0, 1), id="size 2 on a DGX takes an nvlinked pair, lowest first"),
        pytest.param(DGX, ids(*range(8)), [], 4, ids(0, 1, 2, 3), id="size 4 on a DGX takes one whole nvlink group"),
        pytest.param(DGX, ids(*range(8)), [], 8, ids(*range(8)), id="size equal to available takes everything"),
        pytest.param(
            DGX, ids(0, 4, 5, 6, 7), [], 4, ids(4, 5, 6, 7), id="an intact group beats the lower-indexed broken one"
        ),
        pytest.param(
            DGX, ids(2, 3, 4, 5, 6, 7), [], 4, ids(4, 5, 6, 7), id="four linked GPUs beat two plus two across cpus"
        ),
        pytest.param(DGX, ids(*range(8)), ids(5), 2, ids(5, 4), id="must-include 5 pulls in its nvlink peer 4"),
        pytest.param(DGX, ids(*range(8)), ids(6, 2), 3, ids(6, 2, 0), id="must-include ids come first in given order"),
        pytest.param(
            DGX, ids(*range(8)), ids(2), 4, ids(2, 0, 1, 3), id="must-include 2 with size 4 fills its own group"
        ),
        pytest.param(DGX, ids(1, 2), ids(1, 2), 2, ids(1, 2), id="must-include filling size returns it as is"),
        pytest.param(DGX, ids(7), ids(3), 2, ids(3, 7), id="must-include need not be listed in available"),
        pytest.param(PCIE, ids(0, 1, 2, 3), [], 2, ids(0, 1), id="pcie only prefers the pair behind one switch"),
        pytest.param(PCIE, ids(1, 2, 3), [], 2, ids(2, 3), id="pcie only skips a pair split across cpus"),
        pytest.param(PCIE, ids(0, 1, 2, 3), ids(3), 2, ids(3, 2), id="pcie only must-include 3 takes its switch peer"),
        pytest.param(inventory(4), ids(3, 1, 2), [], 2, ids(1, 2), id="no topology known falls back to lowest indices"),
    ],
)
def test_whole_gpus_follow_topology(
    inv: NodeInventory, available: list[str], must: list[str], size: int, expected: list[str]
) -> None:
    res = resource([gpu_device(i) for i in range(len(inv.gpus))])
    assert preferred_allocation(res, inv, available, must, size) == expected


def test_whole_gpus_ignore_the_sharing_policy() -> None:
    # Upstream: the policy only applies to shared devices; topology decides for whole GPUs.
    for policy in ("distributed", "packed"):
        assert preferred_allocation(DGX_GPUS, DGX, ids(*range(8)), [], 4, policy) == ids(0, 1, 2, 3)


def test_whole_gpus_answer_is_identical_for_shuffled_available() -> None:
    rng = random.Random(1234)
    available = ids(*range(8))
    for size, must in [(2, []), (3, ids(6)), (4, []), (5, ids(1)), (6, ids(7, 0))]:
        expected = preferred_allocation(DGX_GPUS, DGX, available, must, size)
        for _ in range(10):
            shuffled = rng.sample(available, len(available))
            assert preferred_allocation(DGX_GPUS, DGX, shuffled, must, size) == expected


def test_large_node_falls_back_to_greedy_and_still_picks_a_linked_group() -> None:
    # 32 GPUs in NVLink groups of 8: C(32, 8) sets is far above the exhaustive limit.
    inv = inventory(32, nvlink_groups(32, 8))
    res = resource([gpu_device(i) for i in range(32)])
    assert preferred_allocation(res, inv, ids(*range(32)), [], 8) == ids(*range(8))
    # With GPU 0 gone the first group is broken: growing from GPU 1 would end with 7 linked GPUs plus a stray one,
    # growing from GPU 8 gives a whole group, and the better-scoring growth wins.
    assert preferred_allocation(res, inv, ids(*range(1, 32)), [], 8) == ids(*range(8, 16))
    # A required GPU seeds the greedy growth.
    assert preferred_allocation(res, inv, ids(*range(32)), ids(20), 8) == ids(20, 16, 17, 18, 19, 21, 22, 23)


def test_exhaustive_search_at_its_worst_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    # 16 GPUs, size 8, no must-include: C(16, 8) = 12870 sets, the largest the exhaustive search takes. Its cost is
    # counted in sets scored, not in seconds (speed is bench/'s business: preferred.nvlink8_*).
    inv = inventory(16, nvlink_groups(16, 8, links=4))
    res = resource([gpu_device(i) for i in range(16)])
    scored: Counter[int] = Counter()
    real = itertools.combinations

    def counting(iterable: object, r: int) -> object:
        for combo in real(iterable, r):  # type: ignore[call-overload]
            scored[r] += 1
            yield combo

    monkeypatch.setattr(preferred.itertools, "combinations", counting)
    assert preferred_allocation(res, inv, ids(*range(16)), [], 8) == ids(*range(8))
    assert scored[8] == 12870  # every set once: exhaustive, and no more than that


# --- replicas and MIG: greedy (upstream §10.7) ----------------------------------------------------------------------


def all_ids(gpus: int, per: int) -> list[str]:
    return [d.id for d in replica_devices(gpus, per)]


@pytest.mark.parametrize(
    ("gpus", "per", "size", "policy", "spread"),
    [
        pytest.param(2, 4, 2, "distributed", [1, 1], id="distributed 2 GPUs x 4 size 2 takes one from each"),
        pytest.param(3, 2, 3, "distributed", [1, 1, 1], id="distributed 3 GPUs x 2 size 3 takes one from each"),
        pytest.param(2, 4, 4, "distributed", [2, 2], id="distributed 2 GPUs x 4 size 4 splits two and two"),
        pytest.param(1, 4, 1, "distributed", [1], id="distributed 1 GPU x 4 size 1 takes one"),
        pytest.param(3, 4, 3, "distributed", [1, 1, 1], id="distributed 3 GPUs x 4 size 3 takes one from each"),
        pytest.param(2, 4, 2, "packed", [2], id="packed 2 GPUs x 4 size 2 takes both from one GPU"),
        pytest.param(3, 2, 3, "packed", [2, 1], id="packed 3 GPUs x 2 size 3 fills one GPU then the next"),
        pytest.param(2, 4, 4, "packed", [4], id="packed 2 GPUs x 4 size 4 takes all from one GPU"),
        pytest.param(2, 4, 5, "packed", [4, 1], id="packed 2 GPUs x 4 size 5 splits four and one"),
        pytest.param(1, 4, 1, "packed", [1], id="packed 1 GPU x 4 size 1 takes one"),
    ],
)
def test_replicas_spread_by_policy(gpus: int, per: int, size: int, policy: str, spread: list[int]) -> None:
    res = resource(replica_devices(gpus, per))
    result = preferred_allocation(res, inventory(gpus), all_ids(gpus, per), [], size, policy)
    assert per_gpu(result) == spread
    assert len(set(result)) == size


@pytest.mark.parametrize("policy", ["distributed", "packed"])
def test_replicas_more_than_available_is_refused(policy: str) -> None:
    res = resource(replica_devices(1, 2))
    with pytest.raises(PreferredAllocationError, match=r"^not enough available devices to satisfy allocation$"):
        preferred_allocation(res, inventory(1), all_ids(1, 2), [], 5, policy)


def test_distributed_counts_replicas_already_allocated_elsewhere() -> None:
    # GPU-1::0 is taken by another pod, so GPU-1 counts as more used: the first pick comes from GPU-0, the second
    # from GPU-1 because GPU-0 is then equally used and already picked from in this call.
    res = resource(replica_devices(2, 2))
    result = preferred_allocation(res, inventory(2), ["GPU-0::0", "GPU-0::1", "GPU-1::1"], [], 2)
    assert result == ["GPU-0::0", "GPU-1::1"]


def test_packed_prefers_the_gpu_that_is_already_busiest() -> None:
    res = resource(replica_devices(2, 4))
    available = ["GPU-0::0", "GPU-0::1", "GPU-0::2", "GPU-0::3", "GPU-1::2", "GPU-1::3"]
    assert preferred_allocation(res, inventory(2), available, [], 2, "packed") == ["GPU-1::2", "GPU-1::3"]
    assert preferred_allocation(res, inventory(2), available, [], 2, "distributed") == ["GPU-0::0", "GPU-0::1"]


def test_replicas_answer_is_identical_for_shuffled_available() -> None:
    res = resource(replica_devices(3, 4))
    available = all_ids(3, 4)
    rng = random.Random(99)
    for policy, size in [("distributed", 3), ("distributed", 5), ("packed", 3), ("packed", 6)]:
        expected = preferred_allocation(res, inventory(3), available, [], size, policy)
        for _ in range(10):
            shuffled = rng.sample(available, len(available))
            assert preferred_allocation(res, inventory(3), shuffled, [], size, policy) == expected


def test_replicas_keep_must_include_first_and_never_repeat_it() -> None:
    res = resource(replica_devices(2, 4))
    result = preferred_allocation(res, inventory(2), all_ids(2, 4), ["GPU-1::3"], 3)
    assert result[0] == "GPU-1::3"
    assert len(set(result)) == 3


def test_mig_devices_take_the_greedy_path_in_resource_order() -> None:
    # Each MIG device is its own physical device, so distributed has no spread to make: resource order decides,
    # even though the inventory's NVLinks would have favoured GPUs 0 and 1 under the topology path.
    devices = [mig_device(g, m) for g in range(2) for m in range(2)]
    res = resource(devices, name="nvidia.com/mig-1g.5gb")
    available = ["MIG-1-1", "MIG-0-1", "MIG-1-0"]
    assert preferred_allocation(res, DGX, available, [], 2) == ["MIG-0-1", "MIG-1-0"]


def test_a_single_replica_in_the_request_turns_off_the_topology_path() -> None:
    devices = [gpu_device(0), *replica_devices(2, 2)[2:]]  # GPU-0 whole, GPU-1 as two replicas
    res = resource(devices)
    assert preferred_allocation(res, DGX, ["GPU-1::0", "GPU-0", "GPU-1::1"], [], 2) == ["GPU-0", "GPU-1::0"]


def test_per_resource_totals_follow_each_resource_object() -> None:
    # Two resources with the same IDs but different replica counts must not share cached totals.
    small = resource(replica_devices(2, 2))
    big = resource(replica_devices(2, 8))
    available = ["GPU-0::0", "GPU-0::1", "GPU-1::1"]
    assert preferred_allocation(small, inventory(2), available, [], 1) == ["GPU-0::0"]
    # In `big`, GPU-0 has 6 of 8 allocated and GPU-1 7 of 8: distributed still starts on GPU-0.
    assert preferred_allocation(big, inventory(2), available, [], 1) == ["GPU-0::0"]
    assert preferred_allocation(big, inventory(2), available, [], 1, "packed") == ["GPU-1::1"]


def test_facts_cache_is_bounded() -> None:
    for _ in range(preferred._FACTS_CACHE_SIZE + 10):
        res = resource(replica_devices(1, 2))
        preferred_allocation(res, inventory(1), ["GPU-0::0"], [], 1)
    assert len(preferred._facts_cache) <= preferred._FACTS_CACHE_SIZE


# --- edge cases ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, -1])
def test_non_positive_size_gives_nothing(size: int) -> None:
    assert preferred_allocation(DGX_GPUS, DGX, ids(0, 1), [], size) == []


@pytest.mark.parametrize(
    ("res", "available", "must", "size", "policy", "message"),
    [
        pytest.param(
            DGX_GPUS,
            ids(0, 1, 2),
            ids(0, 1, 2),
            2,
            "distributed",
            "3 devices must be included but only 2 were requested for nvidia.com/gpu",
            id="more must-include than size is refused",
        ),
        pytest.param(
            DGX_GPUS,
            ["GPU-0", "GPU-x", "GPU-y"],
            [],
            1,
            "distributed",
            "unknown devices for nvidia.com/gpu: GPU-x, GPU-y",
            id="unknown available ids are all named",
        ),
        pytest.param(
            DGX_GPUS,
            ids(0),
            ["GPU-z"],
            1,
            "distributed",
            "unknown device for nvidia.com/gpu: GPU-z",
            id="an unknown must-include id is named",
        ),
        pytest.param(
            DGX_GPUS,
            ids(0, 1),
            [],
            3,
            "distributed",
            "not enough available devices to satisfy allocation",
            id="deliberately unlike upstream too few whole GPUs is an error rather than an empty answer",
        ),
        pytest.param(
            DGX_GPUS,
            ids(0, 1),
            [],
            1,
            "spread",
            "unknown allocation policy: 'spread'",
            id="deliberately unlike upstream an unknown policy is refused rather than treated as distributed",
        ),
    ],
)
def test_bad_requests_are_refused(
    res: Resource, available: list[str], must: list[str], size: int, policy: str, message: str
) -> None:
    with pytest.raises(PreferredAllocationError) as caught:
        preferred_allocation(res, DGX, available, must, size, policy)
    assert str(caught.value) == message


def test_duplicate_available_ids_are_never_chosen_twice() -> None:
    res = resource(replica_devices(1, 2))
    with pytest.raises(PreferredAllocationError, match="not enough available"):
        preferred_allocation(res, inventory(1), ["GPU-0::0", "GPU-0::0"], [], 2)
    assert preferred_allocation(DGX_GPUS, DGX, ids(0, 0, 1), ids(0), 2) == ids(0, 1)
