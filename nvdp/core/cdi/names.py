"""The names nvdp gives CDI devices and spec files (vendor, classes, qualified names, file names).

Apart from `build` so that what runs on every node, with or without a CDI device list strategy (Allocate's CDI
names, the controller's check for feature classes without a spec), does not import the spec model and its builders
(`spec`, `build`: ~5 ms of start-up, docs/performance.md)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

#: The device plugin's CDI vendor and classes (upstream's names, so pods and policies written for it keep working).
VENDOR = "k8s.device-plugin.nvidia.com"
GPU_CLASS, IMEX_CLASS, GDS_CLASS, MOFED_CLASS, GDRCOPY_CLASS = "gpu", "imex-channel", "gds", "mofed", "gdrcopy"


class BuiltSpecs(Protocol):
    """What `classes_without_spec` reads of `nvdp.core.cdi.build.DevicePluginSpecs`."""

    @property
    def specs(self) -> Mapping[str, object]: ...


def spec_filename(kind: str) -> str:
    """`vendor-class.json`, the file name NVIDIA's tools give a spec of that kind."""
    vendor, _, cls = kind.partition("/")
    return f"{vendor}-{cls}.json"


def qualified_name(device_class: str, name: str) -> str:
    return f"{VENDOR}/{device_class}={name}"


def classes_without_spec(built: BuiltSpecs | None, enabled: Sequence[str]) -> tuple[str, ...]:
    """Of the `enabled` classes with a spec of their own (imex-channel, gds, mofed, gdrcopy), those whose spec was not
    built: Allocate must not name a device the runtime cannot resolve (the container would fail to start)."""
    written = built.specs if built is not None else {}
    return tuple(c for c in enabled if spec_filename(f"{VENDOR}/{c}") not in written)
