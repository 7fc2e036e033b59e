"""MPS shares end to end below the gRPC layer: the ClaimPreparer with its share hosts, the MPS provider
(`nvdp.dra.mps_shares`) over real supervised daemons of the fake `nvidia-cuda-mps-control`, which records every
command. Real processes, so the real clock; every wait is bounded."""

from __future__ import annotations

import json
import logging
import os
import signal
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from nvdp import mps
from nvdp.core.dra import shares as sh
from nvdp.core.dra.types import ClaimRef, PrepareResult, UnprepareResult
from nvdp.core.plan.sharing import mps_dirs
from nvdp.dra.mps_shares import MpsShares
from nvdp.dra.prepare import ClaimPreparer, MpsLimits, SideEffectError
from nvdp.mps.control_daemon import set_daemon_limits
from tests.dra_fixtures import DEVICES, DRIVER, GPU0, GPU1, GPU2, NODE, claim, gpu_config, opaque, result
from tests.test_dra_prepare import FakeApi, FakeCdi, Log
from tests.test_mps import CONTROL, FAST, PATH, FakeComputeMode, Health, gone, until

GIB = 1 << 30
LIMIT_S = 20


class BorrowedLauncher(mps.LocalLauncher):
    """Starts daemons as nvdp's own launcher does, but leaves them running when supervision ends (as with the MPS
    host): ending the nursery is then what `kill -9` of nvdp does to the daemons."""

    owns_daemons = False


class SharesNode:
    """One nvdp life: daemons, the MPS provider and the preparer, over a checkpoint and MPS root that outlive it."""

    def __init__(self, root: Path, state_dir: Path, modes: FakeComputeMode, **provider: Any) -> None:
        self.root = root
        self.path = state_dir / "checkpoint.json"
        self.log: Log = []
        self.api = FakeApi(self.log)
        self.cdi = FakeCdi(self.log, self.path)
        self.modes = modes
        self.health = Health()
        self.policy = sh.share_policy(GPU0, sh.decode_mps_shares({"devices": [0]}))
        self.provider_options = provider

    @property
    def spec_dirs(self) -> tuple[str, str, str]:
        return mps_dirs(str(self.root), GPU0.uuid)

    def commands(self) -> list[str]:
        path = Path(self.spec_dirs[0]).parent / "commands.log"
        return path.read_text().splitlines() if path.exists() else []

    def limit_commands(self) -> list[str]:
        return [c for c in self.commands() if c.startswith("set_")]

    async def start(self, nursery: trio.Nursery) -> ClaimPreparer:
        self.daemons = mps.MpsDaemons(nursery, CONTROL, self.modes, self.health, timings=FAST, path_env=PATH,
                                      launcher=BorrowedLauncher(CONTROL, PATH))
        self.provider = MpsShares(nursery, self.daemons, [GPU0, GPU1, GPU2], str(self.root), **self.provider_options)
        self.preparer = ClaimPreparer(DRIVER, NODE, self.path, "boot-1", self.api, self.cdi, self.provider, DEVICES,
                                      share_hosts={"gpu-0": self.policy})
        with trio.fail_after(LIMIT_S):
            await self.preparer.recover()
        return self.preparer

    async def prepare(self, *refs: ClaimRef) -> dict[str, PrepareResult]:
        with trio.fail_after(LIMIT_S):
            return await self.preparer.prepare(list(refs))

    async def unprepare(self, *refs: ClaimRef) -> dict[str, UnprepareResult]:
        with trio.fail_after(LIMIT_S):
            return await self.preparer.unprepare(list(refs))

    def env(self, uid: str) -> tuple[str, ...]:
        [(_, _, edits)] = self.cdi.specs[uid]
        return edits.env


def share_claim(uid: str, memory: str, **compute: str) -> dict[str, Any]:
    return claim(uid, [result("gpu-0", shareID=f"share-{uid}", consumedCapacity={"memory": memory, **compute})])


@pytest.fixture
async def node(mps_root: Path, tmp_path: Path) -> AsyncIterator[SharesNode]:
    yield SharesNode(mps_root, tmp_path, FakeComputeMode({GPU0.uuid: 0, GPU2.uuid: 0}))


async def test_three_shares_one_daemon_a_refused_fourth_and_the_daemon_gone_after_the_last(
        node: SharesNode, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="nvdp")
    async with trio.open_nursery() as nursery:
        await node.start(nursery)
        refs = [node.api.add(share_claim(uid, size, computePercent=pct))
                for uid, size, pct in (("u1", "10Gi", "25"), ("u2", "10Gi", "0"), ("u3", "20Gi", "50"))]
        for ref in refs:
            [answer] = (await node.prepare(ref)).values()
            assert not answer.error
            assert answer.devices[0].share_id == f"share-{ref.uid}"
        pipe_dir, _, shm_dir = node.spec_dirs
        assert node.env("u1") == (f"CUDA_MPS_PIPE_DIRECTORY={pipe_dir}", "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT=0=10240M",
                                  "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=25")
        assert node.env("u2") == (f"CUDA_MPS_PIPE_DIRECTORY={pipe_dir}", "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT=0=10240M")
        assert node.env("u3")[1:] == ("CUDA_MPS_PINNED_DEVICE_MEM_LIMIT=0=20480M",
                                      "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=50")
        [(_, _, edits)] = node.cdi.specs["u3"]
        assert [(m.host_path, m.container_path) for m in edits.mounts] == [(pipe_dir, pipe_dir), (shm_dir, "/dev/shm")]

        # One daemon for the three, started once; its default follows the largest share (u2 lacks a compute cap).
        assert list(node.daemons.running) == [GPU0.uuid]
        state = node.daemons.running[GPU0.uuid].state
        assert state.starts == 1 and state.pid is not None
        assert node.limit_commands() == [
            "set_default_device_pinned_mem_limit 0 10240M", "set_default_active_thread_percentage 25",
            "set_default_device_pinned_mem_limit 0 10240M", "set_default_active_thread_percentage 100",
            "set_default_device_pinned_mem_limit 0 20480M", "set_default_active_thread_percentage 100"]
        assert node.modes.changes == [(GPU0.uuid, 3)]

        # A fourth of 1 GiB would make 41 GiB on a 40 GiB GPU.
        fourth = node.api.add(share_claim("u4", "1Gi"))
        [answer] = (await node.prepare(fourth)).values()
        assert answer.error == (
            "unable to prepare claim default/claim-u4: device gpu-0 (GPU 0) cannot take a share of 1 GiB of memory: "
            "41 GiB requested in total, GPU has 40 GiB (3 share(s) prepared: 40 GiB)")
        assert "u4" not in node.cdi.specs and "u4" not in node.preparer.checkpoint.claims

        # The largest share goes: the default comes down to the largest left; then the others go, and the daemon.
        assert await node.unprepare(refs[2]) == {"u3": UnprepareResult()}
        assert node.limit_commands()[-2:] == ["set_default_device_pinned_mem_limit 0 10240M",
                                              "set_default_active_thread_percentage 100"]
        pid = state.pid
        assert await node.unprepare(refs[0], refs[1]) == {"u1": UnprepareResult(), "u2": UnprepareResult()}
        assert node.daemons.running == {} and gone(pid)
        assert node.commands()[-1] == "quit"
        assert node.modes.changes == [(GPU0.uuid, 3), (GPU0.uuid, 0)]
        assert node.provider.holders == {}
        nursery.cancel_scope.cancel()


async def test_kill_and_restart_adopts_the_daemon_and_answers_re_prepares_identically(
        node: SharesNode, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="nvdp")
    refs = [node.api.add(share_claim(uid, size)) for uid, size in (("u1", "10Gi"), ("u2", "10Gi"), ("u3", "20Gi"))]
    async with trio.open_nursery() as nursery:
        await node.start(nursery)
        first = await node.prepare(*refs)  # concurrently: one daemon all the same
        assert not any(answer.error for answer in first.values())
        assert node.daemons.running[GPU0.uuid].state.starts == 1
        pid = node.daemons.running[GPU0.uuid].state.pid
        nursery.cancel_scope.cancel()  # nvdp is gone (SIGKILL): the daemon, started detached, runs on
    assert pid is not None and not gone(pid)
    # Killed just after a limit change that its checkpoint does not show: the daemon serves other defaults.
    spec = node.provider.spec(GPU0.uuid)
    with trio.fail_after(LIMIT_S):
        await set_daemon_limits(replace(spec, pinned_mem_limit_mib=30720), control=CONTROL,
                                launcher=BorrowedLauncher(CONTROL, PATH), timings=FAST, path_env=PATH)
    sent = len(node.limit_commands())

    caplog.clear()
    async with trio.open_nursery() as nursery:
        preparer = await node.start(nursery)
        state = node.daemons.running[GPU0.uuid].state
        assert (state.pid, state.adoptions, state.starts) == (pid, 1, 0)
        assert f"adopted the MPS control daemon for GPU 0 (pid {pid})" in caplog.text
        # Adopted as it ran (not restarted: its clients live on), then set to the largest share's limit in place.
        assert "30720 MiB" in caplog.text
        assert node.limit_commands()[sent:] == ["set_default_device_pinned_mem_limit 0 20480M",
                                                "set_default_active_thread_percentage 100"]
        assert node.daemons.supervisor.specs[GPU0.uuid] == node.provider.spec(GPU0.uuid)
        assert await node.prepare(*refs) == first
        assert preparer.checkpoint.claims.keys() == {"u1", "u2", "u3"}
        # Still accounted after the restart: a fourth does not fit.
        assert "41 GiB requested in total" in (await node.prepare(node.api.add(share_claim("u4", "1Gi"))))["u4"].error
        await node.unprepare(*refs)
        assert gone(pid) and node.modes.changes == [(GPU0.uuid, 3), (GPU0.uuid, 0)]
        nursery.cancel_scope.cancel()


async def test_a_restarted_daemon_gets_the_largest_share_and_one_that_refuses_limits_fails_the_share(
        node: SharesNode) -> None:
    async with trio.open_nursery() as nursery:
        await node.start(nursery)
        refs = [node.api.add(share_claim(uid, size)) for uid, size in (("u1", "5Gi"), ("u2", "10Gi"))]
        await node.prepare(*refs)
        state = node.daemons.running[GPU0.uuid].state
        assert state.pid is not None
        seen = len(node.health.events)
        os.killpg(state.pid, signal.SIGKILL)  # the daemon crashes; the supervisor starts the next life
        await node.health.wait_for(GPU0.uuid, True, after=seen + 1)
        assert state.starts == 2
        assert node.limit_commands()[-2:] == ["set_default_device_pinned_mem_limit 0 10240M",
                                              "set_default_active_thread_percentage 100"]

        (Path(node.spec_dirs[0]).parent / "fake-mode").write_text("refuse")
        answer = (await node.prepare(node.api.add(share_claim("u3", "20Gi"))))["u3"]
        assert "did not take its limits" in answer.error
        assert "u3" not in node.preparer.checkpoint.claims and set(node.provider.holders[GPU0.uuid]) == {"u1", "u2"}
        assert node.daemons.supervisor.specs[GPU0.uuid].pinned_mem_limit_mib == 10240
        (Path(node.spec_dirs[0]).parent / "fake-mode").write_text("normal")
        await node.unprepare(*refs)
        nursery.cancel_scope.cancel()


async def test_a_daemon_kept_warm_serves_the_next_share_and_goes_once_cold(
        mps_root: Path, tmp_path: Path) -> None:
    node = SharesNode(mps_root, tmp_path, FakeComputeMode({GPU0.uuid: 0}), keep_warm_s=0.5)
    async with trio.open_nursery() as nursery:
        await node.start(nursery)
        one = node.api.add(share_claim("u1", "4Gi"))
        await node.prepare(one)
        pid = node.daemons.running[GPU0.uuid].state.pid
        await node.unprepare(one)
        assert node.daemons.running[GPU0.uuid].state.pid == pid  # kept warm
        two = node.api.add(share_claim("u2", "8Gi"))
        assert not (await node.prepare(two))["u2"].error
        assert node.daemons.running[GPU0.uuid].state.pid == pid and node.daemons.running[GPU0.uuid].state.starts == 1
        await node.unprepare(two)
        await until(lambda: not node.daemons.running and gone(pid) and len(node.modes.changes) == 2)
        assert gone(pid) and node.modes.changes == [(GPU0.uuid, 3), (GPU0.uuid, 0)]
        nursery.cancel_scope.cancel()


async def test_an_mps_config_claim_on_another_gpu_shares_the_provider(node: SharesNode) -> None:
    config = gpu_config("MPS", mpsConfig={"defaultPinnedDeviceMemoryLimit": "4Gi", "defaultActiveThreadPercentage": 30})
    async with trio.open_nursery() as nursery:
        await node.start(nursery)
        ref = node.api.add(claim("m1", [result("gpu-2")], [opaque(config)]))
        assert not (await node.prepare(ref))["m1"].error
        [(_, _, edits)] = node.cdi.specs["m1"]
        assert edits.env[1:] == ("CUDA_MPS_PINNED_DEVICE_MEM_LIMIT=0=4096M", "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=30")
        assert set(node.daemons.running) == {GPU2.uuid}
        # MIG devices get no daemon from this provider: the claim says so.
        with pytest.raises(SideEffectError, match=r"MPS on MIG device .* is not supported"):
            await node.provider.acquire("m2", GPU1.uuid, MpsLimits(GPU1.mig_devices[0].uuid))
        await node.unprepare(ref)
        assert node.daemons.running == {}
        nursery.cancel_scope.cancel()


@pytest.mark.slow  # the daemon never answers: its start-up bound runs out in real time (~3 s)
async def test_a_daemon_that_cannot_start_fails_the_share_and_leaves_nothing(
        node: SharesNode, tmp_path: Path) -> None:
    (Path(node.spec_dirs[0]).parent / "fake-mode").parent.mkdir(parents=True)
    (Path(node.spec_dirs[0]).parent / "fake-mode").write_text("hang")
    async with trio.open_nursery() as nursery:
        await node.start(nursery)
        answer = (await node.prepare(node.api.add(share_claim("u1", "4Gi"))))["u1"]
        assert "MPS control daemon for GPU 0" in answer.error and "is not serving" in answer.error
        assert node.daemons.running == {} and node.provider.holders == {}
        assert node.preparer.checkpoint.claims == {} and "u1" not in node.cdi.specs
        nursery.cancel_scope.cancel()


def test_health_of_the_prepared_shares_from_the_checkpoint(tmp_path: Path) -> None:
    # What the integrator feeds the health stream: every share on the GPU with an XID, Unhealthy.
    async def main() -> None:
        node = SharesNode(tmp_path / "mps", tmp_path, FakeComputeMode({}))
        node.preparer = ClaimPreparer(DRIVER, NODE, node.path, "boot-1", node.api, node.cdi, _NoMps(), DEVICES,
                                      share_hosts={"gpu-0": node.policy})
        refs = [node.api.add(share_claim(uid, "10Gi")) for uid in ("u1", "u2", "u3")]
        await node.preparer.prepare(refs)
        prepared = [(uid, d.device, d.share_id, d.gpu_uuid) for uid, entry in node.preparer.checkpoint.claims.items()
                    for d in entry.devices if d.share_memory_bytes]
        health = sh.share_health(prepared, {GPU0.uuid: "XID 79"})
        assert sorted(h.claim_uid for h in health if not h.healthy) == ["u1", "u2", "u3"]

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


class _NoMps:
    async def acquire(self, claim_uid: str, gpu_uuid: str, limits: MpsLimits) -> sh.DeviceEdits:
        return sh.DeviceEdits()

    async def release(self, claim_uid: str) -> None:
        return None

    async def restore(self, holdings: object) -> None:
        return None



@pytest.mark.slow
def test_the_shares_benchmark_runs_and_reports_its_figures(tmp_path: Path) -> None:
    from bench import dra_shares

    out = tmp_path / "figures.json"
    assert dra_shares.main(["--shares", "2", "--cold", "2", "--json", str(out)]) == 0
    figures = json.loads(out.read_text())
    assert set(figures) == {"share_prepare_ms", "share_unprepare_ms", "first_share_to_daemon_answering_ms"}
    assert figures["share_prepare_ms"]["n"] == 2 and figures["first_share_to_daemon_answering_ms"]["n"] == 2
    assert all(stats["p50"] > 0 for stats in figures.values())
