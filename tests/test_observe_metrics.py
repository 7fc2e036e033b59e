"""nvdp.observe.metrics: every report the daemon makes shows up in the exposition, and snapshots never drift."""

from __future__ import annotations

import threading

from nvdp.observe.metrics import Metrics
from tests.observe_fixtures import GPU0, GPU1, inventory, plan, scrape


def applied(metrics: Metrics | None = None, **kwargs: object) -> Metrics:
    metrics = metrics or Metrics(clock=lambda: 1000.0)
    metrics.plan_applied(plan(**kwargs), inventory(), "default", 1, 0.25)  # type: ignore[arg-type]
    return metrics


def test_a_fresh_registry_is_its_own() -> None:
    # Two daemons in one process (tests, the demo) must not share or collide on metric names.
    a, b = Metrics(), Metrics()
    a.kubelet_restart()
    assert scrape(a).value("nvdp_kubelet_restarts_total") == 1
    assert scrape(b).value("nvdp_kubelet_restarts_total") == 0


def test_devices_gpus_and_replicas_come_from_the_plan() -> None:
    samples = scrape(applied(replicas=4))
    assert samples.value("nvdp_devices", resource="nvidia.com/gpu", health="Healthy") == 1
    assert samples.value("nvdp_devices", resource="nvidia.com/gpu.shared", health="Healthy") == 4
    assert samples.value("nvdp_devices", resource="nvidia.com/gpu.shared", health="Unhealthy") == 0
    assert samples.value("nvdp_replicas", resource="nvidia.com/gpu.shared", uuid=GPU1) == 4
    assert samples.value("nvdp_replicas", resource="nvidia.com/gpu", uuid=GPU0) == 1
    gpus = {labels["uuid"]: labels for labels, _ in samples.get("nvdp_gpu_info")}
    assert gpus[GPU0] == {"uuid": GPU0, "index": "0", "name": "NVIDIA A100-SXM4-40GB", "mig": "false"}
    assert gpus[GPU1]["mig"] == "true"
    assert samples.get("nvdp_build_info")


def test_health_snapshots_replace_each_other() -> None:
    metrics = applied(replicas=3)
    p = plan(replicas=3)
    metrics.health_changed(p, {f"{GPU1}::0": "XID 79", f"{GPU1}::1": "XID 79"})
    samples = scrape(metrics)
    assert samples.value("nvdp_devices", resource="nvidia.com/gpu.shared", health="Unhealthy") == 2
    assert samples.value("nvdp_devices", resource="nvidia.com/gpu.shared", health="Healthy") == 1
    assert samples.value("nvdp_unhealthy_devices", resource="nvidia.com/gpu.shared", reason="XID 79") == 2
    # The physical device appears once, however many of its replicas are marked.
    assert samples.get("nvdp_device_unhealthy") == [({"device": GPU1, "gpu": GPU1, "reason": "XID 79"}, 1.0)]

    metrics.health_changed(p, {})  # recovered: the old label sets disappear, nothing lingers at a stale value
    samples = scrape(metrics)
    assert samples.get("nvdp_device_unhealthy") == []
    assert samples.get("nvdp_unhealthy_devices") == []
    assert samples.value("nvdp_devices", resource="nvidia.com/gpu.shared", health="Unhealthy") == 0


def test_allocate_and_preferred_count_calls_errors_and_latency() -> None:
    metrics = applied()
    samples = scrape(metrics)
    # Every resource of the plan starts at zero, so rate() works before the first call.
    assert samples.value("nvdp_allocate_duration_seconds_count", resource="nvidia.com/gpu") == 0
    assert samples.value("nvdp_allocate_errors_total", resource="nvidia.com/gpu") == 0
    metrics.allocate_observed("nvidia.com/gpu", 0.0003)
    metrics.allocate_observed("nvidia.com/gpu", 0.002, ok=False)
    metrics.preferred_observed("nvidia.com/gpu.shared", 0.0001)
    samples = scrape(metrics)
    assert samples.value("nvdp_allocate_duration_seconds_count", resource="nvidia.com/gpu") == 2
    assert samples.value("nvdp_allocate_errors_total", resource="nvidia.com/gpu") == 1
    assert samples.value("nvdp_allocate_duration_seconds_bucket", resource="nvidia.com/gpu", le="0.0005") == 1
    assert samples.value("nvdp_preferred_allocation_duration_seconds_count", resource="nvidia.com/gpu.shared") == 1
    assert samples.value("nvdp_preferred_allocation_errors_total", resource="nvidia.com/gpu.shared") == 0


def test_allocate_from_many_threads_loses_nothing() -> None:
    # Allocate runs on the asyncio thread; make sure concurrent observers never lose a count.
    metrics = applied()

    def work() -> None:
        for _ in range(500):
            metrics.allocate_observed("nvidia.com/new", 0.001)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert scrape(metrics).value("nvdp_allocate_duration_seconds_count", resource="nvidia.com/new") == 2000


def test_registrations_kubelet_xids_k8s_and_label_counters() -> None:
    metrics = applied()
    metrics.registered("nvidia.com/gpu")
    metrics.registered("nvidia.com/gpu")
    metrics.kubelet_restart()
    metrics.xid(GPU0, 79)
    metrics.xid(GPU0, 79)
    metrics.xid(GPU0, 13)
    metrics.watch_reconnected("/api/v1/nodes/n1")
    metrics.watch_relisted("/api/v1/nodes/n1")
    metrics.config_label_unknown("nope")
    samples = scrape(metrics)
    assert samples.value("nvdp_registrations_total", resource="nvidia.com/gpu") == 2
    assert samples.value("nvdp_registrations_total", resource="nvidia.com/gpu.shared") == 0
    assert samples.value("nvdp_last_registration_timestamp_seconds", resource="nvidia.com/gpu") == 1000.0
    assert samples.value("nvdp_kubelet_restarts_total") == 1
    assert samples.value("nvdp_xid_events_total", uuid=GPU0, xid="79") == 2
    assert samples.value("nvdp_xid_events_total", uuid=GPU0, xid="13") == 1
    assert samples.value("nvdp_k8s_watch_reconnects_total") == 1
    assert samples.value("nvdp_k8s_watch_relists_total") == 1
    assert samples.value("nvdp_config_label_unknown_total", value="nope") == 1


def test_config_generation_reloads_and_failures() -> None:
    clock = [1000.0]
    metrics = Metrics(clock=lambda: clock[0])
    metrics.plan_applied(plan(), inventory(), "default", 1, 0.5)
    samples = scrape(metrics)
    assert samples.value("nvdp_config_generation") == 1
    assert samples.get("nvdp_config_info") == [({"name": "default"}, 1.0)]
    assert samples.total("nvdp_config_reloads_total") == 0  # start-up is not a reload
    assert samples.value("nvdp_config_last_reload_duration_seconds") == 0.5

    metrics.reload_failed("broken", "bad yaml")
    samples = scrape(metrics)
    assert samples.value("nvdp_config_reloads_total", config="broken", result="failed") == 1
    assert samples.value("nvdp_config_last_reload_successful") == 0
    assert samples.value("nvdp_config_generation") == 1  # the running config still serves

    clock[0] = 2000.0
    metrics.plan_applied(plan(replicas=4), inventory(), "big", 2, 0.125)
    samples = scrape(metrics)
    assert samples.value("nvdp_config_generation") == 2
    assert samples.get("nvdp_config_info") == [({"name": "big"}, 1.0)]
    assert samples.value("nvdp_config_reloads_total", config="big", result="applied") == 1
    assert samples.value("nvdp_config_last_reload_successful") == 1
    assert samples.value("nvdp_config_last_reload_success_timestamp_seconds") == 2000.0
    assert samples.value("nvdp_config_last_reload_duration_seconds") == 0.125
    assert samples.value("nvdp_devices", resource="nvidia.com/gpu.shared", health="Healthy") == 4


def test_a_removed_resource_loses_its_last_registration_time() -> None:
    metrics = applied()
    metrics.registered("nvidia.com/gpu.shared")
    whole_only = plan()
    whole_only = type(whole_only)(whole_only.resources[:1])
    metrics.plan_applied(whole_only, inventory(), "default", 2, 0.1)
    samples = scrape(metrics)
    assert samples.value("nvdp_last_registration_timestamp_seconds", resource="nvidia.com/gpu.shared") is None
    assert samples.value("nvdp_devices", resource="nvidia.com/gpu.shared", health="Healthy") is None
    # Counters keep their history.
    assert samples.value("nvdp_registrations_total", resource="nvidia.com/gpu.shared") == 1


def test_mps_daemons_follow_the_plan_and_probes() -> None:
    metrics = applied(mps=True)
    samples = scrape(metrics)
    assert samples.value("nvdp_mps_daemon_up", uuid=GPU1) == 0  # expected by the plan, not up yet
    metrics.mps_daemon(GPU1, True, 0.004)
    metrics.mps_restart(GPU1)
    samples = scrape(metrics)
    assert samples.value("nvdp_mps_daemon_up", uuid=GPU1) == 1
    assert samples.value("nvdp_mps_probe_duration_seconds", uuid=GPU1) == 0.004
    assert samples.value("nvdp_mps_daemon_restarts_total", uuid=GPU1) == 1
    metrics.plan_applied(plan(), inventory(), "default", 2, 0.1)  # MPS no longer configured
    assert scrape(metrics).get("nvdp_mps_daemon_up") == []


def test_event_results_are_counted() -> None:
    metrics = Metrics()
    metrics.event_recorded("DeviceUnhealthy", "posted")
    metrics.event_recorded("DeviceUnhealthy", "dropped")
    samples = scrape(metrics)
    assert samples.value("nvdp_events_total", reason="DeviceUnhealthy", result="posted") == 1
    assert samples.value("nvdp_events_total", reason="DeviceUnhealthy", result="dropped") == 1
