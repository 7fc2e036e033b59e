"""Plugin CPU per Allocate / GetPreferredAllocation, compared between working copies in interleaved rounds.

    .venv/bin/python scripts/allocate_cpu.py [--rounds 5] [--calls 2000] TREE [TREE ...]

Each TREE is a checkout of nvdp (e.g. `git archive main | tar -x -C /tmp/base`); in every round each tree in turn
starts `python -m nvdp --simulate` (through bench.harness, with that tree's code) and answers, after 200 warm-up
calls: Allocate of 1 GPU (4-GPU node, defaults), Allocate of 4 GPUs and GetPreferredAllocation of 2 out of 8 (8-GPU
NVLink node, volume-mounts + device specs), then 8 client threads on one channel for 3 s. CPU is the daemon's, all
threads, from /proc (`bench.harness.thread_cpu_ns`), divided by the calls: less sensitive to a shared machine's load
than latencies are. Prints the median per tree and figure, and each tree's per-round ratios to the first tree.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROUND = r"""
import json, sys, tempfile, threading, time
from pathlib import Path
from bench import nodes
from bench.harness import Nvdp, allocate_request, cpu_seconds_between, percentile, preferred_request, thread_cpu_ns
GPU, CALLS = "nvidia.com/gpu", int(sys.argv[1])
out = {}

def measure(n, name, request, label):
    call = n.raw_method(GPU, name)
    for _ in range(200):
        call(request, timeout=5.0)
    before, lat = thread_cpu_ns(n.pid), []
    for _ in range(CALLS):
        t = time.perf_counter_ns(); call(request, timeout=5.0); lat.append((time.perf_counter_ns() - t) / 1e3)
    lat.sort()
    out[label + " cpu_us"] = cpu_seconds_between(before, thread_cpu_ns(n.pid)) / CALLS * 1e6
    out[label + " p50_us"], out[label + " p99_us"] = percentile(lat, 0.5), percentile(lat, 0.99)

def throughput(n, request, clients=8, seconds=3.0):
    call = n.raw_method(GPU, "Allocate")
    done, stop = [0] * clients, time.monotonic() + seconds
    def worker(i):
        while time.monotonic() < stop:
            call(request, timeout=5.0); done[i] += 1
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for t in threads: t.start()
    for t in threads: t.join()
    out["allocate 1 GPU, 8 clients per_s"] = sum(done) / seconds

with tempfile.TemporaryDirectory() as tmp:
    wd = Path(tmp) / "base"; wd.mkdir()
    with Nvdp(wd, nodes.four_gpus(wd / "node.yaml")) as n:
        assert n.wait_resources([GPU])
        request = allocate_request([next(iter(n.kubelet.devices(GPU)))])
        measure(n, "Allocate", request, "allocate 1 GPU")
        throughput(n, request)
    wd = Path(tmp) / "nvlink8"; wd.mkdir()
    args = ["--device-list-strategy", "volume-mounts", "--pass-device-specs", "true"]
    with Nvdp(wd, nodes.eight_gpus_nvlink(wd / "node.yaml"), args) as n:
        assert n.wait_resources([GPU])
        ids = list(n.kubelet.devices(GPU))
        measure(n, "Allocate", allocate_request(ids[:4]), "allocate 4 GPUs vm+specs")
        measure(n, "GetPreferredAllocation", preferred_request(ids, 2), "preferred 2 of 8")
print(json.dumps(out))
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("trees", nargs="+", type=Path)
    args = parser.parse_args()
    results: dict[tuple[str, str], list[float]] = {}
    for r in range(args.rounds):
        for tree in args.trees:
            done = subprocess.run([sys.executable, "-c", ROUND, str(args.calls)], cwd=tree, capture_output=True,
                                  text=True, check=False)
            if done.returncode != 0:
                print(done.stderr, file=sys.stderr)
                return 1
            for key, value in json.loads(done.stdout.splitlines()[-1]).items():
                results.setdefault((str(tree), key), []).append(value)
            print(f"round {r + 1}/{args.rounds} {tree}: {done.stdout.strip()}", file=sys.stderr)
    for (tree, key), values in sorted(results.items()):
        print(f"{tree}\t{key}\tmedian {statistics.median(values):.0f}\tall {[round(v) for v in values]}")
    # On a shared machine a round's figures move together: the ratio of two trees within a round (they ran one
    # after the other) is steadier than the ratio of their medians.
    first = str(args.trees[0])
    for (tree, key), values in sorted(results.items()):
        if tree != first:
            ratios = [v / b for v, b in zip(values, results[(first, key)], strict=True)]
            print(f"{tree}\t{key}\tper-round ratio to {first}: median {statistics.median(ratios):.2f}"
                  f"\tall {[round(r, 2) for r in ratios]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
