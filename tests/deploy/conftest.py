"""Helpers for the deployment tests: render the Helm chart with the real Helm engine and look at the objects.

helm-python-sdk (the `test` extra) embeds Helm's Go engine; rendering validates values.schema.json and runs the
chart's `fail` checks exactly as `helm install` does. A missing tool fails these tests; it never skips them.
"""

from __future__ import annotations

import pathlib
import shutil
import sys
from dataclasses import dataclass

import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
CHART_DIR = ROOT / "deploy" / "helm" / "nvdp"
HERE = pathlib.Path(__file__).resolve().parent


@dataclass
class Rendered:
    """What one `helm install` would create, plus its NOTES."""

    objects: list[dict]
    notes: str

    def of_kind(self, kind: str) -> list[dict]:
        return [o for o in self.objects if o["kind"] == kind]

    def one(self, kind: str) -> dict:
        found = self.of_kind(kind)
        assert len(found) == 1, f"expected one {kind}, got {len(found)}"
        return found[0]

    @property
    def daemonset(self) -> dict:
        """The plugin's DaemonSet (with MPS there is a second one, the MPS host's)."""
        plugin = [d for d in self.of_kind("DaemonSet") if not d["metadata"]["name"].endswith("-mps-host")]
        assert len(plugin) == 1, f"expected one plugin DaemonSet, got {len(plugin)}"
        return plugin[0]

    @property
    def mps_host(self) -> dict | None:
        hosts = [d for d in self.of_kind("DaemonSet") if d["metadata"]["name"].endswith("-mps-host")]
        assert len(hosts) <= 1
        return hosts[0] if hosts else None

    @property
    def pod(self) -> dict:
        return self.daemonset["spec"]["template"]["spec"]

    @property
    def container(self) -> dict:
        containers = self.pod["containers"]
        assert len(containers) == 1, "nvdp runs as exactly one container"
        assert not self.pod.get("initContainers"), "nvdp needs no init container"
        return containers[0]

    @property
    def env(self) -> dict[str, object]:
        """name -> value (a string) or valueFrom (a dict)."""
        out: dict[str, object] = {}
        for var in self.container.get("env", []):
            assert var["name"] not in out, f"env {var['name']} set twice"
            out[var["name"]] = var["value"] if "value" in var else var["valueFrom"]
        return out

    @property
    def security_context(self) -> dict:
        return self.container["securityContext"]

    def mount(self, mount_path: str) -> tuple[dict, dict]:
        """The volumeMount at mount_path and the volume behind it."""
        mounts = [m for m in self.container.get("volumeMounts", []) if m["mountPath"] == mount_path]
        assert len(mounts) == 1, f"no single mount at {mount_path}: {self.container.get('volumeMounts')}"
        volumes = [v for v in self.pod.get("volumes", []) if v["name"] == mounts[0]["name"]]
        assert len(volumes) == 1
        return mounts[0], volumes[0]

    def mount_paths(self) -> set[str]:
        return {m["mountPath"] for m in self.container.get("volumeMounts", [])}


@pytest.fixture(scope="session")
def helm():
    import helm_python

    return helm_python


@pytest.fixture(scope="session")
def chart(helm):
    return helm.Chart.load(CHART_DIR)


@pytest.fixture(scope="session")
def render(chart):
    """render(values, namespace=...) -> Rendered, as `helm install nvdp deploy/helm/nvdp` would create it."""

    def _render(values: dict | None = None, *, name: str = "nvdp", namespace: str = "nvdp") -> Rendered:
        manifests = chart.render(values or {}, name=name, namespace=namespace, is_install=True)
        objects: list[dict] = []
        notes = ""
        for path in sorted(manifests):
            if path.endswith("NOTES.txt"):
                notes = manifests[path]
            elif path.endswith((".yaml", ".yml")):
                objects.extend(o for o in yaml.safe_load_all(manifests[path]) if o)
        return Rendered(objects, notes)

    return _render


@pytest.fixture(scope="session")
def render_error(chart, helm):
    """render_error(values) -> the message of the error `helm install` stops with."""

    def _render_error(values: dict, *, namespace: str = "nvdp") -> str:
        with pytest.raises(helm.HelmError) as info:
            chart.render(values, name="nvdp", namespace=namespace, is_install=True)
        return str(info.value)

    return _render_error


@pytest.fixture(scope="session")
def values_file():
    """values_file(name) -> the values in tests/deploy/<name>."""
    return lambda name: yaml.safe_load((HERE / name).read_text())


@pytest.fixture(scope="session")
def tool():
    """tool(name) -> path of a required command-line tool: the venv's bin first, then PATH. Missing fails."""

    def _tool(name: str) -> str:
        venv_bin = pathlib.Path(sys.executable).parent / name
        found = str(venv_bin) if venv_bin.exists() else shutil.which(name)
        if not found:
            pytest.fail(f"{name} is required by tests/deploy and is not installed (see docs/deployment.md, 'Tests')")
        return found

    return _tool
