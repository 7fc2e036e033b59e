"""The `sharing` config section: both dialects, upstream's replicas_test (§10.3), config_test (§10.1), settings."""

from __future__ import annotations

import msgspec
import pytest

from nvdp.core.config.errors import ConfigError
from nvdp.core.config.load import parse_config
from nvdp.core.config.settings import resolve
from nvdp.core.config.sharing import DeviceSelection, Mps, ReplicatedResource, TimeSlicing, device_ref_kind

GPU_UUID = "GPU-4cf8db2d-06c0-7d70-1a51-e59b25b2c16c"
MIG_UUID = "MIG-3eb87630-93d5-b2b6-b8ff-9b359caf4ee2"
LEGACY_MIG_UUID = "MIG-GPU-662077db-fa3f-0d8f-9502-21ab0ef058a2/10/0"


def decode(data: object, kind: type) -> object:
    return msgspec.convert(data, kind, str_keys=True)


# --- upstream replicas_test: TestReplicatedDeviceRef -------------------------------------------------------------


@pytest.mark.parametrize(
    ("ref", "kind"),
    [
        pytest.param("0", "gpu-index", id="0 is a GPU index only"),
        pytest.param("0:0", "mig-index", id="0:0 is a MIG index only"),
        pytest.param(GPU_UUID, "gpu-uuid", id="GPU uuid"),
        pytest.param(MIG_UUID, "mig-uuid", id="MIG uuid"),
        pytest.param(LEGACY_MIG_UUID, "mig-uuid", id="legacy MIG uuid"),
        pytest.param("GPU-UUID", None, id="GPU- without a uuid is nothing"),
        pytest.param("-1", None, id="a negative index is nothing"),
    ],
)
def test_device_reference_kinds(ref: str, kind: str | None) -> None:
    assert device_ref_kind(ref) == kind


# --- upstream replicas_test: TestUnmarshalReplicatedDevices -------------------------------------------------------


@pytest.mark.parametrize(
    ("devices", "message"),
    [
        pytest.param("not-all", "the only valid string input is 'all'", id="a string other than all"),
        pytest.param(-2, "a count of devices must be > 0", id="a negative count"),
        pytest.param(0, "a count of devices must be > 0", id="a zero count"),
        pytest.param(2.0, "got `float`", id="a float count"),
        pytest.param([-1], "unsupported device in devices list: -1", id="a negative index in the list"),
        pytest.param(["-1"], "unsupported device in devices list: '-1'", id="a negative index string in the list"),
        pytest.param(["invalid-UUID"], "unsupported device", id="an invalid uuid"),
        pytest.param(["GPU-UUID"], "unsupported device", id="GPU- without a uuid"),
        pytest.param(["MIG-UUID"], "unsupported device", id="MIG- without a uuid"),
        pytest.param(["MIG-GPU-4cf8db2d-06c0-7d70-1a51-e59b25b2c16c"], "unsupported device",
                     id="legacy MIG uuid without gi and ci"),
        pytest.param(True, "got `bool`", id="a boolean"),
        pytest.param([], "empty list", id="deliberately unlike upstream an empty list is an error"),
    ],
)
def test_bad_devices_are_refused(devices: object, message: str) -> None:
    with pytest.raises(msgspec.ValidationError) as error:
        decode({"name": "gpu", "replicas": 2, "devices": devices}, ReplicatedResource)
    assert message in str(error.value)


@pytest.mark.parametrize(
    ("devices", "normalised", "selection"),
    [
        pytest.param("all", "all", DeviceSelection(), id="all"),
        pytest.param(None, None, DeviceSelection(), id="left out means all"),
        pytest.param(2, 2, DeviceSelection(count=2), id="a count"),
        pytest.param([0], ["0"], DeviceSelection(refs=("0",)), id="an integer index becomes a string"),
        pytest.param(["0"], ["0"], DeviceSelection(refs=("0",)), id="a string index"),
        pytest.param(["0:0"], ["0:0"], DeviceSelection(refs=("0:0",)), id="a MIG index"),
        pytest.param([GPU_UUID], [GPU_UUID], DeviceSelection(refs=(GPU_UUID,)), id="a GPU uuid"),
        pytest.param([MIG_UUID], [MIG_UUID], DeviceSelection(refs=(MIG_UUID,)), id="a MIG uuid"),
        pytest.param(["MIG-GPU-662077db-fa3f-0d8f-9502-21ab0ef058a2/0/0"],
                     ["MIG-GPU-662077db-fa3f-0d8f-9502-21ab0ef058a2/0/0"],
                     DeviceSelection(refs=("MIG-GPU-662077db-fa3f-0d8f-9502-21ab0ef058a2/0/0",)),
                     id="a legacy MIG uuid"),
        pytest.param([0, "0:0", GPU_UUID], ["0", "0:0", GPU_UUID], DeviceSelection(refs=("0", "0:0", GPU_UUID)),
                     id="a mixed list"),
        pytest.param([0, "0"], ["0", "0"], DeviceSelection(refs=("0",)), id="a repeated reference selects once"),
    ],
)
def test_good_devices(devices: object, normalised: object, selection: DeviceSelection) -> None:
    resource = decode({"name": "gpu", "replicas": 2, "devices": devices}, ReplicatedResource)
    assert isinstance(resource, ReplicatedResource)
    assert resource.devices == normalised
    assert resource.selection() == selection


def test_devices_marshal_back_to_what_was_written() -> None:
    # Upstream's TestMarshalReplicatedDevices: all, a count and a list come back as written.
    for devices in ("all", 2, ["0", "0:0", GPU_UUID]):
        resource = decode({"name": "gpu", "replicas": 2, "devices": devices}, ReplicatedResource)
        assert msgspec.to_builtins(resource)["devices"] == devices


# --- upstream replicas_test: TestUnmarshalReplicatedResource -----------------------------------------------------


@pytest.mark.parametrize(
    ("data", "message"),
    [
        pytest.param({}, "no resource name specified", id="no name"),
        pytest.param({"name": "valid"}, "no replicas specified", id="name only"),
        pytest.param({"name": "valid", "devices": "all"}, "no replicas specified", id="name and devices"),
        pytest.param({"name": "valid", "devices": "all", "rename": "valid-shared"}, "no replicas specified",
                     id="name devices and rename"),
        pytest.param({"name": "valid", "replicas": -1}, "number of replicas must be >= 1", id="replicas -1"),
        pytest.param({"name": "valid", "replicas": 0}, "number of replicas must be >= 1", id="replicas 0"),
        pytest.param({"name": "$invalid$", "replicas": 2}, "incorrect format for resource name '$invalid$'",
                     id="invalid name"),
        pytest.param({"name": "valid", "rename": "$invalid$", "replicas": 2},
                     "incorrect format for resource name '$invalid$'", id="invalid rename"),
        pytest.param({"name": "example.com/gpu", "replicas": 2}, "only the nvidia.com/ domain", id="another domain"),
        pytest.param({"name": "g" * 60, "replicas": 2}, "must be 63 characters or less", id="too long"),
        pytest.param({"name": "gpu", "replicas": 2, "memoryGB": 0}, "memoryGB must be >= 1", id="memoryGB 0"),
        pytest.param({"name": "gpu", "replicas": 2, "computePercent": 101}, "computePercent must be between 1 and 100",
                     id="computePercent over 100"),
        pytest.param({"name": "gpu", "replicas": 2, "memoryGb": 10}, "unknown field `memoryGb`",
                     id="a misspelt key is an error"),
    ],
)
def test_bad_resources_are_refused(data: dict[str, object], message: str) -> None:
    with pytest.raises(msgspec.ValidationError) as error:
        decode(data, ReplicatedResource)
    assert message in str(error.value)


def test_empty_input_is_refused() -> None:
    with pytest.raises(msgspec.DecodeError):
        msgspec.json.decode(b"", type=ReplicatedResource)


@pytest.mark.parametrize(
    ("data", "name", "rename", "selection"),
    [
        pytest.param({"name": "valid", "devices": "all", "replicas": 2}, "nvidia.com/valid", None, DeviceSelection(),
                     id="a name gets the nvidia.com prefix"),
        pytest.param({"name": "valid", "devices": "all", "rename": "valid-shared", "replicas": 2}, "nvidia.com/valid",
                     "nvidia.com/valid-shared", DeviceSelection(), id="so does rename"),
        pytest.param({"name": "valid", "replicas": 2}, "nvidia.com/valid", None, DeviceSelection(),
                     id="devices left out means all"),
        pytest.param({"name": "nvidia.com/gpu", "replicas": 2}, "nvidia.com/gpu", None, DeviceSelection(),
                     id="a qualified name is kept"),
    ],
)
def test_good_resources(data: dict[str, object], name: str, rename: str | None, selection: DeviceSelection) -> None:
    resource = decode(data, ReplicatedResource)
    assert isinstance(resource, ReplicatedResource)
    assert (resource.name, resource.rename, resource.replicas, resource.selection()) == (name, rename, 2, selection)


# --- upstream replicas_test: TestUnmarshalReplicatedResources ----------------------------------------------------


@pytest.mark.parametrize("kind", [TimeSlicing, Mps])
@pytest.mark.parametrize(
    "data",
    [
        pytest.param({}, id="no resources"),
        pytest.param({"resources": []}, id="an empty resources list"),
    ],
)
def test_a_section_without_resources_is_refused(kind: type, data: dict[str, object]) -> None:
    with pytest.raises(msgspec.ValidationError, match="no resources specified"):
        decode(data, kind)


@pytest.mark.parametrize("kind", [TimeSlicing, Mps])
def test_sections_hold_their_resources(kind: type) -> None:
    one = decode({"resources": [{"name": "valid", "replicas": 2}]}, kind)
    assert isinstance(one, kind)
    assert [(r.name, r.rename, r.selection()) for r in one.resources] == [("nvidia.com/valid", None, DeviceSelection())]
    two = decode({"resources": [{"name": "valid", "replicas": 2}, {"name": "valid2", "replicas": 2}]}, kind)
    assert len(two.resources) == 2
    with pytest.raises(msgspec.ValidationError, match="incorrect format"):
        decode({"resources": [{"name": "$invalid$", "replicas": 2}]}, kind)


@pytest.mark.parametrize(
    ("resource", "message"),
    [
        pytest.param({"replicas": 1}, "resources[0] (nvidia.com/gpu): number of replicas must be >= 2",
                     id="one time-sliced replica is refused"),
        pytest.param({"replicas": 2, "memoryGB": 10}, "memoryGB applies to sharing.mps only", id="memoryGB"),
        pytest.param({"replicas": 2, "computePercent": 10}, "computePercent applies to sharing.mps only",
                     id="computePercent"),
    ],
)
def test_time_slicing_needs_two_replicas_and_no_limits(resource: dict[str, object], message: str) -> None:
    with pytest.raises(msgspec.ValidationError) as error:
        decode({"resources": [{"name": "gpu", **resource}]}, TimeSlicing)
    assert message in str(error.value)


def test_an_mps_slice_may_stand_alone_on_a_gpu() -> None:
    # nos writes `gpu-20gb` with replicas 1 next to `gpu-10gb` with replicas 2 on one A100-40GB.
    mps = decode({"resources": [{"name": "gpu", "rename": "gpu-20gb", "memoryGB": 20, "replicas": 1}]}, Mps)
    assert isinstance(mps, Mps)
    assert mps.resources[0].replicas == 1


def test_output_names() -> None:
    section = decode({"renameByDefault": True, "resources": [
        {"name": "gpu", "replicas": 2}, {"name": "gpu", "rename": "gpu-10gb", "memoryGB": 10, "replicas": 2}]}, Mps)
    assert isinstance(section, Mps)
    # renameByDefault names the unnamed; unlike upstream an explicit rename is kept.
    assert [section.output_name(r) for r in section.resources] == ["nvidia.com/gpu.shared", "nvidia.com/gpu-10gb"]
    plain = decode({"resources": [{"name": "gpu", "replicas": 2}]}, TimeSlicing)
    assert isinstance(plain, TimeSlicing)
    assert plain.output_name(plain.resources[0]) == "nvidia.com/gpu"


# --- the file, settings and upstream config_test (§10.1) ---------------------------------------------------------

FORK = """\
version: v1
flags:
  migStrategy: none
  mpsRoot: /run/nvidia/mps
sharing:
  mps:
    failRequestsGreaterThanOne: true
    resources:
      - name: nvidia.com/gpu
        rename: gpu-10gb
        memoryGB: 10
        replicas: 2
        devices: ["0"]
      - name: nvidia.com/gpu
        rename: gpu-20gb
        memoryGB: 20
        replicas: 1
        devices: ["0"]
"""


def test_a_fork_config_as_nos_writes_it_loads() -> None:
    settings = resolve({}, {}, parse_config(FORK, "c.yaml"))
    mps = settings.config.sharing.mps  # type: ignore[union-attr]
    assert mps is not None
    assert [(r.rename, r.memory_gb, r.replicas, r.devices) for r in mps.resources or ()] == [
        ("nvidia.com/gpu-10gb", 10, 2, ["0"]), ("nvidia.com/gpu-20gb", 20, 1, ["0"])]


MPS_ONLY = "sharing:\n  mps:\n    resources:\n      - name: nvidia.com/gpu\n        replicas: 2\n"


def test_mps_fails_requests_greater_than_one_by_default() -> None:
    # Upstream TestNewConfigDefaultsMPSFailRequestsGreaterThanOne.
    settings = resolve({"mps_root": "/run/nvidia/mps"}, {}, parse_config(MPS_ONLY, "c.yaml"))
    assert settings.config.sharing.mps.fails_requests_greater_than_one is True  # type: ignore[union-attr]


def test_an_explicit_false_is_honoured_for_mps() -> None:
    # Upstream TestNewConfigHonorsExplicitMPSFailRequestsGreaterThanOneFalse.
    text = MPS_ONLY.replace("  mps:\n", "  mps:\n    failRequestsGreaterThanOne: false\n")
    settings = resolve({"mps_root": "/run/nvidia/mps"}, {}, parse_config(text, "c.yaml"))
    assert settings.config.sharing.mps.fails_requests_greater_than_one is False  # type: ignore[union-attr]


def test_time_slicing_does_not_fail_requests_greater_than_one_by_default() -> None:
    text = MPS_ONLY.replace("mps:", "timeSlicing:")
    settings = resolve({}, {}, parse_config(text, "c.yaml"))
    assert settings.config.sharing.time_slicing.fails_requests_greater_than_one is False  # type: ignore[union-attr]


def test_mps_root_may_come_from_the_environment() -> None:
    settings = resolve({}, {"MPS_ROOT": "/run/nvidia/mps"}, parse_config(MPS_ONLY, "c.yaml"))
    assert settings.mps_root == "/run/nvidia/mps"


@pytest.mark.parametrize(
    ("cli", "text", "message"),
    [
        pytest.param({}, MPS_ONLY, "c.yaml: $.sharing.mps: using MPS requires --mps-root to be specified",
                     id="MPS without an MPS root"),
        pytest.param({"mps_root": "run/mps"}, MPS_ONLY, "the MPS root must be an absolute path",
                     id="a relative MPS root"),
        pytest.param({"mps_root": "/run/nvidia/mps", "mig_strategy": "mixed"}, MPS_ONLY,
                     "using --mig-strategy=mixed is not supported with MPS", id="MPS with the mixed strategy"),
        pytest.param({}, "sharing:\n  timeSlicing: {}\n", "c.yaml: $.sharing.timeSlicing: no resources specified",
                     id="a section without resources names its path"),
        pytest.param({}, "sharing:\n  timeSlicing:\n    resources:\n      - name: gpu\n        replicas: 2\n"
                     "        devices: [x]\n", "c.yaml: $.sharing.timeSlicing.resources[0]: unsupported device",
                     id="a bad device reference names its path"),
        pytest.param({}, "sharing:\n  timeSlicing: {}\n", "no resources specified", id="an empty section"),
    ],
)
def test_sharing_errors_say_where_and_what(cli: dict[str, str], text: str, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        resolve(cli, {}, parse_config(text, "c.yaml"), config_source="c.yaml")
    assert message in str(error.value)


def test_time_slicing_needs_no_mps_root() -> None:
    text = MPS_ONLY.replace("mps:", "timeSlicing:")
    assert resolve({}, {}, parse_config(text, "c.yaml")).mps_root == ""


def test_an_empty_sharing_section_shares_nothing() -> None:
    settings = resolve({}, {}, parse_config("sharing: {}\n", "c.yaml"))
    assert settings.config.sharing is not None
    assert (settings.config.sharing.time_slicing, settings.config.sharing.mps) == (None, None)
