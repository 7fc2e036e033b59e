"""ResourceSlice planning, fuzzed: whatever the API server holds (nothing, a wiped or half-written pool, duplicates,
other pools, edits), one pass of `plan_sync`'s writes leaves exactly the wanted pool, within the API's limits, and a
second pass writes nothing."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nvdp.core.dra.slices import (
    INDEX_LABEL,
    MAX_DEVICES_PER_SLICE,
    MAX_DEVICES_PER_SLICE_TAINTED,
    Pool,
    SliceState,
    build_slices,
    normalise_spec,
    plan_sync,
)
from tests.fuzz._settings import fuzz_settings

# Long by design (hundreds of examples each): the slow lane, which CI runs (docs/reliability.md).
pytestmark = pytest.mark.slow

POOL = Pool("node-1", "uid-1", "gpu.nvidia.com")


def devices(count: int, tainted: frozenset[int]) -> list[dict[str, Any]]:
    out = []
    for i in range(count):
        d: dict[str, Any] = {"name": f"gpu-{i}", "attributes": {"type": {"string": "gpu"}}}
        if i in tainted:
            d["taints"] = [{"key": "gpu.nvidia.com/xid", "value": "48", "effect": "NoSchedule"}]
        out.append(d)
    return out


@st.composite
def scenario(draw: st.DrawFn) -> tuple[list[dict[str, Any]], list[SliceState], int]:
    count = draw(st.integers(0, 400))
    tainted = frozenset(draw(st.lists(st.integers(0, max(count - 1, 0)), max_size=5)))
    wanted = devices(count, tainted if count else frozenset())
    old_count = draw(st.integers(0, 400))
    old_generation = draw(st.integers(1, 5))
    there = build_slices(POOL, devices(old_count, frozenset()), old_generation)
    states = []
    for i, s in enumerate(there):
        fate = draw(st.sampled_from(["keep", "keep", "drop", "duplicate", "older", "edited"]))
        if fate == "drop":
            continue
        if fate == "older":
            s["spec"]["pool"]["generation"] = max(0, old_generation - 1)
        if fate == "edited":
            s["spec"]["devices"] = s["spec"]["devices"][:1]
        states.append(SliceState(f"s{i}", f"u{i}", str(10 + i), s["metadata"]["labels"], s["spec"]))
        if fate == "duplicate":
            states.append(SliceState(f"d{i}", f"v{i}", str(500 + i), dict(s["metadata"]["labels"]),
                                     copy.deepcopy(s["spec"])))
    if draw(st.booleans()):
        states.append(SliceState("other", "uo", "900", {INDEX_LABEL: "0"},
                                 {"driver": "gpu.nvidia.com", "nodeName": "node-1", "pool": {"name": "elsewhere"}}))
    return wanted, states, draw(st.integers(0, 6))


def apply(states: list[SliceState], plan: Any) -> list[SliceState]:
    """The API server's side of the writes (names for creates, no validation beyond the limits)."""
    by_name = {s.name: s for s in states}
    for d in plan.deletes:
        del by_name[d.name]
    for u in plan.updates:
        old = by_name[u.name]
        assert u.body["metadata"]["resourceVersion"] == old.resource_version
        by_name[u.name] = SliceState(u.name, old.uid, old.resource_version + "1", u.body["metadata"]["labels"],
                                     u.body["spec"])
    for c in plan.creates:
        name = f"new{c.index}"
        by_name[name] = SliceState(name, "n", "1", c.body["metadata"]["labels"], c.body["spec"])
    return list(by_name.values())


@fuzz_settings(300)
@given(scenario())
def test_one_pass_converges_within_the_limits(case: tuple[list[dict[str, Any]], list[SliceState], int]) -> None:
    wanted, states, generation = case
    plan = plan_sync(POOL, wanted, states, generation)
    seen = max([generation, *(s.generation for s in states)])
    assert plan.generation >= seen
    after = apply(states, plan)
    again = plan_sync(POOL, wanted, after, plan.generation)
    assert again.in_sync and again.generation == plan.generation
    specs = sorted((normalise_spec(s.spec) for s in after), key=lambda sp: sp["devices"][0]["name"]
                   if sp["devices"] else "")
    assert {sp["pool"]["generation"] for sp in specs} == {plan.generation}
    assert {sp["pool"]["resourceSliceCount"] for sp in specs} == {len(after)}
    ordered = sorted(after, key=lambda s: int(s.labels[INDEX_LABEL]))
    assert [d["name"] for s in ordered for d in s.spec["devices"]] == [d["name"] for d in wanted]
    for s in after:
        limit = MAX_DEVICES_PER_SLICE_TAINTED if any(d.get("taints") for d in s.spec["devices"]) \
            else MAX_DEVICES_PER_SLICE
        assert len(s.spec["devices"]) <= limit
    if not plan.in_sync:
        assert plan.generation == seen + 1
