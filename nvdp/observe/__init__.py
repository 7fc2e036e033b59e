"""Observability: Prometheus metrics, the HTTP probes, structured logs, Kubernetes Events and `nvdp status`.

Nothing here decides anything about devices: the daemon reports what happened (a plan applied, an Allocate served,
an XID seen) and these modules turn it into metrics, Events and log lines. See docs/operations.md.
"""

from nvdp.observe.metrics import Metrics

__all__ = ["Metrics"]
