"""The config file, schema v1, as msgspec structs.

Key names and meaning follow NVIDIA's plugin (`api/config/v1`), so an upstream config file loads unchanged. As
upstream, an unknown key is ignored, but never silently: `nvdp.core.config.load` drops it with a warning that
names its path (upstream says nothing about, for example, `renameByDefault` placed under `flags`); with
`--strict-config` it is an error. The structs themselves refuse unknown keys, so nothing reaches them
unchecked. Every leaf is optional (`None` = not set here) so that precedence (flag > env > file > default) can
tell "not given" from "false".
"""

from __future__ import annotations

from typing import Any

import msgspec

from nvdp.core.config.dra import Dra
from nvdp.core.config.sharing import Sharing

# Upstream spells a few keys with an upper-case acronym.
_ACRONYMS = {
    "device_id_strategy": "deviceIDStrategy",
    "nvidia_ctk_path": "nvidiaCTKPath",
    "channel_ids": "channelIDs",
    "use_node_feature_api": "useNodeFeatureAPI",
}


def yaml_key(name: str) -> str:
    """The config-file key of a struct field."""
    if name in _ACRONYMS:
        return _ACRONYMS[name]
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


class _Struct(msgspec.Struct, rename=yaml_key, forbid_unknown_fields=True, kw_only=True, omit_defaults=True):
    pass


class PluginFlags(_Struct):
    pass_device_specs: bool | None = None
    #: A string or a list of strings, as upstream accepts both.
    device_list_strategy: str | list[str] | None = None
    device_id_strategy: str | None = None
    shared_devices_allocation_policy: str | None = None
    #: The `cdi-annotations` strategy's annotation key prefix (`--cdi-annotation-prefix`).
    cdi_annotation_prefix: str | None = None
    nvidia_ctk_path: str | None = None
    container_driver_root: str | None = None


class Flags(_Struct):
    mig_strategy: str | None = None
    fail_on_init_error: bool | None = None
    mps_root: str | None = None
    nvidia_driver_root: str | None = None
    nvidia_dev_root: str | None = None
    gdrcopy_enabled: bool | None = None
    gds_enabled: bool | None = None
    mofed_enabled: bool | None = None
    device_discovery_strategy: str | None = None
    use_node_feature_api: bool | None = None
    plugin: PluginFlags | None = None
    #: gpu-feature-discovery's own section; upstream's plugin drops it and so does nvdp.
    gfd: dict[str, Any] | None = None
    #: nvdp only (upstream ignores it): config warnings are errors (`--strict-config`, env STRICT_CONFIG).
    strict_config: bool | None = None


class Imex(_Struct):
    channel_ids: list[int] | None = None
    required: bool | None = None


class Config(_Struct, dict=True):
    """The whole file. `dict=True`: the parser attaches the file's warnings (`nvdp.core.config.load.config_warnings`)
    to the instance without making them a key."""

    version: str | None = None
    flags: Flags | None = None
    #: Upstream's renaming patterns: parsed for compatibility, ignored at runtime with a warning, as upstream does.
    resources: dict[str, Any] | None = None
    sharing: Sharing | None = None
    imex: Imex | None = None
    #: nvdp only: the DRA kubelet plugin (docs/dra.md).
    dra: Dra | None = None
