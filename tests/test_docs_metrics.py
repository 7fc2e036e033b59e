"""docs/operations.md lists every metric nvdp exports, and nothing it does not: a metric added or renamed without
the table (or a table row for a metric that is gone) fails here."""

from __future__ import annotations

import re
from pathlib import Path

from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from nvdp.observe.metrics import Metrics
from tests.observe_fixtures import GPU0, GPU1, inventory, plan

DOC = Path(__file__).resolve().parents[1] / "docs" / "operations.md"
ROW = re.compile(r"^\| `(nvdp_[a-z0-9_]+)` \|", re.MULTILINE)


def exported() -> set[str]:
    """Every family a daemon exports once each kind of thing has happened at least once."""
    metrics = Metrics(clock=lambda: 1_700_000_000.0)
    the_plan = plan(mps=True)
    metrics.plan_applied(the_plan, inventory(), "default", 1, 0.01)
    metrics.health_changed(the_plan, {f"{GPU1}::0": "XID 79"})
    metrics.reload_failed("other", "bad")
    metrics.mps_daemon(GPU1, True, 0.002)
    metrics.mps_restart(GPU1)
    metrics.registered("nvidia.com/gpu")
    metrics.kubelet_restart()
    metrics.xid(GPU0, 79)
    metrics.allocate_observed("nvidia.com/gpu", 0.001, ok=False)
    metrics.preferred_observed("nvidia.com/gpu", 0.001, ok=False)
    metrics.watch_reconnected("node")
    metrics.watch_relisted("node")
    metrics.config_label_unknown("nope")
    metrics.event_recorded("ConfigApplied", "posted")
    metrics.child_up("server nvidia.com/gpu", True)
    metrics.child_restarted("server nvidia.com/gpu")
    metrics.http_shed("limit")
    metrics.dra_call("prepare", 0.01, claims=2, failed=1)
    metrics.slices_published("gpu.nvidia.com", 1, 1, 2)
    metrics.slice_write("gpu.nvidia.com", "create", ok=True)
    metrics.share_hosts_waiting("gpu.nvidia.com", 1)
    metrics.config_warnings("default", [("c.yaml: $.flags.foo", "unknown key `foo` ignored")])
    names = set()
    for family in text_string_to_metric_families(generate_latest(metrics.registry).decode()):
        for sample in family.samples:
            if sample.name.endswith(("_created", "_bucket", "_sum")):
                continue
            names.add(sample.name.removesuffix("_count") if family.type == "histogram" else sample.name)
    return names


def test_every_exported_metric_is_documented_and_every_documented_one_exported() -> None:
    documented = set(ROW.findall(DOC.read_text()))
    assert documented, "no metric table found in docs/operations.md"
    names = exported()
    assert names - documented == set(), "exported but not documented in docs/operations.md"
    assert documented - names == set(), "documented in docs/operations.md but not exported"
