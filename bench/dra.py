"""`python -m bench.dra [--rounds N] [--warmup N] [--json]`, from the repository root: DRA on the simulated node.

`python -m nvdp --dra` runs as a child process (bench.harness.Nvdp) on a 4-GPU simulated node
(bench.nodes.four_gpus, every GPU DRA's); this process hosts the fake API server (its own trio thread,
bench.apiserver) and the DRA kubelet emulator (nvdp/testing/dra_emulator.py, grpcio). Figures, in ms:

* `startup.slices`: process spawned -> the fake API server holds the node's ResourceSlices (polled every 1 ms, so
  up to 1 ms late);
* `startup.registered`: process spawned -> the emulator accepted the driver's registration;
* `prepare` / `unprepare`: one whole-GPU claim's NodePrepareResources / NodeUnprepareResources round trip, seen by
  the emulator's client, alternating, after the warm-up rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import nodes
from bench.apiserver import ApiServerThread
from bench.harness import FigureError, Nvdp, latency_stats
from nvdp.testing.dra_emulator import DraKubeletEmulator

NODE_NAME = "gpu-node-bench"
DRIVER = "gpu.nvidia.com"
CLAIM = ("default", "uid-bench", "claim-bench")
START_TIMEOUT_S = 60.0


def _claim(device: str) -> dict[str, Any]:
    namespace, uid, name = CLAIM
    return {
        "apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaim",
        "metadata": {"name": name, "namespace": namespace, "uid": uid, "resourceVersion": "1"},
        "spec": {"devices": {"requests": [{"name": "gpu", "exactly": {"deviceClassName": DRIVER}}]}},
        "status": {"allocation": {"devices": {"results": [
            {"request": "gpu", "driver": DRIVER, "pool": NODE_NAME, "device": device}], "config": []}},
            "reservedFor": [{"resource": "pods", "name": "p", "uid": "pod-bench"}]},
    }


def _slice_count(api: ApiServerThread) -> int:
    return int(api.call(lambda: sum(len(s["spec"].get("devices", [])) for s in api.fake.resourceslices(NODE_NAME))))


def run(rounds: int = 200, warmup: int = 20) -> dict[str, Any]:
    """The figures as a dict (ms), with the load average before and after."""
    from tests.fake_apiserver import write_kubeconfig  # the test extras (hypercorn, trustme)

    load_before = os.getloadavg()
    with (tempfile.TemporaryDirectory(prefix="nvdp-bd-") as short, tempfile.TemporaryDirectory() as work,
          ApiServerThread() as api):
        short_dir, workdir = Path(short), Path(work)
        api.call(api.fake.set_node, NODE_NAME)
        api.call(api.fake.set_resourceclaim, _claim("gpu-0"))
        kubeconfig = write_kubeconfig(workdir / "kubeconfig", api.fake, token=api.fake.token)
        args = ["--dra", "--node-name", NODE_NAME, "--kubeconfig", str(kubeconfig),
                "--cdi-root", str(short_dir / "cdi"), "--kubelet-registry-dir", str(short_dir / "registry"),
                "--kubelet-plugins-dir", str(short_dir / "plugins")]
        with DraKubeletEmulator(short_dir / "registry") as dra, \
                Nvdp(workdir, nodes.four_gpus(workdir / "node.yaml"), args) as n:
            deadline = n.spawned_at + START_TIMEOUT_S
            while _slice_count(api) == 0:
                if time.monotonic() > deadline or not n.alive():
                    raise FigureError(f"no ResourceSlice published; log tail:\n{n.log_tail()}")
                time.sleep(0.001)
            slices_at = time.monotonic()
            try:
                dra.wait_for(lambda d: DRIVER in d.plugins, max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                raise FigureError(f"the driver did not register; log tail:\n{n.log_tail()}") from None
            registered_at = max(r.at for r in dra.registrations if r.driver == DRIVER and r.accepted)

            prepare_ms: list[float] = []
            unprepare_ms: list[float] = []
            for i in range(warmup + rounds):
                started = time.monotonic()
                answer = dra.prepare(DRIVER, [CLAIM])
                prepared = time.monotonic()
                done = dra.unprepare(DRIVER, [CLAIM])
                ended = time.monotonic()
                if answer[CLAIM[1]].error or done != {CLAIM[1]: ""}:
                    raise FigureError(f"round {i}: prepare {answer}, unprepare {done}; log tail:\n{n.log_tail()}")
                if i >= warmup:
                    prepare_ms.append(1000 * (prepared - started))
                    unprepare_ms.append(1000 * (ended - prepared))
            devices = _slice_count(api)
    return {
        "startup": {"slices": 1000 * (slices_at - n.spawned_at), "registered": 1000 * (registered_at - n.spawned_at),
                    "devices": devices},
        "prepare": latency_stats(prepare_ms),
        "unprepare": latency_stats(unprepare_ms),
        "rounds": rounds, "warmup": warmup,
        "loadavg": {"before": load_before[0], "after": os.getloadavg()[0]}, "cpus": os.cpu_count(),
    }


def markdown(figures: dict[str, Any]) -> str:
    rows = [f"| {name} | {figures[name]['p50']:.2f} | {figures[name]['p99']:.2f} |"
            for name in ("prepare", "unprepare")]
    start = figures["startup"]
    load = figures["loadavg"]
    return "\n".join([
        f"{figures['rounds']} rounds after {figures['warmup']} warm-up, {start['devices']} GPUs published; "
        f"load average {load['before']:.1f} -> {load['after']:.1f} on {figures['cpus']} CPUs.", "",
        "| call (one whole-GPU claim) | p50 ms | p99 ms |", "|---|---:|---:|", *rows, "",
        f"Start to ResourceSlices on the API server: {start['slices']:.0f} ms; "
        f"start to registration with the kubelet: {start['registered']:.0f} ms.",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.dra", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--json", action="store_true", help="print the figures as JSON instead of a table")
    options = parser.parse_args(argv)
    try:
        figures = run(options.rounds, options.warmup)
    except FigureError as exc:
        print(f"bench.dra: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(figures, indent=2) if options.json else markdown(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
