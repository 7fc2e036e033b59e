"""The simulated node: YAML validation, building and loading the fake NVML, and the fake host root."""

from __future__ import annotations

import ctypes
import importlib.util
import shutil
import subprocess
from importlib import resources
from pathlib import Path
from typing import Any

import pynvml
import pytest
import yaml

from nvdp import sim
from nvdp.sim import SimNodeError, build_fake_nvml, load_node, parse_node
from nvdp.sim.node import profile_id


def _gpu(index: int, **overrides: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "uuid": f"GPU-{index:08d}-aaaa-bbbb-cccc-000000000000",
        "name": "NVIDIA A100-SXM4-40GB",
        "memoryMiB": 40960,
        "computeCapability": "8.0",
        "pciBusId": f"00000000:{0x10 + index:02X}:00.0",
        "minorNumber": index,
    }
    entry.update(overrides)
    return entry


def _node(gpus: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {"driverVersion": "580.82.07", "cudaDriverVersion": 13000, "gpus": gpus, **extra}


def _parse(data: dict[str, Any]) -> sim.SimNode:
    return parse_node(yaml.safe_dump(data, sort_keys=False), "node.yaml")


def _error(data: dict[str, Any]) -> str:
    with pytest.raises(SimNodeError) as info:
        _parse(data)
    return str(info.value)


# ------------------------------------------------------------------------------------------------------- YAML


def test_default_node_is_a_four_gpu_nvlinked_node() -> None:
    node = sim.DEFAULT_NODE
    assert len(node.gpus) == 4
    assert {g.name for g in node.gpus} == {"NVIDIA A100-SXM4-40GB"}
    assert [g.numa_node for g in node.gpus] == [0, 0, 1, 1]
    assert not any(g.mig_enabled for g in node.gpus)
    assert sorted((a, b) for a, b, n in node.nvlinks if n == 12) == [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
    assert node.control_devices == ("/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools")
    assert load_node(sim.default_node_path()) == node


def test_minimal_node_defaults() -> None:
    node = _parse(_node([_gpu(0)]))
    gpu = node.gpus[0]
    assert (gpu.numa_node, gpu.mig_enabled, gpu.mig_devices, gpu.mig_capable) == (None, False, (), True)
    assert node.events_file is None and node.nvlinks == () and node.init_error is None


@pytest.mark.parametrize(
    ("data", "path", "fragment"),
    [
        (_node([_gpu(0), _gpu(1, uuid=_gpu(0)["uuid"])]), "$.gpus[1].uuid", "duplicate of $.gpus[0].uuid"),
        (_node([_gpu(0), _gpu(1, minorNumber=0)]), "$.gpus[1].minorNumber", "duplicate"),
        (_node([_gpu(0, memoryMiB="lots")]), "$.gpus[0].memoryMiB", "Expected `int`, got `str`"),
        (_node([_gpu(0, colour="green")]), "$.gpus[0]", "unknown field `colour`"),
        (_node([_gpu(0)], nvlinks=[[0, 3, 12]]), "$.nvlinks[0]", "GPU index out of range"),
        (_node([_gpu(0), _gpu(1)], nvlinks=[[0, 1, 40]]), "$.nvlinks[0]", "more than 36 NVLinks"),
        (
            _node([_gpu(0, migDevices=[{"uuid": "MIG-x", "profile": "1g.5gb", "memoryMiB": 4864, "gi": 1, "ci": 0}])]),
            "$.gpus[0].migDevices",
            "need migEnabled",
        ),
        (
            _node(
                [
                    _gpu(
                        0,
                        migEnabled=True,
                        migDevices=[{"uuid": "MIG-x", "profile": "1g.5", "memoryMiB": 4864, "gi": 1, "ci": 0}],
                    )
                ]
            ),
            "$.gpus[0].migDevices[0].profile",
            "not a MIG profile name",
        ),
        (_node([_gpu(0)], topology=[[0, 0, 10]]), "$.topology[0]", "two different"),
        (_node([_gpu(0, computeCapability="eight")]), "$.gpus[0].computeCapability", 'look like "8.0"'),
    ],
)
def test_validation_errors_name_file_key_and_value(data: dict[str, Any], path: str, fragment: str) -> None:
    message = _error(data)
    assert message.startswith(f"node.yaml: {path}: "), message
    assert fragment in message
    assert "(value: " in message


def test_unquoted_yaml_numbers_get_a_hint() -> None:
    # YAML 1.1 reads an unquoted bus id as a base-60 float: the message must say what to do.
    text = yaml.safe_dump(_node([_gpu(0)])).replace("'00000000:10:00.0'", "00000000:10:00.0")
    with pytest.raises(SimNodeError, match=r"\$\.gpus\[0\]\.pciBusId: .*quote it"):
        parse_node(text, "node.yaml")


def test_load_node_reports_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SimNodeError, match="cannot read"):
        load_node(tmp_path / "absent.yaml")


def test_profile_ids_follow_nvml() -> None:
    assert profile_id("1g.5gb", 4864, {}) == pynvml.NVML_GPU_INSTANCE_PROFILE_1_SLICE
    assert profile_id("1g.5gb+me", 4864, {}) == pynvml.NVML_GPU_INSTANCE_PROFILE_1_SLICE_REV1
    assert profile_id("7g.40gb", 40192, {}) == pynvml.NVML_GPU_INSTANCE_PROFILE_7_SLICE
    siblings = {"1g.10gb": 9856, "1g.20gb": 19968}
    assert profile_id("1g.10gb", 9856, siblings) == pynvml.NVML_GPU_INSTANCE_PROFILE_1_SLICE
    assert profile_id("1g.20gb", 19968, siblings) == pynvml.NVML_GPU_INSTANCE_PROFILE_1_SLICE_REV2
    with pytest.raises(ValueError, match="no 5-slice"):
        profile_id("5g.20gb", 20000, {})


# ------------------------------------------------------------------------------------------- build and load


def test_build_is_cached_by_source_hash(tmp_path: Path) -> None:
    first = build_fake_nvml(tmp_path)
    mtime = first.stat().st_mtime_ns
    assert first.name == "libnvidia-ml.so.1"
    assert build_fake_nvml(tmp_path) == first
    assert first.stat().st_mtime_ns == mtime
    assert [p.name for p in first.parent.iterdir()] == ["libnvidia-ml.so.1"]  # no temporary left behind


def test_build_without_compiler_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("CC", raising=False)
    with pytest.raises(sim.SimBuildError, match="needs a C compiler"):
        build_fake_nvml(tmp_path / "cache")


def test_build_falls_back_when_cache_dir_is_not_writable(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    built = build_fake_nvml(blocker / "cache")  # cannot create a directory under a file
    assert built.is_file() and blocker not in built.parents


def _find_nvml_header() -> Path | None:
    spec = importlib.util.find_spec("nvidia")
    for location in (spec.submodule_search_locations or []) if spec else []:
        for header in sorted(Path(location).glob("*/include/nvml.h")):
            return header
    return None


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")
def test_fake_matches_the_real_nvml_header(tmp_path: Path) -> None:
    """Every signature and struct the fake defines must agree with NVIDIA's nvml.h (pip: nvidia-nvml-dev)."""
    header = _find_nvml_header()
    if header is None:
        pytest.skip("nvidia-nvml-dev (NVIDIA's nvml.h) is not installed")
    with resources.as_file(resources.files("nvdp.sim").joinpath("libnvidia-ml.c")) as source:
        result = subprocess.run(
            [
                *("gcc", "-shared", "-fPIC", "-Wall", "-Wextra", "-Werror", "-DNVDP_SIM_WITH_NVML_H"),
                *("-I", str(header.parent), "-o", str(tmp_path / "checked.so"), str(source)),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
    assert result.returncode == 0, result.stderr


def test_activate_makes_pynvml_use_the_fake(tmp_path: Path) -> None:
    handle = sim.activate(sim.DEFAULT_NODE, tmp_path)
    pynvml.nvmlInit()
    try:
        # pynvml's own CDLL("libnvidia-ml.so.1") resolved to the object activate() loaded, not a search path.
        assert sim._loaded_library is not None
        assert pynvml.nvmlLib._handle == sim._loaded_library._handle
        assert pynvml.nvmlDeviceGetCount() == 4
        assert pynvml.nvmlSystemGetDriverVersion() == "580.82.07"
    finally:
        pynvml.nvmlShutdown()
    assert handle.state_file.read_text().startswith("# nvdp simulated node")


def test_activate_writes_the_host_root(tmp_path: Path) -> None:
    node = _parse(
        _node(
            [
                _gpu(0, minorNumber=3, numaNode=1),
                _gpu(
                    1,
                    minorNumber=5,
                    migEnabled=True,
                    migDevices=[
                        {"uuid": "MIG-a", "profile": "1g.5gb", "memoryMiB": 4864, "gi": 7, "ci": 0},
                        {"uuid": "MIG-b", "profile": "3g.20gb", "memoryMiB": 19968, "gi": 2, "ci": 0},
                        {"uuid": "MIG-c", "profile": "3g.20gb", "memoryMiB": 19968, "gi": 2, "ci": 1, "index": 5},
                    ],
                ),
            ],
            controlDevices=["/dev/nvidiactl", "/dev/nvidia-modeset"],
        )
    )
    handle = sim.activate(node, tmp_path / "work")
    root = handle.host_root
    # nvidia-caps: the MIG capability nodes of the simulated driver root (docs/cdi.md).
    assert sorted(p.name for p in (root / "dev").iterdir()) == ["nvidia-caps", "nvidia-modeset", "nvidia3", "nvidia5",
                                                                 "nvidiactl"]
    assert (root / "sys/bus/pci/devices/0000:10:00.0/numa_node").read_text() == "1\n"
    assert (root / "sys/bus/pci/devices/0000:11:00.0/numa_node").read_text() == "-1\n"
    minors = dict(line.split() for line in (root / "proc/driver/nvidia-caps/mig-minors").read_text().splitlines())
    assert minors["gpu5/gi7/access"] == str(sim.mig_minor(5, 7))
    assert minors["gpu5/gi2/ci1/access"] == str(sim.mig_minor(5, 2, 1))
    assert len(minors) == 2 + 5  # config, monitor, 2 GIs and 3 CIs
    assert len(set(minors.values())) == len(minors)
    assert sim.mig_minor(0, 1) == 12  # the driver's numbering: gpu0/gi1/access is minor 12
    assert handle.events_file.read_text() == ""


def test_bad_state_file_fails_init_cleanly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sim.activate(sim.DEFAULT_NODE, tmp_path)
    state = tmp_path / "broken"
    state.write_text("gpu only-a-uuid\n")
    monkeypatch.setenv(sim.STATE_ENV, str(state))
    with pytest.raises(pynvml.NVMLError) as info:
        pynvml.nvmlInit()
    assert info.value.value == pynvml.NVML_ERROR_UNKNOWN
    monkeypatch.delenv(sim.STATE_ENV)
    with pytest.raises(pynvml.NVMLError) as info:
        pynvml.nvmlInit()
    assert info.value.value == pynvml.NVML_ERROR_DRIVER_NOT_LOADED


def test_library_is_loaded_once_per_process(tmp_path: Path) -> None:
    sim.activate(sim.DEFAULT_NODE, tmp_path / "a")
    first = sim._loaded_library
    sim.activate(sim.DEFAULT_NODE, tmp_path / "b", cache_dir=tmp_path / "other-cache")
    assert sim._loaded_library is first
    assert isinstance(first, ctypes.CDLL)
