"""GPU Feature Discovery's labels (upstream's `internal/lm` cases, through nvdp's plans) and the NFD feature file."""

from __future__ import annotations

import dataclasses
import os
import random
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from nvdp import sim
from nvdp.core.config.load import parse_config
from nvdp.core.config.settings import resolve
from nvdp.core.inventory import Gpu, MigDevice, NodeInventory
from nvdp.core.plan.build import build_plan
from nvdp.core.plan.labels import (
    PCI_CLASS_3D,
    PCI_CLASS_VGA,
    HostFacts,
    LabelError,
    family,
    gpu_mode,
    node_labels,
    render_features,
    sanitise,
)
from nvdp.core.plan.model import Device, Plan, Resource, Sharing
from nvdp.nfd import write_features_file
from nvdp.nvml import adapter

ROOT = "/run/nvidia/mps"
HOST = HostFacts(machine="DGX A100", pci_classes={})
COMPUTE = {f"GPU-{i}": PCI_CLASS_3D for i in range(8)}


def a100(i: int, **overrides: object) -> Gpu:
    fields: dict[str, object] = dict(index=i, uuid=f"GPU-{i}", name="NVIDIA A100-SXM4-40GB", memory_mib=40960,
                                     minor=i, pci_bus_id=f"00000000:{16 + i:02x}:00.0", compute_capability="8.0",
                                     mig_capable=True)
    fields.update(overrides)
    return Gpu(**fields)  # type: ignore[arg-type]


def mig(uuid: str, index: int, profile: str = "1g.5gb", gi: int = 7, memory: int = 4864) -> MigDevice:
    slices = int(profile[0])
    return MigDevice(uuid, index, profile, memory, gi=gi, ci=0, multiprocessors=14 * slices, slices_gi=slices,
                     slices_ci=slices, copy_engines=slices, decoders=slices // 2, jpeg_engines=int("+me" in profile),
                     ofa_engines=int("+me" in profile))


def mig_gpu(i: int, *migs: MigDevice) -> Gpu:
    return a100(i, mig_enabled=True, mig_devices=migs)


def labels_for(config: str, *gpus: Gpu, host: HostFacts = HOST, timestamp: int | None = None,
               **cli: str) -> dict[str, str]:
    settings = resolve({"mps_root": ROOT, **cli}, {}, parse_config(config, "c.yaml"), config_source="c.yaml")
    inventory = NodeInventory("580.82.07", 13000, tuple(gpus))
    plan = build_plan(inventory, settings)
    host = dataclasses.replace(host, pci_classes=host.pci_classes or COMPUTE)
    return node_labels(plan, inventory, mig_strategy=settings.mig_strategy, host=host, timestamp=timestamp)


def resource(labels: dict[str, str], name: str) -> dict[str, str]:
    """The labels of one resource, by suffix (the node-wide `gpu.machine` and `gpu.mode` left out)."""
    prefix = f"nvidia.com/{name}."
    return {k.removeprefix(prefix): v for k, v in labels.items()
            if k.startswith(prefix) and k not in ("nvidia.com/gpu.machine", "nvidia.com/gpu.mode")}


def ts(name: str = "nvidia.com/gpu", replicas: int = 2, rename: str | None = None) -> str:
    extra = f"\n        rename: {rename}" if rename else ""
    return f"sharing:\n  timeSlicing:\n    resources:\n      - name: {name}\n        replicas: {replicas}{extra}\n"


def mps(name: str = "nvidia.com/gpu", replicas: int = 2, rename: str | None = None) -> str:
    return ts(name, replicas, rename).replace("timeSlicing", "mps")


# -- internal/lm/resource_test.go ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("raw", "clean"), [
    ("a space separated string", "a-space-separated-string"),
    ("some(thing)else", "somethingelse"),
    ("some ( thing )else", "some-thing-else"),
    ("NVIDIA-TITAN-X-(Pascal)", "NVIDIA-TITAN-X-Pascal"),
    (" input  with multiple   spaces   ", "input-with-multiple-spaces"),
    ("some [ / thing / ]else", "some-thing-else"),
    ("some-thing.else_new", "some-thing.else_new"),
])
def test_sanitise(raw: str, clean: str) -> None:
    assert sanitise(raw) == clean


@pytest.mark.parametrize(("config", "replicas", "strategy", "product"), [
    pytest.param("", "1", "none", "NVIDIA-A100-SXM4-40GB", id="no sharing"),
    pytest.param(ts(), "2", "time-slicing", "NVIDIA-A100-SXM4-40GB-SHARED", id="time-slicing x2"),
    pytest.param(mps(), "2", "mps", "NVIDIA-A100-SXM4-40GB-SHARED", id="mps x2"),
    pytest.param(ts(rename="gpu.shared"), "2", "time-slicing", "NVIDIA-A100-SXM4-40GB", id="renamed: no suffix"),
    pytest.param(mps(replicas=1), "1", "none", "NVIDIA-A100-SXM4-40GB", id="one MPS replica is not sharing"),
])
def test_whole_gpu_resource_labels(config: str, replicas: str, strategy: str, product: str) -> None:
    labels = resource(labels_for(config, a100(0), a100(1)), "gpu")
    assert labels == {"count": "2", "replicas": replicas, "sharing-strategy": strategy, "product": product,
                      "memory": "40960", "family": "ampere", "compute.major": "8", "compute.minor": "0"}


def test_a_sharing_entry_for_another_resource_changes_nothing() -> None:
    # Upstream's `nvidia.com/not-gpu` case: here a MIG profile the node does not have under mixed.
    shared = labels_for(ts("nvidia.com/mig-3g.20gb"), a100(0), mig_strategy="mixed")
    assert shared == labels_for("", a100(0), mig_strategy="mixed")


@pytest.mark.parametrize(("config", "product", "replicas"), [
    pytest.param("", "NVIDIA-A100-SXM4-40GB-MIG-1g.5gb", "1", id="not shared"),
    pytest.param(ts("nvidia.com/mig-1g.5gb"), "NVIDIA-A100-SXM4-40GB-MIG-1g.5gb-SHARED", "2", id="shared"),
    pytest.param(ts("nvidia.com/mig-1g.5gb", rename="mig-small"), "NVIDIA-A100-SXM4-40GB-MIG-1g.5gb", "2",
                 id="shared and renamed"),
])
def test_mig_resource_labels_under_mixed(config: str, product: str, replicas: str) -> None:
    gpu = mig_gpu(0, mig("MIG-a", 0), mig("MIG-b", 1, gi=8), mig("MIG-c", 2, "2g.10gb", gi=3, memory=9856))
    labels = labels_for(config, gpu, mig_strategy="mixed")
    assert resource(labels, "mig-1g.5gb") == {
        "count": "2", "replicas": replicas, "sharing-strategy": "time-slicing" if replicas == "2" else "none",
        "product": product, "memory": "4864", "multiprocessors": "14", "slices.gi": "1", "slices.ci": "1",
        "engines.copy": "1", "engines.decoder": "0", "engines.encoder": "0", "engines.jpeg": "0", "engines.ofa": "0"}
    assert resource(labels, "mig-2g.10gb")["product"] == "NVIDIA-A100-SXM4-40GB-MIG-2g.10gb"
    assert resource(labels, "mig-2g.10gb")["multiprocessors"] == "28"
    # The MIG-enabled GPU itself: labelled under nvidia.com/gpu without sharing (replicas 0), as upstream.
    assert resource(labels, "gpu") == {"count": "1", "replicas": "0", "sharing-strategy": "none",
                                       "product": "NVIDIA-A100-SXM4-40GB", "memory": "40960", "family": "ampere",
                                       "compute.major": "8", "compute.minor": "0"}
    assert labels["nvidia.com/mig.strategy"] == "mixed"


def test_a_plus_profile_is_named_with_a_dot() -> None:
    labels = labels_for("", mig_gpu(0, mig("MIG-a", 0, "1g.10gb+me", memory=9856)), mig_strategy="mixed")
    assert labels["nvidia.com/mig-1g.10gb.me.product"] == "NVIDIA-A100-SXM4-40GB-MIG-1g.10gb.me"
    assert labels["nvidia.com/mig-1g.10gb.me.engines.ofa"] == "1"


# -- internal/lm/mig-strategy_test.go --------------------------------------------------------------------------------


def test_single_strategy_labels_the_mig_devices_as_gpu() -> None:
    labels = labels_for(ts(), mig_gpu(0, mig("MIG-a", 0), mig("MIG-b", 1, gi=8)),
                        mig_gpu(1, mig("MIG-c", 0)), mig_strategy="single")
    assert resource(labels, "gpu") == {
        "count": "3", "replicas": "2", "sharing-strategy": "time-slicing",
        "product": "NVIDIA-A100-SXM4-40GB-MIG-1g.5gb-SHARED", "memory": "4864", "multiprocessors": "14",
        "slices.gi": "1", "slices.ci": "1", "engines.copy": "1", "engines.decoder": "0", "engines.encoder": "0",
        "engines.jpeg": "0", "engines.ofa": "0",
        # From the whole GPUs: upstream merges the MIG labels over them.
        "family": "ampere", "compute.major": "8", "compute.minor": "0"}
    assert labels["nvidia.com/mig.strategy"] == "single"


@pytest.mark.parametrize("gpus", [
    pytest.param((mig_gpu(0, mig("MIG-a", 0)), a100(1)), id="MIG and whole GPUs"),
    pytest.param((mig_gpu(0, mig("MIG-a", 0), mig("MIG-b", 1, "2g.10gb", gi=3, memory=9856)),),
                 id="two profiles"),
    pytest.param((mig_gpu(0),), id="MIG enabled but empty"),
])
def test_single_strategy_on_a_node_it_cannot_serve_gets_the_invalid_set(gpus: tuple[Gpu, ...]) -> None:
    inventory = NodeInventory("580.82.07", 13000, gpus)
    # The plan is refused for such a node; the labels say why to a scheduler, as upstream's do.
    labels = node_labels(Plan(()), inventory, mig_strategy="single", host=HOST)
    assert {k: v for k, v in resource(labels, "gpu").items() if k not in ("family", "compute.major",
                                                                           "compute.minor")} == {
        "product": "NVIDIA-A100-SXM4-40GB-MIG-INVALID", "count": "0", "replicas": "0", "sharing-strategy": "",
        "memory": "0"}


def test_none_strategy_shares_whole_gpus_and_not_the_mig_enabled_ones() -> None:
    labels = labels_for(ts(replicas=4), a100(0), mig_gpu(1, mig("MIG-a", 0)))
    # Whole GPUs of the same product override the MIG-enabled one's labels; the count is both.
    assert resource(labels, "gpu")["count"] == "2"
    assert resource(labels, "gpu")["replicas"] == "4"
    assert "nvidia.com/mig.strategy" not in labels
    assert not any(k.startswith("nvidia.com/mig-") for k in labels)


# -- internal/lm/nvml_test.go ------------------------------------------------------------------------------------------


def _mps_plan(replicas: int, gpu: Gpu) -> tuple[Plan, NodeInventory]:
    devices = tuple(Device(f"{gpu.uuid}::{n}", gpu.uuid, str(gpu.index), gpu.uuid, gpu.index, ("/dev/nvidia0",),
                           replica=n if replicas > 1 else None) for n in range(replicas))
    return Plan((Resource("nvidia.com/gpu", devices, Sharing.MPS),)), NodeInventory("580.82.07", 13000, (gpu,))


@pytest.mark.parametrize(("config", "capable"), [
    pytest.param("", "false", id="no sharing"),
    pytest.param("sharing: {}\n", "false", id="empty sharing"),
    pytest.param(ts(), "false", id="time-slicing"),
    pytest.param(mps(replicas=1), "false", id="mps with one replica"),
    pytest.param(mps(), "true", id="mps x2 without MIG"),
])
def test_mps_capable(config: str, capable: str) -> None:
    assert labels_for(config, a100(0))["nvidia.com/mps.capable"] == capable


def test_mps_sharing_with_a_mig_enabled_gpu_cannot_be_labelled() -> None:
    plan, inventory = _mps_plan(2, mig_gpu(0, mig("MIG-a", 0)))
    with pytest.raises(LabelError, match="MPS sharing is not supported for mig devices"):
        node_labels(plan, inventory, mig_strategy="none", host=HOST)
    plan, inventory = _mps_plan(1, mig_gpu(0, mig("MIG-a", 0)))
    assert node_labels(plan, inventory, mig_strategy="none", host=HOST)["nvidia.com/mps.capable"] == "false"


@pytest.mark.parametrize(("gpus", "capable"), [
    pytest.param((a100(0, mig_capable=False), a100(1)), "true", id="one capable is enough"),
    pytest.param((a100(0, mig_capable=False),), "false", id="none capable"),
])
def test_mig_capable(gpus: tuple[Gpu, ...], capable: str) -> None:
    assert labels_for("", *gpus)["nvidia.com/mig.capable"] == capable


@pytest.mark.parametrize(("classes", "mode"), [
    pytest.param((PCI_CLASS_3D, PCI_CLASS_3D), "compute", id="3D controller"),
    pytest.param((PCI_CLASS_VGA,), "graphics", id="VGA controller"),
    pytest.param((0x068000,), "unknown", id="a bridge"),
    pytest.param((PCI_CLASS_3D, PCI_CLASS_VGA), "unknown", id="mixed classes"),
    pytest.param((None,), "unknown", id="class unreadable"),
])
def test_gpu_mode(classes: tuple[int | None, ...], mode: str) -> None:
    gpus = [a100(i) for i in range(len(classes))]
    assert gpu_mode(gpus, {g.uuid: c for g, c in zip(gpus, classes, strict=True) if c is not None}) == mode


def test_mig_enabled_gpus_count_as_compute() -> None:
    assert gpu_mode([mig_gpu(0, mig("MIG-a", 0))], {"GPU-0": PCI_CLASS_VGA}) == "compute"


@pytest.mark.parametrize(("cc", "name"), [
    ((6, 0), "pascal"), ((7, 0), "volta"), ((7, 5), "turing"), ((8, 0), "ampere"), ((8, 6), "ampere"),
    ((8, 9), "ada-lovelace"), ((9, 0), "hopper"), ((10, 0), "blackwell"), ((12, 0), "blackwell"),
    ((4, 0), "undefined"),
])
def test_family(cc: tuple[int, int], name: str) -> None:
    assert family(*cc) == name


def test_versions_and_a_driver_version_gfd_cannot_parse() -> None:
    labels = labels_for("", a100(0))
    assert resource(labels, "cuda.driver-version") == {"major": "580", "minor": "82", "revision": "07",
                                                       "full": "580.82.07"}
    odd = node_labels(Plan(()), NodeInventory("580", 12080, (a100(0),)), mig_strategy="none", host=HOST)
    assert not any(k.startswith("nvidia.com/cuda.driver") for k in odd)
    assert odd["nvidia.com/cuda.runtime-version.full"] == "12.8"


def test_no_gpus_no_labels_but_the_timestamp() -> None:
    empty = NodeInventory("580.82.07", 13000, ())
    assert node_labels(Plan(()), empty, mig_strategy="none", host=HOST, timestamp=7) == {
        "nvidia.com/gfd.timestamp": "7"}
    assert node_labels(Plan(()), empty, mig_strategy="none", host=HOST) == {}


def test_labels_do_not_depend_on_the_inventory_order() -> None:
    gpus = [a100(0), a100(1, name="NVIDIA H100 80GB HBM3", compute_capability="9.0"), a100(2)]
    expected = labels_for(ts(), *gpus)
    for seed in range(5):
        random.Random(seed).shuffle(gpus)
        assert labels_for(ts(), *gpus) == expected
    # Two products: the lowest-index GPU's wins (upstream picks in map order).
    assert expected["nvidia.com/gpu.product"] == "NVIDIA-A100-SXM4-40GB-SHARED"
    assert expected["nvidia.com/gpu.count"] == "2"


# -- beyond upstream: MPS slices carry their slice's memory (upstream issue #535) ----------------------------------


def test_mps_slices_are_labelled_with_their_memory() -> None:
    config = ("sharing:\n  mps:\n    resources:\n"
              "      - name: nvidia.com/gpu\n        rename: gpu-10gb\n        memoryGB: 10\n        replicas: 2\n"
              "      - name: nvidia.com/gpu\n        rename: gpu-20gb\n        memoryGB: 20\n        replicas: 1\n")
    labels = labels_for(config, a100(0), a100(1))
    assert resource(labels, "gpu-10gb") == {"count": "2", "replicas": "2", "sharing-strategy": "mps",
                                            "product": "NVIDIA-A100-SXM4-40GB", "memory": "10240"}
    assert resource(labels, "gpu-20gb") == {"count": "2", "replicas": "1", "sharing-strategy": "mps",
                                            "product": "NVIDIA-A100-SXM4-40GB", "memory": "20480"}
    assert resource(labels, "gpu")["memory"] == "40960"
    assert labels["nvidia.com/mps.capable"] == "true"


# -- the tables: the default simulated node, time-sliced and MPS ------------------------------------------------


@pytest.fixture(scope="module")
def default_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[NodeInventory, HostFacts]]:
    """The default simulated node read the way the daemon reads it: the fake library, pynvml, the adapter."""
    adapter.shutdown()
    handle = sim.activate(sim.load_node(sim.default_node_path()), tmp_path_factory.mktemp("node"))
    adapter.init()
    try:
        inventory = adapter.read_inventory(handle.host_root, handle.host_root)
        yield inventory, adapter.read_host_facts(handle.host_root, Path("/sys/class/dmi/id/product_name"),
                                                 inventory.gpus)
    finally:
        adapter.shutdown()


DEFAULT_NODE = {
    "nvidia.com/cuda.driver-version.full": "580.82.07",
    "nvidia.com/cuda.driver-version.major": "580",
    "nvidia.com/cuda.driver-version.minor": "82",
    "nvidia.com/cuda.driver-version.revision": "07",
    "nvidia.com/cuda.driver.major": "580",
    "nvidia.com/cuda.driver.minor": "82",
    "nvidia.com/cuda.driver.rev": "07",
    "nvidia.com/cuda.runtime-version.full": "13.0",
    "nvidia.com/cuda.runtime-version.major": "13",
    "nvidia.com/cuda.runtime-version.minor": "0",
    "nvidia.com/cuda.runtime.major": "13",
    "nvidia.com/cuda.runtime.minor": "0",
    "nvidia.com/gfd.timestamp": "1765000000",
    "nvidia.com/gpu.compute.major": "8",
    "nvidia.com/gpu.compute.minor": "0",
    "nvidia.com/gpu.count": "4",
    "nvidia.com/gpu.family": "ampere",
    "nvidia.com/gpu.machine": "Simulated-GPU-Node",
    "nvidia.com/gpu.memory": "40960",
    "nvidia.com/gpu.mode": "compute",
    "nvidia.com/gpu.product": "NVIDIA-A100-SXM4-40GB",
    "nvidia.com/gpu.replicas": "1",
    "nvidia.com/gpu.sharing-strategy": "none",
    "nvidia.com/mig.capable": "true",
    "nvidia.com/mps.capable": "false",
}
TIME_SLICED = DEFAULT_NODE | {
    "nvidia.com/gpu.replicas": "4",
    "nvidia.com/gpu.sharing-strategy": "time-slicing",
    "nvidia.com/gpu.product": "NVIDIA-A100-SXM4-40GB-SHARED",
}
MPS = DEFAULT_NODE | {
    "nvidia.com/gpu.replicas": "4",
    "nvidia.com/gpu.sharing-strategy": "mps",
    "nvidia.com/gpu.product": "NVIDIA-A100-SXM4-40GB-SHARED",
    "nvidia.com/mps.capable": "true",
}


@pytest.mark.parametrize(("config", "expected"), [
    pytest.param("", DEFAULT_NODE, id="default node"),
    pytest.param(ts(replicas=4), TIME_SLICED, id="time-sliced x4"),
    pytest.param(mps(replicas=4), MPS, id="MPS x4"),
])
def test_label_table_for_the_default_simulated_node(default_node: tuple[NodeInventory, HostFacts], config: str,
                                                    expected: dict[str, str]) -> None:
    inventory, facts = default_node
    settings = resolve({"mps_root": ROOT}, {}, parse_config(config, "c.yaml"), config_source="c.yaml")
    labels = node_labels(build_plan(inventory, settings), inventory, mig_strategy="none", host=facts,
                         timestamp=1765000000)
    assert labels == expected
    assert list(labels) == sorted(labels)


# -- the NFD local feature file ----------------------------------------------------------------------------------------


def test_features_file_is_replaced_atomically(tmp_path: Path) -> None:
    path = tmp_path / "features.d" / "nvdp"
    assert write_features_file(path, {"nvidia.com/gpu.replicas": "4", "nvidia.com/mps.capable": "false"})
    assert path.read_text() == "nvidia.com/gpu.replicas=4\nnvidia.com/mps.capable=false\n"
    assert oct(path.stat().st_mode & 0o777) == oct(0o644)
    inode = path.stat().st_ino
    # Unchanged labels: no write, so NFD sees no event.
    assert not write_features_file(path, {"nvidia.com/mps.capable": "false", "nvidia.com/gpu.replicas": "4"})
    assert path.stat().st_ino == inode
    assert write_features_file(path, {"nvidia.com/gpu.replicas": "2"})
    assert path.read_text() == "nvidia.com/gpu.replicas=2\n"
    assert path.stat().st_ino != inode  # a new file renamed over the old one, never rewritten in place
    assert os.listdir(path.parent) == ["nvdp"]  # no temporary left behind


def test_render_is_sorted_key_value_lines() -> None:
    assert render_features({"b": "2", "a": "1"}) == "a=1\nb=2\n"


# -- docs/labels.md stays true -----------------------------------------------------------------------------------------

DOCS = Path(__file__).resolve().parents[1] / "docs" / "labels.md"


def _documented_patterns() -> list[re.Pattern[str]]:
    """The label names of the table in docs/labels.md, `<res>` as any resource, `.x` short for the row's first name
    with its last components replaced."""
    text = DOCS.read_text()
    table = text[text.index("| Label | Value |"):text.index("\n\n", text.index("| Label | Value |"))]
    patterns = []
    for row in table.splitlines()[2:]:
        names = re.findall(r"`([^`]+)`", row.split("|")[1])
        first = names[0]
        for name in names:
            if name.startswith("."):
                name = first.rsplit(".", name.count("."))[0] + name
            patterns.append(re.compile(re.escape(name).replace(re.escape("<res>"), r"[a-z0-9.-]+")))
    return patterns


@pytest.mark.parametrize(("config", "gpus", "strategy"), [
    pytest.param(ts(), (a100(0),), "none", id="time-sliced"),
    pytest.param("sharing:\n  mps:\n    resources:\n      - name: nvidia.com/gpu\n        rename: gpu-10gb\n"
                 "        memoryGB: 10\n        replicas: 2\n", (a100(0),), "none", id="MPS slices"),
    pytest.param("", (mig_gpu(0, mig("MIG-a", 0, "1g.10gb+me", memory=9856)), a100(1)), "mixed", id="mixed"),
    pytest.param("", (mig_gpu(0, mig("MIG-a", 0)),), "single", id="single"),
])
def test_every_label_is_in_the_docs_table(config: str, gpus: tuple[Gpu, ...], strategy: str) -> None:
    patterns = _documented_patterns()
    labels = labels_for(config, *gpus, mig_strategy=strategy, timestamp=1)
    undocumented = [k for k in labels if not any(p.fullmatch(k) for p in patterns)]
    assert not undocumented


def test_the_docs_name_only_real_flags_and_the_real_defaults() -> None:
    from nvdp.core.config.settings import OPTIONS, OPTIONS_BY_DEST
    from nvdp.k8s.nodefeatures import NAME_PREFIX, OWNED_ANNOTATION

    text = DOCS.read_text()
    flags = {f for o in OPTIONS for f in o.flags}
    envs = {e for o in OPTIONS for e in o.envs}
    # GFD's flags nvdp does not take are named as such.
    mentioned = set(re.findall(r"`(--[a-z-]+)", text)) - {"--oneshot", "--sleep-interval"}
    assert mentioned and mentioned <= flags
    for env in ("LABEL_SINK", "GFD_USE_NODE_FEATURE_API", "USE_NODE_FEATURE_API", "GFD_OUTPUT_FILE", "LABEL_INTERVAL",
                "GFD_NO_TIMESTAMP", "POD_NAME", "POD_NAMESPACE"):
        assert env in envs and env in text, env
    assert f"default `{OPTIONS_BY_DEST['label_interval'].default:g}s`" in text
    assert f"default `{OPTIONS_BY_DEST['machine_type_file'].default}`" in text
    assert f"annotation `{OWNED_ANNOTATION}`" in text and f"{NAME_PREFIX}-<node>" in text


def test_with_several_products_the_lowest_index_whole_gpu_wins() -> None:
    h100 = {"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0", "memory_mib": 81559}
    labels = labels_for("", mig_gpu(0, mig("MIG-a", 0)), a100(1, **h100), a100(2))
    assert (labels["nvidia.com/gpu.product"], labels["nvidia.com/gpu.count"]) == ("NVIDIA-H100-80GB-HBM3", "1")
    assert labels["nvidia.com/gpu.family"] == "hopper"
    only_mig = labels_for("", mig_gpu(0, mig("MIG-a", 0)), mig_gpu(1, mig("MIG-b", 0)), mig_strategy="mixed")
    assert (only_mig["nvidia.com/gpu.count"], only_mig["nvidia.com/gpu.replicas"]) == ("2", "0")
