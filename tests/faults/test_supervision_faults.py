"""One child fails, one child restarts: an unexpected exception (no grpclib, OS or NVML type) injected into one
resource's registration after a kubelet restart, and into one resource's server, restarts that resource alone.
The daemon stays up, the other resource never leaves the kubelet, and the restart counter shows it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from nvdp import controller as controller_module
from nvdp.core.config.settings import resolve
from nvdp.kubelet import servers as servers_module
from nvdp.observe.http import ProbeState
from nvdp.observe.metrics import Metrics
from nvdp.testing.kubelet_emulator import Endpoint, KubeletEmulator
from tests.faults.test_kubelet_faults import EXPECTED, MIG, mig_node
from tests.harness import GPU1, answers, daemon, until

GPU = "nvidia.com/gpu"
MIG_RESOURCE = "nvidia.com/mig-1g.5gb"


class Injected(Exception):
    """Stands for a bug: not a type any layer expects."""


def restarts(metrics: Metrics, child: str) -> float:
    text = _exposition(metrics)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "nvdp_child_restarts_total" and sample.labels.get("child") == child:
                return sample.value
    return 0.0


def _exposition(metrics: Metrics) -> str:
    from prometheus_client import generate_latest

    return generate_latest(metrics.registry).decode()


def registrations_since_start(kubelet: KubeletEmulator, resource: str) -> int:
    return sum(1 for r in kubelet.registrations if r.resource == resource and r.at >= kubelet.started_at)


def still_there(kubelet: KubeletEmulator, endpoint: Endpoint) -> bool:
    """The same registration as before, its ListAndWatch stream open, every device Healthy."""
    return (kubelet.endpoint(endpoint.resource) is endpoint and not endpoint.stream_ended
            and set(endpoint.devices.values()) == {"Healthy"})


def settings_for(tmp_path: Path, kubelet: KubeletEmulator) -> Any:
    node = mig_node(tmp_path / "node.yaml")
    return resolve({"simulate": str(node), "kubelet_socket": str(kubelet.socket), "metrics_address": "",
                    "mig_strategy": "mixed"}, {}, None)


async def test_an_unexpected_error_in_one_registration_restarts_only_that_resource(
    tmp_path: Path, kubelet: KubeletEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_register = servers_module.register
    armed = {"on": False, "raised": 0}

    async def register(kubelet_socket: Path, endpoint: str, resource_name: str) -> None:
        if armed["on"] and resource_name == MIG_RESOURCE and not armed["raised"]:
            armed["raised"] += 1
            raise Injected("registration blew up")
        await real_register(kubelet_socket, endpoint, resource_name)

    monkeypatch.setattr(servers_module, "register", register)
    metrics, probes = Metrics(), ProbeState()
    async with daemon(settings_for(tmp_path, kubelet), metrics=metrics, probes=probes):
        await until(kubelet, lambda k: all(k.devices(r) == d for r, d in EXPECTED.items()), what="first serve")
        armed["on"] = True
        kubelet.restart()
        # The GPU resource registers with the new kubelet; the MIG resource's first try raises and is restarted.
        await until(kubelet, lambda k: registrations_since_start(k, GPU) == 1, what="GPU re-registered")
        gpu_endpoint = kubelet.endpoint(GPU)
        assert gpu_endpoint is not None
        await until(kubelet, lambda k: k.devices(MIG_RESOURCE) == EXPECTED[MIG_RESOURCE]
                    and registrations_since_start(k, MIG_RESOURCE) == 1, what="MIG resource registered again")
        assert armed["raised"] == 1
        assert restarts(metrics, f"server {MIG_RESOURCE}") == 1
        assert restarts(metrics, f"server {GPU}") == 0
        # The other resource never left: the same registration, its stream open, and it still allocates.
        assert still_there(kubelet, gpu_endpoint)
        await answers(kubelet, GPU, GPU1)
        await answers(kubelet, MIG_RESOURCE, MIG[0])
        assert probes.readiness() == (True, "ok")


async def test_an_unexpected_error_in_one_server_restarts_only_that_server(
    tmp_path: Path, kubelet: KubeletEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_start = servers_module.start_server
    armed = {"on": False, "raised": 0}

    async def start_server(context: Any, *args: Any) -> Any:
        if armed["on"] and context.resource.name == MIG_RESOURCE and armed["raised"] < 2:
            armed["raised"] += 1
            raise Injected(f"server start blew up ({armed['raised']})")
        return await real_start(context, *args)

    monkeypatch.setattr(servers_module, "start_server", start_server)
    metrics, probes = Metrics(), ProbeState()
    async with daemon(settings_for(tmp_path, kubelet), metrics=metrics, probes=probes):
        await until(kubelet, lambda k: all(k.devices(r) == d for r, d in EXPECTED.items()), what="first serve")
        gpu_endpoint = kubelet.endpoint(GPU)
        assert gpu_endpoint is not None
        mig_endpoint = kubelet.endpoint(MIG_RESOURCE)
        assert mig_endpoint is not None
        armed["on"] = True
        # The kubelet loses the MIG resource's socket: nvdp restarts that server, whose start fails twice.
        (kubelet.plugin_dir / Path(mig_endpoint.endpoint).name).unlink()
        await until(kubelet, lambda k: k.endpoint(MIG_RESOURCE) is not mig_endpoint
                    and k.devices(MIG_RESOURCE) == EXPECTED[MIG_RESOURCE], what="MIG server back")
        assert armed["raised"] == 2
        assert restarts(metrics, f"server {MIG_RESOURCE}") == 2
        assert restarts(metrics, f"server {GPU}") == 0
        assert still_there(kubelet, gpu_endpoint)
        await answers(kubelet, GPU, GPU1)
        await answers(kubelet, MIG_RESOURCE, MIG[1])
        assert probes.readiness() == (True, "ok")
        assert MIG_RESOURCE not in " ".join(probes.down)


async def test_an_unexpected_error_in_the_health_watch_restarts_it_and_nothing_else(
    tmp_path: Path, kubelet: KubeletEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While the health watch is down nothing checks the GPUs: they are Unhealthy, then recover once the restarted
    watch has seen a quiet period; the servers are never restarted."""
    real_watch = controller_module.watch_nvml_health
    fail = trio.Event()
    calls = 0

    async def watch(gpus: Any, tracker: Any, on_change: Any, *, task_status: Any) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            task_status.started()
            await fail.wait()
            raise Injected("health loop bug")
        await real_watch(gpus, tracker, on_change, task_status=task_status)

    monkeypatch.setattr(controller_module, "watch_nvml_health", watch)
    metrics = Metrics()
    settings = resolve({"simulate": str(mig_node(tmp_path / "node.yaml")), "kubelet_socket": str(kubelet.socket),
                        "metrics_address": "", "mig_strategy": "mixed", "health_quiet_period": "0.5"}, {}, None)
    async with daemon(settings, metrics=metrics):
        await until(kubelet, lambda k: all(k.devices(r) == d for r, d in EXPECTED.items()), what="first serve")
        endpoints = {r: kubelet.endpoint(r) for r in EXPECTED}
        fail.set()
        await until(kubelet, lambda k: set(k.devices(GPU).values()) == {"Unhealthy"}, what="Unhealthy meanwhile")
        await until(kubelet, lambda k: all(k.devices(r) == d for r, d in EXPECTED.items()), what="recovered")
        assert calls == 2
        assert restarts(metrics, "nvml-health") == 1
        assert all(kubelet.endpoint(r) is e and e is not None and not e.stream_ended for r, e in endpoints.items())
