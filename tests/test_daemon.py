"""The daemon in-process, on a simulated node, against the grpcio kubelet emulator."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
import trio
from prometheus_client import generate_latest

from nvdp.core.config.settings import Settings
from nvdp.daemon import StartupError, run_daemon
from nvdp.observe.metrics import Metrics
from nvdp.testing.kubelet_emulator import KubeletEmulator
from tests.harness import GPU0, GPU1, LogWatch, daemon, wait_for
from tests.helpers import gpu, write_node


def settings(node: Path, kubelet: KubeletEmulator, **overrides: object) -> Settings:
    return Settings(simulate=node, kubelet_socket=kubelet.socket, **overrides)  # type: ignore[arg-type]


async def test_registers_both_gpus_healthy(two_gpu_node: Path, kubelet: KubeletEmulator) -> None:
    async with daemon(settings(two_gpu_node, kubelet)) as servers:
        assert await wait_for(kubelet, lambda k: k.devices("nvidia.com/gpu") == {GPU0: "Healthy", GPU1: "Healthy"})
        (registration,) = kubelet.registrations
        assert (registration.resource, registration.endpoint) == ("nvidia.com/gpu", "nvidia-gpu.sock")
        assert registration.options.get_preferred_allocation_available
        assert servers.all_registered
        assert "registered=True" in repr(servers.running["nvidia.com/gpu"])


@pytest.mark.parametrize(
    ("overrides", "ids", "expected"),
    [
        pytest.param({}, [GPU0], {"NVIDIA_VISIBLE_DEVICES": GPU0}, id="uuid strategy gives the UUID"),
        pytest.param({"device_id_strategy": "index"}, [GPU1, GPU0], {"NVIDIA_VISIBLE_DEVICES": "1,0"},
                     id="index strategy gives indices in request order"),
        pytest.param({"gds_enabled": True}, [GPU0], {"NVIDIA_VISIBLE_DEVICES": GPU0, "NVIDIA_GDS": "enabled"},
                     id="gds adds its variable"),
    ],
)
async def test_allocate_envvar(
    two_gpu_node: Path, kubelet: KubeletEmulator, overrides: dict[str, object], ids: list[str],
    expected: dict[str, str]
) -> None:
    async with daemon(settings(two_gpu_node, kubelet, **overrides)):
        response = await trio.to_thread.run_sync(kubelet.allocate, "nvidia.com/gpu", ids)
    (container,) = response.container_responses
    assert container.envs == expected
    assert not container.mounts and not container.devices


async def test_allocate_volume_mounts_and_device_specs_under_the_dev_root(
    two_gpu_node: Path, kubelet: KubeletEmulator
) -> None:
    s = settings(two_gpu_node, kubelet, device_list_strategy=("envvar", "volume-mounts"), pass_device_specs=True,
                 dev_root=Path("/run/nvidia/driver"))
    async with daemon(s):
        response = await trio.to_thread.run_sync(kubelet.allocate, "nvidia.com/gpu", [GPU0, GPU1])
    (container,) = response.container_responses
    assert container.envs == {"NVIDIA_VISIBLE_DEVICES": "/var/run/nvidia-container-devices"}
    assert [(m.host_path, m.container_path, m.read_only) for m in container.mounts] == [
        ("/dev/null", f"/var/run/nvidia-container-devices/{GPU0}", False),
        ("/dev/null", f"/var/run/nvidia-container-devices/{GPU1}", False),
    ]
    # The simulated node has nvidiactl, nvidia-uvm and nvidia-uvm-tools but no nvidia-modeset.
    assert [(d.container_path, d.host_path, d.permissions) for d in container.devices] == [
        (path, f"/run/nvidia/driver{path}", "rw")
        for path in ("/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools", "/dev/nvidia0", "/dev/nvidia1")
    ]


async def test_an_unknown_device_id_is_refused_naming_resource_and_id(
    two_gpu_node: Path, kubelet: KubeletEmulator
) -> None:
    async with daemon(settings(two_gpu_node, kubelet)):
        with pytest.raises(grpc.RpcError) as error:
            await trio.to_thread.run_sync(kubelet.allocate, "nvidia.com/gpu", ["GPU-nope"])
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.value.details() == 'invalid allocation request for "nvidia.com/gpu": unknown device: GPU-nope'


async def test_preferred_allocation_picks_nvlinked_gpus(tmp_path: Path, kubelet: KubeletEmulator) -> None:
    node = write_node(tmp_path / "node.yaml", [gpu(i) for i in range(4)], nvlinks=[[1, 3, 12]])
    async with daemon(settings(node, kubelet)):
        assert await wait_for(kubelet, lambda k: len(k.devices("nvidia.com/gpu")) == 4)
        ids = list(kubelet.devices("nvidia.com/gpu"))
        preferred = await trio.to_thread.run_sync(kubelet.preferred_allocation, "nvidia.com/gpu", ids, [], 2)
    assert preferred == [ids[1], ids[3]]


async def test_kubelet_restart_is_followed_by_re_registration(two_gpu_node: Path, kubelet: KubeletEmulator) -> None:
    async with daemon(settings(two_gpu_node, kubelet)):
        for restart in range(3):
            await trio.to_thread.run_sync(kubelet.restart)
            assert await wait_for(kubelet, lambda k, n=restart: len(k.registrations) == n + 2
                                  and k.devices("nvidia.com/gpu") == {GPU0: "Healthy", GPU1: "Healthy"})
            assert (kubelet.plugin_dir / "nvidia-gpu.sock").exists()
        # One registration per kubelet start: the deleted socket and the new kubelet.sock cause one restart.
        assert len(kubelet.registrations) == 4


async def test_a_deleted_plugin_socket_is_recreated(two_gpu_node: Path, kubelet: KubeletEmulator) -> None:
    async with daemon(settings(two_gpu_node, kubelet)):
        socket = kubelet.plugin_dir / "nvidia-gpu.sock"
        socket.unlink()
        assert await wait_for(kubelet, lambda k: len(k.registrations) == 2 and socket.exists())


async def test_stopping_removes_every_socket_and_ends_the_stream(
    two_gpu_node: Path, kubelet: KubeletEmulator
) -> None:
    async with daemon(settings(two_gpu_node, kubelet)):
        assert await wait_for(kubelet, lambda k: bool(k.devices("nvidia.com/gpu")))
    assert sorted(p.name for p in kubelet.plugin_dir.iterdir()) == ["kubelet.sock"]
    # The kubelet saw its ListAndWatch end and made nothing allocatable.
    assert await wait_for(kubelet, lambda k: k.devices("nvidia.com/gpu") == {GPU0: "Unhealthy", GPU1: "Unhealthy"})


async def test_registration_waits_for_the_kubelet_and_retries(
    two_gpu_node: Path, no_leaks: None, logs: LogWatch
) -> None:
    import tempfile

    with tempfile.TemporaryDirectory(prefix="nvdp-t-") as tmp:
        kubelet = KubeletEmulator(Path(tmp) / "device-plugins")
        kubelet.plugin_dir.mkdir()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(lambda: run_daemon(settings(two_gpu_node, kubelet), handle_signals=False))
                # The witness that it tried without a kubelet: two failed registrations, each followed by a retry.
                await logs.wait(r"registering nvidia.com/gpu failed: .*; retrying in", count=2)
                assert not kubelet.registrations
                await trio.to_thread.run_sync(kubelet.start)
                assert await wait_for(kubelet, lambda k: bool(k.devices("nvidia.com/gpu")))
                nursery.cancel_scope.cancel()
        finally:
            # After the daemon (and outside its cancelled scope, where a thread could not be started any more).
            kubelet.stop()


async def test_nvml_failure_exits_with_a_clear_message_by_default(tmp_path: Path, kubelet: KubeletEmulator) -> None:
    node = write_node(tmp_path / "node.yaml", [gpu(0)], initError=9)
    with pytest.raises(StartupError, match=r"failed to initialize NVML: .*failOnInitError=false"):
        await run_daemon(settings(node, kubelet), handle_signals=False)


async def test_nvml_failure_with_fail_on_init_error_false_serves_nothing_and_waits(
    tmp_path: Path, kubelet: KubeletEmulator, logs: LogWatch
) -> None:
    node = write_node(tmp_path / "node.yaml", [gpu(0)], initError=9)
    async with daemon(settings(node, kubelet, fail_on_init_error=False)) as servers:
        # Started, with nothing to serve: the daemon is past the point where it would have registered anything.
        assert servers is None
        assert logs.matching("failOnInitError is false, so nvdp serves no devices and waits")
        assert not kubelet.registrations


async def test_stopping_leaves_no_thread_of_ours(two_gpu_node: Path, kubelet: KubeletEmulator) -> None:
    import threading

    before = {t.ident for t in threading.enumerate()}
    async with daemon(settings(two_gpu_node, kubelet)):
        assert any(t.name == "nvdp-grpc" for t in threading.enumerate())
    # trio keeps idle worker threads of its own thread cache; the asyncio loop thread must be gone.
    left = [t for t in threading.enumerate() if t.ident not in before and not t.name.startswith("Trio thread")]
    assert not [t for t in left if t.name == "nvdp-grpc"], left


def node_with_events(tmp_path: Path, **gpu0: object) -> tuple[Path, Path]:
    events = tmp_path / "xids"
    events.write_text("")
    return write_node(tmp_path / "node.yaml", [gpu(0, **gpu0), gpu(1)], eventsFile=str(events)), events


async def test_a_critical_xid_turns_that_gpu_unhealthy_and_it_recovers_after_quiet(
    tmp_path: Path, kubelet: KubeletEmulator
) -> None:
    node, events = node_with_events(tmp_path)
    async with daemon(settings(node, kubelet, health_quiet_period=0.5)):
        assert await wait_for(kubelet, lambda k: k.devices("nvidia.com/gpu") == {GPU0: "Healthy", GPU1: "Healthy"})
        with events.open("a") as f:
            f.write(f"xid {GPU0} 48\n")
        assert await wait_for(kubelet, lambda k: k.devices("nvidia.com/gpu") == {GPU0: "Unhealthy", GPU1: "Healthy"})
        # No new XID for the quiet period: probed, Healthy again.
        assert await wait_for(kubelet, lambda k: k.devices("nvidia.com/gpu") == {GPU0: "Healthy", GPU1: "Healthy"})


@pytest.mark.parametrize(
    ("xid", "overrides"),
    [
        pytest.param(13, {}, id="xid 13 is ignored by default"),
        pytest.param(48, {"disable_healthchecks": "all"}, id="DP_DISABLE_HEALTHCHECKS=all ignores everything"),
    ],
)
async def test_ignored_xids_change_nothing(
    tmp_path: Path, kubelet: KubeletEmulator, logs: LogWatch, xid: int, overrides: dict[str, object]
) -> None:
    node, events = node_with_events(tmp_path)
    async with daemon(settings(node, kubelet, **overrides)):
        assert await wait_for(kubelet, lambda k: bool(k.devices("nvidia.com/gpu")))
        with events.open("a") as f:
            f.write(f"xid {GPU0} {xid}\nxid {GPU1} 48\n" if not overrides else f"xid {GPU0} {xid}\n")
        if not overrides:
            # The second line proves the first was read: GPU1 turns Unhealthy, GPU0 does not.
            assert await wait_for(kubelet, lambda k: k.devices("nvidia.com/gpu") == {
                GPU0: "Healthy", GPU1: "Unhealthy"})
        else:
            # Nothing reads the events: the daemon said so when it started, and a later kubelet restart (a fresh
            # ListAndWatch with the daemon's current health, sent after the XID was written) shows every GPU Healthy.
            assert logs.matching("health checks disabled by policy: not listening to NVML events")
            await trio.to_thread.run_sync(kubelet.restart)
            assert await wait_for(kubelet, lambda k: len(k.registrations) == 2 and bool(k.devices("nvidia.com/gpu")))
            assert kubelet.devices("nvidia.com/gpu") == {GPU0: "Healthy", GPU1: "Healthy"}


def mig_node(tmp_path: Path) -> tuple[Path, Path]:
    events = tmp_path / "xids"
    events.write_text("")
    a100 = gpu(0, migEnabled=True, migDevices=[
        {"uuid": "MIG-aaaaaaaa-0000-0000-0000-000000000001", "profile": "1g.5gb", "memoryMiB": 4864, "gi": 7, "ci": 0},
        {"uuid": "MIG-aaaaaaaa-0000-0000-0000-000000000002", "profile": "1g.5gb", "memoryMiB": 4864, "gi": 8, "ci": 0},
        {"uuid": "MIG-aaaaaaaa-0000-0000-0000-000000000003", "profile": "2g.10gb", "memoryMiB": 9856, "gi": 3,
         "ci": 0},
    ])
    h100 = gpu(1, name="NVIDIA H100 80GB HBM3", memoryMiB=81559, computeCapability="9.0")
    return write_node(tmp_path / "node.yaml", [a100, h100], eventsFile=str(events)), events


@pytest.mark.parametrize(
    ("strategy", "expected"),
    [
        pytest.param("mixed", {"nvidia.com/gpu": 1, "nvidia.com/mig-1g.5gb": 2, "nvidia.com/mig-2g.10gb": 1},
                     id="mixed: one resource per profile plus the whole H100"),
        pytest.param("none", {"nvidia.com/gpu": 2}, id="none: both GPUs whole"),
    ],
)
async def test_mig_strategies_on_a_simulated_a100_and_h100(
    tmp_path: Path, kubelet: KubeletEmulator, strategy: str, expected: dict[str, int]
) -> None:
    node, _ = mig_node(tmp_path)
    async with daemon(settings(node, kubelet, mig_strategy=strategy)):
        assert await wait_for(kubelet, lambda k: {r: len(k.devices(r)) for r in k.resources()} == expected)
    assert sorted(r.endpoint for r in kubelet.registrations) == sorted(
        f"nvidia-{name.removeprefix('nvidia.com/')}.sock" for name in expected)


async def test_single_strategy_refuses_two_profiles(tmp_path: Path, kubelet: KubeletEmulator) -> None:
    node, _ = mig_node(tmp_path)
    with pytest.raises(StartupError, match="more than one MIG device type present on node"):
        await run_daemon(settings(node, kubelet, mig_strategy="single"), handle_signals=False)


async def test_a_mig_xid_marks_only_that_mig_device(tmp_path: Path, kubelet: KubeletEmulator) -> None:
    node, events = mig_node(tmp_path)
    first, second = "MIG-aaaaaaaa-0000-0000-0000-000000000001", "MIG-aaaaaaaa-0000-0000-0000-000000000002"
    async with daemon(settings(node, kubelet, mig_strategy="mixed")):
        assert await wait_for(kubelet, lambda k: len(k.devices("nvidia.com/mig-1g.5gb")) == 2)
        with events.open("a") as f:
            f.write(f"xid {second} 48\n")
        assert await wait_for(kubelet, lambda k: k.devices("nvidia.com/mig-1g.5gb") == {
            first: "Healthy", second: "Unhealthy"})
        assert set(kubelet.devices("nvidia.com/mig-2g.10gb").values()) == {"Healthy"}
        # An XID on the parent GPU itself (no instance ids) marks every MIG device of it.
        with events.open("a") as f:
            f.write(f"xid {GPU0} 48\n")
        assert await wait_for(kubelet, lambda k: set(k.devices("nvidia.com/mig-1g.5gb").values()) == {"Unhealthy"}
                              and set(k.devices("nvidia.com/mig-2g.10gb").values()) == {"Unhealthy"})
        assert set(kubelet.devices("nvidia.com/gpu").values()) == {"Healthy"}


async def test_mig_device_specs_come_from_the_nodes_mig_minors(tmp_path: Path, kubelet: KubeletEmulator) -> None:
    from nvdp.sim import mig_minor

    node, _ = mig_node(tmp_path)
    first = "MIG-aaaaaaaa-0000-0000-0000-000000000001"
    s = settings(node, kubelet, mig_strategy="mixed", pass_device_specs=True, device_id_strategy="index")
    async with daemon(s):
        assert await wait_for(kubelet, lambda k: len(k.devices("nvidia.com/mig-1g.5gb")) == 2)
        response = await trio.to_thread.run_sync(kubelet.allocate, "nvidia.com/mig-1g.5gb", [first])
    (container,) = response.container_responses
    assert container.envs == {"NVIDIA_VISIBLE_DEVICES": "0:0"}
    caps = [f"/dev/nvidia-caps/nvidia-cap{mig_minor(0, 7)}", f"/dev/nvidia-caps/nvidia-cap{mig_minor(0, 7, 0)}"]
    assert [d.container_path for d in container.devices][-3:] == ["/dev/nvidia0", *caps]


async def test_time_slicing_replicas_all_turn_unhealthy_on_an_xid(tmp_path: Path, kubelet: KubeletEmulator) -> None:
    from nvdp.core.config.load import parse_config
    from nvdp.core.config.settings import resolve

    node, events = node_with_events(tmp_path)
    config = parse_config("version: v1\nsharing:\n  timeSlicing:\n    renameByDefault: true\n"
                          "    failRequestsGreaterThanOne: true\n    resources:\n"
                          "    - name: nvidia.com/gpu\n      replicas: 4\n", "config.yaml")
    s = resolve({"simulate": str(node), "kubelet_socket": str(kubelet.socket), "metrics_address": ""}, {}, config)
    async with daemon(s):
        assert await wait_for(kubelet, lambda k: len(k.devices("nvidia.com/gpu.shared")) == 8)
        assert kubelet.resources() == ["nvidia.com/gpu.shared"]
        ids = list(kubelet.devices("nvidia.com/gpu.shared"))
        assert ids[:2] == [f"{GPU0}::0", f"{GPU0}::1"]
        with pytest.raises(grpc.RpcError) as error:
            await trio.to_thread.run_sync(kubelet.allocate, "nvidia.com/gpu.shared", ids[:2])
        assert error.value.details() == ("request for 'nvidia.com/gpu.shared: 2' too large: maximum request size "
                                         "for shared resources is 1")
        with events.open("a") as f:
            f.write(f"xid {GPU0} 48\n")
        # Every replica of GPU 0 (upstream marks one: its bug #1929), none of GPU 1.
        assert await wait_for(kubelet, lambda k: [h for h in k.devices("nvidia.com/gpu.shared").values()] == [
            "Unhealthy"] * 4 + ["Healthy"] * 4)


async def test_mps_slices_with_supervised_control_daemons(tmp_path: Path, kubelet: KubeletEmulator) -> None:
    import json
    import os
    import shutil
    import signal
    import tempfile

    from nvdp.core.config.load import parse_config
    from nvdp.core.config.settings import resolve

    node, _ = node_with_events(tmp_path)
    # MPS listens on a Unix socket in the pipe directory: keep the path well under the 107-byte limit.
    mps_root = Path(tempfile.mkdtemp(prefix="nvdp-mps-"))
    config = parse_config(
        "version: v1\nsharing:\n  mps:\n    resources:\n"
        "    - {name: nvidia.com/gpu, rename: gpu-10gb, memoryGB: 10, replicas: 2, devices: ['0']}\n"
        "    - {name: nvidia.com/gpu, rename: gpu-20gb, memoryGB: 20, replicas: 1, devices: ['0']}\n", "config.yaml")
    s = resolve({"simulate": str(node), "kubelet_socket": str(kubelet.socket), "mps_root": str(mps_root),
                 "metrics_address": ""}, {}, config)
    state = mps_root / GPU0
    metrics = Metrics()
    async with daemon(s, search_path=os.environ["PATH"], metrics=metrics):
        assert await wait_for(kubelet, lambda k: {r: len(k.devices(r)) for r in k.resources()} == {
            "nvidia.com/gpu": 1, "nvidia.com/gpu-10gb": 2, "nvidia.com/gpu-20gb": 1})
        assert list(kubelet.devices("nvidia.com/gpu")) == [GPU1]
        response = await trio.to_thread.run_sync(kubelet.allocate, "nvidia.com/gpu-10gb", [f"{GPU0}::10::1"])
        (container,) = response.container_responses
        assert container.envs == {
            "NVIDIA_VISIBLE_DEVICES": GPU0,
            "CUDA_MPS_PIPE_DIRECTORY": str(state / "pipe"),
            "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT": "0=10G",
            "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": "25",
        }
        assert {(m.host_path, m.container_path) for m in container.mounts} == {
            (str(state / "pipe"), str(state / "pipe")), (str(mps_root / "shm"), "/dev/shm")}
        commands = (state / "commands.log").read_text().splitlines()
        assert "set_default_device_pinned_mem_limit 0 20480M" in commands
        assert "set_default_active_thread_percentage 50" in commands

        # Kill the control daemon: GPU 0's slices go Unhealthy, then Healthy once the restarted daemon answers.
        pid = json.loads((state / "daemon-env.json").read_text())["pid"]
        os.kill(pid, signal.SIGKILL)
        sliced = ("nvidia.com/gpu-10gb", "nvidia.com/gpu-20gb")
        assert await wait_for(kubelet, lambda k: all(set(k.devices(r).values()) == {"Unhealthy"} for r in sliced))
        assert set(kubelet.devices("nvidia.com/gpu").values()) == {"Healthy"}
        assert await wait_for(kubelet, lambda k: all(set(k.devices(r).values()) == {"Healthy"} for r in sliced))
        exposition = generate_latest(metrics.registry).decode()
        assert f'nvdp_mps_daemon_restarts_total{{uuid="{GPU0}"}} 1.0' in exposition
        assert f'nvdp_mps_daemon_up{{uuid="{GPU0}"}} 1.0' in exposition
    assert (state / "commands.log").read_text().splitlines()[-1] == "quit"
    shutil.rmtree(mps_root)
