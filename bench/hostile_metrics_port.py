"""`python -m bench.hostile_metrics_port [--held N] [--probes K]`: /healthz latency and server RSS while N idle or
slowloris (one byte a second) connections are held against the metrics port (issue 14, item 2).

The server is `nvdp.observe.http.serve_http` alone in a child process (the daemon's HTTP task, nothing else on its
loop); the attackers and the prober run here. Prints one line per scenario; docs/security.md quotes the figures.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

import trio

SERVER = """
import os, importlib.util
import trio
if os.environ.get("NVDP_BENCH_HTTP_MODULE"):  # compare with another version of nvdp/observe/http.py
    spec = importlib.util.spec_from_file_location("other_http", os.environ["NVDP_BENCH_HTTP_MODULE"])
    other = importlib.util.module_from_spec(spec)
    import sys; sys.modules["other_http"] = other
    spec.loader.exec_module(other)
    ProbeState, serve_http = other.ProbeState, other.serve_http
else:
    from nvdp.observe.http import ProbeState, serve_http
from nvdp.observe.metrics import Metrics

async def main():
    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve_http, "127.0.0.1:0", Metrics(), ProbeState())
        print(port, flush=True)

trio.run(main)
"""


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


async def probe(port: int) -> tuple[float, bool]:
    started = time.perf_counter()
    ok = False
    with trio.move_on_after(5):
        try:
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                await stream.send_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                data = b""
                while chunk := await stream.receive_some(4096):
                    data += chunk
            ok = data.startswith(b"HTTP/1.1 200")
        except (OSError, trio.BrokenResourceError):
            ok = False
    return time.perf_counter() - started, ok


async def scenario(port: int, pid: int, kind: str, held: int, probes: int) -> str:
    hogs: list[trio.SocketStream] = []
    async with trio.open_nursery() as nursery:
        async def hold() -> None:
            # Re-open whatever the server closes, as the attacker did (every 10 s there; here at once).
            while True:
                while len(hogs) < held:
                    hog = await trio.open_tcp_stream("127.0.0.1", port)
                    hogs.append(hog)
                    if kind == "slowloris":
                        nursery.start_soon(trickle, hog)
                await trio.sleep(0.05)
                for hog in list(hogs):
                    with trio.move_on_after(0):
                        try:
                            if await hog.receive_some(1) == b"":
                                hogs.remove(hog)
                                await hog.aclose()
                        except trio.BrokenResourceError:
                            hogs.remove(hog)

        async def trickle(hog: trio.SocketStream) -> None:
            try:
                for byte in b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 1000:
                    await hog.send_all(bytes([byte]))
                    await trio.sleep(1)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

        if kind != "none":
            nursery.start_soon(hold)
            await trio.sleep(1)
        results = []
        for _ in range(probes):
            results.append(await probe(port))
            await trio.sleep(0.01)
        rss = rss_kib(pid)
        nursery.cancel_scope.cancel()
    for hog in hogs:
        await trio.aclose_forcefully(hog)
    latencies = sorted(r[0] for r in results if r[1])
    failed = sum(1 for r in results if not r[1])
    if not latencies:
        return f"{kind:9} held={held:4}: every probe failed ({failed}/{probes}); server RSS {rss / 1024:.1f} MiB"
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
    return (f"{kind:9} held={held:4}: /healthz ok {len(latencies)}/{probes}, median "
            f"{statistics.median(latencies) * 1000:.2f} ms, p99 {p99 * 1000:.2f} ms, max {latencies[-1] * 1000:.2f} ms;"
            f" server RSS {rss / 1024:.1f} MiB")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.hostile_metrics_port")
    parser.add_argument("--held", type=int, nargs="*", default=[64, 128, 512])
    parser.add_argument("--probes", type=int, default=200)
    args = parser.parse_args()
    server = subprocess.Popen([sys.executable, "-c", SERVER], stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline())
        print(trio.run(scenario, port, server.pid, "none", 0, args.probes), flush=True)
        for held in args.held:
            for kind in ("idle", "slowloris"):
                print(trio.run(scenario, port, server.pid, kind, held, args.probes), flush=True)
    finally:
        server.terminate()
        server.wait(10)


if __name__ == "__main__":
    main()
