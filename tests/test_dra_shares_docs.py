"""docs/dra.md's "MPS shares" section, docs/mps.md's "DRA shares" and docs/security.md's share bounds say what the
code does: the examples parse and produce what the section shows."""

from __future__ import annotations

import re
from typing import Any

import yaml

from nvdp.core.config.load import parse_config
from nvdp.core.dra import shares as sh
from nvdp.core.inventory import Gpu
from nvdp.observe.metrics import Metrics
from tests.helpers import ROOT

GPU = Gpu(index=1, uuid="GPU-1", name="A100", memory_mib=40960, minor=1, pci_bus_id="00000000:11:00.0",
          compute_capability="8.0")


def section(doc: str, title: str) -> str:
    text = (ROOT / "docs" / doc).read_text()
    start = text.index(title)
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else None]


def yaml_blocks(text: str) -> list[Any]:
    return [yaml.safe_load(block) if "\n---\n" not in block else list(yaml.safe_load_all(block))
            for block in re.findall(r"```yaml\n(.*?)```", text, re.DOTALL)]


SHARES = section("dra.md", "## MPS shares")


def test_the_config_example_loads_and_fits_a_40_gib_gpu() -> None:
    config_text = re.findall(r"```yaml\n(.*?)```", SHARES, re.DOTALL)[0]
    config = parse_config(config_text, "docs/dra.md")
    assert config.dra is not None and config.dra.sharing is not None and config.dra.sharing.mps is not None
    checked = config.dra.sharing.mps.checked()
    assert checked.keep_warm_s == 300 and checked.memory_default == 4 << 30
    policy = sh.share_policy(GPU, checked)
    for capacity in sh.share_capacities(policy).values():
        request_policy = capacity["requestPolicy"]
        assert isinstance(request_policy, dict)
        assert sh.validate_request_policy(str(capacity["value"]), request_policy) == []


def test_the_published_device_is_what_nvdp_publishes_for_a_40_gib_gpu_by_default() -> None:
    (device,) = yaml_blocks(SHARES)[1]
    policy = sh.share_policy(GPU, sh.decode_mps_shares({"devices": [1]}))
    published = sh.apply_share_overrides({"name": "gpu-1", "capacity": {"memory": {"value": "40Gi"}}}, GPU, policy)
    assert device == published


def test_the_walk_through_asks_for_10gi_and_the_refusal_is_the_codes() -> None:
    template, pod = yaml_blocks(SHARES)[2]
    (request,) = template["spec"]["spec"]["devices"]["requests"]
    assert request["exactly"]["capacity"]["requests"]["memory"] == "10Gi"
    assert pod["spec"]["resourceClaims"][0]["resourceClaimTemplateName"] == template["metadata"]["name"]
    policy = sh.share_policy(GPU, sh.decode_mps_shares({"devices": [1]}))
    held = [sh.ShareAmount(10 << 30), sh.ShareAmount(10 << 30), sh.ShareAmount(20 << 30)]
    refusal = sh.over_commit("gpu-1", policy, held, sh.ShareAmount(1 << 30))
    assert refusal is not None and f"\n{refusal}\n" in SHARES
    limits = sh.share_limits(policy, sh.consumed_amount([("memory", "10Gi"), ("computePercent", "25")], policy))
    edits = sh.client_edits("/p", "/s", limits.pinned_mib, limits.active_thread_percentage)
    for env in edits.env[1:]:
        assert f"`{env}`" in SHARES


def test_the_taints_metric_and_bounds_are_named_as_in_the_code() -> None:
    text = " ".join(SHARES.split())
    assert f"`{sh.TAINT_KEY}`" in text
    assert all(f"`{t['value']}`".replace("48", "<code>") in text for t in sh.share_host_taints(48, True))
    families = {m.name for m in Metrics().registry.collect()}
    assert "nvdp_dra_share_hosts_waiting" in families and "`nvdp_dra_share_hosts_waiting`" in text
    assert "`keepWarm` is at most 24h" in text
    assert sh.decode_mps_shares({"devices": [1], "keepWarm": "24h"}).keep_warm_s == 86400
    security = " ".join((ROOT / "docs" / "security.md").read_text().split())
    assert "`dra.sharing.mps.keepWarm` at most 24h" in security
    assert "bounded by `--mps-probe-timeout`" in security
    mps = section("mps.md", "## DRA shares")
    assert "`nvdp.dra.mps_shares.MpsShares`" in mps


def test_nvdp_status_says_when_devices_wait_to_move_to_or_from_shares() -> None:
    from prometheus_client import generate_latest

    from nvdp.observe.status import Probe, Samples, render

    metrics = Metrics()
    metrics.slices_published("gpu.nvidia.com", 3, 1, 2)
    metrics.share_hosts_waiting("gpu.nvidia.com", 1)
    text = render(Samples.parse(generate_latest(metrics.registry).decode()), Probe(True, ""), Probe(True, ""))
    assert "DRA driver gpu.nvidia.com: 1 device(s) wait for their prepared claims to move to or from MPS shares" in text
    metrics.share_hosts_waiting("gpu.nvidia.com", 0)
    text = render(Samples.parse(generate_latest(metrics.registry).decode()), Probe(True, ""), Probe(True, ""))
    assert "MPS shares" not in text


def test_shares_without_an_mps_root_or_on_a_gpu_outside_dra_are_plan_errors() -> None:
    import pytest

    from nvdp.core.config.settings import Settings
    from nvdp.core.inventory import NodeInventory
    from nvdp.core.plan.build import PlanError, build_plan

    other = Gpu(index=0, uuid="GPU-0", name="A100", memory_mib=40960, minor=0, pci_bus_id="00000000:10:00.0",
                compute_capability="8.0")
    node = NodeInventory(driver_version="580.82.07", cuda_driver_version=13000, gpus=(other, GPU))

    def settings(shares: str, mps_root: str = "/run/mps") -> Settings:
        text = f"dra:\n  enabled: true\n  devices: [1]\n  sharing:\n    mps:\n      devices: [{shares}]\n"
        config = parse_config(text, "test")
        return Settings(config=config, dra_enabled=True, mps_root=mps_root)

    plan = build_plan(node, settings("1"))
    assert [name for name, _ in plan.dra_share_hosts] == ["gpu-1"] and plan.dra_gpus == ("GPU-1",)
    with pytest.raises(PlanError, match="need an MPS root"):
        build_plan(node, settings("1", mps_root=""))
    with pytest.raises(PlanError, match=r"GPU 0 \(GPU-0\) is not served through DRA"):
        build_plan(node, settings("0"))


def test_validate_prints_what_each_share_host_publishes_as_dra_md_shows() -> None:
    from nvdp.core.config.settings import Settings
    from nvdp.core.inventory import NodeInventory
    from nvdp.core.plan.build import build_plan
    from nvdp.validate import share_host_lines

    config_text = re.findall(r"```yaml\n(.*?)```", SHARES, re.DOTALL)[0].replace("devices: [1, 2, 3]", "devices: [1]")
    config = parse_config(config_text, "docs/dra.md")
    node = NodeInventory(driver_version="580.82.07", cuda_driver_version=13000, gpus=(GPU,))
    plan = build_plan(node, Settings(config=config, dra_enabled=True, mps_root="/run/nvidia/mps"))
    (line,) = share_host_lines(plan)
    assert line.replace(GPU.uuid, "GPU-…") in SHARES
    assert "MPS shares (dra.sharing.mps), what each share host publishes:" in SHARES
