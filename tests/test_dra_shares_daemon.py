"""Issue 19's acceptance, end to end on the simulated node: the daemon in-process with the DRA kubelet emulator, the
fake API server and the fake `nvidia-cuda-mps-control` (which records every command). GPU 1 (40 GiB) of a 2-GPU
node is a DRA MPS share host (`dra.sharing.mps`); GPU 0 stays with the device plugin."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from nvdp.core.dra import shares as sh
from nvdp.core.dra.devices import check_device
from nvdp.testing.kubelet_emulator import KubeletEmulator
from tests.harness import eventually
from tests.test_dra_daemon import DRIVER, GPU1_UUID, NODE, claim, dra_node, health, registered, slice_devices, taints

SHARES = "dra:\n  enabled: true\n  devices: [1]\n  sharing:\n    mps:\n      devices: [1]\n"
GIB = 1 << 30


def share_claim(uid: str, memory: str, **compute: str) -> dict[str, Any]:
    body = claim(uid, "gpu-1")
    (result,) = body["status"]["allocation"]["devices"]["results"]
    result.update(shareID=f"share-{uid}", consumedCapacity={"memory": memory, **compute})
    return body


def ref(uid: str) -> tuple[str, str, str]:
    return ("default", uid, f"claim-{uid}")


def published(fake: Any) -> dict[str, Any]:
    (device,) = [d for s in fake.resourceslices(NODE) for d in s["spec"]["devices"]]
    return dict(device)


def claim_env(node: Any, uid: str) -> list[str]:
    spec = json.loads((node.cdi_root / f"k8s.gpu.nvidia.com-claim_{uid}.json").read_text())
    (device,) = spec["devices"]
    return list(device["containerEdits"]["env"])


def compute_modes() -> list[tuple[str, int]]:
    """The simulated node's `nvmlDeviceSetComputeMode` calls (the daemon's own simulated node: its state file)."""
    log = Path(os.environ["NVDP_SIM_STATE"]).parent / "compute-mode.log"
    return [(uuid, int(mode)) for _, uuid, mode in (line.split() for line in log.read_text().splitlines())]


async def test_three_shares_one_daemon_a_refused_fourth_an_xid_on_all_three_and_the_daemon_gone_after_the_last(
    short_dir: Path, kubelet: KubeletEmulator, mps_root: Path,
) -> None:
    async with dra_node(short_dir, kubelet, SHARES, mps_root=str(mps_root), health_quiet_period=1.0) as node:
        await node.call(node.dra.wait_for, registered)
        await node.fake.wait_for(lambda: slice_devices(node.fake) == ["gpu-1"]
                                 and "capacity" in published(node.fake)
                                 and "computePercent" in published(node.fake)["capacity"])
        # The slice advertises consumable memory and compute, each with a request policy the API server accepts.
        device = published(node.fake)
        assert device["allowMultipleAllocations"] is True and check_device(device) == []
        memory, compute = device["capacity"]["memory"], device["capacity"]["computePercent"]
        assert memory == {"value": "40Gi", "requestPolicy": {
            "default": "40Gi", "validRange": {"min": "1Mi", "max": "40Gi", "step": "1Mi"}}}
        assert compute["value"] == "100"
        for capacity in (memory, compute):
            assert sh.validate_request_policy(capacity["value"], capacity["requestPolicy"]) == []

        # Three shares of 10, 10 and 20 GiB: each its limits in its CDI spec, one control daemon for all three.
        sizes = {"u1": ("10Gi", "25"), "u2": ("10Gi", "0"), "u3": ("20Gi", "50")}
        answers = {}
        for uid, (size, percent) in sizes.items():
            node.fake.set_resourceclaim(share_claim(uid, size, computePercent=percent))
            answers[uid] = (await node.call(node.dra.prepare, DRIVER, [ref(uid)]))[uid]
            assert answers[uid].error == "", answers[uid].error
            ((_, _, name, _, share_id),) = answers[uid].devices
            assert (name, share_id) == ("gpu-1", f"share-{uid}")
        pipe = mps_root / GPU1_UUID / "pipe"
        assert claim_env(node, "u1") == [f"CUDA_MPS_PIPE_DIRECTORY={pipe}", "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT=0=10240M",
                                         "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=25"]
        assert claim_env(node, "u2") == [f"CUDA_MPS_PIPE_DIRECTORY={pipe}", "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT=0=10240M"]
        assert claim_env(node, "u3") == [f"CUDA_MPS_PIPE_DIRECTORY={pipe}", "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT=0=20480M",
                                         "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=50"]
        commands = (mps_root / GPU1_UUID / "commands.log").read_text().splitlines()
        # One daemon, started once: its default follows the largest share (u2 has no compute cap: 100 %).
        assert [c for c in commands if c.startswith("set_")] == [
            "set_default_device_pinned_mem_limit 0 10240M", "set_default_active_thread_percentage 25",
            "set_default_device_pinned_mem_limit 0 10240M", "set_default_active_thread_percentage 100",
            "set_default_device_pinned_mem_limit 0 20480M", "set_default_active_thread_percentage 100"]
        assert "quit" not in commands
        daemon_pid = json.loads((mps_root / GPU1_UUID / "daemon-env.json").read_text())["pid"]
        os.kill(daemon_pid, 0)
        assert compute_modes() == [(GPU1_UUID, 3)]

        # A fourth share of 1 GiB would make 41 GiB on a 40 GiB GPU: refused, for that claim only.
        node.fake.set_resourceclaim(share_claim("u4", "1Gi"))
        refused = (await node.call(node.dra.prepare, DRIVER, [ref("u4")]))["u4"]
        assert "41 GiB requested in total, GPU has 40 GiB" in refused.error and refused.devices == ()
        assert not (node.cdi_root / "k8s.gpu.nvidia.com-claim_u4.json").exists()

        # An XID on GPU 1: the device all three shares are on is Unhealthy on the health stream, and tainted so that
        # no new share lands there; it recovers after the quiet period.
        await node.call(node.dra.wait_for, lambda d: health(d) == "HEALTHY")
        with (short_dir / "xids").open("a") as events:
            events.write(f"xid {GPU1_UUID} 48\n")
        await node.call(node.dra.wait_for, lambda d: health(d) == "UNHEALTHY")
        assert all(answers[uid].devices[0][2] == "gpu-1" for uid in sizes)
        await node.fake.wait_for(lambda: set(taints(node.fake)) == {
            (f"{DRIVER}/xid", "48", "NoSchedule"), (sh.TAINT_KEY, "xid-48", "NoSchedule")})
        await node.call(node.dra.wait_for, lambda d: health(d) == "HEALTHY")
        await node.fake.wait_for(lambda: taints(node.fake) == [])

        # Unprepare all three: the daemon is told to quit and the GPU's compute mode is restored.
        answer = await node.call(node.dra.unprepare, DRIVER, [ref(uid) for uid in sizes])
        assert answer == {uid: "" for uid in sizes}
        log = mps_root / GPU1_UUID / "commands.log"
        await eventually(lambda: log.read_text().splitlines()[-1:] == ["quit"], "the daemon told to quit")
        await eventually(lambda: compute_modes() == [(GPU1_UUID, 3), (GPU1_UUID, 0)], "the compute mode restored")
        assert (await node.call(node.dra.prepare, DRIVER, [ref("u4")]))["u4"].error == ""


async def test_a_share_host_that_is_no_dra_gpu_is_a_start_up_error(short_dir: Path, kubelet: KubeletEmulator,
                                                                  mps_root: Path) -> None:
    from nvdp.controller import NodeConfig
    from nvdp.core.config.load import parse_config
    from nvdp.core.config.settings import Settings
    from nvdp.daemon import StartupError, run_daemon
    from tests.fake_apiserver import open_fake_apiserver
    from tests.helpers import gpu, write_node

    config = parse_config("dra:\n  enabled: true\n  devices: [1]\n  sharing:\n    mps:\n      devices: [0]\n", "test")
    settings = Settings(simulate=write_node(short_dir / "node.yaml", [gpu(0), gpu(1)]), kubelet_socket=kubelet.socket,
                        config=config, dra_enabled=True, node_name=NODE, cdi_root=short_dir / "cdi",
                        mps_root=str(mps_root), kubelet_registry_dir=short_dir / "registry",
                        kubelet_plugins_dir=short_dir / "plugins")
    async with open_fake_apiserver() as fake:
        fake.set_node(NODE)
        node_config = NodeConfig(None, fake.api_config(token="token-1"), lambda config, source: settings)
        with pytest.raises(StartupError, match=r"GPU 0 .* is not served through DRA"):
            await run_daemon(settings, handle_signals=False, node_config=node_config)


async def test_a_gpu_moves_to_and_from_mps_shares_by_reload_once_its_prepared_claims_are_gone(
    short_dir: Path, kubelet: KubeletEmulator, mps_root: Path,
) -> None:
    import signal
    from dataclasses import replace

    from nvdp.core.config.load import parse_config
    from nvdp.core.config.settings import Settings

    configs = iter([SHARES, "dra:\n  enabled: true\n  devices: [1]\n"])

    def next_config(settings: Settings) -> Settings:
        return replace(settings, config=parse_config(next(configs), "reload"))

    def shared(node: Any) -> bool:
        return bool(published(node.fake).get("allowMultipleAllocations"))

    async with dra_node(short_dir, kubelet, reload=next_config, mps_root=str(mps_root)) as node:
        waiting = node.metrics.registry.get_sample_value
        await node.call(node.dra.wait_for, registered)
        await node.fake.wait_for(lambda: slice_devices(node.fake) == ["gpu-1"])
        node.fake.set_resourceclaim(claim("x1", "gpu-1"))
        assert (await node.call(node.dra.prepare, DRIVER, [ref("x1")]))["x1"].error == ""

        # Sharing on while an exclusive claim holds the GPU: it stays exclusive and says so, until the claim goes.
        signal.raise_signal(signal.SIGHUP)
        await eventually(lambda: waiting("nvdp_dra_share_hosts_waiting", {"driver": DRIVER}) == 1, "waiting")
        assert not shared(node)
        # A Node Event says which device waits and for what (the log too; `nvdp status` shows the gauge).
        await eventually(lambda: [body["message"] for _, body in node.fake.posted_events
                                  if body["reason"] == "DraShareHostWaiting"] == [
            "gpu-1 becomes an MPS share host once its 1 prepared claim(s) are unprepared"], "the Event")
        assert await node.call(node.dra.unprepare, DRIVER, [ref("x1")]) == {"x1": ""}
        await node.fake.wait_for(lambda: shared(node))
        assert waiting("nvdp_dra_share_hosts_waiting", {"driver": DRIVER}) == 0
        node.fake.set_resourceclaim(share_claim("s1", "10Gi"))
        assert (await node.call(node.dra.prepare, DRIVER, [ref("s1")]))["s1"].error == ""
        assert "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT=0=10240M" in claim_env(node, "s1")

        # Sharing off while a share is prepared: the GPU stays a share host until the share goes.
        signal.raise_signal(signal.SIGHUP)
        await eventually(lambda: waiting("nvdp_dra_share_hosts_waiting", {"driver": DRIVER}) == 1, "waiting")
        assert shared(node)
        assert await node.call(node.dra.unprepare, DRIVER, [ref("s1")]) == {"s1": ""}
        await node.fake.wait_for(lambda: not shared(node) and published(node.fake)["capacity"].keys() == {"memory"})
        assert waiting("nvdp_dra_share_hosts_waiting", {"driver": DRIVER}) == 0


async def test_a_share_hosts_silent_daemon_taints_it_and_marks_it_unhealthy_until_it_answers_again(
    short_dir: Path, kubelet: KubeletEmulator, mps_root: Path,
) -> None:
    import signal

    async with dra_node(short_dir, kubelet, SHARES, mps_root=str(mps_root)) as node:
        await node.call(node.dra.wait_for, lambda d: health(d) == "HEALTHY")
        node.fake.set_resourceclaim(share_claim("s1", "8Gi"))
        assert (await node.call(node.dra.prepare, DRIVER, [ref("s1")]))["s1"].error == ""
        state = mps_root / GPU1_UUID
        pid = json.loads((state / "daemon-env.json").read_text())["pid"]
        # The daemon dies and its next lives refuse every command: the shares on GPU 1 cannot be served.
        (state / "fake-mode").write_text("refuse")
        os.kill(pid, signal.SIGKILL)
        await node.call(node.dra.wait_for, lambda d: health(d) == "UNHEALTHY")
        assert "MPS control daemon of GPU 1 does not answer" in registered(node.dra).devices[(NODE, "gpu-1")].message
        await node.fake.wait_for(lambda: taints(node.fake) == [(sh.TAINT_KEY, "mps-daemon-down", "NoSchedule")])
        # It answers again (a new life; tests/test_dra_mps_shares.py checks it gets the largest share's limits):
        # healthy and untainted.
        (state / "fake-mode").write_text("normal")
        await node.call(node.dra.wait_for, lambda d: health(d) == "HEALTHY", 60.0)
        await node.fake.wait_for(lambda: taints(node.fake) == [])
        pid = json.loads((state / "daemon-env.json").read_text())["pid"]
    # nvdp's clean exit removes the daemons it owns, the share's too (the MPS host would keep them).
    assert (state / "commands.log").read_text().splitlines()[-1] == "quit"
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


@pytest.mark.slow
async def test_kill_9_with_shares_prepared_and_a_restart_adopt_the_daemon_and_answer_re_prepares_identically(
    short_dir: Path, kubelet: KubeletEmulator, mps_root: Path,
) -> None:
    import signal
    import subprocess
    import sys

    import trio

    from nvdp.testing.dra_emulator import DraKubeletEmulator
    from tests.fake_apiserver import open_fake_apiserver, write_kubeconfig
    from tests.helpers import gpu, write_node

    registry, plugins = short_dir / "registry", short_dir / "plugins"
    node_file = write_node(short_dir / "node.yaml", [gpu(0), gpu(1)])
    (short_dir / "config.yaml").write_text("version: v1\n" + SHARES)
    state = mps_root / GPU1_UUID
    uids = {"u1": "10Gi", "u2": "10Gi", "u3": "20Gi"}
    async with open_fake_apiserver() as fake:
        fake.set_node(NODE)
        for uid, size in uids.items():
            fake.set_resourceclaim(share_claim(uid, size))
        kubeconfig = write_kubeconfig(short_dir / "kubeconfig", fake, token="token-1")
        argv = [sys.executable, "-m", "nvdp", "--kubelet-socket", str(kubelet.socket), "--simulate", str(node_file),
                "--dra", "--node-name", NODE, "--kubeconfig", str(kubeconfig), "--cdi-root", str(short_dir / "cdi"),
                "--kubelet-registry-dir", str(registry), "--kubelet-plugins-dir", str(plugins), "--mps-root",
                str(mps_root), "--config-file", str(short_dir / "config.yaml")]
        env = {**os.environ, "METRICS_ADDRESS": ""}

        async def life(log_name: str, work: Any) -> Any:
            with DraKubeletEmulator(registry) as dra, (short_dir / log_name).open("w") as out:
                process = await trio.lowlevel.open_process(argv, env=env, stdout=out, stderr=subprocess.STDOUT)
                try:
                    await trio.to_thread.run_sync(dra.wait_for, registered, 60.0)
                    return await work(dra, process)
                finally:
                    if process.returncode is None:
                        process.kill()
                    await process.wait()

        async def prepare_and_kill(dra: DraKubeletEmulator, process: trio.Process) -> Any:
            first = {uid: (await trio.to_thread.run_sync(dra.prepare, DRIVER, [ref(uid)]))[uid] for uid in uids}
            assert all(answer.error == "" for answer in first.values()), first
            process.send_signal(signal.SIGKILL)
            await process.wait()
            return first

        first = await life("first.log", prepare_and_kill)
        pid = json.loads((state / "daemon-env.json").read_text())["pid"]
        os.kill(pid, 0)  # the daemon outlives nvdp's kill -9
        sent = len((state / "commands.log").read_text().splitlines())

        async def prepare_again_and_unprepare(dra: DraKubeletEmulator, process: trio.Process) -> Any:
            again = {uid: (await trio.to_thread.run_sync(dra.prepare, DRIVER, [ref(uid)]))[uid] for uid in uids}
            # Adopted, not restarted: the same process serves the shares, and no limit had to change.
            assert json.loads((state / "daemon-env.json").read_text())["pid"] == pid
            assert not [c for c in (state / "commands.log").read_text().splitlines()[sent:] if c.startswith("set_")]
            unprepared = await trio.to_thread.run_sync(dra.unprepare, DRIVER, [ref(uid) for uid in uids])
            assert unprepared == {uid: "" for uid in uids}
            assert (state / "commands.log").read_text().splitlines()[-1] == "quit"
            process.send_signal(signal.SIGTERM)
            await process.wait()
            return again

        again = await life("second.log", prepare_again_and_unprepare)
    assert again == first
    assert "adopted the MPS control daemon for GPU 1" in (short_dir / "second.log").read_text()
