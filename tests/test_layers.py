"""The runtime import graph, as a process sees it: test doubles stay out of it, and the demo says what it lacks.

The static layering (which package may import which) is `.importlinter`'s, checked by `lint-imports` in `.ci/run`;
these tests check what a static graph cannot: that the lazily imported parts (the simulated node, the demo's kubelet
emulator) are really not loaded by a daemon that does not use them, and how the CLI behaves without grpcio.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from nvdp.cli import DEMO_NEEDS

ROOT = Path(__file__).resolve().parent.parent

#: Makes grpcio look uninstalled (as without the `emulator` extra), for everything the process imports afterwards.
NO_GRPCIO = textwrap.dedent("""
    import sys

    class NoGrpcio:
        def find_spec(self, name, path=None, target=None):
            if name == "grpc" or name.startswith("grpc."):
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    sys.meta_path.insert(0, NoGrpcio())
""")


def _python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", NO_GRPCIO + textwrap.dedent(code)], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)


def test_demo_without_grpcio_says_what_to_install() -> None:
    result = _python("""
        from nvdp.cli import main
        sys.exit(main(["demo"]))
    """)
    assert result.returncode == 1, result.stderr
    assert result.stderr == f"nvdp demo: {DEMO_NEEDS}\n"
    assert "pip install 'nvdp[emulator]'" in result.stderr
    assert result.stdout == ""


def test_the_daemon_loads_no_test_double_and_no_simulator() -> None:
    result = _python("""
        import nvdp.cli, nvdp.daemon, nvdp.node_config, nvdp.k8s.watch, nvdp.kubelet.socket_watch
        from nvdp.cli import main

        try:
            main(["--help"])
        except SystemExit as exc:
            assert exc.code == 0, exc.code
        loaded = sorted(m for m in sys.modules if m.partition(".")[0] == "grpc" or m.startswith(("nvdp.testing",
                                                                                                 "nvdp.sim")))
        print("loaded:", loaded)
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "loaded: []"
