"""The CDI spec model, its JSON rendering, the minimum `cdiVersion`, name checks and host-root transforms.

Key names and rules follow the CDI specification (`specs-go/config.go`, `version.go`, `pkg/parser`): runtimes parse
spec files strictly, so a wrong key or a version newer than the runtime knows loses every device in the file. That is
why the rendering omits what is empty and the version is the minimum the content needs, never the newest.
"""

from __future__ import annotations

import json
import posixpath
import re
from dataclasses import dataclass, replace
from typing import Any

#: Valid `cdiVersion` values, oldest first (CDI v1.1.0's list).
CDI_VERSIONS = ("0.1.0", "0.2.0", "0.3.0", "0.4.0", "0.5.0", "0.6.0", "0.7.0", "0.8.0", "1.0.0", "1.1.0")
#: The OCI hook stages a CDI hook may name.
HOOK_NAMES = ("prestart", "createRuntime", "createContainer", "startContainer", "poststart", "poststop")

_VENDOR_OR_CLASS = re.compile(r"^[A-Za-z](?:[A-Za-z0-9_.-]*[A-Za-z0-9])?$")
_DEVICE_NAME = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9_.:-]*[A-Za-z0-9])?$")


class CdiSpecError(ValueError):
    """A spec, a name or an edit that a CDI runtime would refuse; the message names what and why."""


@dataclass(frozen=True, slots=True)
class DeviceNode:
    """`deviceNodes[]`: `path` inside the container; `host_path` "" means the same path on the host."""

    path: str
    host_path: str = ""
    #: "" (the runtime stats the host node), "c", "b", "u" or "p".
    type: str = ""
    major: int | None = None
    minor: int | None = None
    #: Permission bits (written as a decimal number, as CDI wants: 0o666 is 438).
    file_mode: int | None = None
    #: Subset of "rwm"; "" means "rwm".
    permissions: str = ""
    uid: int | None = None
    gid: int | None = None


@dataclass(frozen=True, slots=True)
class Mount:
    host_path: str
    container_path: str
    options: tuple[str, ...] = ()
    type: str = ""


@dataclass(frozen=True, slots=True)
class Hook:
    hook_name: str
    #: Absolute path on the host.
    path: str
    #: The full argv, args[0] being the program's name.
    args: tuple[str, ...] = ()
    env: tuple[str, ...] = ()
    timeout: int | None = None


@dataclass(frozen=True, slots=True)
class ContainerEdits:
    env: tuple[str, ...] = ()
    device_nodes: tuple[DeviceNode, ...] = ()
    mounts: tuple[Mount, ...] = ()
    hooks: tuple[Hook, ...] = ()
    #: `additionalGids` (CDI 0.7.0): groups the container process joins, e.g. a device node's group.
    additional_gids: tuple[int, ...] = ()

    @property
    def empty(self) -> bool:
        return not (self.env or self.device_nodes or self.mounts or self.hooks or self.additional_gids)

    def merged(self, *others: ContainerEdits) -> ContainerEdits:
        """These edits followed by `others`, each entry once (first occurrence kept): a MIG device's parent node and a
        replica's GPU must not appear twice."""
        parts = (self, *others)
        return ContainerEdits(
            env=_unique(e for p in parts for e in p.env),
            device_nodes=_unique(d for p in parts for d in p.device_nodes),
            mounts=_unique(m for p in parts for m in p.mounts),
            hooks=_unique(h for p in parts for h in p.hooks),
            additional_gids=_unique(g for p in parts for g in p.additional_gids),
        )


def _unique(items: Any) -> tuple[Any, ...]:
    return tuple(dict.fromkeys(items))


@dataclass(frozen=True, slots=True)
class Device:
    name: str
    container_edits: ContainerEdits
    #: (key, value) pairs, in order; CDI 0.6.0.
    annotations: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class Spec:
    #: `vendor/class`.
    kind: str
    devices: tuple[Device, ...]
    container_edits: ContainerEdits = ContainerEdits()
    annotations: tuple[tuple[str, str], ...] = ()

    @property
    def vendor(self) -> str:
        return self.kind.partition("/")[0]

    @property
    def device_class(self) -> str:
        return self.kind.partition("/")[2]

    def qualified(self, name: str) -> str:
        """`vendor/class=name`, what a container runtime is asked for."""
        return f"{self.kind}={name}"

    @property
    def qualified_names(self) -> tuple[str, ...]:
        return tuple(self.qualified(d.name) for d in self.devices)


# -- names ------------------------------------------------------------------------------------------------------------


def validate_kind(kind: str) -> None:
    vendor, sep, cls = kind.partition("/")
    if not sep:
        raise CdiSpecError(f"invalid CDI kind {kind!r}: expected vendor/class")
    if not _VENDOR_OR_CLASS.match(vendor):
        raise CdiSpecError(f"invalid CDI vendor {vendor!r}: must start with a letter, end with a letter or digit and "
                           "hold only letters, digits, '_', '.' and '-'")
    if not _VENDOR_OR_CLASS.match(cls):
        raise CdiSpecError(f"invalid CDI class {cls!r}: must start with a letter, end with a letter or digit and "
                           "hold only letters, digits, '_', '.' and '-'")


def validate_device_name(name: str) -> None:
    if not _DEVICE_NAME.match(name):
        raise CdiSpecError(f"invalid CDI device name {name!r}: must start and end with a letter or digit and hold "
                           "only letters, digits, '_', '.', ':' and '-'")


def validate_spec(spec: Spec) -> None:
    """What a CDI runtime checks when it loads a file: kind, at least one device, names, unique names, non-empty
    device edits, hook stages and absolute paths."""
    validate_kind(spec.kind)
    if not spec.devices:
        raise CdiSpecError(f"CDI spec {spec.kind}: no devices (a spec needs at least one)")
    seen: set[str] = set()
    for device in spec.devices:
        validate_device_name(device.name)
        if device.name in seen:
            raise CdiSpecError(f"CDI spec {spec.kind}: device {device.name!r} defined twice")
        seen.add(device.name)
        if device.container_edits.empty:
            raise CdiSpecError(f"CDI spec {spec.kind}: device {device.name!r} has empty container edits")
        _validate_edits(device.container_edits, f"{spec.kind}={device.name}")
    _validate_edits(spec.container_edits, spec.kind)


def _validate_edits(edits: ContainerEdits, where: str) -> None:
    for env in edits.env:
        if env.find("=") < 1:
            raise CdiSpecError(f"{where}: invalid env entry {env!r}: expected NAME=VALUE")
    for node in edits.device_nodes:
        if not node.path.startswith("/"):
            raise CdiSpecError(f"{where}: device node path {node.path!r} is not absolute")
        if node.type not in ("", "c", "b", "u", "p"):
            raise CdiSpecError(f"{where}: device node {node.path}: invalid type {node.type!r}")
        if node.permissions and node.permissions != "none" and set(node.permissions) - set("rwm"):
            raise CdiSpecError(f"{where}: device node {node.path}: invalid permissions {node.permissions!r}")
    for hook in edits.hooks:
        if hook.hook_name not in HOOK_NAMES:
            raise CdiSpecError(f"{where}: invalid hook stage {hook.hook_name!r}")
        if not hook.path.startswith("/"):
            raise CdiSpecError(f"{where}: hook path {hook.path!r} is not absolute")
        if hook.timeout is not None and hook.timeout <= 0:
            raise CdiSpecError(f"{where}: hook timeout must be positive")
    for mount in edits.mounts:
        if not mount.container_path or not mount.host_path:
            raise CdiSpecError(f"{where}: a mount needs hostPath and containerPath")


# -- versions ---------------------------------------------------------------------------------------------------------


def minimum_version(spec: Spec) -> str:
    """The oldest `cdiVersion` that allows everything in `spec` (CDI `version.go`'s rules). Older runtimes reject
    versions they do not know, so nvdp writes this and never more."""
    needed = "0.3.0"

    def need(version: str) -> None:
        nonlocal needed
        if CDI_VERSIONS.index(version) > CDI_VERSIONS.index(needed):
            needed = version

    all_edits = [spec.container_edits, *(d.container_edits for d in spec.devices)]
    if any(g for e in all_edits for g in e.additional_gids):
        need("0.7.0")
    if spec.annotations or any(d.annotations for d in spec.devices) or "." in spec.device_class:
        need("0.6.0")
    if any(d.name[:1].isdigit() for d in spec.devices):
        need("0.5.0")
    if any(n.host_path and n.host_path != n.path for e in all_edits for n in e.device_nodes):
        need("0.5.0")
    if any(m.type for e in all_edits for m in e.mounts):
        need("0.4.0")
    return needed


# -- JSON -------------------------------------------------------------------------------------------------------------


def _node_json(node: DeviceNode) -> dict[str, Any]:
    out: dict[str, Any] = {"path": node.path}
    # Omitted when it says nothing new: hostPath is a 0.5.0 key, and equal to path it only raises the version.
    if node.host_path and node.host_path != node.path:
        out["hostPath"] = node.host_path
    if node.type:
        out["type"] = node.type
    for key, value in (("major", node.major), ("minor", node.minor), ("fileMode", node.file_mode)):
        if value is not None:
            out[key] = value
    if node.permissions:
        out["permissions"] = node.permissions
    if node.uid is not None:
        out["uid"] = node.uid
    if node.gid is not None:
        out["gid"] = node.gid
    return out


def _mount_json(mount: Mount) -> dict[str, Any]:
    out: dict[str, Any] = {"hostPath": mount.host_path, "containerPath": mount.container_path}
    if mount.options:
        out["options"] = list(mount.options)
    if mount.type:
        out["type"] = mount.type
    return out


def _hook_json(hook: Hook) -> dict[str, Any]:
    out: dict[str, Any] = {"hookName": hook.hook_name, "path": hook.path}
    if hook.args:
        out["args"] = list(hook.args)
    if hook.env:
        out["env"] = list(hook.env)
    if hook.timeout is not None:
        out["timeout"] = hook.timeout
    return out


def edits_json(edits: ContainerEdits) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if edits.env:
        out["env"] = list(edits.env)
    if edits.device_nodes:
        out["deviceNodes"] = [_node_json(n) for n in edits.device_nodes]
    if edits.mounts:
        out["mounts"] = [_mount_json(m) for m in edits.mounts]
    if edits.hooks:
        out["hooks"] = [_hook_json(h) for h in edits.hooks]
    gids = [g for g in edits.additional_gids if g]
    if gids:
        # CDI spells it with a lower-case "ids"; 0 means nothing to runtimes, so it is not written.
        out["additionalGids"] = gids
    return out


def spec_json(spec: Spec) -> dict[str, Any]:
    out: dict[str, Any] = {"cdiVersion": minimum_version(spec), "kind": spec.kind}
    if spec.annotations:
        out["annotations"] = dict(spec.annotations)
    devices = []
    for device in spec.devices:
        entry: dict[str, Any] = {"name": device.name}
        if device.annotations:
            entry["annotations"] = dict(device.annotations)
        entry["containerEdits"] = edits_json(device.container_edits)
        devices.append(entry)
    out["devices"] = devices
    common = edits_json(spec.container_edits)
    if common:
        out["containerEdits"] = common
    return out


def render(spec: Spec) -> str:
    """The spec file's text: deterministic (key order fixed, entries in the order built), so an unchanged spec is
    byte-identical and is not rewritten."""
    validate_spec(spec)
    return json.dumps(spec_json(spec), indent=2) + "\n"


# -- host-root transforms ---------------------------------------------------------------------------------------------


def reroot(path: str, from_root: str, to_root: str) -> str:
    """`path` moved from under `from_root` to under `to_root`, matching whole path components: `/driver-root` moves
    `/driver-root/lib/x` but not `/driver-root2/lib/x` (NVIDIA's toolkit v1.20.0, which k8s-device-plugin v0.20.0
    vendors, compares plain string prefixes and would). A path outside `from_root` is returned unchanged."""
    src = posixpath.normpath(from_root or "/")
    dst = posixpath.normpath(to_root or "/")
    norm = posixpath.normpath(path)
    if src == dst or not norm.startswith("/"):
        return path
    if src == "/":
        rest = norm.lstrip("/")
    elif norm == src:
        rest = ""
    elif norm.startswith(src + "/"):
        rest = norm[len(src) + 1:]
    else:
        return path
    return posixpath.join(dst, rest) if rest else dst


def transform_edits(
    edits: ContainerEdits, *, driver: tuple[str, str] = ("/", "/"), dev: tuple[str, str] = ("/", "/")
) -> ContainerEdits:
    """Host paths as the host sees them: device nodes' `hostPath` through the dev-root pair (from, to), mounts'
    `hostPath` and hooks' `path` through the driver-root pair. Container paths never change. Hooks that run outside
    the container (not createContainer/startContainer) also have their path arguments moved, both sides of
    `target::link`."""
    nodes = tuple(replace(n, host_path=reroot(n.host_path or n.path, *dev)) for n in edits.device_nodes)
    mounts = tuple(replace(m, host_path=reroot(m.host_path, *driver)) for m in edits.mounts)
    hooks = []
    for hook in edits.hooks:
        path = hook.path if hook.hook_name == "startContainer" else reroot(hook.path, *driver)
        args = hook.args
        if hook.hook_name not in ("createContainer", "startContainer"):
            args = tuple("::".join(reroot(p, *driver) for p in a.split("::", 1)) for a in args)
        hooks.append(replace(hook, path=path, args=args))
    return replace(edits, device_nodes=nodes, mounts=mounts, hooks=tuple(hooks))
