"""`dra.sharing.mps`, fuzzed: for any section and GPU, either a `ConfigError` that names the section, or published
capacities whose request policies pass the API server's validation (`validate_request_policy`) and whose
accounting never lets the shares of a GPU add up to more than it publishes."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nvdp.core.config.errors import ConfigError
from nvdp.core.dra import shares as sh
from nvdp.core.inventory import Gpu
from tests.fuzz._settings import fuzz_settings

# Long by design (hundreds of examples each): the slow lane, which CI runs (docs/reliability.md).
pytestmark = pytest.mark.slow

MIB = 1 << 20
mib_quantities = st.integers(min_value=0, max_value=96 * 1024).map(lambda n: f"{n}Mi")
memory = st.fixed_dictionaries({}, optional={"minimum": mib_quantities, "step": mib_quantities,
                                             "default": mib_quantities})
compute = st.fixed_dictionaries({}, optional={
    "capacity": st.sampled_from(["computePercent", "multiprocessors"]),
    "minimum": st.integers(min_value=0, max_value=200), "step": st.integers(min_value=0, max_value=64),
    "default": st.integers(min_value=0, max_value=200)})
sections = st.fixed_dictionaries({"devices": st.just([0])}, optional={"memory": memory, "compute": compute})
gpus = st.builds(lambda mib, sms: Gpu(index=0, uuid="GPU-00000000-0000-0000-0000-000000000000", name="GPU",
                                      memory_mib=mib, minor=0, pci_bus_id="00000000:10:00.0",
                                      compute_capability="9.0", multiprocessors=sms),
                 st.integers(min_value=1, max_value=200 * 1024), st.integers(min_value=0, max_value=200))


@fuzz_settings(300)
@given(sections, gpus, st.lists(st.integers(min_value=1, max_value=64 * 1024), max_size=12))
def test_published_policies_are_valid_and_shares_never_over_commit(
        raw: dict[str, Any], gpu: Gpu, share_mib: list[int]) -> None:
    try:
        policy = sh.share_policy(gpu, sh.decode_mps_shares(raw))
    except ConfigError as e:
        assert str(e).startswith("dra.sharing.mps: ")
        return
    for capacity in sh.share_device_overrides(gpu, policy)["capacity"].values():  # type: ignore[union-attr]
        assert sh.validate_request_policy(capacity["value"], capacity["requestPolicy"]) == []
    held: list[sh.ShareAmount] = []
    for mib in share_mib:
        new = sh.ShareAmount(mib * MIB)
        if sh.over_commit("gpu-0", policy, held, new) is None:
            held.append(new)
    assert sum(s.memory_bytes for s in held) <= policy.memory_bytes <= gpu.memory_mib * MIB
