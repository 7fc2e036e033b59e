"""The CDI spec model: JSON keys, minimum versions, names, host-root transforms and hook arguments."""

from __future__ import annotations

import json

import pytest

from nvdp.core.cdi.build import CdiOptions, hook_args, make_hook
from nvdp.core.cdi.spec import (
    CdiSpecError,
    ContainerEdits,
    Device,
    DeviceNode,
    Hook,
    Mount,
    Spec,
    minimum_version,
    render,
    reroot,
    transform_edits,
    validate_device_name,
    validate_kind,
)

NODE = DeviceNode(path="/dev/nvidia0", major=195, minor=0, file_mode=0o666, permissions="rwm")


def spec(*devices: Device, kind: str = "k8s.device-plugin.nvidia.com/gpu", **common: object) -> Spec:
    return Spec(kind=kind, devices=devices, container_edits=ContainerEdits(**common))  # type: ignore[arg-type]


def test_rendering_uses_cdi_key_names_decimal_file_mode_and_omits_what_is_empty() -> None:
    edits = ContainerEdits(
        device_nodes=(DeviceNode(path="/dev/nvidia0", host_path="/dev/nvidia0", major=195, minor=0, file_mode=0o666,
                                 permissions="rwm", gid=44),),
        mounts=(Mount("/host/lib.so", "/lib.so", ("ro",)),),
        hooks=(Hook("createContainer", "/usr/bin/nvidia-ctk", ("nvidia-ctk", "hook", "x")),),
        additional_gids=(44,),
    )
    out = json.loads(render(spec(Device("gpu0", edits))))
    assert list(out) == ["cdiVersion", "kind", "devices"]  # no empty spec-level containerEdits
    device = out["devices"][0]["containerEdits"]
    assert device["deviceNodes"] == [{"path": "/dev/nvidia0", "major": 195, "minor": 0, "fileMode": 438,
                                      "permissions": "rwm", "gid": 44}]
    assert device["mounts"] == [{"hostPath": "/host/lib.so", "containerPath": "/lib.so", "options": ["ro"]}]
    assert device["hooks"] == [{"hookName": "createContainer", "path": "/usr/bin/nvidia-ctk",
                                "args": ["nvidia-ctk", "hook", "x"]}]
    assert device["additionalGids"] == [44]
    assert "env" not in device


def test_host_path_is_written_only_when_it_differs() -> None:
    moved = ContainerEdits(device_nodes=(DeviceNode(path="/dev/nvidia0", host_path="/run/nvidia/driver/dev/nvidia0"),))
    out = json.loads(render(spec(Device("gpu0", moved))))
    assert out["devices"][0]["containerEdits"]["deviceNodes"] == [
        {"path": "/dev/nvidia0", "hostPath": "/run/nvidia/driver/dev/nvidia0"}]


def test_rendering_is_deterministic() -> None:
    s = spec(Device("a", ContainerEdits(device_nodes=(NODE,))), env=("A=1",))
    assert render(s) == render(Spec(s.kind, s.devices, s.container_edits))
    assert render(s).endswith("}\n")


@pytest.mark.parametrize(
    ("devices", "common", "kind", "expected"),
    [
        pytest.param((Device("gpu-a", ContainerEdits(device_nodes=(NODE,))),), {}, None, "0.3.0",
                     id="plain content needs 0.3.0"),
        pytest.param((Device("0", ContainerEdits(device_nodes=(NODE,))),), {}, None, "0.5.0",
                     id="a device name starting with a digit needs 0.5.0"),
        pytest.param((Device("0:1", ContainerEdits(device_nodes=(NODE,))),), {}, None, "0.5.0",
                     id="a MIG index name needs 0.5.0"),
        pytest.param((Device("GPU-x", ContainerEdits(device_nodes=(DeviceNode("/dev/a", host_path="/h/dev/a"),))),),
                     {}, None, "0.5.0", id="a hostPath needs 0.5.0"),
        pytest.param((Device("GPU-x", ContainerEdits(device_nodes=(DeviceNode("/dev/a", host_path="/dev/a"),))),),
                     {}, None, "0.3.0", id="a hostPath equal to the path is not written and needs nothing"),
        pytest.param((Device("GPU-x", ContainerEdits(device_nodes=(NODE,))),), {"additional_gids": (44,)}, None,
                     "0.7.0", id="additionalGids need 0.7.0"),
        pytest.param((Device("0", ContainerEdits(additional_gids=(44,))),), {}, None, "0.7.0",
                     id="the newest requirement wins"),
        pytest.param((Device("GPU-x", ContainerEdits(device_nodes=(NODE,), additional_gids=(0,))),), {}, None,
                     "0.3.0", id="group 0 is no additional group"),
        pytest.param((Device("GPU-x", ContainerEdits(mounts=(Mount("/a", "/b", type="bind"),))),), {}, None,
                     "0.4.0", id="a mount type needs 0.4.0"),
        pytest.param((Device("GPU-x", ContainerEdits(device_nodes=(NODE,)), annotations=(("a", "b"),)),), {}, None,
                     "0.6.0", id="annotations need 0.6.0"),
        pytest.param((Device("x", ContainerEdits(device_nodes=(NODE,))),), {}, "vendor.com/cl.ass", "0.6.0",
                     id="a dot in the class needs 0.6.0"),
    ],
)
def test_minimum_version(devices: tuple[Device, ...], common: dict[str, object], kind: str | None,
                         expected: str) -> None:
    s = spec(*devices, kind=kind or "k8s.device-plugin.nvidia.com/gpu", **common)
    assert minimum_version(s) == expected
    assert json.loads(render(s))["cdiVersion"] == expected


@pytest.mark.parametrize("name", ["GPU-3a1f6c52-8e0b", "0", "0:1", "a_b.c-d", "1c2a-gpu-0"])
def test_valid_device_names(name: str) -> None:
    validate_device_name(name)


@pytest.mark.parametrize("name", ["", "-a", "a-", ":0", "a b", "a/b", "é", "0:"])
def test_invalid_device_names(name: str) -> None:
    with pytest.raises(CdiSpecError, match="invalid CDI device name"):
        validate_device_name(name)


@pytest.mark.parametrize("kind", ["k8s.device-plugin.nvidia.com/gpu", "nvidia.com/imex-channel", "a/b"])
def test_valid_kinds(kind: str) -> None:
    validate_kind(kind)


@pytest.mark.parametrize(("kind", "message"), [
    ("gpu", "expected vendor/class"), ("1vendor/gpu", "vendor"), ("vendor/gpu-", "class"), ("ven:dor/gpu", "vendor"),
    ("vendor/g:pu", "class"),
])
def test_invalid_kinds(kind: str, message: str) -> None:
    with pytest.raises(CdiSpecError, match=message):
        validate_kind(kind)


@pytest.mark.parametrize(("s", "message"), [
    (spec(), "no devices"),
    (spec(Device("a", ContainerEdits())), "empty container edits"),
    (spec(Device("a", ContainerEdits(env=("A=1",))), Device("a", ContainerEdits(env=("A=1",)))), "defined twice"),
    (spec(Device("a", ContainerEdits(env=("=1",)))), "invalid env entry"),
    (spec(Device("a", ContainerEdits(hooks=(Hook("later", "/bin/x"),)))), "invalid hook stage"),
    (spec(Device("a", ContainerEdits(hooks=(Hook("createContainer", "bin/x"),)))), "not absolute"),
])
def test_what_a_runtime_would_refuse_is_refused(s: Spec, message: str) -> None:
    with pytest.raises(CdiSpecError, match=message):
        render(s)


@pytest.mark.parametrize(
    ("path", "src", "dst", "expected"),
    [
        pytest.param("/driver-root/usr/lib/libcuda.so", "/driver-root", "/", "/usr/lib/libcuda.so", id="to /"),
        pytest.param("/driver-root/dev/nvidia0", "/driver-root", "/run/nvidia/driver", "/run/nvidia/driver/dev/nvidia0",
                     id="to another root"),
        pytest.param("/driver-root", "/driver-root", "/host", "/host", id="the root itself"),
        pytest.param("/driver-root2/lib.so", "/driver-root", "/host", "/driver-root2/lib.so",
                     id="a longer first component is not under the root (upstream v1.20.0 would move it)"),
        pytest.param("/driver-rootlib.so", "/driver-root/", "/host", "/driver-rootlib.so", id="trailing slash"),
        pytest.param("/usr/bin/nvidia-ctk", "/driver-root", "/host", "/usr/bin/nvidia-ctk", id="outside"),
        pytest.param("/dev/nvidia0", "/", "/run/nvidia/driver", "/run/nvidia/driver/dev/nvidia0", id="from /"),
        pytest.param("/a/b", "/a", "/a", "/a/b", id="same roots"),
    ],
)
def test_reroot_matches_whole_path_components(path: str, src: str, dst: str, expected: str) -> None:
    assert reroot(path, src, dst) == expected


def test_transform_moves_host_paths_by_kind_and_keeps_container_paths() -> None:
    edits = ContainerEdits(
        device_nodes=(DeviceNode("/dev/nvidia0", host_path="/driver-root/dev/nvidia0"),),
        mounts=(Mount("/driver-root/usr/lib/libcuda.so.1", "/usr/lib/libcuda.so.1"),),
        hooks=(Hook("createContainer", "/driver-root/usr/bin/nvidia-ctk",
                    ("nvidia-ctk", "--link", "a::/driver-root/b")),
               Hook("createRuntime", "/driver-root/usr/bin/x", ("x", "/driver-root/t::/driver-root/l"))),
    )
    out = transform_edits(edits, driver=("/driver-root", "/run/nvidia/driver"), dev=("/driver-root", "/"))
    assert out.device_nodes[0].host_path == "/dev/nvidia0"
    assert out.mounts[0] == Mount("/run/nvidia/driver/usr/lib/libcuda.so.1", "/usr/lib/libcuda.so.1")
    # A createContainer hook's arguments are container paths: untouched; its program is a host path: moved.
    assert out.hooks[0].path == "/run/nvidia/driver/usr/bin/nvidia-ctk"
    assert out.hooks[0].args == ("nvidia-ctk", "--link", "a::/driver-root/b")
    assert out.hooks[1].args == ("x", "/run/nvidia/driver/t::/run/nvidia/driver/l")


@pytest.mark.parametrize(
    ("hook_path", "expected"),
    [
        pytest.param("/usr/bin/nvidia-ctk", ("nvidia-ctk", "hook", "update-ldcache"), id="nvidia-ctk: hook subcommand"),
        pytest.param("/usr/local/nvidia/toolkit/nvidia-cdi-hook", ("nvidia-cdi-hook", "update-ldcache"),
                     id="nvidia-cdi-hook: top-level command"),
    ],
)
def test_hook_arguments_follow_the_hook_binary(hook_path: str, expected: tuple[str, ...]) -> None:
    assert hook_args("update-ldcache", [], hook_path) == expected
    hook = make_hook("update-ldcache", ["/usr/lib64"], CdiOptions(hook_path=hook_path))
    assert hook is not None and hook.path == hook_path
    assert hook.args == (*expected, "--folder", "/usr/lib64")
    assert hook.hook_name == "createContainer" and hook.env == ("NVIDIA_CTK_DEBUG=false",)


def test_disabled_and_pointless_hooks_are_not_made() -> None:
    assert make_hook("update-ldcache", ["/l"], CdiOptions(disabled_hooks=frozenset({"update-ldcache"}))) is None
    assert make_hook("enable-cuda-compat", [], CdiOptions(disabled_hooks=frozenset({"all"}))) is None
    assert make_hook("create-symlinks", [], CdiOptions()) is None
    links = make_hook("create-symlinks", ["a::/b", "c::/d"], CdiOptions())
    assert links is not None and links.args[3:] == ("--link", "a::/b", "--link", "c::/d")
