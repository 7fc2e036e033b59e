"""Choose which devices the kubelet should prefer for one container (`GetPreferredAllocation`), as plain data.

Two policies, picked per request:

* **Whole GPUs** (no replica, no MIG device among the IDs): topology-aware. Every GPU pair gets a link score
  (NVLinks beat PCIe; a closer PCIe ancestor beats a farther one) and we pick the `size` GPUs, including all
  `must_include`, whose summed pairwise score is highest: exhaustively while there are at most `EXHAUSTIVE_LIMIT`
  sets to compare, else by greedy growth (which may miss the optimum on big nodes).
* **Replicas and MIG devices**: a greedy spread over physical devices, `distributed` (least-used physical device
  first) or `packed` (most-used first), as upstream does for shared devices.

Everything is deterministic: the same inputs in any order give the same answer. Nothing here imports trio, grpclib
or pynvml.
"""

from __future__ import annotations

import itertools
import math
import threading
from collections import Counter, OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from nvdp.core.inventory import Link, NodeInventory
from nvdp.core.plan.allocate import describe_ids, split_known
from nvdp.core.plan.model import Device, Resource

POLICIES = ("distributed", "packed")

#: Above this many candidate sets the exhaustive search gives way to a greedy one. C(16, 8) = 12870 stays
#: exhaustive; the search costs ~O(sets x size^2) pair additions, a few tens of milliseconds at the limit.
EXHAUSTIVE_LIMIT = 20_000

#: PCIe score by NVML topology level (the GPUs' closest common ancestor); the scale upstream's allocator uses.
_PCIE_SCORE = {
    0: 60,  # same board
    10: 50,  # single PCIe switch
    20: 40,  # multiple PCIe switches
    30: 30,  # host bridge
    40: 20,  # same NUMA node / CPU
    50: 10,  # across CPUs
}
#: One NVLink is worth more than the best PCIe path.
_NVLINK_SCORE = 100


class PreferredAllocationError(Exception):
    """No preferred allocation can be computed; the message goes back to the kubelet."""


def link_score(link: Link) -> int:
    """How well two GPUs are connected: 100 per NVLink, else by PCIe distance, 0 when unknown."""
    if link.nvlinks > 0:
        return _NVLINK_SCORE * link.nvlinks
    if link.pcie_level is None:
        return 0
    return _PCIE_SCORE.get(link.pcie_level, 0)


def preferred_allocation(
    resource: Resource,
    inventory: NodeInventory,
    available: Sequence[str],
    must_include: Sequence[str],
    size: int,
    policy: str = "distributed",
) -> list[str]:
    """The `size` device IDs to prefer: all of `must_include` (first, in given order), then the chosen rest."""
    if policy not in POLICIES:
        # The config rejects unknown policies; upstream would silently fall back to distributed.
        raise PreferredAllocationError(f"unknown allocation policy: {policy!r}")
    if size <= 0:
        return []
    # De-duplicate, keeping order: the kubelet never repeats IDs, but a repeat must not be chosen twice.
    required = _lookup(resource, must_include)
    pool = _lookup(resource, available)
    if len(required) > size:
        raise PreferredAllocationError(
            f"{len(required)} devices must be included but only {size} were requested for {resource.name}"
        )
    required_ids = {d.id for d in required}
    candidates = [d for d in pool if d.id not in required_ids]
    needed = size - len(required)
    if len(candidates) < needed:
        raise PreferredAllocationError("not enough available devices to satisfy allocation")
    if needed == 0:
        return [d.id for d in required]

    if all(_is_whole_gpu(d) for d in itertools.chain(required, candidates)):
        picked = _topology_pick(inventory, required, candidates, needed)
    else:
        picked = _greedy_pick(resource, candidates, needed, packed=policy == "packed")
    return [d.id for d in required] + [d.id for d in picked]


def _lookup(resource: Resource, device_ids: Sequence[str]) -> list[Device]:
    known, unknown = split_known(resource, device_ids)
    # Duplicates count once, at their first place (the kubelet's lists are sets).
    devices = {device.id: device for device in known}
    if unknown:
        noun = "unknown device" if len(unknown) == 1 else "unknown devices"
        raise PreferredAllocationError(f"{noun} for {resource.name}: {describe_ids(unknown)}")
    return list(devices.values())


def _is_whole_gpu(device: Device) -> bool:
    return device.replica is None and device.mig_placement is None


# --- whole GPUs: topology ---------------------------------------------------------------------------------------


def _topology_pick(
    inventory: NodeInventory, required: Sequence[Device], candidates: Sequence[Device], needed: int
) -> list[Device]:
    """The `needed` candidates that, with `required`, maximise the summed pairwise link score; by GPU index.

    Ties go to the set with the lexicographically smallest sorted GPU indices, so the result does not depend on the
    order of `available`.
    """
    ordered = sorted(candidates, key=lambda d: (d.gpu_index, d.id))
    n = len(ordered)
    if needed == n:
        return ordered
    # pair[i][j]: score between candidates i and j; base[i]: candidate i's summed score to every required GPU.
    # Pairs within `required` add the same constant to every set, so they are left out.
    pair = [[0] * n for _ in range(n)]
    for i, j in itertools.combinations(range(n), 2):
        pair[i][j] = pair[j][i] = link_score(inventory.link(ordered[i].gpu_index, ordered[j].gpu_index))
    base = [sum(link_score(inventory.link(c.gpu_index, r.gpu_index)) for r in required) for c in ordered]

    if math.comb(n, needed) <= EXHAUSTIVE_LIMIT:
        chosen = _best_set(pair, base, n, needed)
    else:
        chosen = _greedy_set(pair, base, n, needed)
    return [ordered[i] for i in chosen]


def _best_set(pair: list[list[int]], base: list[int], n: int, needed: int) -> tuple[int, ...]:
    # combinations() yields index tuples in lexicographic order and only a strictly better score replaces the
    # best, so among equal scores the lexicographically smallest set (lowest GPU indices) wins.
    best: tuple[int, ...] = ()
    best_score = -1
    for combo in itertools.combinations(range(n), needed):
        score = sum(base[i] for i in combo)
        for k, i in enumerate(combo):
            row = pair[i]
            for j in combo[k + 1 :]:
                score += row[j]
        if score > best_score:
            best, best_score = combo, score
    return best


def _greedy_set(pair: list[list[int]], base: list[int], n: int, needed: int) -> tuple[int, ...]:
    """Grow a set one GPU at a time, each time adding the one best connected to what is already chosen.

    One growth per possible first GPU, keeping the best-scoring result: a single growth from a fixed start (the
    lowest index, say) can lock itself into a broken NVLink group. Ties go to the lowest sorted indices, as in
    `_best_set`. Cost: O(n^2 x needed) score additions, fine for the GPU counts one node has.
    """
    best: tuple[int, ...] = ()
    best_score = -1
    for seed in range(n):
        chosen, score = _grow(pair, base, seed, needed)
        if score > best_score or (score == best_score and chosen < best):
            best, best_score = chosen, score
    return best


def _grow(pair: list[list[int]], base: list[int], seed: int, needed: int) -> tuple[tuple[int, ...], int]:
    """One greedy growth from `seed`: the chosen indices (sorted) and the set's score."""
    affinity = list(base)  # each candidate's summed score to the required GPUs and everything chosen so far
    remaining = set(range(len(base)))
    chosen: list[int] = []
    score = 0
    nxt = seed
    while True:
        chosen.append(nxt)
        remaining.discard(nxt)
        score += affinity[nxt]
        if len(chosen) == needed:
            return tuple(sorted(chosen)), score
        row = pair[nxt]
        for j in remaining:
            affinity[j] += row[j]
        # Highest affinity, then lowest index (candidates are ordered by GPU index).
        nxt = min(remaining, key=lambda i: (-affinity[i], i))


# --- replicas and MIG: greedy spread ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _ResourceFacts:
    """Per-resource numbers the greedy policy needs, computed once per resource object (O(all devices))."""

    #: Devices (replicas) per physical device in the whole resource.
    totals: Counter[str]
    #: Position of each device in `resource.devices`: the final, deterministic tie-break.
    position: dict[str, int]


# Keyed by id(resource); the entry keeps the resource alive, so the id cannot be reused while cached. Bounded so
# that resources of superseded plans fall out. `Resource` is a slotted dataclass without __weakref__, hence no
# WeakKeyDictionary; and hashing a Resource would walk all its devices, which is what this cache avoids. The lock
# matters because the gRPC handlers run on their own thread.
_FACTS_CACHE_SIZE = 64
_facts_cache: OrderedDict[int, tuple[Resource, _ResourceFacts]] = OrderedDict()
_facts_lock = threading.Lock()


def _facts(resource: Resource) -> _ResourceFacts:
    key = id(resource)
    with _facts_lock:
        entry = _facts_cache.get(key)
        if entry is not None and entry[0] is resource:
            _facts_cache.move_to_end(key)
            return entry[1]
    facts = _ResourceFacts(
        totals=Counter(d.physical_id for d in resource.devices),
        position={d.id: i for i, d in enumerate(resource.devices)},
    )
    with _facts_lock:
        _facts_cache[key] = (resource, facts)
        _facts_cache.move_to_end(key)
        while len(_facts_cache) > _FACTS_CACHE_SIZE:
            _facts_cache.popitem(last=False)
    return facts


def _greedy_pick(resource: Resource, candidates: Sequence[Device], needed: int, *, packed: bool) -> list[Device]:
    """Pick `needed` candidates one at a time, spreading over (or packing onto) physical devices.

    A physical device's "allocated" count is its replicas in the resource minus those still available here; each
    pick makes its physical device one more allocated. Rank, first key deciding:
    1. allocated: ascending for distributed (least-used first), descending for packed (most-used first);
    2. how many were already picked from that physical device in this call, ascending;
    3. position in the resource (GPU index, MIG index, replica number), so the answer never depends on input order.
    Cost: O(needed x len(candidates)) after the one-off per-resource facts.
    """
    facts = _facts(resource)
    free = Counter(d.physical_id for d in candidates)
    picked_from: Counter[str] = Counter()
    sign = -1 if packed else 1
    remaining = list(candidates)
    picked: list[Device] = []

    def rank(device: Device) -> tuple[int, int, int]:
        allocated = facts.totals[device.physical_id] - free[device.physical_id]
        return (sign * allocated, picked_from[device.physical_id], facts.position[device.id])

    for _ in range(needed):
        best = min(remaining, key=rank)
        remaining.remove(best)
        picked.append(best)
        free[best.physical_id] -= 1
        picked_from[best.physical_id] += 1
    return picked
