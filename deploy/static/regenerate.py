"""Write deploy/static/nvdp.yaml: the Helm chart rendered with its default values into kube-system.

Run from the repository root after changing the chart (needs the `test` extra, for helm-python-sdk):

    python deploy/static/regenerate.py

tests/deploy checks that the file and the chart agree.
"""

from __future__ import annotations

import pathlib

import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "nvdp"
STATIC = ROOT / "deploy" / "static" / "nvdp.yaml"
# Helm's bookkeeping labels say nothing true about an object created with kubectl.
HELM_ONLY_LABELS = ("helm.sh/chart", "app.kubernetes.io/managed-by")

HEADER = """\
# nvdp as a plain DaemonSet in kube-system: no config, no Kubernetes API access, every capability dropped.
#   kubectl create -f deploy/static/nvdp.yaml
# Generated from the Helm chart with its default values by deploy/static/regenerate.py; do not edit by hand.
"""


def render_default_objects() -> list[dict]:
    """The objects the chart renders with default values, Helm-only labels removed."""
    import helm_python as helm

    chart = helm.Chart.load(CHART)
    manifests = chart.render({}, name="nvdp", namespace="kube-system", is_install=True)
    objects = []
    for path in sorted(manifests):
        if not path.endswith((".yaml", ".yml")):
            continue
        for obj in yaml.safe_load_all(manifests[path]):
            if obj:
                for label in HELM_ONLY_LABELS:
                    obj.get("metadata", {}).get("labels", {}).pop(label, None)
                objects.append(obj)
    return objects


def main() -> None:
    docs = [yaml.safe_dump(obj, sort_keys=False, default_flow_style=False) for obj in render_default_objects()]
    STATIC.write_text(HEADER + "---\n" + "---\n".join(docs))
    print(f"wrote {STATIC.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
