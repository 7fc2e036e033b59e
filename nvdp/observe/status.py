"""`nvdp status`: what a running daemon serves, read from its metrics endpoint and shown as tables.

It reads only what the daemon exports (`/metrics`, `/healthz`, `/readyz`), so what an operator sees here is what
Prometheus sees; there is no second channel into the daemon to keep in sync.
"""

from __future__ import annotations

import datetime
import sys
import urllib.error
import urllib.request
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

from nvdp.core.config.settings import parse_address

DEFAULT_ADDRESS = "127.0.0.1:9400"
TIMEOUT_S = 3.0

Labels = dict[str, str]


class StatusError(Exception):
    """The endpoint cannot be reached or does not serve nvdp metrics."""


@dataclass
class Probe:
    ok: bool
    detail: str


@dataclass
class Samples:
    """Samples by name, e.g. samples["nvdp_devices"] -> [(labels, value), ...]."""

    by_name: dict[str, list[tuple[Labels, float]]] = field(default_factory=lambda: defaultdict(list))

    @classmethod
    def parse(cls, text: str) -> Samples:
        samples = cls()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                samples.by_name[sample.name].append((dict(sample.labels), sample.value))
        return samples

    def get(self, name: str) -> list[tuple[Labels, float]]:
        return self.by_name.get(name, [])

    def value(self, name: str, default: float | None = None, **labels: str) -> float | None:
        for have, value in self.get(name):
            if all(have.get(k) == v for k, v in labels.items()):
                return value
        return default

    def total(self, name: str, **labels: str) -> float:
        return sum(v for have, v in self.get(name) if all(have.get(k) == w for k, w in labels.items()))


def base_url(address: str) -> str:
    host, port = parse_address(address)
    host = host or "127.0.0.1"  # ":9400" serves every interface; loopback is one of them
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


#: No proxies: the daemon is on this node, and an HTTP_PROXY meant for the outside world must not intercept it.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _get(url: str, timeout: float) -> tuple[int, str]:
    try:
        with _OPENER.open(url, timeout=timeout) as response:
            return response.status, response.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:  # 503 from a probe is an answer, not a failure
        with exc:
            return exc.code, exc.read().decode("utf-8", "replace")


def fetch(address: str, timeout: float = TIMEOUT_S) -> tuple[Samples, Probe, Probe]:
    url = base_url(address)
    try:
        code, text = _get(url + "/metrics", timeout)
        if code != 200:
            raise StatusError(f"{url}/metrics answered HTTP {code}: {text.strip()[:200]}")
        probes = []
        for path in ("/healthz", "/readyz"):
            code, body = _get(url + path, timeout)
            probes.append(Probe(code == 200, body.strip()))
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise StatusError(f"cannot reach nvdp at {url}: {reason}") from None
    try:
        samples = Samples.parse(text)
    except ValueError as exc:
        raise StatusError(f"{url}/metrics is not in the Prometheus text format: {exc}") from None
    if not samples.get("nvdp_build_info"):
        raise StatusError(f"{url}/metrics does not look like nvdp's metrics (no nvdp_build_info)")
    return samples, probes[0], probes[1]


def table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> list[str]:
    cells = [list(header)] + [[_cell(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells]


def _cell(value: object) -> str:
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else f"{value:.3g}"
    return str(value)


def _when(timestamp: float | None) -> str:
    if not timestamp:
        return "-"
    return datetime.datetime.fromtimestamp(timestamp, tz=datetime.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _xids(samples: Samples, uuid: str) -> str:
    """Every XID NVML reported for the GPU, and in parentheses those the health policy counts as critical."""
    total = samples.total("nvdp_xid_events_total", uuid=uuid)
    critical = samples.total("nvdp_xid_events_total", uuid=uuid, critical="true")
    return f"{_cell(total)} ({_cell(critical)})"


def render(samples: Samples, health: Probe, ready: Probe, source: str = "") -> str:
    out: list[str] = []
    version = next((labels.get("version", "?") for labels, _ in samples.get("nvdp_build_info")), "?")
    out.append(f"nvdp {version}" + (f" at {source}" if source else ""))
    out.append(f"health:  {'ok' if health.ok else 'FAILING'}" + ("" if health.ok else f" ({health.detail})"))
    out.append(f"ready:   {'yes' if ready.ok else 'no'}" + ("" if ready.ok else f" ({ready.detail})"))

    config = next((labels.get("name", "") for labels, _ in samples.get("nvdp_config_info")), None)
    if config is not None:
        generation = samples.value("nvdp_config_generation", 0)
        applied = samples.total("nvdp_config_reloads_total", result="applied")
        failed = samples.total("nvdp_config_reloads_total", result="failed")
        last_ok = samples.value("nvdp_config_last_reload_successful", 1)
        out.append(f"config:  {config or '(default)'}, generation {_cell(generation)}, applied "
                   f"{_when(samples.value('nvdp_config_last_reload_success_timestamp_seconds'))}; reloads: "
                   f"{_cell(applied)} applied, {_cell(failed)} failed"
                   + ("" if last_ok else " (the last reload was REJECTED)"))
    out.append(f"kubelet: {_cell(samples.value('nvdp_kubelet_restarts_total', 0))} restart(s) seen")

    resources = sorted({labels["resource"] for labels, _ in samples.get("nvdp_devices")})
    out.append("")
    if resources:
        out += table(
            ["RESOURCE", "HEALTHY", "UNHEALTHY", "REGISTRATIONS", "LAST REGISTERED", "ALLOCATE", "ERRORS"],
            [[r,
              samples.value("nvdp_devices", 0, resource=r, health="Healthy"),
              samples.value("nvdp_devices", 0, resource=r, health="Unhealthy"),
              samples.value("nvdp_registrations_total", 0, resource=r),
              _when(samples.value("nvdp_last_registration_timestamp_seconds", resource=r)),
              samples.value("nvdp_allocate_duration_seconds_count", 0, resource=r),
              samples.value("nvdp_allocate_errors_total", 0, resource=r)]
             for r in resources])
    else:
        out.append("no resources advertised")

    gpus = sorted(samples.get("nvdp_gpu_info"), key=lambda s: int(s[0].get("index", "0") or 0))
    if gpus:
        replicas: dict[str, list[str]] = defaultdict(list)
        for labels, value in sorted(samples.get("nvdp_replicas"), key=lambda s: s[0]["resource"]):
            replicas[labels["uuid"]].append(f"{labels['resource'].removeprefix('nvidia.com/')}={_cell(value)}")
        out.append("")
        out += table(["GPU", "UUID", "NAME", "MIG", "DEVICES", "XIDS (CRITICAL)"],
                     [[g["index"], g["uuid"], g["name"], "yes" if g.get("mig") == "true" else "no",
                       " ".join(replicas.get(g["uuid"], [])) or "-", _xids(samples, g["uuid"])] for g, _ in gpus])

    unhealthy = samples.get("nvdp_device_unhealthy")
    if unhealthy:
        out.append("")
        out += table(["UNHEALTHY DEVICE", "GPU", "REASON"],
                     [[labels["device"], labels["gpu"], labels["reason"]] for labels, _ in unhealthy])

    warnings = samples.get("nvdp_config_warnings")
    if warnings:
        # What the config asks that nvdp serves with upstream's or the fork's meaning (docs/compatibility.md).
        out.append("")
        out += table(["CONFIG WARNING", "WHAT NVDP DOES"], [[labels["path"], labels["message"]]
                                                             for labels, _ in warnings])

    mps = samples.get("nvdp_mps_daemon_up")
    if mps:
        out.append("")
        rows = []
        for labels, up in mps:
            uuid = labels["uuid"]
            probe = samples.value("nvdp_mps_probe_duration_seconds", uuid=uuid)
            # Up with no probe yet: the daemon answered when it came up, and its first periodic probe is due.
            state = ("up" if probe is not None else "up, not probed yet") if up else "DOWN"
            rows.append([uuid, state, "-" if probe is None else f"{probe * 1000:.1f} ms",
                         samples.value("nvdp_mps_daemon_restarts_total", 0, uuid=uuid)])
        out += table(["MPS DAEMON (GPU)", "STATE", "LAST PROBE", "RESTARTS"], rows)

    drivers = sorted({labels["driver"] for labels, _ in samples.get("nvdp_dra_slices_devices")})
    if drivers or samples.get("nvdp_dra_claims_total"):
        # DRA (docs/dra.md): the devices the node's ResourceSlices hold, and the kubelet's calls by claim.
        out.append("")
        out += table(["DRA DRIVER", "DEVICES", "GENERATION", "SLICE WRITE ERRORS", "PREPARED", "PREPARE ERRORS",
                      "UNPREPARED", "UNPREPARE ERRORS"],
                     [[d, samples.value("nvdp_dra_slices_devices", 0, driver=d),
                       samples.value("nvdp_dra_slices_generation", 0, driver=d),
                       samples.total("nvdp_dra_slice_writes_total", driver=d, result="error"),
                       samples.total("nvdp_dra_claims_total", call="prepare", result="ok"),
                       samples.total("nvdp_dra_claims_total", call="prepare", result="error"),
                       samples.total("nvdp_dra_claims_total", call="unprepare", result="ok"),
                       samples.total("nvdp_dra_claims_total", call="unprepare", result="error")]
                      for d in drivers or ["-"]])
    for labels, value in samples.get("nvdp_dra_share_hosts_waiting"):
        if value:
            # A reload moved GPUs to or from MPS shares while claims are prepared on them (docs/dra.md).
            out.append(f"DRA driver {labels['driver']}: {value:g} device(s) wait for their prepared claims to move to "
                       "or from MPS shares (nvdp's log says which)")
    return "\n".join(out) + "\n"


def status_main(address: str = DEFAULT_ADDRESS) -> int:
    """Print the status tables; 1 with a message on stderr when the daemon cannot be read."""
    try:
        samples, health, ready = fetch(address)
    except ValueError as exc:
        print(f"nvdp status: {exc}", file=sys.stderr)
        return 1
    except StatusError as exc:
        print(f"nvdp status: {exc}; is nvdp running there? --address (or $METRICS_ADDRESS) must be its "
              "--metrics-address (default :9400)", file=sys.stderr)
        return 1
    sys.stdout.write(render(samples, health, ready, base_url(address)))
    return 0
