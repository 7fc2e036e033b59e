"""Allocate and GetPreferredAllocation, fuzzed: random ID lists (unknown, duplicated, empty, long, odd Unicode) and
raw protobuf bytes (invalid UTF-8, wrong wire types, truncations) from a client that bypasses every encoder.

Two layers:

- the pure functions (`allocate`, `preferred_allocation`) against an independent oracle, for most examples;
- the real daemon on a simulated node, through the grpcio kubelet emulator: each answer must equal what the pure
  function gives for the server's own `ServingContext` (so the wire adds nothing and loses nothing), and after every
  example a valid Allocate must still succeed: the server keeps serving.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from nvdp.core.config.load import parse_config
from nvdp.core.config.settings import Settings, resolve
from nvdp.core.inventory import Gpu, Link, NodeInventory
from nvdp.core.plan.allocate import MAX_IDS_NAMED, AllocateOptions, AllocationError, allocate, show_id
from nvdp.core.plan.build import build_plan
from nvdp.core.plan.model import Resource
from nvdp.core.plan.preferred import PreferredAllocationError, preferred_allocation
from nvdp.kubelet.api import v1beta1 as api
from nvdp.kubelet.plugin_server import ServingContext
from nvdp.testing.kubelet_emulator import KubeletEmulator
from tests.fuzz._settings import fuzz_settings
from tests.harness import daemon, wait_for
from tests.helpers import gpu, write_node

# Long by design (hundreds of examples each): the slow lane, which CI runs (docs/reliability.md).
pytestmark = pytest.mark.slow

# --- a pure plan: whole GPUs, time-sliced replicas and MPS slices ------------------------------------------------


def _uuid(i: int) -> str:
    return f"GPU-00000000-aaaa-bbbb-cccc-0000000000{i:02d}"


def _gpu(i: int) -> Gpu:
    return Gpu(index=i, uuid=_uuid(i), name="NVIDIA A100-SXM4-40GB", memory_mib=40960, minor=i,
               pci_bus_id=f"00000000:{16 + i:02x}:00.0", compute_capability="8.0", numa_node=i // 2)


INVENTORY = NodeInventory("580.82.07", 13000, tuple(_gpu(i) for i in range(6)),
                          links={(0, 1): Link(nvlinks=12), (2, 3): Link(pcie_level=10), (4, 5): Link(nvlinks=2)},
                          control_devices=("/dev/nvidiactl", "/dev/nvidia-uvm"))
CONFIG = parse_config("""
sharing:
  timeSlicing:
    resources:
      - {name: gpu, rename: gpu-shared, replicas: 3, devices: [0, 1]}
  mps:
    failRequestsGreaterThanOne: false
    resources:
      - {name: gpu, rename: gpu-10gb, memoryGB: 10, replicas: 2, devices: ["2"]}
      - {name: gpu, rename: gpu-quarter, replicas: 4, devices: ["3"]}
""", "fuzz.yaml")
PLAN = build_plan(INVENTORY, resolve({"mps_root": "/run/nvidia/mps"}, {}, CONFIG, "fuzz.yaml"))
RESOURCES = {r.name: r for r in PLAN.resources}
FAIL_GT_ONE = Resource("nvidia.com/gpu-shared", RESOURCES["nvidia.com/gpu-shared"].devices,
                       sharing=RESOURCES["nvidia.com/gpu-shared"].sharing, fail_requests_greater_than_one=True)
ALL_RESOURCES = (*RESOURCES.values(), FAIL_GT_ONE)
OPTIONS = st.builds(
    AllocateOptions,
    device_list_strategy=st.sampled_from([("envvar",), ("volume-mounts",), ("envvar", "volume-mounts"),
                                          ("cdi-cri",), ("cdi-annotations",), ("envvar", "cdi-annotations"),
                                          ("volume-mounts", "cdi-cri", "cdi-annotations")]),
    device_id_strategy=st.sampled_from(["uuid", "index"]),
    pass_device_specs=st.booleans(),
    dev_root=st.sampled_from(["/", "/run/nvidia/driver"]),
    control_devices=st.just(("/dev/nvidiactl",)),
    gds_enabled=st.booleans(),
    imex_channels=st.sampled_from([(), (0,)]),
)

#: IDs a client might send that are not devices: near misses, separators, path tricks, odd Unicode, long ones.
NOT_IDS = ("", " ", "GPU-", _uuid(0) + " ", _uuid(0).lower(), _uuid(0) + "::", _uuid(0) + "::99", _uuid(0) + "::-1",
           _uuid(2) + "::10::9", "0", "all", "none", "void", ",", _uuid(0) + "," + _uuid(1), "../../etc/passwd",
           "/dev/nvidia0", "\x00", "\n", "\u202e", "🙂", "GPU-" + "a" * 300)


def ids_for(resource: Resource) -> st.SearchStrategy[list[str]]:
    known = st.sampled_from([d.id for d in resource.devices])
    unknown = st.one_of(st.sampled_from(NOT_IDS), st.text(max_size=40))
    return st.lists(st.one_of(known, known, known, unknown), max_size=12)


def _dedupe(items: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(items))


def check_allocate(resource: Resource, ids: list[str], options: AllocateOptions) -> None:
    """Call `allocate` and check its answer against what the request deserves, worked out independently."""
    unknown = [i for i in ids if resource.device(i) is None]
    devices = [resource.device(i) for i in ids if resource.device(i) is not None]
    try:
        response = allocate(resource, ids, options)
    except AllocationError as exc:
        message = str(exc)
        assert resource.name in message, message
        if not ids:
            assert "no devices requested" in message
        elif unknown:
            assert all(show_id(u) in message for u in list(dict.fromkeys(unknown))[:MAX_IDS_NAMED]), message
        elif resource.fail_requests_greater_than_one and len(ids) > 1:
            assert "maximum request size for shared resources is 1" in message
        else:
            gpus = {d.gpu_index for d in devices if d is not None and d.mps is not None}
            assert len(gpus) > 1 and "MPS slices of several GPUs" in message, message
        return
    assert ids and not unknown, f"accepted {ids!r}"
    assert not (resource.fail_requests_greater_than_one and len(ids) > 1)
    wanted = _dedupe([d.physical_id if options.device_id_strategy == "uuid" else d.index
                      for d in devices if d is not None])
    strategies = set(options.device_list_strategy)
    names = (*response.cdi_devices, *response.cdi_annotation_names)
    if strategies & {"cdi-cri", "cdi-annotations"}:
        gpus = [n.removeprefix("k8s.device-plugin.nvidia.com/gpu=") for n in names if "/gpu=" in n]
        assert gpus == wanted * len(strategies & {"cdi-cri", "cdi-annotations"}), names
        assert ("k8s.device-plugin.nvidia.com/imex-channel=0" in names) == bool(options.imex_channels)
    else:
        assert not names
    if strategies <= {"cdi-cri", "cdi-annotations"}:
        # CDI alone: the runtime must learn the devices from the CDI names only.
        assert "NVIDIA_VISIBLE_DEVICES" not in response.envs and not response.device_specs
        assert not [m for m in response.mounts if m.container_path.startswith("/var/run/nvidia-container-devices")]
    elif "volume-mounts" in options.device_list_strategy:
        assert response.envs["NVIDIA_VISIBLE_DEVICES"] == "/var/run/nvidia-container-devices"
        listed = [m.container_path.rsplit("/", 1)[1] for m in response.mounts
                  if m.container_path.startswith("/var/run/nvidia-container-devices/")
                  and not m.container_path.startswith("/var/run/nvidia-container-devices/imex/")]
        assert listed == wanted
    else:
        assert response.envs["NVIDIA_VISIBLE_DEVICES"] == ",".join(wanted)
    mps = [d for d in devices if d is not None and d.mps is not None]
    if mps:
        assert response.envs["CUDA_MPS_PIPE_DIRECTORY"] == mps[0].mps.pipe_dir  # type: ignore[union-attr]
        assert 1 <= int(response.envs["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"]) <= 100
    paths = [p.container_path for p in response.device_specs]
    assert len(paths) == len(set(paths)), "a device node twice"
    if options.pass_device_specs and not strategies <= {"cdi-cri", "cdi-annotations"}:
        assert set(paths) >= {p for d in devices if d is not None for p in d.paths}


def check_preferred(resource: Resource, available: list[str], must: list[str], size: int, policy: str) -> None:
    try:
        chosen = preferred_allocation(resource, INVENTORY, available, must, size, policy)
    except PreferredAllocationError as exc:
        message = str(exc)
        unknown = [i for i in (*available, *must) if resource.device(i) is None]
        required = _dedupe(must)
        pool = [i for i in _dedupe(available) if i not in required]
        assert unknown or len(required) > size or len(pool) < size - len(required), message
        # must_include is looked up first: its unknown IDs are named, else those of available.
        named = [i for i in must if resource.device(i) is None] or unknown
        if named:
            shown = list(dict.fromkeys(named))[:MAX_IDS_NAMED]  # the first 10 distinct ones, as show_id shows them
            assert resource.name in message and all(show_id(u) in message for u in shown), message
        return
    if size <= 0:
        assert chosen == []
        return
    assert len(chosen) == size and len(set(chosen)) == size, chosen
    assert chosen[: len(_dedupe(must))] == _dedupe(must), "must_include first, in order"
    assert set(chosen) <= set(available) | set(must)


@fuzz_settings(max_examples=600, deadline_ms=500)
@given(st.sampled_from(ALL_RESOURCES).flatmap(lambda r: st.tuples(st.just(r), ids_for(r))), OPTIONS)
def test_allocate_pure(request: tuple[Resource, list[str]], options: AllocateOptions) -> None:
    check_allocate(*request, options)


@fuzz_settings(max_examples=600, deadline_ms=500)
@given(st.sampled_from(ALL_RESOURCES).flatmap(lambda r: st.tuples(st.just(r), ids_for(r), ids_for(r))),
       st.one_of(st.integers(-3, 16), st.sampled_from([2**31 - 1, -(2**31)])),
       st.sampled_from(["distributed", "packed"]))
def test_preferred_allocation_pure(request: tuple[Resource, list[str], list[str]], size: int, policy: str) -> None:
    resource, available, must = request
    check_preferred(resource, available, must, size, policy)


def test_long_requests_pure() -> None:
    # The longest request a kubelet could send (every device) and a long one of duplicates: answered, quickly.
    for resource in ALL_RESOURCES:
        ids = [d.id for d in resource.devices]
        check_allocate(resource, ids, AllocateOptions())
        check_allocate(resource, ids * 500, AllocateOptions())
        check_preferred(resource, ids * 50, [], len(ids), "distributed")


# --- the same through gRPC, against the running daemon -----------------------------------------------------------

SIM_CONFIG = """
sharing:
  timeSlicing:
    resources:
      - {name: gpu, rename: gpu-shared, replicas: 3, devices: [0]}
"""


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field, written by hand so that nothing checks the payload."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _raw_method(kubelet: KubeletEmulator, resource: str, name: str, response: type) -> Any:
    channel = kubelet.endpoint(resource).channel  # type: ignore[union-attr]
    return channel.unary_unary(f"/v1beta1.DevicePlugin/{name}", request_serializer=lambda b: b,
                               response_deserializer=response.parse)


#: Status codes a malformed request may get today. INVALID_ARGUMENT is right; UNKNOWN ("Internal Server Error") is
#: what grpclib answers when betterproto2 cannot decode the message: see test_non_utf8_device_id_is_invalid_argument.
MALFORMED_CODES = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNKNOWN)


def _fuzz_over_grpc(kubelet: KubeletEmulator, contexts: dict[str, ServingContext]) -> dict[str, int]:
    """Runs in a worker thread (grpcio is blocking) while the daemon serves on the trio side."""
    counts = {"allocate": 0, "preferred": 0, "raw": 0}
    probes = {name: [context.resource.devices[0].id] for name, context in contexts.items()}

    def still_serving(name: str) -> None:
        response = kubelet.allocate(name, probes[name])
        assert response.container_responses[0].envs["NVIDIA_VISIBLE_DEVICES"]

    def strategy() -> st.SearchStrategy[tuple[str, list[str], list[str]]]:
        return st.sampled_from(sorted(contexts)).flatmap(
            lambda n: st.tuples(st.just(n), ids_for(contexts[n].resource), ids_for(contexts[n].resource)))

    @fuzz_settings(max_examples=120, deadline_ms=3000)
    @given(strategy(), st.integers(-2, 8))
    def allocate_and_prefer(request: tuple[str, list[str], list[str]], size: int) -> None:
        name, ids, must = request
        context = contexts[name]
        try:
            expected: object = allocate(context.resource, ids, context.options)
        except AllocationError as exc:
            expected = exc
        try:
            got = kubelet.allocate(name, ids).container_responses[0]
            assert not isinstance(expected, Exception), f"served {ids!r}; the pure function says {expected}"
            assert dict(got.envs) == expected.envs  # type: ignore[attr-defined]
            assert [m.container_path for m in got.mounts] == [m.container_path for m in expected.mounts]  # type: ignore[attr-defined]
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT, (exc.code(), exc.details())
            assert exc.details() == str(expected), "the kubelet must see the same precise message"
        counts["allocate"] += 1
        try:
            want: object = preferred_allocation(context.resource, context.inventory, ids, must, size,
                                                context.allocation_policy)
        except PreferredAllocationError as exc:
            want = exc
        try:
            assert kubelet.preferred_allocation(name, ids, must, size) == want
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT and exc.details() == str(want)
        counts["preferred"] += 1
        still_serving(name)

    @fuzz_settings(max_examples=120, deadline_ms=3000)
    @given(st.sampled_from(sorted(contexts)), st.sampled_from(["Allocate", "GetPreferredAllocation"]),
           st.one_of(
               # One container request holding raw ID bytes: invalid UTF-8 mostly.
               st.lists(st.binary(max_size=40), max_size=4).map(
                   lambda ids: _field(1, b"".join(_field(1, i) for i in ids))),
               # Anything at all: truncated varints, wrong wire types, deep groups.
               st.binary(max_size=64)))
    def raw_bytes(name: str, method: str, body: bytes) -> None:
        response_type = api.AllocateResponse if method == "Allocate" else api.PreferredAllocationResponse
        try:
            _raw_method(kubelet, name, method, response_type)(body, timeout=5)
        except grpc.RpcError as exc:
            assert exc.code() in MALFORMED_CODES, (exc.code(), exc.details())
        counts["raw"] += 1
        still_serving(name)

    allocate_and_prefer()
    raw_bytes()
    return counts


async def test_requests_over_grpc_keep_the_server_serving(tmp_path: Path, kubelet: KubeletEmulator) -> None:
    node = write_node(tmp_path / "node.yaml", [gpu(i) for i in range(3)], nvlinks=[[1, 2, 12]])
    settings = Settings(simulate=node, kubelet_socket=kubelet.socket, config=parse_config(SIM_CONFIG, "fuzz.yaml"),
                        device_list_strategy=("envvar", "volume-mounts"), pass_device_specs=True)
    async with daemon(settings) as servers:
        assert await wait_for(kubelet, lambda k: k.resources() == ["nvidia.com/gpu", "nvidia.com/gpu-shared"])
        contexts = {name: running.context for name, running in servers.running.items()}
        counts = await trio.to_thread.run_sync(_fuzz_over_grpc, kubelet, contexts)
        # Every stream is still up: no request broke a ListAndWatch either.
        assert kubelet.broken_streams == {}
    assert counts["allocate"] >= 100 and counts["raw"] >= 100, counts


# --- bugs found while writing this suite (strict: an XPASS means it was fixed; drop the marker then) -------------


async def test_non_utf8_device_id_is_invalid_argument(two_gpu_node: Path, kubelet: KubeletEmulator) -> None:
    async with daemon(Settings(simulate=two_gpu_node, kubelet_socket=kubelet.socket)):
        assert await wait_for(kubelet, lambda k: bool(k.devices("nvidia.com/gpu")))

        def call() -> grpc.StatusCode:
            method = _raw_method(kubelet, "nvidia.com/gpu", "Allocate", api.AllocateResponse)
            with pytest.raises(grpc.RpcError) as error:
                method(_field(1, _field(1, b"\xff\xfeGPU")), timeout=5)
            return error.value.code()  # type: ignore[no-any-return]

        assert await trio.to_thread.run_sync(call) == grpc.StatusCode.INVALID_ARGUMENT


def test_many_unknown_ids_get_a_bounded_error() -> None:
    resource = RESOURCES["nvidia.com/gpu"]
    ids = [f"GPU-unknown-{i:030d}" for i in range(20_000)]
    with pytest.raises(AllocationError) as error:
        allocate(resource, ids, AllocateOptions())
    assert len(str(error.value)) < 4096
    with pytest.raises(PreferredAllocationError) as preferred:
        preferred_allocation(resource, INVENTORY, ids, [], 1)
    assert len(str(preferred.value)) < 4096
