"""Dynamic MPS shares, the pure core: config, published capacities and their request policies, accounting, limits,
health."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import msgspec
import pytest
import trio
import trio.testing

from nvdp.core.config.errors import ConfigError
from nvdp.core.dra import checkpoint as cp
from nvdp.core.dra import shares as sh
from nvdp.core.dra.claims import ClaimPlan, DevicePlan, Mount, NodeDevice, plan_claim
from nvdp.core.dra.config import MPS
from nvdp.core.dra.types import ClaimRef
from nvdp.core.inventory import Gpu
from tests.dra_fixtures import DEVICES, DRIVER, GPU0, GPU1, GPU2, NODE, claim, gpu_config, opaque, result
from tests.test_dra_prepare import Node

GIB = 1 << 30
MIB = 1 << 20
H100 = Gpu(index=3, uuid="GPU-00000000-0000-0000-0000-000000000003", name="H100", memory_mib=81559, minor=3,
           pci_bus_id="00000000:40:00.0", compute_capability="9.0", multiprocessors=132)


def config(**raw: Any) -> sh.MpsSharesConfig:
    return sh.decode_mps_shares({"devices": ["0"], **raw})


def policy(gpu: Gpu = GPU0, **raw: Any) -> sh.SharePolicy:
    return sh.share_policy(gpu, config(**raw))


# --- config -------------------------------------------------------------------------------------------------------


def test_the_defaults_share_whole_mib_and_no_compute_and_keep_nothing_warm() -> None:
    assert sh.decode_mps_shares({"devices": "all"}) == sh.MpsSharesConfig(devices="all")
    parsed = config(memory={"minimum": "1Gi", "step": "256Mi", "default": "2Gi"},
                    compute={"capacity": "multiprocessors", "minimum": 2, "step": 2, "default": 4}, keepWarm="5m")
    assert parsed == sh.MpsSharesConfig(
        devices=("0",), memory_minimum=GIB, memory_step=256 * MIB, memory_default=2 * GIB,
        compute_capacity="multiprocessors", compute_minimum=2, compute_step=2, compute_default=4, keep_warm_s=300)


@pytest.mark.parametrize(("raw", "message"), [
    ({}, "Object missing required field `devices`"),
    ({"devices": ["0"], "memroy": {}}, "Object contains unknown field `memroy`"),
    ({"devices": ["0"], "memory": {"step": "1Gb"}}, "memory.step: quantities must match"),
    ({"devices": "some"}, "the only valid string is 'all'"),
    ({"devices": 0}, "a count of GPUs must be > 0"),
    ({"devices": []}, "devices is an empty list"),
    ({"devices": ["0:1"]}, "'0:1' is a MIG device: MPS shares are of whole GPUs"),
    ({"devices": ["gpu0"]}, "unsupported device 'gpu0'"),
    ({"devices": ["0"], "memory": {"minimum": "1000k"}}, "must be whole MiB"),
    ({"devices": ["0"], "memory": {"minimum": "1Gi", "default": "512Mi"}},
     "memory.default (512 MiB) is less than memory.minimum (1 GiB)"),
    ({"devices": ["0"], "memory": {"minimum": "1Gi", "step": "1Gi", "default": "1536Mi"}},
     "memory.default (1.5 GiB) is not memory.minimum (1 GiB) plus a multiple of memory.step (1 GiB)"),
    ({"devices": ["0"], "compute": {"capacity": "sms"}}, "compute.capacity must be computePercent or multiprocessors"),
    ({"devices": ["0"], "compute": {"step": 0}}, "compute.step must be at least 1"),
    ({"devices": ["0"], "compute": {"minimum": -1}}, "compute.minimum must not be negative"),
    ({"devices": ["0"], "compute": {"step": 10, "default": 15}}, "compute.default (15) must be compute.minimum (0)"),
    ({"devices": ["0"], "compute": {"default": 150}}, "are percentages: at most 100"),
    ({"devices": ["0"], "keepWarm": "5 minutes"}, "keepWarm must be a duration"),
    ({"devices": ["0"], "keepWarm": "48h"}, "keepWarm must be between 0 and 24h"),
])
def test_config_errors_say_where_and_why(raw: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=r"^dra\.sharing\.mps: ") as error:
        sh.decode_mps_shares(raw)
    assert message in str(error.value)


def test_selected_gpus_follow_the_selector_and_refuse_what_cannot_host_shares() -> None:
    gpus = [GPU2, GPU0, GPU1]
    assert sh.selected_gpus(config(), gpus) == (GPU0,)
    assert sh.selected_gpus(sh.decode_mps_shares({"devices": "all"}), gpus) == (GPU0, GPU2)  # GPU1 has MIG on
    assert sh.selected_gpus(sh.decode_mps_shares({"devices": 1}), gpus) == (GPU0,)
    assert sh.selected_gpus(sh.decode_mps_shares({"devices": [GPU2.uuid, 0]}), gpus) == (GPU2, GPU0)
    with pytest.raises(ConfigError, match="'7' names no GPU of this node"):
        sh.selected_gpus(sh.decode_mps_shares({"devices": [7]}), gpus)
    with pytest.raises(ConfigError, match="4 GPUs requested, the node has 3"):
        sh.selected_gpus(sh.decode_mps_shares({"devices": 4}), gpus)
    with pytest.raises(ConfigError, match=r"GPU 1 \(GPU-.*1\) has MIG enabled"):
        sh.selected_gpus(sh.decode_mps_shares({"devices": [1]}), gpus)
    names = {GPU0.uuid: "gpu-0"}
    assert set(sh.share_policies(config(), gpus, names)) == {"gpu-0"}
    with pytest.raises(ConfigError, match="is not served through DRA"):
        sh.share_policies(sh.decode_mps_shares({"devices": [2]}), gpus, names)


# --- capacities and request policies -------------------------------------------------------------------------------


def test_a_share_host_publishes_memory_and_compute_with_valid_request_policies() -> None:
    overrides = sh.share_device_overrides(GPU0, policy())
    assert overrides == {"allowMultipleAllocations": True, "capacity": {
        "memory": {"value": "40Gi", "requestPolicy": {
            "default": "40Gi", "validRange": {"min": "1Mi", "max": "40Gi", "step": "1Mi"}}},
        "computePercent": {"value": "100", "requestPolicy": {
            "default": "0", "validRange": {"min": "0", "max": "100", "step": "1"}}},
    }}
    device = {"name": "gpu-0", "attributes": {"uuid": {"string": GPU0.uuid}}, "capacity": {"other": {"value": "1"}}}
    applied = sh.apply_share_overrides(device, GPU0, policy())
    assert applied["attributes"] == device["attributes"] and applied["capacity"] == overrides["capacity"]


@pytest.mark.parametrize("raw", [
    {},
    {"memory": {"minimum": "1Gi", "step": "256Mi", "default": "2Gi"}},
    {"memory": {"minimum": "3Gi", "step": "7Gi"}},
    {"compute": {"capacity": "multiprocessors", "minimum": 2, "step": 4, "default": 6}},
    {"compute": {"minimum": 5, "step": 10, "default": 25}},
])
def test_every_published_policy_passes_the_api_validation(raw: dict[str, Any]) -> None:
    for gpu in (replace(GPU0, multiprocessors=108), H100):
        for capacity in sh.share_device_overrides(gpu, sh.share_policy(gpu, config(**raw)))["capacity"].values():
            assert isinstance(capacity, dict)
            assert sh.validate_request_policy(capacity["value"], capacity["requestPolicy"]) == []


def test_memory_is_rounded_down_to_the_step_from_the_minimum() -> None:
    p = policy(H100, memory={"minimum": "3Gi", "step": "2Gi"})
    # 81559 MiB = 79.6 GiB: 3 GiB + 38 steps of 2 GiB = 79 GiB.
    assert p.memory_bytes == 79 * GIB and p.memory_default == 79 * GIB
    assert sh.share_capacities(p)["memory"]["value"] == "79Gi"
    sms = policy(H100, compute={"capacity": "multiprocessors", "minimum": 2, "step": 4})
    assert (sms.compute_total, sms.compute_maximum) == (132, 130)
    assert sh.share_capacities(sms)["multiprocessors"] == {"value": "132", "requestPolicy": {
        "default": "2", "validRange": {"min": "2", "max": "130", "step": "4"}}}


def test_a_policy_that_does_not_fit_the_gpu_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"GPU 0 \(.*\) has 40 GiB of memory: memory.minimum \(40 GiB\) plus one"):
        policy(memory={"minimum": "40Gi"})
    with pytest.raises(ConfigError, match=r"memory.default \(48 GiB\) is more than GPU 0 .* can share \(40 GiB\)"):
        policy(memory={"default": "48Gi"})
    with pytest.raises(ConfigError, match="the driver does not say how many"):
        policy(compute={"capacity": "multiprocessors"})  # the fixture's A100 has multiprocessors=0
    with pytest.raises(ConfigError, match=r"compute\.minimum \(99\) plus one compute\.step \(2\) is more"):
        policy(compute={"minimum": 99, "step": 2, "default": 99})


@pytest.mark.parametrize(("value", "request_policy", "errors"), [
    ("40Gi", {"default": "1Gi", "validRange": {"min": "1Gi", "max": "40Gi", "step": "1Gi"}}, []),
    ("40Gi", {"default": "1Gi", "validValues": ["1Gi"], "validRange": {"min": "1Gi"}},
     ['exactly one policy can be specified, cannot specify "validValues" and "validRange" at the same time']),
    ("40Gi", {"validRange": {"min": "1Gi"}}, ["default: required when validRange is defined"]),
    ("40Gi", {"default": "1Gi", "validRange": {}}, ["validRange.min: required when validRange is defined"]),
    ("40Gi", {"default": "512Mi", "validRange": {"min": "1Gi"}},
     ["validRange.min: default is less than min: 1073741824"]),
    ("40Gi", {"default": "41Gi", "validRange": {"min": "41Gi", "max": "42Gi"}}, [
        "validRange.min: min is larger than capacity value: 42949672960",
        "validRange.max: max is larger than capacity value: 42949672960"]),
    ("40Gi", {"default": "3Gi", "validRange": {"min": "2Gi", "max": "1Gi"}}, [
        "validRange.max: min is larger than max: 1073741824", "validRange.max: default is more than max: 1073741824"]),
    ("40Gi", {"default": "2Gi", "validRange": {"min": "1Gi", "max": "40Gi", "step": "40Gi"}}, [
        "validRange.step: one step 44023414784 is larger than capacity value: 42949672960",
        "validRange.step: default 2147483648 is not a multiple of a given step (42949672960) from (1073741824)",
        "validRange.step: max 42949672960 is not a multiple of a given step (42949672960) from (1073741824)"]),
    ("40Gi", {"default": "1536Mi", "validRange": {"min": "1Gi", "step": "1Gi"}}, [
        "validRange.step: default 1610612736 is not a multiple of a given step (1073741824) from (1073741824)"]),
    ("40Gi", {"default": "2Gi", "validValues": ["1Gi", "2Gi", "4Gi"]}, []),
    ("40Gi", {"validValues": ["1Gi"]}, ["default: required when validValues is defined"]),
    ("40Gi", {"default": "3Gi", "validValues": ["4Gi", "1Gi", "48Gi"]}, [
        "validValues[1]: values must be sorted in ascending order",
        "validValues[2]: option is larger than capacity value: 42949672960",
        "validValues: default value is not valid according to the requestPolicy"]),
    ("40Gi", {"default": "1", "validValues": [str(i) for i in range(1, 12)]}, ["validValues: must have at most 10"]),
])
def test_request_policy_validation_follows_the_api(value: str, request_policy: dict[str, Any],
                                                    errors: list[str]) -> None:
    found = sh.validate_request_policy(value, request_policy)
    assert len(found) == len(errors)
    for got, want in zip(found, errors, strict=True):
        assert got.startswith(want)


# --- accounting and limits -----------------------------------------------------------------------------------------


def test_three_shares_fit_a_40_gib_gpu_and_a_fourth_of_1_gib_is_refused_naming_41_and_40() -> None:
    p = policy()
    held: list[sh.ShareAmount] = []
    for size in (10, 10, 20):
        new = sh.ShareAmount(size * GIB)
        assert sh.over_commit("gpu-0", p, held, new) is None
        held.append(new)
    why = sh.over_commit("gpu-0", p, held, sh.ShareAmount(GIB))
    assert why == ("device gpu-0 (GPU 0) cannot take a share of 1 GiB of memory: 41 GiB requested in total, GPU has "
                   "40 GiB (3 share(s) prepared: 40 GiB)")


def test_compute_is_accounted_too() -> None:
    p = policy()
    assert sh.over_commit("gpu-0", p, [sh.ShareAmount(GIB, 60)], sh.ShareAmount(GIB, 40)) is None
    assert sh.over_commit("gpu-0", p, [sh.ShareAmount(GIB, 60)], sh.ShareAmount(GIB, 50)) == (
        "device gpu-0 (GPU 0) cannot take a share of 50 computePercent: 110 requested in total, GPU has 100 "
        "(1 share(s) prepared: 60)")


def test_consumed_capacity_becomes_amounts_and_limits() -> None:
    p = policy()
    amount = sh.consumed_amount([("memory", "10Gi"), ("computePercent", "25")], p)
    assert amount == sh.ShareAmount(10 * GIB, 25)
    assert sh.share_limits(p, amount) == sh.ShareLimits(10240, 25)
    # Not booked: the policy's default, as the scheduler books it (whole GPU, no compute cap).
    assert sh.consumed_amount([], p) == sh.ShareAmount(40 * GIB, 0)
    assert sh.share_limits(p, sh.ShareAmount(40 * GIB, 0)) == sh.ShareLimits(40960, None)
    sms = policy(H100, compute={"capacity": "multiprocessors"})
    # 27 of 132 SMs = 20.45 %: rounded up, MPS allots whole SMs.
    assert sh.share_limits(sms, sh.ShareAmount(GIB + 512 * 1024, 27)) == sh.ShareLimits(1024, 21)
    with pytest.raises(ValueError, match="names gpus, which this device does not publish"):
        sh.consumed_amount([("gpus", "1")], p)
    with pytest.raises(ValueError, match="less than 1 MiB"):
        sh.consumed_amount([("memory", "1Ki")], p)


def test_client_edits_carry_the_pipe_and_shm_and_the_limits() -> None:
    edits = sh.client_edits("/run/nvdp/mps/GPU-0/pipe", "/run/nvdp/mps/shm", 10240, 25)
    assert edits.env == ("CUDA_MPS_PIPE_DIRECTORY=/run/nvdp/mps/GPU-0/pipe",
                         "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT=0=10240M", "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=25")
    bind = ("rw", "nosuid", "nodev", "bind")
    assert edits.mounts == (Mount(host_path="/run/nvdp/mps/GPU-0/pipe", container_path="/run/nvdp/mps/GPU-0/pipe",
                                  options=bind),
                            Mount(host_path="/run/nvdp/mps/shm", container_path="/dev/shm", options=bind))
    assert sh.client_edits("/p", "/s", None, None).env == ("CUDA_MPS_PIPE_DIRECTORY=/p",)


def test_the_daemon_default_is_the_largest_share() -> None:
    assert sh.daemon_defaults([(10240, 25), (20480, None), (10240, 50)], 40960) == (20480, 100)
    assert sh.daemon_defaults([(10240, 25), (4096, 50)], 40960) == (10240, 50)
    assert sh.daemon_defaults([(None, 25)], 40960) == (40960, 25)
    assert sh.daemon_defaults([], 40960) == (40960, 100)


def _share_claim(uid: str, memory: str, share: str, **extra: Any) -> dict[str, Any]:
    return claim(uid, [result("gpu-0", shareID=share, consumedCapacity={"memory": memory}, **extra)])


def _plan(body: dict[str, Any], uid: str) -> ClaimPlan:
    plan = plan_claim(body, ClaimRef("default", uid, f"claim-{uid}"), DRIVER, NODE, DEVICES)
    assert isinstance(plan, ClaimPlan)
    return plan


def test_plan_shares_makes_each_share_an_mps_device_with_its_limits() -> None:
    hosts = {"gpu-0": policy()}
    plan = sh.plan_shares(_plan(_share_claim("u1", "10Gi", "s1"), "u1"), hosts)
    assert isinstance(plan, ClaimPlan)
    [device] = plan.devices
    assert device.config.sharing is not None and device.config.sharing.strategy == MPS
    assert device.mps_pinned_mib == 10240 and device.share_memory_bytes == 10 * GIB and device.share_id == "s1"
    # Devices that are no share host are left alone.
    other = _plan(claim("u2", [result("gpu-2")]), "u2")
    assert sh.plan_shares(other, hosts) == other


@pytest.mark.parametrize(("body", "message"), [
    (claim("u1", [result("gpu-0")]), "is published for MPS shares, but its allocation has no shareID"),
    (claim("u1", [result("gpu-0", shareID="s1", consumedCapacity={"memory": "1Gi"})], [opaque(gpu_config("MPS"))]),
     "a MPS sharing config cannot apply to it"),
    (_share_claim("u1", "lots", "s1"), "share s1 of device gpu-0: quantities must match"),
])
def test_plan_shares_refuses_what_cannot_be_a_share(body: dict[str, Any], message: str) -> None:
    why = sh.plan_shares(_plan(body, "u1"), {"gpu-0": policy()})
    assert isinstance(why, str) and why.startswith("claim default/claim-u1: ") and message in why


def test_an_xid_or_a_dead_daemon_marks_every_share_of_its_gpu_unhealthy_and_taints_the_host() -> None:
    prepared = [("u1", "gpu-0", "s1", GPU0.uuid), ("u2", "gpu-0", "s2", GPU0.uuid), ("u3", "gpu-0", "s3", GPU0.uuid),
                ("u4", "gpu-2", "s4", GPU2.uuid)]
    health = sh.share_health(prepared, {GPU0.uuid: "XID 79"})
    assert [(h.claim_uid, h.healthy, h.reason) for h in health] == [
        ("u1", False, "XID 79"), ("u2", False, "XID 79"), ("u3", False, "XID 79"), ("u4", True, "")]
    assert sh.share_host_taints(79, False) == [{"key": "gpu.nvidia.com/mps-shares", "value": "xid-79",
                                                "effect": "NoSchedule"}]
    assert [t["value"] for t in sh.share_host_taints(None, True)] == ["mps-daemon-down"]
    assert sh.share_host_taints(None, False) == []


def test_device_plan_defaults_keep_non_shares_unchanged() -> None:
    plan = DevicePlan(request="gpu", pool=NODE, device="gpu-0", node_device=NodeDevice(GPU0),
                      config=sh.DeviceConfig("GpuConfig"), group=-2)
    assert (plan.share_memory_bytes, plan.share_compute) == (0, 0)


def test_two_shares_of_one_gpu_in_one_claim_are_refused() -> None:
    body = claim("u1", [result("gpu-0", request="a", shareID="s1", consumedCapacity={"memory": "1Gi"}),
                        result("gpu-0", request="b", shareID="s2", consumedCapacity={"memory": "1Gi"})])
    why = sh.plan_shares(_plan(body, "u1"), {"gpu-0": policy()})
    assert why == "claim default/claim-u1: two shares of device gpu-0 in one claim: request one share of the total " \
                  "instead"


async def test_two_claims_racing_for_the_last_memory_do_not_both_get_it(
        tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    node = Node(tmp_path, share_hosts={"gpu-0": policy()})
    held = node.api.add(_share_claim("u1", "30Gi", "s1"))
    assert not (await node.preparer.prepare([held]))["u1"].error
    answers = await node.preparer.prepare([node.api.add(_share_claim("u2", "6Gi", "s2")),
                                           node.api.add(_share_claim("u3", "6Gi", "s3"))])
    errors = sorted(answer.error for answer in answers.values())
    assert errors[0] == ""
    assert "cannot take a share of 6 GiB of memory: 42 GiB requested in total, GPU has 40 GiB" in errors[1]
    # What the checkpoint holds for a share: its amounts, read back after a restart for the accounting.
    [record] = node.restart().checkpoint.claims["u1"].devices
    assert (record.share_memory_bytes, record.share_compute, record.share_id) == (30 * GIB, 0, "s1")
    assert record.sharing is not None and record.sharing.pinned_memory_limit_mib == 30720


async def test_a_share_on_a_device_that_is_no_share_host_is_left_to_the_device_rules(
        tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    node = Node(tmp_path, share_hosts={"gpu-0": policy()})
    answers = await node.preparer.prepare([node.api.add(claim("u1", [result("gpu-2", shareID="s1")]))])
    assert not answers["u1"].error and answers["u1"].devices[0].share_id == "s1"
    assert node.mps.clients == {}
    # A share host no longer published as one (config reload): later prepares treat its device as a plain one.
    node.preparer.update_devices(DEVICES, share_hosts={})
    assert not (await node.preparer.prepare([node.api.add(claim("u2", [result("gpu-0")]))]))["u2"].error


def test_a_mode_change_waits_for_the_claims_prepared_on_the_device() -> None:
    host, other = policy(), policy(memory={"step": "1Gi"})
    now, waiting = sh.share_host_transition({"gpu-0": host}, {"gpu-2": host}, {"gpu-0": 3, "gpu-2": 1})
    assert now == {"gpu-0": host}
    assert waiting == {"gpu-0": "gpu-0 stays an MPS share host until its 3 prepared claim(s) are unprepared",
                       "gpu-2": "gpu-2 becomes an MPS share host once its 1 prepared claim(s) are unprepared"}
    # Once they are gone, the change applies; a host that stays one takes its new policy at once.
    assert sh.share_host_transition({"gpu-0": host}, {"gpu-2": host}, {}) == ({"gpu-2": host}, {})
    assert sh.share_host_transition({"gpu-0": host}, {"gpu-0": other}, {"gpu-0": 2}) == ({"gpu-0": other}, {})


async def test_the_checkpoint_says_which_devices_hold_claims_and_which_shares_are_prepared(
        tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    node = Node(tmp_path, share_hosts={"gpu-0": policy()})
    await node.preparer.prepare([node.api.add(_share_claim(uid, "10Gi", f"s-{uid}")) for uid in ("u1", "u2")]
                                + [node.api.add(claim("u3", [result("gpu-2")]))])
    state = node.preparer.checkpoint
    assert cp.prepared_per_device(state) == {"gpu-0": 2, "gpu-2": 1}
    assert cp.prepared_shares(state) == [("u1", "gpu-0", "s-u1", GPU0.uuid), ("u2", "gpu-0", "s-u2", GPU0.uuid)]
    assert [h.healthy for h in sh.share_health(cp.prepared_shares(state), {GPU0.uuid: "XID 79"})] == [False, False]


class Sharing(msgspec.Struct, forbid_unknown_fields=True):
    mps: sh.MpsSharesSpec | None = None


class Dra(msgspec.Struct, forbid_unknown_fields=True):
    """How the integrator embeds the section in the `dra` config struct."""

    sharing: Sharing | None = None


def test_the_spec_embeds_in_a_config_schema_and_reports_broken_rules_with_their_path() -> None:
    dra = msgspec.convert({"sharing": {"mps": {"devices": [0], "keepWarm": "30s"}}}, Dra)
    assert dra.sharing is not None and dra.sharing.mps is not None
    assert dra.sharing.mps.checked() == sh.MpsSharesConfig(devices=("0",), keep_warm_s=30)
    with pytest.raises(msgspec.ValidationError, match=r"memory.default .* - at `\$.sharing.mps`"):
        msgspec.convert({"sharing": {"mps": {"devices": "all", "memory": {"minimum": "2Gi", "default": "1Gi"}}}},
                        Dra)


def test_a_share_host_whose_daemon_does_not_answer_is_unhealthy() -> None:
    hosts = {"gpu-0": policy(), "gpu-2": policy(GPU2)}
    assert sh.unhealthy_share_hosts(hosts, {GPU0.uuid: False, GPU2.uuid: True}) == {
        "gpu-0": "the MPS control daemon of GPU 0 does not answer"}
    assert sh.unhealthy_share_hosts(hosts, {}) == {}
