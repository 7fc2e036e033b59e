"""GPU Feature Discovery inside nvdp: the supervised child that publishes the node's GFD labels.

The controller hands it every plan it applies (`LabelPublisher.update`) and nudges it on health changes; the child
computes the labels (`nvdp.core.plan.labels.node_labels`, pure), and writes them to one sink only when they differ
from what it last published, at most once per `MIN_INTERVAL_S` (docs/labels.md). Sinks:

- `file`: NFD's local feature file (written when NFD's `features.d` directory exists);
- `node-feature-api`: the node's NodeFeature object (`nvdp.k8s.nodefeatures`);
- `node`: the Node's own labels, merge-patched, stale ones removed.

A failed write (`LabelSinkError`: the API server unreachable, NFD's CRD missing, RBAC, a full disk) is logged and
retried by the child itself, 1 s doubling to 60 s, with the labels current at that time; nvdp stays ready, since it
serves its devices regardless.
`nvidia.com/gfd.timestamp` is the time the label set last changed (upstream rewrites it every minute; nvdp writes
only on a change, so a node's labels never churn).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import trio

from nvdp.core.config.settings import Settings
from nvdp.core.inventory import Gpu, NodeInventory
from nvdp.core.plan.labels import TIMESTAMP, HostFacts, LabelError, node_labels
from nvdp.core.plan.model import Plan
from nvdp.nfd import write_features_file
from nvdp.nvml import adapter as nvml

if TYPE_CHECKING:
    from nvdp.k8s.client import ApiClient

log = logging.getLogger(__name__)

#: At most one write per this many seconds (`--label-interval`), whatever the rate of reloads and health changes.
MIN_INTERVAL_S = 5.0
#: Retries of a failed write: the first after this long, doubling up to `MAX_RETRY_S`.
FIRST_RETRY_S = 1.0
MAX_RETRY_S = 60.0


class LabelSinkError(Exception):
    """A sink could not be written (the message says why and, where it can, what to do); the write is retried."""


class LabelSink(Protocol):
    @property
    def description(self) -> str: ...

    async def publish(self, labels: Mapping[str, str]) -> bool:
        """Make the sink hold exactly `labels`; True when something was written."""
        ...


@dataclass
class FileSink:
    path: Path

    @property
    def description(self) -> str:
        return f"NFD feature file {self.path}"

    async def publish(self, labels: Mapping[str, str]) -> bool:
        # nvdp does not create NFD's directory on hosts without node-feature-discovery.
        if not await trio.Path(self.path.parent).is_dir():
            log.debug("no node-feature-discovery directory %s: labels not written", self.path.parent)
            return False
        try:
            return await trio.to_thread.run_sync(write_features_file, self.path, dict(labels))
        except OSError as exc:
            raise LabelSinkError(f"cannot write {self.path}: {exc.strerror or exc}") from None


@dataclass
class NodeFeatureSink:
    client: ApiClient
    namespace: str
    node_name: str
    pod_name: str | None = None
    _owners: list[dict[str, Any]] | None = None

    @property
    def description(self) -> str:
        return f"NodeFeature {self.namespace}/nvidia-features-for-{self.node_name}"

    async def publish(self, labels: Mapping[str, str]) -> bool:
        from nvdp.k8s.nodefeatures import owner_references, publish_node_feature

        async with _api_errors(self.description, missing="is node-feature-discovery installed (its NodeFeature CRD)?",
                               forbidden="nvdp needs get, create and update on nodefeatures.nfd.k8s-sigs.io in "
                                         f"namespace {self.namespace} (Helm: gfd.enabled grants them)"):
            if self._owners is None:
                self._owners = await owner_references(self.client, self.namespace, self.pod_name)
            return await publish_node_feature(self.client, self.namespace, self.node_name, labels, self._owners)


@dataclass
class NodeLabelSink:
    client: ApiClient
    node_name: str

    @property
    def description(self) -> str:
        return f"labels of node {self.node_name}"

    async def publish(self, labels: Mapping[str, str]) -> bool:
        from nvdp.k8s.nodefeatures import publish_node_labels

        async with _api_errors(self.description, missing=f"no node {self.node_name}: check --node-name",
                               forbidden="nvdp needs get and patch on its Node (Helm: labels.direct grants them)"):
            return await publish_node_labels(self.client, self.node_name, labels)


@contextlib.asynccontextmanager
async def _api_errors(description: str, *, missing: str, forbidden: str) -> AsyncIterator[None]:
    """The API client's errors as LabelSinkError, with a hint for the two an operator must fix."""
    import msgspec

    from nvdp.k8s.client import ApiError, ApiUnreachable

    try:
        yield
    except ApiError as exc:
        hint = {404: f"; {missing}", 403: f"; {forbidden}"}.get(exc.status, "")
        raise LabelSinkError(f"{description}: {exc}{hint}") from None
    except (ApiUnreachable, msgspec.DecodeError) as exc:
        raise LabelSinkError(f"{description}: {exc}") from None


def label_sink(settings: Settings, client: ApiClient | None, node_name: str | None) -> LabelSink | None:
    """The sink `--label-sink` (and `--use-node-feature-api` under `auto`) asks for; ValueError, naming the flag,
    when it needs API access or a node name that nvdp does not have."""
    kind = settings.label_sink
    if kind == "auto":
        kind = "node-feature-api" if settings.use_node_feature_api else "file"
    if kind == "none":
        return None
    if kind == "file":
        return FileSink(settings.nfd_features_file) if settings.nfd_features_file is not None else None
    what = "--label-sink node" if kind == "node" else "--use-node-feature-api"
    if client is None or not node_name:
        raise ValueError(f"{what} publishes the GPU feature labels through the Kubernetes API: it needs "
                         "--node-name (NODE_NAME) and API access (in-cluster service account or --kubeconfig)")
    if kind == "node":
        return NodeLabelSink(client, node_name)
    if not settings.pod_namespace:
        raise ValueError(f"{what}: the NodeFeature object lives in nvdp's namespace: set POD_NAMESPACE")
    return NodeFeatureSink(client, settings.pod_namespace, node_name, settings.pod_name)


@dataclass(frozen=True, slots=True)
class LabelInput:
    plan: Plan
    inventory: NodeInventory
    mig_strategy: str


class LabelPublisher:
    """Latest input in, labels out to one sink (see the module docstring)."""

    def __init__(self, sink: LabelSink, *, host_root: Path, machine_type_file: Path | None, timestamps: bool,
                 min_interval_s: float = MIN_INTERVAL_S) -> None:
        self.sink = sink
        self.host_root = host_root
        self.machine_type_file = machine_type_file
        self.timestamps = timestamps
        self.min_interval_s = min_interval_s
        self._input: LabelInput | None = None
        self._pending = trio.Event()
        #: What the sink holds, without the timestamp (None: nothing published by this process yet).
        self.published: dict[str, str] | None = None
        self.writes = 0
        self.failures = 0
        self._retry_s = FIRST_RETRY_S
        #: Host facts are read again only for another set of GPUs: DMI and PCI classes do not change under us.
        self._facts: tuple[tuple[Gpu, ...], HostFacts] | None = None

    def __repr__(self) -> str:
        count = "nothing" if self.published is None else f"{len(self.published)} labels"
        return (f"<LabelPublisher {self.sink.description}: {count} published, {self.writes} writes, "
                f"{self.failures} failed>")

    def update(self, plan: Plan, inventory: NodeInventory, mig_strategy: str) -> None:
        """A new plan is served (start, reload, per-node config change). Never blocks."""
        self._input = LabelInput(plan, inventory, mig_strategy)
        self._pending.set()

    def nudge(self) -> None:
        """Something changed that may change the labels (health): compute them again; written only if they did."""
        if self._input is not None:
            self._pending.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        if self._input is not None:
            # A restarted child publishes what is current: its last write may have failed half-way.
            self.published = None
            self._pending.set()
        while True:
            await self._pending.wait()
            self._pending = trio.Event()
            current = self._input
            assert current is not None
            facts = await self._host_facts(current.inventory.gpus)
            try:
                labels = node_labels(current.plan, current.inventory, mig_strategy=current.mig_strategy, host=facts)
            except LabelError as exc:
                log.error("GPU feature labels not published: %s", exc)
                continue
            if labels == self.published:
                continue
            stamped = dict(labels)
            if self.timestamps:
                # Wall-clock time, as upstream's: the label is read by people and tools outside this process.
                stamped[TIMESTAMP] = str(int(time.time()))
            try:
                wrote = await self.sink.publish(stamped)
            except LabelSinkError as exc:
                delay, self._retry_s = self._retry_s, min(self._retry_s * 2, MAX_RETRY_S)
                self.failures += 1
                log.warning("GPU feature labels not written: %s; retrying in %.0f s", exc, delay)
                await trio.sleep(delay)
                self._pending.set()
                continue
            self._retry_s = FIRST_RETRY_S
            self.writes += wrote
            self.published = labels
            await trio.sleep(self.min_interval_s)

    async def _host_facts(self, gpus: tuple[Gpu, ...]) -> HostFacts:
        if self._facts is None or self._facts[0] != gpus:
            facts = await trio.to_thread.run_sync(nvml.read_host_facts, self.host_root, self.machine_type_file, gpus)
            self._facts = (gpus, facts)
        return self._facts[1]
