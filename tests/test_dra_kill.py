"""`nvdp run --dra` killed with SIGKILL (no cleanup at all) and started again on the same plugin directory,
checkpoint and CDI root: it registers again, answers a re-prepare from its checkpoint without redoing anything, and
still cleans up on unprepare."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import trio

from nvdp.testing.dra_emulator import DraKubeletEmulator
from nvdp.testing.kubelet_emulator import KubeletEmulator
from tests.fake_apiserver import FakeApiServer, open_fake_apiserver, write_kubeconfig
from tests.test_dra_daemon import DRIVER, LIMIT_S, NODE, claim, registered, slice_devices


@asynccontextmanager
async def nvdp_process(short_dir: Path, kubelet: KubeletEmulator, node_file: Path, fake: FakeApiServer,
                       log_name: str) -> AsyncIterator[trio.Process]:
    kubeconfig = write_kubeconfig(short_dir / "kubeconfig", fake, token="token-1")
    with (short_dir / log_name).open("w") as log_file:
        process = await trio.lowlevel.open_process(
            [sys.executable, "-m", "nvdp", "--kubelet-socket", str(kubelet.socket), "--simulate", str(node_file),
             "--dra", "--node-name", NODE, "--kubeconfig", str(kubeconfig), "--cdi-root", str(short_dir / "cdi"),
             "--kubelet-registry-dir", str(short_dir / "plugins_registry"),
             "--kubelet-plugins-dir", str(short_dir / "plugins")],
            env={**os.environ, "METRICS_ADDRESS": ""}, stdout=log_file, stderr=subprocess.STDOUT)
        try:
            yield process
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()


async def test_after_sigkill_a_new_process_registers_and_re_prepare_is_the_same_answer_with_no_new_write(
    short_dir: Path, kubelet: KubeletEmulator, two_gpu_node: Path,
) -> None:
    claims = [("default", "uid-1", "claim-uid-1")]
    spec_file = short_dir / "cdi" / "k8s.gpu.nvidia.com-claim_uid-1.json"
    checkpoint = short_dir / "plugins" / DRIVER / "checkpoint.json"
    async with open_fake_apiserver() as fake:
        fake.set_node(NODE)
        fake.set_resourceclaim(claim("uid-1", "gpu-1"))
        with DraKubeletEmulator(short_dir / "plugins_registry") as dra, trio.fail_after(LIMIT_S):
            async with nvdp_process(short_dir, kubelet, two_gpu_node, fake, "first.log") as first:
                await trio.to_thread.run_sync(dra.wait_for, registered, LIMIT_S)
                before = await trio.to_thread.run_sync(dra.prepare, DRIVER, claims)
                assert before["uid-1"].error == "", (short_dir / "first.log").read_text()
                written = spec_file.stat()
                first.send_signal(signal.SIGKILL)
                await first.wait()
            assert first.returncode == -signal.SIGKILL
            # Nothing was cleaned up: the killed process's sockets and its checkpoint entry are still there.
            assert list((short_dir / "plugins_registry").glob("*-reg.sock"))
            assert "uid-1" in checkpoint.read_text()
            accepted = sum(r.accepted for r in dra.registrations)

            async with nvdp_process(short_dir, kubelet, two_gpu_node, fake, "second.log") as second:
                await trio.to_thread.run_sync(
                    dra.wait_for, lambda d: sum(r.accepted for r in d.registrations) > accepted, LIMIT_S)
                log = (short_dir / "second.log").read_text
                await fake.wait_for(lambda: len(slice_devices(fake)) == 2)
                again = await trio.to_thread.run_sync(dra.prepare, DRIVER, claims)
                assert again == before, log()
                ((_, _, device, cdi_ids, _),) = again["uid-1"].devices
                assert device == "gpu-1" and cdi_ids == ("k8s.gpu.nvidia.com/claim=uid-1-gpu-1",)
                # Answered from the checkpoint: the spec file is the one the killed process wrote, untouched.
                now = spec_file.stat()
                assert (now.st_ino, now.st_mtime_ns) == (written.st_ino, written.st_mtime_ns)
                assert json.loads(spec_file.read_text())["kind"] == "k8s.gpu.nvidia.com/claim"

                assert await trio.to_thread.run_sync(dra.unprepare, DRIVER, claims) == {"uid-1": ""}, log()
                assert not spec_file.exists()
                assert "uid-1" not in checkpoint.read_text()
                second.send_signal(signal.SIGTERM)
                await second.wait()
            assert second.returncode == 0, log()
