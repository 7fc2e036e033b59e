"""DRA's settings and the GPU split (pure): which GPU DRA serves and which the device plugin, never both; the
kubelet-facing rules of nvdp.core.dra.plugin; the start-up errors of `nvdp run --dra`."""

from __future__ import annotations

from pathlib import Path

import pytest

from nvdp.cli import main
from nvdp.core.config.dra import Dra
from nvdp.core.config.errors import ConfigError
from nvdp.core.config.load import parse_config
from nvdp.core.config.settings import Settings, check_dra_runnable, resolve
from nvdp.core.dra.plugin import (
    Health,
    HealthTarget,
    complete_prepare,
    complete_unprepare,
    health_snapshot,
    kubelet_request_names,
    plugin_socket_path,
    registration_socket_name,
    unhealthy_targets,
)
from nvdp.core.dra.split import DraSplitError, split_gpus
from nvdp.core.dra.types import ClaimRef, PreparedDevice, PrepareResult, UnprepareResult
from nvdp.core.health import HealthTracker, XidPolicy
from nvdp.core.health.events import XidEvent
from nvdp.core.health.xids import EVENT_XID_CRITICAL
from nvdp.core.inventory import Gpu, MigDevice, NodeInventory
from nvdp.core.plan.build import PlanError, build_plan
from nvdp.validate import validate_configs
from tests.helpers import gpu, write_node

U = [f"GPU-{i:08d}-aaaa-bbbb-cccc-000000000000" for i in range(3)]


def _gpu(index: int, mig: tuple[MigDevice, ...] = ()) -> Gpu:
    return Gpu(index=index, uuid=U[index], name="NVIDIA A100-SXM4-40GB", memory_mib=40960, minor=index,
               pci_bus_id=f"00000000:{0x10 + index:02x}:00.0", compute_capability="8.0", mig_enabled=bool(mig),
               mig_devices=mig)


NODE = NodeInventory(driver_version="580.82.07", cuda_driver_version=13000, gpus=(_gpu(0), _gpu(1), _gpu(2)))


def _config(text: str) -> Dra | None:
    return parse_config(text, "test").dra


# -- the config section and the settings ---------------------------------------------------------------------------


@pytest.mark.parametrize(("devices", "dra"), [
    pytest.param("", (U[0], U[1], U[2]), id="default-all"),
    pytest.param("devices: all", (U[0], U[1], U[2]), id="all"),
    pytest.param("devices: 2", (U[0], U[1]), id="first-two-by-index"),
    pytest.param(f"devices: [2, {U[0]}]", (U[0], U[2]), id="index-and-uuid-in-index-order"),
])
def test_dra_devices_choose_gpus_and_the_rest_stay_with_the_device_plugin(devices: str, dra: tuple[str, ...]) -> None:
    split = split_gpus(NODE, True, _config(f"dra:\n  enabled: true\n  {devices}\n"))
    assert split.dra == dra
    assert split.device_plugin == tuple(g.uuid for g in NODE.gpus if g.uuid not in dra)


def test_dra_off_leaves_every_gpu_to_the_device_plugin() -> None:
    split = split_gpus(NODE, False, _config("dra:\n  devices: [0]\n"))
    assert split == type(split)(dra=(), device_plugin=tuple(U))


@pytest.mark.parametrize(("devices", "message"), [
    pytest.param("4", "4 GPUs requested for DRA, but this node has 3", id="count-too-large"),
    pytest.param("[7]", "'7': no such GPU on this node (GPU indices: 0, 1, 2)", id="unknown-index"),
    pytest.param("[GPU-00000000-0000-0000-0000-000000000009]", "no such GPU", id="unknown-uuid"),
])
def test_dra_devices_that_do_not_fit_the_node_are_refused(devices: str, message: str) -> None:
    with pytest.raises(DraSplitError, match=r"dra\.devices") as caught:
        split_gpus(NODE, True, _config(f"dra:\n  devices: {devices}\n"))
    assert message in str(caught.value)


@pytest.mark.parametrize(("devices", "message"), [
    pytest.param("['0:1']", "is a MIG device: DRA is chosen per GPU", id="mig-index"),
    pytest.param("[MIG-00000000-0000-0000-0000-000000000001]", "is a MIG device", id="mig-uuid"),
    pytest.param("0", "must be > 0", id="zero"),
    pytest.param("some", "the only valid string input is 'all'", id="word"),
    pytest.param("[]", "empty list", id="empty-list"),
])
def test_dra_devices_take_the_sharing_selector_syntax_at_gpu_granularity(devices: str, message: str) -> None:
    with pytest.raises(ConfigError, match=r"\$\.dra") as caught:
        parse_config(f"dra:\n  devices: {devices}\n", "test")
    assert message in str(caught.value)


def test_dra_settings_come_from_flags_env_and_the_file_with_nvidias_defaults() -> None:
    default = resolve({}, {})
    assert (default.dra_enabled, default.dra_driver_name) == (False, "gpu.nvidia.com")
    assert default.kubelet_registry_dir == Path("/var/lib/kubelet/plugins_registry")
    assert default.kubelet_plugins_dir == Path("/var/lib/kubelet/plugins")
    assert resolve({"dra_enabled": "true"}, {}).dra_enabled
    assert resolve({}, {"DRA_ENABLED": "true"}).dra_enabled
    from_file = resolve({}, {}, parse_config("dra:\n  enabled: true\n  driverName: gpu.example.com\n", "f"))
    assert (from_file.dra_enabled, from_file.dra_driver_name) == (True, "gpu.example.com")
    # A flag beats the file.
    assert not resolve({"dra_enabled": "false"}, {}, parse_config("dra:\n  enabled: true\n", "f")).dra_enabled
    dirs = resolve({"kubelet_registry_dir": "/k/reg", "kubelet_plugins_dir": "/k/plugins"}, {})
    assert (dirs.kubelet_registry_dir, dirs.kubelet_plugins_dir) == (Path("/k/reg"), Path("/k/plugins"))


@pytest.mark.parametrize(("cli", "message"), [
    pytest.param({"dra_driver_name": "GPU_Driver"}, "invalid DRA driver name", id="driver-not-dns"),
    pytest.param({"dra_driver_name": "a" * 64}, "at most 63 characters", id="driver-too-long"),
    pytest.param({"kubelet_plugins_dir": "plugins"}, "--kubelet-plugins-dir: must be an absolute path", id="relative"),
])
def test_dra_settings_are_checked(cli: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        resolve({"dra_enabled": "true", **cli}, {})
    assert message in str(caught.value)


def test_running_dra_needs_the_node_name() -> None:
    check_dra_runnable(Settings(dra_enabled=True, node_name="n1"))
    check_dra_runnable(Settings(dra_enabled=False))
    with pytest.raises(ConfigError, match="--node-name"):
        check_dra_runnable(Settings(dra_enabled=True))


@pytest.mark.parametrize(("argv", "fragment"), [
    pytest.param(["run", "--dra"], "set --node-name (env NODE_NAME", id="no-node-name"),
    pytest.param(["run", "--dra", "--node-name", "n1", "--kubeconfig", "{missing}"],
                 "DRA is enabled but there is no Kubernetes API access", id="no-api"),
])
def test_nvdp_run_with_dra_says_what_is_missing_in_one_line(
    argv: list[str], fragment: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("NODE_NAME", "KUBECONFIG", "KUBERNETES_SERVICE_HOST", "DRA_ENABLED"):
        monkeypatch.delenv(name, raising=False)
    code = main([a.format(missing=tmp_path / "nope") for a in argv])
    err = capsys.readouterr().err
    assert code == 1
    assert fragment in err and "Traceback" not in err
    # One line says it (besides the log's "starting" line).
    assert len([line for line in err.splitlines() if line.startswith("nvdp: ")]) == 1


# -- the plan -------------------------------------------------------------------------------------------------------


def _settings(text: str, **extra: str) -> Settings:
    return resolve(extra, {}, parse_config(text, "test"))


def test_a_gpu_served_through_dra_is_not_in_the_device_plugin_plan() -> None:
    plan = build_plan(NODE, _settings("dra:\n  enabled: true\n  devices: [1]\n"))
    (resource,) = plan.resources
    assert [d.id for d in resource.devices] == [U[0], U[2]]
    assert plan.dra_gpus == (U[1],)
    everything = build_plan(NODE, _settings("dra:\n  enabled: true\n"))
    assert everything.resources == () and everything.dra_gpus == tuple(U)
    assert build_plan(NODE, _settings("dra:\n  enabled: false\n  devices: [1]\n")).dra_gpus == ()


def test_dra_gpus_do_not_count_in_the_single_mig_strategy_checks() -> None:
    mig = (MigDevice(uuid="MIG-a", index=0, profile="1g.5gb", memory_mib=4864, gi=1, ci=0),)
    node = NodeInventory("580.82.07", 13000, (_gpu(0), _gpu(1, mig)))
    # GPU 0 whole and GPU 1 in MIG mode: refused by `single` unless GPU 0 goes to DRA.
    with pytest.raises(PlanError, match="same migEnabled"):
        build_plan(node, _settings("", mig_strategy="single"))
    plan = build_plan(node, _settings("dra:\n  enabled: true\n  devices: [0]\n", mig_strategy="single"))
    assert [d.id for r in plan.resources for d in r.devices] == ["MIG-a"]


def test_a_dra_split_that_does_not_fit_is_a_plan_error() -> None:
    with pytest.raises(PlanError, match="no such GPU"):
        build_plan(NODE, _settings("dra:\n  enabled: true\n  devices: [5]\n"))


def test_config_validate_prints_which_api_serves_each_gpu(tmp_path: Path) -> None:
    node = write_node(tmp_path / "node.yaml", [gpu(0), gpu(1)])
    config = tmp_path / "c.yaml"
    config.write_text("version: v1\ndra:\n  enabled: true\n  devices: [1]\n")
    code, text = validate_configs([config], None, {}, {}, node, strict=False)
    assert code == 0, text
    assert "which API serves each GPU (DRA driver gpu.nvidia.com):" in text
    assert f"GPU 0 ({gpu(0)['uuid']}): device plugin" in text
    assert f"GPU 1 ({gpu(1)['uuid']}): DRA" in text


# -- what the plugin tells the kubelet -----------------------------------------------------------------------------


def test_registration_names_and_paths() -> None:
    assert registration_socket_name("gpu.nvidia.com") == "gpu.nvidia.com-reg.sock"
    assert str(plugin_socket_path(Path("/var/lib/kubelet/plugins"), "gpu.nvidia.com")) == \
        "/var/lib/kubelet/plugins/gpu.nvidia.com/dra.sock"


def test_subrequests_count_as_their_request() -> None:
    assert kubelet_request_names(["gpu/small", "gpu/big", "nic", "gpu"]) == ("gpu", "nic")


def test_every_claim_gets_an_entry_and_an_error_drops_the_devices() -> None:
    claims = [ClaimRef("ns", "a", "a"), ClaimRef("ns", "b", "b"), ClaimRef("ns", "c", "c")]
    device = PreparedDevice(("r/s",), "pool", "gpu-0", ("k8s.gpu.nvidia.com/claim=a-gpu-0",))
    answer = complete_prepare(claims, {"a": PrepareResult(devices=(device,)),
                                       "b": PrepareResult(devices=(device,), error="refused"),
                                       "z": PrepareResult()}, "no answer")
    assert answer == {"a": PrepareResult(devices=(PreparedDevice(("r",), "pool", "gpu-0", device.cdi_device_ids),)),
                      "b": PrepareResult(error="refused"), "c": PrepareResult(error="no answer")}
    assert complete_unprepare(claims[:2], {"b": UnprepareResult("busy")}, "no answer") == {
        "a": UnprepareResult("no answer"), "b": UnprepareResult("busy")}


def test_health_follows_the_device_plugins_tracker() -> None:
    tracker = HealthTracker(XidPolicy.from_env(None, None), quiet_period_s=60)
    targets = [HealthTarget("gpu-0", "GPU-0"), HealthTarget("gpu-1-mig-1g5gb-19-0", "GPU-1", (1, 0)),
               HealthTarget("gpu-1-mig-1g5gb-19-4", "GPU-1", (2, 0))]
    assert unhealthy_targets(tracker, targets) == {}
    tracker.on_xid(XidEvent("GPU-1", EVENT_XID_CRITICAL, 79), now=1.0)
    unhealthy = unhealthy_targets(tracker, targets)
    assert set(unhealthy) == {"gpu-1-mig-1g5gb-19-0", "gpu-1-mig-1g5gb-19-4"}
    snapshot = health_snapshot("node-a", targets, {**unhealthy, "gpu-0": "x" * 5000})
    assert [(d.device_name, d.health) for d in snapshot.devices] == [
        ("gpu-0", Health.UNHEALTHY), ("gpu-1-mig-1g5gb-19-0", Health.UNHEALTHY),
        ("gpu-1-mig-1g5gb-19-4", Health.UNHEALTHY)]
    assert len(snapshot.devices[0].message) == 1024
    assert "XID 79" in snapshot.devices[1].message
    tracker.on_error(None, "event wait failed", now=2.0)
    assert set(unhealthy_targets(tracker, targets)) == {t.device_name for t in targets}


def test_a_claims_error_is_cut_to_what_an_event_holds() -> None:
    from nvdp.core.dra.plugin import MAX_CLAIM_ERROR

    long = "x" * 5000
    claims = [ClaimRef("ns", "a", "a")]
    (prepared,) = complete_prepare(claims, {"a": PrepareResult(error=long)}, "").values()
    (unprepared,) = complete_unprepare(claims, {"a": UnprepareResult(long)}, "").values()
    for error in (prepared.error, unprepared.error):
        assert len(error) == MAX_CLAIM_ERROR and error.endswith("(5000 characters)")
