"""Allocate and GetPreferredAllocation on the wire: the responses encoded once per device set, the CDI fields of
`ContainerAllocation` in protobuf, and the unary send (headers, message and trailers in one socket write)."""

from __future__ import annotations

import asyncio
import re
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import grpclib.const
import h2.connection
import hyperframe.frame
import pytest

from nvdp.core.inventory import NodeInventory
from nvdp.core.plan.allocate import AllocateOptions, ContainerAllocation, DeviceSpec, Mount
from nvdp.core.plan.model import Device, Resource
from nvdp.kubelet import grpc_guard
from nvdp.kubelet.api import v1beta1 as api
from nvdp.kubelet.plugin_server import (
    CACHE_ENTRIES,
    CACHE_ENTRY_BYTES,
    CACHE_KEY_BYTES,
    Answer,
    BoundServer,
    EncodedContainer,
    ResponseCache,
    ServingContext,
    container_response,
    start_server,
    stop_server,
)
from tests.hostile_h2 import ALLOCATE, H2Client, allocate_request, grpc_frame, request_headers
from tests.hostile_h2 import Answer as H2Answer

T = TypeVar("T")
PREFERRED = "/v1beta1.DevicePlugin/GetPreferredAllocation"
UUID4 = r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"
CDI_KEY = re.compile(rf"^(.*)nvidia-device-plugin_({UUID4})$")
GPUS = [f"GPU-0000000{i}-aaaa-bbbb-cccc-000000000000" for i in range(4)]


def allocation(**changes: Any) -> ContainerAllocation:
    fields: dict[str, Any] = {
        "envs": {"NVIDIA_VISIBLE_DEVICES": "/var/run/nvidia-container-devices", "NVIDIA_MIG_MONITOR": "é"},
        "mounts": (Mount("/var/run/nvidia-container-devices/GPU-0", "/dev/null", read_only=True),),
        "device_specs": (DeviceSpec("/dev/nvidia0", "/run/nvidia/driver/dev/nvidia0", "rw"),),
        "annotations": {"existing": "kept"},
        "cdi_devices": ("k8s.device-plugin.nvidia.com/gpu=GPU-0", "k8s.device-plugin.nvidia.com/gpu=GPU-1"),
        "cdi_annotation_names": ("k8s.device-plugin.nvidia.com/gpu=GPU-0", "k8s.device-plugin.nvidia.com/gpu=GPU-1"),
    }
    fields.update(changes)
    return ContainerAllocation(**fields)


def decoded(answer: Answer) -> api.AllocateResponse:
    return api.AllocateResponse.parse(answer.encode())


def cdi_annotations(container: api.ContainerAllocateResponse) -> dict[str, str]:
    return {k: v for k, v in container.annotations.items() if CDI_KEY.match(k)}


# ------------------------------------------------------------------------------------------ the conversion


def test_every_field_of_a_container_allocation_reaches_protobuf() -> None:
    (container,) = decoded(Answer((EncodedContainer.of(allocation()),))).container_responses
    assert container.envs == allocation().envs
    assert [(m.container_path, m.host_path, m.read_only) for m in container.mounts] == [
        ("/var/run/nvidia-container-devices/GPU-0", "/dev/null", True)]
    assert [(d.container_path, d.host_path, d.permissions) for d in container.devices] == [
        ("/dev/nvidia0", "/run/nvidia/driver/dev/nvidia0", "rw")]
    assert [d.name for d in container.cdi_devices] == list(allocation().cdi_devices)
    (key, value), = cdi_annotations(container).items()
    assert CDI_KEY.match(key)[1] == "cdi.k8s.io/"  # type: ignore[index]
    assert value == "k8s.device-plugin.nvidia.com/gpu=GPU-0,k8s.device-plugin.nvidia.com/gpu=GPU-1"
    assert container.annotations["existing"] == "kept" and len(container.annotations) == 2


def test_each_response_gets_its_own_cdi_annotation_key() -> None:
    answer = Answer((EncodedContainer.of(allocation(cdi_annotation_prefix="example.com/")),))
    first, second = decoded(answer).container_responses[0], decoded(answer).container_responses[0]
    (key1, value1), = cdi_annotations(first).items()
    (key2, value2), = cdi_annotations(second).items()
    assert key1 != key2 and value1 == value2
    assert key1.startswith("example.com/nvidia-device-plugin_")
    assert (first.envs, first.mounts, first.cdi_devices) == (second.envs, second.mounts, second.cdi_devices)


def test_without_cdi_annotation_names_the_response_is_the_generated_encoding_reused() -> None:
    plain = allocation(cdi_annotation_names=(), cdi_devices=())
    answer = Answer((EncodedContainer.of(plain), EncodedContainer.of(plain)))
    expected = bytes(api.AllocateResponse(container_responses=[container_response(plain)] * 2))
    assert answer.encode() == expected
    assert answer.encode() is answer.encode()
    assert not cdi_annotations(decoded(answer).container_responses[0])


def test_several_containers_each_get_their_annotation() -> None:
    answer = Answer((EncodedContainer.of(allocation()), EncodedContainer.of(allocation(cdi_annotation_names=())),
                     EncodedContainer.of(allocation(cdi_annotation_names=("a/b=c",)))))
    containers = decoded(answer).container_responses
    assert [list(cdi_annotations(c).values()) for c in containers] == [
        ["k8s.device-plugin.nvidia.com/gpu=GPU-0,k8s.device-plugin.nvidia.com/gpu=GPU-1"], [], ["a/b=c"]]


def test_the_response_cache_is_bounded() -> None:
    cache = ResponseCache()
    small = Answer((EncodedContainer(b"\x0a\x01x"),))
    for i in range(CACHE_ENTRIES + 5):
        cache.put(b"%d" % i, small)
    assert len(cache) == CACHE_ENTRIES
    assert cache.get(b"0") is None and cache.get(b"%d" % (CACHE_ENTRIES + 4)) is small
    large = Answer((EncodedContainer(b"x" * (CACHE_ENTRY_BYTES + 1)),))
    cache.put(b"large", large)
    assert cache.get(b"large") is None


# ------------------------------------------------------------------------------------------ through a server


class Calls:
    """The calls a server reported (`CallObserver`): (method, ok)."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, bool]] = []

    def allocate_observed(self, resource: str, seconds: float, ok: bool = True) -> None:
        self.seen.append(("Allocate", ok))

    def preferred_observed(self, resource: str, seconds: float, ok: bool = True) -> None:
        self.seen.append(("GetPreferredAllocation", ok))


class Served:
    """A plugin server on an asyncio loop in a thread (as the daemon runs it), whose socket writes are counted."""

    def __init__(self, path: Path, options: AllocateOptions, ids: list[str] = GPUS) -> None:
        self.path = path
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="wire-test-loop")
        self.thread.start()
        devices = tuple(Device(id=gpu, physical_id=gpu, index=str(i), gpu_uuid=gpu, gpu_index=i,
                               paths=(f"/dev/nvidia{i}",)) for i, gpu in enumerate(ids))
        context = ServingContext(Resource("nvidia.com/gpu", devices), options, NodeInventory("1", 4, ()))
        self.calls = Calls()
        self.bound: BoundServer = self.run(lambda: start_server(context, {}, path, self.calls))
        self.writes = 0

    def run(self, coro: Callable[[], Awaitable[T]]) -> T:
        async def wrapped() -> T:
            return await coro()
        return asyncio.run_coroutine_threadsafe(wrapped(), self.loop).result(10)

    def count_writes(self) -> None:
        """From now on, count the writes to every open connection's socket."""
        async def wrap() -> None:
            for transport in self.bound.server.transports:
                write = transport.write  # type: ignore[attr-defined]

                def counted(data: Any, write: Any = write) -> None:
                    self.writes += 1
                    write(data)
                transport.write = counted  # type: ignore[attr-defined]
        self.run(wrap)

    @property
    def service(self) -> Any:
        return next(iter(self.bound.server._mapping.values())).func.__self__

    def close(self) -> None:
        try:
            self.run(lambda: stop_server(self.bound))
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()


@pytest.fixture
def served(short_dir: Path) -> Iterator[Served]:
    server = Served(short_dir / "gpu.sock", AllocateOptions(device_list_strategy=("envvar", "volume-mounts"),
                                                            pass_device_specs=True))
    try:
        yield server
    finally:
        server.close()


def preferred_request(available: list[str], size: int) -> bytes:
    return bytes(api.PreferredAllocationRequest(container_requests=[api.ContainerPreferredAllocationRequest(
        available_deviceIDs=available, must_include_deviceIDs=[], allocation_size=size)]))


def unframed(data: bytes) -> bytes:
    assert data[0] == 0 and int.from_bytes(data[1:5], "big") == len(data) - 5
    return data[5:]


def test_repeated_allocates_are_answered_from_the_cache_in_one_write_each(served: Served) -> None:
    with H2Client(served.path) as client:
        first = client.call(ALLOCATE, grpc_frame(allocate_request(GPUS[1], GPUS[2])))
        served.count_writes()
        again = [client.call(ALLOCATE, grpc_frame(allocate_request(GPUS[1], GPUS[2]))) for _ in range(3)]
    assert first.status == grpclib.const.Status.OK.value and first.ended
    assert [a.data for a in again] == [first.data] * 3
    assert all(a.headers[":status"] == "200" and a.headers["content-type"] == "application/grpc+proto"
               and a.trailers == {"grpc-status": "0"} for a in [first, *again])
    assert served.writes == 3
    assert len(served.service.allocate_cache) == 1
    assert served.calls.seen == [("Allocate", True)] * 4
    (container,) = api.AllocateResponse.parse(unframed(first.data)).container_responses
    assert container.envs["NVIDIA_VISIBLE_DEVICES"] == "/var/run/nvidia-container-devices"
    assert len(container.mounts) == 2 and len(container.devices) >= 2


def test_a_refused_allocate_is_not_cached_and_a_large_request_is_served_without_the_cache(served: Served) -> None:
    many = [GPUS[0]] * (CACHE_KEY_BYTES // len(GPUS[0]) + 1)
    with H2Client(served.path) as client:
        refused = [client.call(ALLOCATE, grpc_frame(allocate_request("GPU-unknown"))) for _ in range(2)]
        large = client.call(ALLOCATE, grpc_frame(allocate_request(*many)))
    assert [a.status for a in refused] == [grpclib.const.Status.INVALID_ARGUMENT.value] * 2
    assert all("GPU-unknown" in a.message for a in refused)
    assert large.status == grpclib.const.Status.OK.value
    assert len(served.service.allocate_cache) == 0
    assert served.calls.seen == [("Allocate", False), ("Allocate", False), ("Allocate", True)]


def test_get_preferred_allocation_is_cached_and_matches_the_generated_encoding(served: Served) -> None:
    with H2Client(served.path) as client:
        answers = [client.call(PREFERRED, grpc_frame(preferred_request(GPUS, 2))) for _ in range(2)]
    assert answers[0].data == answers[1].data
    response = api.PreferredAllocationResponse.parse(unframed(answers[0].data))
    assert unframed(answers[0].data) == bytes(response)
    assert len(response.container_responses[0].device_i_ds) == 2  # type: ignore[attr-defined]
    assert len(served.service.preferred_cache) == 1
    assert served.calls.seen == [("GetPreferredAllocation", True)] * 2


def test_a_response_larger_than_one_frame_goes_through_grpclibs_path(short_dir: Path) -> None:
    # One mount per device, each naming its 6 000-character ID: a response over h2's 16 KiB maximum frame size.
    ids = [f"GPU-{i}-" + "x" * 6000 for i in range(4)]
    served = Served(short_dir / "gpu.sock", AllocateOptions(device_list_strategy=("volume-mounts",)), ids)
    try:
        with H2Client(served.path) as client:
            client.call(ALLOCATE, grpc_frame(allocate_request(ids[0])))
            served.count_writes()
            big = client.call(ALLOCATE, grpc_frame(allocate_request(*ids)))
        assert big.status == grpclib.const.Status.OK.value and big.trailers == {"grpc-status": "0"}
        (container,) = api.AllocateResponse.parse(unframed(big.data)).container_responses
        assert len(container.mounts) == 4 and len(big.data) > 16384
        assert served.writes > 1
    finally:
        served.close()


def test_received_frames_are_not_formatted_for_h2s_trace_log(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(self: object) -> str:
        raise AssertionError("a frame was formatted")
    monkeypatch.setattr(hyperframe.frame.Frame, "__repr__", refuse)
    assert grpc_guard  # the module that shadows h2.connection's `repr`
    server = h2.connection.H2Connection(config=h2.config.H2Configuration(client_side=False))
    client = h2.connection.H2Connection()
    client.initiate_connection()
    client.send_headers(1, [(":method", "POST"), (":path", ALLOCATE), (":scheme", "http"), (":authority", "x")],
                        end_stream=True)
    events = server.receive_data(client.data_to_send())
    assert any(type(e).__name__ == "RequestReceived" for e in events)


def eventually(condition: Callable[[], bool], limit_s: float = 5.0) -> None:
    deadline = time.monotonic() + limit_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met"
        time.sleep(0.001)


def call_in_one_write(client: H2Client, body: bytes, *extra: tuple[str, str]) -> H2Answer:
    """A unary Allocate whose headers and message go out in one write, as the kubelet's gRPC client sends them
    (`H2Client.call` writes them separately: the server may read the headers alone)."""
    stream_id = client.h2.get_next_available_stream_id()
    client.h2.send_headers(stream_id, request_headers(ALLOCATE, *extra))
    client.h2.send_data(stream_id, body, end_stream=True)
    client.answers[stream_id] = H2Answer()
    client.flush()
    return client.wait(stream_id)


def test_a_repeated_request_is_answered_without_a_task_unless_it_carries_metadata(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    started: list[str] = []
    request_handler = grpc_guard.request_handler

    def counted(*args: Any) -> Any:
        started.append(dict(args[2])[":path"])
        return request_handler(*args)

    monkeypatch.setattr(grpc_guard, "request_handler", counted)
    request = grpc_frame(allocate_request(GPUS[1]))
    with H2Client(served.path) as client:
        first = call_in_one_write(client, request)
        again = [call_in_one_write(client, request) for _ in range(3)]
        with_deadline = call_in_one_write(client, request, ("grpc-timeout", "5S"))
        with_metadata = call_in_one_write(client, request, ("x-trace", "1"))
        # Headers read without the message: the call waits for it in a task, as before.
        in_two_reads = client.open(ALLOCATE)
        eventually(lambda: len(started) == 3)  # the server read the headers alone and started a task
        client.send(in_two_reads, request)
        split = client.wait(in_two_reads)
    answers = [first, *again, with_deadline, with_metadata, split]
    assert all(a.status == grpclib.const.Status.OK.value and a.trailers == {"grpc-status": "0"} for a in answers)
    assert [a.data for a in answers] == [first.data] * 7
    # A task for the first call (computed), the one with metadata and the one read in two parts; the others were
    # answered at once.
    assert started == [ALLOCATE] * 3
    assert served.calls.seen == [("Allocate", True)] * 7


def test_a_kept_request_reset_in_the_read_it_arrived_in_is_not_answered(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    started: list[int] = []
    request_handler = grpc_guard.request_handler

    def counted(*args: Any) -> Any:
        started.append(args[1].id)
        return request_handler(*args)

    monkeypatch.setattr(grpc_guard, "request_handler", counted)
    request = grpc_frame(allocate_request(GPUS[1]))
    with H2Client(served.path) as client:
        assert call_in_one_write(client, request).status == grpclib.const.Status.OK.value
        # Headers, message and a reset in one write: the server reads them together.
        stream_id = client.h2.get_next_available_stream_id()
        client.h2.send_headers(stream_id, request_headers(ALLOCATE))
        client.h2.send_data(stream_id, request, end_stream=True)
        client.h2.reset_stream(stream_id, error_code=8)
        client.answers[stream_id] = reset = H2Answer()
        client.flush()
        assert call_in_one_write(client, request).status == grpclib.const.Status.OK.value
        assert reset.headers == {} and reset.data == b""

        async def streams_held() -> list[int]:
            return [len(p.processor.streams) for p in served.bound.server.protocols]
        assert served.run(streams_held) == [0]
    assert served.calls.seen == [("Allocate", True)] * 2
    assert started == [1]  # the first call; the reset one was never started, the last one answered at once
