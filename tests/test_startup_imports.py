"""Start-up imports only what the configuration uses (issue 17): a node with no config file, no metrics endpoint,
no MPS and no Kubernetes API never loads PyYAML, prometheus-client, the MPS machinery, httpx or OpenSSL. Checked in a
real `python -m nvdp` process, once it has registered with the kubelet."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from bench import nodes
from nvdp.observe.metrics import Metrics, UnexportedMetrics
from nvdp.testing.kubelet_emulator import KubeletEmulator
from tests.harness import LIMIT_S
from tests.helpers import ROOT

#: Modules a default node must not import, each with the setting that would need it.
NOT_NEEDED = {
    "yaml": "a config file (or a simulated node written as YAML)",
    "prometheus_client": "a metrics endpoint",
    "httpx": "per-node configs or Kubernetes API access",
    "nvdp.mps.control_daemon": "a GPU shared through MPS",
    "nvdp.mps.supervisor": "a GPU shared through MPS",
    "nvdp.k8s.client": "per-node configs or Kubernetes API access",
    "nvdp.observe.events": "Kubernetes API access (Node Events)",
    "nvdp.core.cdi.spec": "a CDI device list strategy (cdi-annotations, cdi-cri)",
    "nvdp.core.cdi.build": "a CDI device list strategy (cdi-annotations, cdi-cri)",
    "nvdp.cdi.discover": "a CDI device list strategy (cdi-annotations, cdi-cri)",
    # nvdp.__main__.import_lean: OpenSSL (through `ssl` or `hashlib`) only for TLS, i.e. the Kubernetes API.
    "_ssl": "TLS (Kubernetes API access)",
    "_hashlib": "TLS (Kubernetes API access)",
    "importlib.metadata": "nothing: betterproto2's version is read without it",
}

CHILD = textwrap.dedent("""
    import os, signal, sys, threading, time
    from pathlib import Path

    plugin_dir = Path(sys.argv[2]).parent
    def report():
        while not any(p.name.startswith("nvidia-") for p in plugin_dir.iterdir()):
            time.sleep(0.01)
        time.sleep(0.2)  # registered, the health loop waiting: start-up is over
        print("LOADED", " ".join(m for m in watched if m in sys.modules), flush=True)
        os.kill(os.getpid(), signal.SIGTERM)

    watched = sys.argv[3:]
    sys.argv = ["nvdp", "--simulate", sys.argv[1], "--kubelet-socket", sys.argv[2]]
    threading.Thread(target=report, daemon=True).start()
    from nvdp.__main__ import main
    main()
""")


def test_a_default_node_imports_nothing_its_configuration_does_not_use(
        tmp_path: Path, kubelet: KubeletEmulator) -> None:
    node = nodes.four_gpus(tmp_path / "node.yaml")  # written as JSON, which is YAML
    env = {k: v for k, v in os.environ.items() if k not in ("CONFIG_FILE", "NODE_NAME", "KUBECONFIG")}
    env.update(METRICS_ADDRESS="", PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, "-c", CHILD, str(node), str(kubelet.socket), *NOT_NEEDED],
                            capture_output=True, text=True, timeout=LIMIT_S, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    [line] = [x for x in result.stdout.splitlines() if x.startswith("LOADED")]
    loaded = line.split()[1:]
    assert not loaded, {m: f"imported although nothing configured needs it ({NOT_NEEDED[m]})" for m in loaded}
    assert kubelet.devices("nvidia.com/gpu")  # it did serve


def test_unexported_metrics_drop_every_report_metrics_can_take() -> None:
    public = {name for name, member in vars(Metrics).items() if callable(member) and not name.startswith("_")}
    assert public  # the loop in nvdp/observe/metrics.py found them
    dropped = UnexportedMetrics()
    for name in public:
        method = getattr(dropped, name)
        arguments = [None] * (len(inspect.signature(getattr(Metrics, name)).parameters) - 1)
        assert method(*arguments) is None, name
    assert not hasattr(dropped, "registry")  # nothing to scrape


def test_the_image_byte_compiles_every_module() -> None:
    """docs/performance.md: the byte-compiled start-up figure is the image's (no `.pyc` is written at run time:
    the image sets PYTHONDONTWRITEBYTECODE, so without this every start would compile nvdp and its dependencies)."""
    text = (ROOT / "Containerfile").read_text()
    assert "/opt/nvdp/bin/python -m compileall -q /opt/nvdp/lib" in text
    assert "PYTHONDONTWRITEBYTECODE=1" in text.split("FROM ${PYTHON_IMAGE}\n", 2)[-1]


SEAMS_CHILD = textwrap.dedent("""
    import json, sys
    from nvdp.__main__ import import_lean
    import_lean()
    import asyncio.base_events, betterproto2, grpclib.client, hmac, trio
    before_tls = sorted(m for m in ("_ssl", "_hashlib", "importlib.metadata") if m in sys.modules)
    from nvdp.k8s.client import open_client
    from tests.fake_apiserver import open_fake_apiserver

    async def main():
        async with open_fake_apiserver() as fake:
            fake.set_node("node-1", {"seen": "over-tls"})
            async with open_client(fake.api_config(token=fake.token)) as client:
                return json.loads(await client.get_json("/api/v1/nodes/node-1"))["metadata"]["labels"]

    print(json.dumps({
        "before_tls": before_tls, "labels": trio.run(main), "betterproto2": betterproto2.__version__,
        "hmac": hmac.new(b"k", b"m", "sha256").hexdigest()[:8],
        "asyncio_tls": asyncio.base_events.ssl is not None, "grpclib_tls": grpclib.client._ssl is not None,
    }))
""")


def test_the_import_seams_defer_openssl_until_tls_is_used() -> None:
    """`nvdp.__main__.import_lean` (docs/performance.md): `ssl` and `hmac` run at their first use, so the
    Kubernetes API client's TLS still works; asyncio and grpclib are imported as without TLS (nvdp's gRPC runs over
    Unix sockets only); betterproto2 gets the version importlib.metadata would give it."""
    import hmac
    from importlib.metadata import version

    result = subprocess.run([sys.executable, "-c", SEAMS_CHILD], capture_output=True, text=True, timeout=LIMIT_S,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    seen = json.loads(result.stdout.splitlines()[-1])
    assert seen == {"before_tls": [], "labels": {"seen": "over-tls"}, "betterproto2": version("betterproto2"),
                    "hmac": hmac.new(b"k", b"m", "sha256").hexdigest()[:8], "asyncio_tls": False, "grpclib_tls": False}


@pytest.mark.parametrize("dist", ["betterproto2", "trio", "typing_extensions", "nvdp", "no-such-distribution"])
def test_the_version_betterproto2_gets_is_importlib_metadatas(dist: str) -> None:
    """Where several copies are on sys.path (nvdp: the checkout's egg-info before the venv's dist-info), or none,
    the real importlib.metadata answers, errors included."""
    from importlib import metadata

    from nvdp.__main__ import _dist_version

    try:
        expected: str | type[Exception] = metadata.version(dist)
    except metadata.PackageNotFoundError:
        expected = metadata.PackageNotFoundError
    if isinstance(expected, str):
        assert _dist_version(dist) == expected
    else:
        with pytest.raises(expected):
            _dist_version(dist)
