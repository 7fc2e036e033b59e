"""MPS health that does not flap: with another process using one core flat out for a minute, no MPS replica leaves
Healthy. The daemon runs with its real probe settings (every second, 3 s deadline, Unhealthy after 3 failures in
a row) on a simulated 4-GPU node, MPS-sharing every GPU in 4 replicas; the kubelet emulator sees every ListAndWatch
update (nvdp sends one only when something changes, so no update at all means no replica ever left Healthy)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import trio

from nvdp.core.config.load import parse_config
from nvdp.core.config.settings import resolve
from nvdp.testing.kubelet_emulator import KubeletEmulator
from tests.harness import LogWatch, daemon, until
from tests.helpers import gpu, write_node

HOG_S = 60.0
RESOURCE = "nvidia.com/gpu"
CONFIG = "version: v1\nsharing:\n  mps:\n    resources:\n    - {name: nvidia.com/gpu, replicas: 4}\n"


@pytest.mark.slow  # a minute under a CPU hog, by design
async def test_no_mps_replica_leaves_healthy_under_a_one_core_cpu_hog(
        tmp_path: Path, kubelet: KubeletEmulator, short_dir: Path, logs: LogWatch) -> None:
    node = write_node(tmp_path / "node.yaml", [gpu(i) for i in range(4)])
    settings = resolve({"simulate": str(node), "kubelet_socket": str(kubelet.socket), "mps_root": str(short_dir),
                        "metrics_address": ""}, {}, parse_config(CONFIG, "config.yaml"))
    assert (settings.mps_probe_timeout, settings.mps_probe_failures) == (3.0, 3)  # the defaults, untouched
    # The venv's python first: the fake control program (`#!/usr/bin/env python3`) starts without a pyenv shim.
    search_path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", os.defpath)])
    async with daemon(settings, search_path=search_path):
        await until(kubelet, lambda k: len(k.devices(RESOURCE)) == 16
                    and set(k.devices(RESOURCE).values()) == {"Healthy"}, what="16 Healthy MPS replicas")
        endpoint = kubelet.endpoint(RESOURCE)
        assert endpoint is not None
        updates = endpoint.updates
        hog = await trio.lowlevel.open_process([sys.executable, "-c", "while True: pass"])
        try:
            await trio.sleep(HOG_S)  # the scenario's length, not a bound on anything
        finally:
            hog.kill()
            with trio.CancelScope(shield=True):
                await hog.wait()
        devices = kubelet.devices(RESOURCE)
        assert set(devices.values()) == {"Healthy"} and len(devices) == 16, devices
        # Every change of any replica's health is a ListAndWatch update: there was none.
        assert endpoint.updates == updates, f"{endpoint.updates - updates} health update(s) during the hog"
    flaps = [m for m in logs.messages() if "probes in a row" in m]
    assert not flaps, flaps
    missed = sum("failed a probe" in m for m in logs.messages())
    print(f"probes that missed their deadline under the hog (none made a replica Unhealthy): {missed}")
