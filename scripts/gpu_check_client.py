#!/usr/bin/env python3
"""One CUDA client for `scripts/gpu-check`: what a container's process would see under an MPS slice.

It is started on the host with exactly the MPS environment nvdp's Allocate returned (or none, for the unshared
baseline) and reports, as one JSON line prefixed `GPUCHECK-RESULT `:

* whether CUDA came up and whether NVML lists this PID among the GPU's MPS client processes;
* how much device memory it could take, in fixed steps until an allocation fails (or a cap is reached);
* the throughput of a square bf16 matmul for a few seconds, optionally started on a signal (a file appearing) so
  that two clients measure at the same time.

Only PyTorch and, if present, pynvml are needed: no nvdp import, so the environment it runs in is exactly the
client's. It never changes a GPU setting.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

PREFIX = "GPUCHECK-RESULT "  # nvdp.gpucheck.CLIENT_PREFIX; repeated to keep this file free of nvdp imports


def listed_as_mps_client(pid: int) -> bool | None:
    """Whether NVML lists `pid` as an MPS client on some GPU; None when NVML cannot say."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:
        return None
    try:
        answered = False
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            try:
                processes = pynvml.nvmlDeviceGetMPSComputeRunningProcesses(handle)
            except pynvml.NVMLError:
                continue
            answered = True
            if any(p.pid == pid for p in processes):
                return True
        return False if answered else None
    finally:
        pynvml.nvmlShutdown()


def probe_memory(torch: Any, step_mib: int, cap_mib: int) -> tuple[int, str]:
    """Allocate `step_mib` blocks until one fails or `cap_mib` is reached; returns (MiB held, why it stopped)."""
    blocks = []
    stop = "cap"
    try:
        while (len(blocks) + 1) * step_mib <= cap_mib:
            block = torch.empty(step_mib * 1024 * 1024, dtype=torch.uint8, device="cuda")
            # Touch it: a limit that were only enforced on first use must show here too.
            block.zero_()
            blocks.append(block)
        torch.cuda.synchronize()
    except torch.cuda.OutOfMemoryError:
        stop = "out of memory"
    except RuntimeError as exc:
        stop = f"error: {str(exc).splitlines()[0][:160]}"
    held = len(blocks) * step_mib
    del blocks
    torch.cuda.empty_cache()
    return held, stop


def matmul_rate(torch: Any, n: int, seconds: float, go_file: Path | None, ready_file: Path | None,
                wait_s: float) -> dict[str, float]:
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    c = torch.empty(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(5):  # warm-up: cuBLAS picks its kernel, clocks ramp
        torch.matmul(a, b, out=c)
    torch.cuda.synchronize()
    if ready_file is not None:
        ready_file.touch()
    if go_file is not None:
        deadline = time.monotonic() + wait_s
        while not go_file.exists():
            if time.monotonic() > deadline:
                raise TimeoutError(f"no start signal ({go_file}) within {wait_s:.0f} s")
            time.sleep(0.005)
    start_wall, start = time.time(), time.perf_counter()
    iterations = 0
    while True:
        for _ in range(4):
            torch.matmul(a, b, out=c)
        torch.cuda.synchronize()
        iterations += 4
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            break
    return {"tflops": 2 * n**3 * iterations / elapsed / 1e12, "matmul_start": start_wall,
            "matmul_end": start_wall + elapsed}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", default="client")
    parser.add_argument("--mem-step-mib", type=int, default=256)
    parser.add_argument("--mem-cap-mib", type=int, default=0, help="0: skip the memory probe")
    parser.add_argument("--matmul-n", type=int, default=4096)
    parser.add_argument("--matmul-s", type=float, default=3.0, help="0: skip the matmul")
    parser.add_argument("--ready-file", type=Path, default=None, help="touched when about to wait for --go-file")
    parser.add_argument("--go-file", type=Path, default=None, help="start the matmul once this file exists")
    parser.add_argument("--wait-s", type=float, default=120.0)
    args = parser.parse_args()

    result: dict[str, Any] = {"label": args.label, "pid": os.getpid(),
                              "env": {k: v for k, v in os.environ.items() if k.startswith("CUDA_MPS_")}}
    try:
        import torch

        result["torch"] = torch.__version__
        torch.zeros(1, device="cuda")  # creates the context: under MPS this is where the client connects
        torch.cuda.synchronize()
        result["cuda_ok"] = True
        result["device"] = torch.cuda.get_device_name(0)
        result["device_count"] = torch.cuda.device_count()
        free, total = torch.cuda.mem_get_info()
        result["mem_free_mib"], result["mem_total_mib"] = free >> 20, total >> 20
        result["mps_listed"] = listed_as_mps_client(os.getpid())
        if args.mem_cap_mib > 0:
            result["alloc_mib"], result["alloc_stop"] = probe_memory(torch, args.mem_step_mib, args.mem_cap_mib)
        if args.matmul_s > 0:
            result.update(matmul_rate(torch, args.matmul_n, args.matmul_s, args.go_file, args.ready_file,
                                      args.wait_s))
    except Exception as exc:  # report whatever broke; the orchestrator judges
        result["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
    print(PREFIX + json.dumps(result), flush=True)
    return 0 if "error" not in result else 1


if __name__ == "__main__":
    sys.exit(main())
