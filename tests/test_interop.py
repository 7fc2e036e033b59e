"""Interop with an independent gRPC stack: Google's protobuf runtime + grpcio stubs generated from proto/ at test
time, as the kubelet (grpc-go + gogo/golang protobuf) would see nvdp. Nothing here uses betterproto or grpclib."""

from __future__ import annotations

import importlib
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc
import pytest
import trio

from nvdp.core.config.settings import Settings
from tests.harness import daemon
from tests.helpers import ROOT


@pytest.fixture(scope="module")
def pb() -> Iterator[tuple[ModuleType, ModuleType]]:
    with tempfile.TemporaryDirectory() as out:
        subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{ROOT / 'proto'}", f"--python_out={out}",
                        f"--grpc_python_out={out}", "v1beta1/api.proto"], check=True, timeout=60)
        sys.path.insert(0, out)
        try:
            messages = importlib.import_module("v1beta1.api_pb2")
            services = importlib.import_module("v1beta1.api_pb2_grpc")
            yield messages, services
        finally:
            sys.path.remove(out)
            for name in [n for n in sys.modules if n.startswith("v1beta1")]:
                del sys.modules[name]


class Kubelet:
    """A minimal kubelet on generated grpcio code: Register dials back and asks for the options, as the kubelet."""

    def __init__(self, pb: tuple[ModuleType, ModuleType], plugin_dir: Path) -> None:
        self.messages, self.services = pb
        self.plugin_dir = plugin_dir
        self.requests: list[Any] = []
        self.options_inside_register: list[Any] = []
        self.registered = threading.Event()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        kubelet = self

        class Registration(self.services.RegistrationServicer):  # type: ignore[name-defined,misc]
            def Register(self, request: Any, context: Any) -> Any:
                channel = grpc.insecure_channel(f"unix:{kubelet.plugin_dir / request.endpoint}",
                                                options=[("grpc.default_authority", "localhost")])
                stub = kubelet.services.DevicePluginStub(channel)
                kubelet.options_inside_register.append(stub.GetDevicePluginOptions(kubelet.messages.Empty(),
                                                                                   timeout=10))
                channel.close()
                kubelet.requests.append(request)
                kubelet.registered.set()
                return kubelet.messages.Empty()

        self.services.add_RegistrationServicer_to_server(Registration(), self.server)
        self.server.add_insecure_port(f"unix:{plugin_dir / 'kubelet.sock'}")

    def stub(self, endpoint: str) -> Any:
        channel = grpc.insecure_channel(f"unix:{self.plugin_dir / endpoint}",
                                        options=[("grpc.default_authority", "localhost")])
        return self.services.DevicePluginStub(channel), channel


async def test_nvdp_speaks_the_kubelet_protocol_to_generated_grpcio_code(
    pb: tuple[ModuleType, ModuleType], two_gpu_node: Path, no_leaks: None
) -> None:
    with tempfile.TemporaryDirectory(prefix="nvdp-i-") as tmp:
        plugin_dir = Path(tmp)
        kubelet = Kubelet(pb, plugin_dir)
        kubelet.server.start()
        try:
            settings = Settings(simulate=two_gpu_node, kubelet_socket=plugin_dir / "kubelet.sock")
            async with daemon(settings):
                assert kubelet.registered.is_set()
                request = kubelet.requests[0]
                assert (request.version, request.endpoint, request.resource_name) == (
                    "v1beta1", "nvidia-gpu.sock", "nvidia.com/gpu")
                assert request.options.get_preferred_allocation_available
                assert not request.options.pre_start_required
                assert kubelet.options_inside_register[0].get_preferred_allocation_available

                def talk() -> tuple[Any, Any, Any, Any]:
                    stub, channel = kubelet.stub("nvidia-gpu.sock")
                    try:
                        stream = stub.ListAndWatch(pb[0].Empty(), timeout=10)
                        first = next(stream)
                        stream.cancel()
                        ids = [d.ID for d in first.devices]
                        allocate = stub.Allocate(pb[0].AllocateRequest(
                            container_requests=[pb[0].ContainerAllocateRequest(devices_ids=ids[:1])]), timeout=10)
                        preferred = stub.GetPreferredAllocation(pb[0].PreferredAllocationRequest(
                            container_requests=[pb[0].ContainerPreferredAllocationRequest(
                                available_deviceIDs=ids, must_include_deviceIDs=ids[1:], allocation_size=1)]),
                            timeout=10)
                        pre_start = stub.PreStartContainer(pb[0].PreStartContainerRequest(devices_ids=ids[:1]),
                                                           timeout=10)
                        return first, allocate, preferred, pre_start
                    finally:
                        channel.close()

                first, allocate, preferred, pre_start = await trio.to_thread.run_sync(talk)
        finally:
            kubelet.server.stop(None)

    uuids = ["GPU-00000000-aaaa-bbbb-cccc-000000000000", "GPU-00000001-aaaa-bbbb-cccc-000000000000"]
    assert [(d.ID, d.health) for d in first.devices] == [(u, "Healthy") for u in uuids]
    assert [[n.ID for n in d.topology.nodes] for d in first.devices] == [[0], [0]]
    assert dict(allocate.container_responses[0].envs) == {"NVIDIA_VISIBLE_DEVICES": uuids[0]}
    assert list(preferred.container_responses[0].deviceIDs) == uuids[1:]
    assert pre_start.ByteSize() == 0
