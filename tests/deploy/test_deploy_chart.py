"""The Helm chart, rendered by Helm's own engine: defaults, each privilege mode, named configs, upstream and fork
values files, refusals, and the static manifest."""

from __future__ import annotations

import pathlib

import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
HERE = pathlib.Path(__file__).resolve().parent
DEVICE_PLUGINS = "/var/lib/kubelet/device-plugins"
DROP_ALL = {
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
}
HELM_ONLY_LABELS = ("helm.sh/chart", "app.kubernetes.io/managed-by")


def test_lint_is_clean(helm):
    report = helm.lint(str(ROOT / "deploy/helm/nvdp"), strict=True, namespace="nvdp")
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert not problems and not report["errors"], report


def test_default_render_is_one_least_privilege_daemonset(render):
    r = render()
    assert [o["kind"] for o in r.objects] == ["DaemonSet"], "no config: no ConfigMap, no RBAC, no ServiceAccount"
    assert r.daemonset["metadata"]["namespace"] == "nvdp"
    assert r.security_context == DROP_ALL
    mount, volume = r.mount(DEVICE_PLUGINS)
    assert not mount.get("readOnly")
    assert volume["hostPath"] == {"path": DEVICE_PLUGINS, "type": "Directory"}
    env = r.env
    assert env["NODE_NAME"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    assert env["NVIDIA_VISIBLE_DEVICES"] == "all"
    assert env["NVIDIA_DRIVER_CAPABILITIES"] == "compute,utility"
    assert env["METRICS_ADDRESS"] == ":9400"
    for unset in (
        "MIG_STRATEGY",
        "FAIL_ON_INIT_ERROR",
        "PASS_DEVICE_SPECS",
        "MPS_ROOT",
        "CONFIG_FILE_SRCDIR",
        "NVIDIA_MIG_MONITOR_DEVICES",
        "CONFIG_MAP",
    ):
        assert unset not in env
    assert "args" not in r.container and "command" not in r.container, "configured through env only"
    pod = r.pod
    assert pod["priorityClassName"] == "system-node-critical"
    assert pod["automountServiceAccountToken"] is False
    assert "serviceAccountName" not in pod
    assert not pod.get("hostPID") and not pod.get("hostNetwork") and not pod.get("shareProcessNamespace")
    # The daemon's HTTP server (METRICS_ADDRESS) serves /metrics and both probes on the container port `metrics`.
    assert r.container["ports"] == [{"name": "metrics", "containerPort": 9400, "protocol": "TCP"}]
    liveness, readiness = r.container["livenessProbe"], r.container["readinessProbe"]
    assert liveness["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert readiness["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert liveness["initialDelaySeconds"] == 10 and liveness["failureThreshold"] == 3
    assert readiness["periodSeconds"] == 5
    assert "annotations" not in r.daemonset["spec"]["template"]["metadata"], "scrape annotations are opt-in"
    assert {t["key"] for t in pod["tolerations"]} == {"CriticalAddonsOnly", "nvidia.com/gpu"}


def test_static_manifest_is_the_default_render(render):
    static = [o for o in yaml.safe_load_all((ROOT / "deploy/static/nvdp.yaml").read_text()) if o]
    rendered = render(namespace="kube-system").objects
    for obj in rendered:
        for label in HELM_ONLY_LABELS:
            obj["metadata"].get("labels", {}).pop(label, None)
    assert static == rendered, "deploy/static/nvdp.yaml is stale: run python deploy/static/regenerate.py"
    assert static[0]["metadata"]["namespace"] == "kube-system"


def test_mps_enabled(render):
    r = render({"mps": {"enabled": True}})
    assert r.env["MPS_ROOT"] == "/run/nvidia/mps"
    mount, volume = r.mount("/run/nvidia/mps")
    assert volume["hostPath"] == {"path": "/run/nvidia/mps", "type": "DirectoryOrCreate"}
    assert mount["mountPropagation"] == "Bidirectional"
    shm_mount, shm_volume = r.mount("/dev/shm")
    assert shm_volume["hostPath"] == {"path": "/run/nvidia/mps/shm", "type": "DirectoryOrCreate"}
    assert shm_mount["mountPropagation"] == "HostToContainer"
    # Kubernetes accepts Bidirectional propagation only in a privileged container.
    assert r.security_context == {"privileged": True}
    assert r.pod["hostPID"] is True
    assert "hostIPC" not in r.pod, "clients share the tmpfs, not the host IPC namespace"
    assert "MPS is enabled" in r.notes


def test_mps_daemons_run_in_the_mps_host_daemonset(render):
    r = render({"mps": {"enabled": True}})
    assert r.env["MPS_HOST_SOCKET"] == "/run/nvidia/mps/nvdp-mps-host.sock"
    host = r.mps_host
    assert host is not None and host["metadata"]["name"] == "nvdp-mps-host"
    # A chart upgrade never restarts it, so never ends MPS clients.
    assert host["spec"]["updateStrategy"] == {"type": "OnDelete"}
    # Its pods are never the plugin's: two DaemonSets selecting the same pods fight over them.
    plugin_selector = r.daemonset["spec"]["selector"]["matchLabels"]
    host_labels = host["spec"]["template"]["metadata"]["labels"]
    assert host["spec"]["selector"]["matchLabels"] == host_labels
    assert not plugin_selector.items() <= host_labels.items()
    pod = host["spec"]["template"]["spec"]
    assert pod["hostPID"] is True and pod["automountServiceAccountToken"] is False
    assert pod["priorityClassName"] == "system-node-critical"
    assert pod["tolerations"] == r.pod["tolerations"]
    (container,) = pod["containers"]
    assert container["args"] == ["mps-host"] and container["image"] == r.container["image"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["MPS_ROOT"] == "/run/nvidia/mps" and env["NVIDIA_VISIBLE_DEVICES"] == "all"
    assert container["securityContext"] == {
        "capabilities": {"drop": ["ALL"], "add": ["SYS_ADMIN", "SETUID", "SETGID", "KILL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts["/run/nvidia/mps"]["mountPropagation"] == "HostToContainer"
    assert mounts["/dev/shm"]["mountPropagation"] == "HostToContainer"
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["mps-shm"]["hostPath"]["path"] == "/run/nvidia/mps/shm"
    assert "mps-host" in r.notes and "OnDelete" in r.notes
    rolling = render({"mps": {"enabled": True, "host": {"updateStrategy": {"type": "RollingUpdate"}}}})
    assert rolling.mps_host["spec"]["updateStrategy"] == {"type": "RollingUpdate"}
    assert render().mps_host is None


def test_mps_with_host_mounted_shm_is_not_privileged(render):
    r = render({"mps": {"enabled": True, "shmFromHost": True, "root": "/var/run/mps/", "enableHostPID": False}})
    sc = r.security_context
    assert "privileged" not in sc
    assert sc["capabilities"] == {"drop": ["ALL"], "add": ["SYS_ADMIN", "SETUID", "SETGID", "KILL"]}
    # The API rejects allowPrivilegeEscalation=false together with CAP_SYS_ADMIN.
    assert "allowPrivilegeEscalation" not in sc
    assert r.mount("/var/run/mps")[0]["mountPropagation"] == "HostToContainer"
    assert r.env["MPS_ROOT"] == "/var/run/mps"
    assert "hostPID" not in r.pod


def test_compat_with_cpu_manager(render):
    r = render({"compatWithCPUManager": True})
    assert r.env["PASS_DEVICE_SPECS"] == "true"
    assert r.security_context == {"privileged": True}
    off = render({"compatWithCPUManager": False})
    assert off.env["PASS_DEVICE_SPECS"] == "false"
    assert off.security_context == DROP_ALL


@pytest.mark.parametrize(
    ("values", "sys_admin"),
    [
        ({"migStrategy": "single"}, True),
        ({"migStrategy": "mixed"}, True),
        ({"migStrategy": "none"}, False),
        ({"config": {"map": {"default": "version: v1\nflags:\n  migStrategy: mixed\n"}}}, True),
        ({"config": {"map": {"default": "version: v1\nflags:\n  migStrategy: none\n"}}}, False),
        # The top-level value wins over the files (env beats config file), as in upstream's chart.
        ({"migStrategy": "none", "config": {"map": {"default": "flags:\n  migStrategy: mixed\n"}}}, False),
        # An external ConfigMap's content is unknown: MIG may be selected.
        ({"config": {"name": "my-configs"}}, True),
        ({"config": {"name": "my-configs"}, "migStrategy": "none"}, False),
    ],
)
def test_mig_gets_sys_admin_only_when_possible(render, values, sys_admin):
    r = render(values)
    if sys_admin:
        assert r.security_context["capabilities"] == {"drop": ["ALL"], "add": ["SYS_ADMIN"]}
        assert "privileged" not in r.security_context
        assert r.env["NVIDIA_MIG_MONITOR_DEVICES"] == "all"
    else:
        assert r.security_context == DROP_ALL
        assert "NVIDIA_MIG_MONITOR_DEVICES" not in r.env


def test_config_map_two_configs_and_a_default(render):
    # As `--set-file config.map.config0=dp-example-config0.yaml --set-file config.map.config1=...
    # --set config.default=config0`.
    configs = {n: (HERE / f"dp-example-{n}.yaml").read_text() for n in ("config0", "config1")}
    r = render({"config": {"map": configs, "default": "config0"}})
    cm = r.one("ConfigMap")
    assert cm["metadata"]["name"] == "nvdp-configs"
    assert cm["data"] == configs
    env = r.env
    assert env["CONFIG_FILE_SRCDIR"] == "/config/named"
    assert env["DEFAULT_CONFIG"] == "config0"
    assert env["FALLBACK_STRATEGIES"] == "named,single"
    assert "CONFIG_MAP" not in env
    mount, volume = r.mount("/config/named")
    assert mount["readOnly"] is True
    assert volume["configMap"] == {"name": "nvdp-configs"}
    # No sidecar, no init container, no shared PID namespace, no signal: nvdp reloads by itself.
    assert len(r.pod["containers"]) == 1 and not r.pod.get("initContainers")
    assert not r.pod.get("shareProcessNamespace")
    assert r.security_context == DROP_ALL, "neither config uses MIG or MPS"
    # API access: its own ServiceAccount; Nodes read cluster-wide, Events written in `default`; nothing else.
    sa = r.one("ServiceAccount")
    assert r.pod["serviceAccountName"] == sa["metadata"]["name"]
    assert "automountServiceAccountToken" not in r.pod
    nodes = {"apiGroups": [""], "resources": ["nodes"], "verbs": ["list", "watch"]}
    assert r.one("ClusterRole")["rules"] == [nodes]
    assert_events_rbac(r, sa["metadata"]["name"], "nvdp")
    assert r.one("ClusterRoleBinding")["subjects"] == [
        {"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": "nvdp"}
    ]
    assert "nvidia.com/device-plugin.config=<config name>" in r.notes


def assert_events_rbac(r, sa_name: str, sa_namespace: str) -> None:
    """Events about a Node live in `default`: one Role there, core/v1 events create only, bound to nvdp's SA."""
    roles = [o for o in r.of_kind("Role") if any("events" in rule["resources"] for rule in o["rules"])]
    assert len(roles) == 1, roles
    assert roles[0]["metadata"]["namespace"] == "default"
    assert roles[0]["rules"] == [{"apiGroups": [""], "resources": ["events"], "verbs": ["create"]}]
    bindings = [o for o in r.of_kind("RoleBinding") if o["roleRef"]["name"] == roles[0]["metadata"]["name"]]
    assert len(bindings) == 1, bindings
    assert bindings[0]["metadata"]["namespace"] == "default"
    assert bindings[0]["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": roles[0]["metadata"]["name"],
    }
    assert bindings[0]["subjects"] == [{"kind": "ServiceAccount", "name": sa_name, "namespace": sa_namespace}]


def test_config_read_through_the_api_is_limited_to_that_configmap(render):
    r = render({"config": {"map": {"default": "version: v1\n"}, "readFromAPI": True}})
    assert r.env["CONFIG_MAP"] == "nvdp/nvdp-configs"
    config_roles = [o for o in r.of_kind("Role") if o["metadata"]["namespace"] == "nvdp"]
    assert len(config_roles) == 1
    assert config_roles[0]["rules"] == [
        {
            "apiGroups": [""],
            "resources": ["configmaps"],
            "resourceNames": ["nvdp-configs"],
            "verbs": ["list", "watch"],
        }
    ]
    binding = [o for o in r.of_kind("RoleBinding") if o["metadata"]["namespace"] == "nvdp"]
    assert len(binding) == 1 and binding[0]["roleRef"]["name"] == config_roles[0]["metadata"]["name"]
    assert_events_rbac(r, "nvdp", "nvdp")


def test_events_rbac_when_installed_into_default_does_not_clash(render):
    r = render(
        {"allowDefaultNamespace": True, "config": {"map": {"default": "version: v1\n"}, "readFromAPI": True}},
        namespace="default",
    )
    names = [(o["kind"], o["metadata"]["name"]) for o in r.objects if o["metadata"].get("namespace") == "default"]
    assert len(names) == len(set(names)), names
    assert_events_rbac(r, "nvdp", "default")


@pytest.mark.parametrize(
    ("config", "default"),
    [
        ({"map": {"a": "version: v1\n", "b": "version: v1\n"}, "default": "b"}, "b"),  # explicit
        ({"map": {"a": "version: v1\n", "default": "version: v1\n"}}, "default"),  # a config named default
        ({"map": {"only": "version: v1\n"}}, "only"),  # the only config
        ({"name": "external", "default": "x"}, "x"),
        ({"name": "external"}, None),  # unknown content: nvdp's fallbacks decide at run time
    ],
)
def test_default_config_inference(render, config, default):
    env = render({"config": config}).env
    assert env.get("DEFAULT_CONFIG") == default


def test_external_config_name(render):
    r = render({"config": {"name": "nvidia-plugin-configs", "fallbackStrategies": ["named", "single", "empty"]}})
    assert not r.of_kind("ConfigMap"), "an external ConfigMap is not created"
    assert r.mount("/config/named")[1]["configMap"] == {"name": "nvidia-plugin-configs"}
    assert r.env["FALLBACK_STRATEGIES"] == "named,single,empty"


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"config": {"map": {"a": "version: v1\n", "b": "version: v1\n"}}}, "set config.default to one of a, b"),
        ({"config": {"map": {"a": "version: v1\n"}, "default": "b"}}, "config.default=b is not a key of config.map"),
        ({"config": {"map": {"a": "x: [1"}}}, "config.map.a is not valid YAML"),
        ({"config": {"map": {"a": "version: v1\n"}, "name": "other"}}, "config.name and config.map are both set"),
        ({"config": {"map": {"m": "sharing:\n  mps: {}\n"}}}, "config.map.m uses sharing.mps: set mps.enabled=true"),
        ({"config": {"readFromAPI": True}}, "config.readFromAPI=true needs config.map or config.name"),
        ({"deviceDiscoveryStrategy": "tegra"}, "remove deviceDiscoveryStrategy"),
        ({"devicePlugin": {"enabled": False}}, "remove devicePlugin.enabled"),
        ({"legacyDaemonsetAPI": True}, "remove legacyDaemonsetAPI"),
        ({"namespace": "gpu"}, "namespaceOverride"),
        ({"mps": {"userID": 1000}}, "set mps.enabled=true"),
        ({"probes": {"enabled": True}, "metrics": {"enabled": False}}, "needs metrics.enabled=true"),
        # probes are on by default: turning metrics off alone says to turn the probes off too.
        ({"metrics": {"enabled": False}}, "also set probes.enabled=false"),
        ({"metrics": {"enabled": False, "scrapeAnnotations": True}, "probes": {"enabled": False}}, "nothing to scrape"),
    ],
)
def test_refused_values_name_the_key_to_change(render_error, values, message):
    assert message in render_error(values)


def test_default_namespace_needs_allow_default_namespace(render, render_error):
    assert "allowDefaultNamespace=true" in render_error({}, namespace="default")
    assert render({"allowDefaultNamespace": True}, namespace="default").daemonset


@pytest.mark.parametrize(
    "values",
    [
        {"migStrategy": 5},
        {"migStrategy": "auto"},
        {"failOnInitError": "yes"},
        {"compatWithCPUManager": "true"},
        {"deviceIDStrategy": "serial"},
        {"deviceListStrategy": "envvar,bogus"},
        {"mps": {"enabled": "true"}},
        {"mps": {"root": "relative/path"}},
        {"config": {"map": ["default"]}},
        {"config": {"map": {"a": 1}}},
        {"config": {"fallbackStrategies": "named"}},
        {"metrics": {"port": "9400"}},
        {"metrics": {"scrapeAnnotations": "yes"}},
        {"probes": {"enabled": "true"}},
        {"probes": {"readiness": {"periodSeconds": "5"}}},
        {"tolerations": {"key": "x"}},
        {"nodeSelector": {"gpu": True}},
    ],
)
def test_schema_refuses_wrong_types(render_error, values):
    assert "schema" in render_error(values) or "at '/" in render_error(values)


@pytest.mark.parametrize(
    ("values", "name", "value"),
    [
        ({"migStrategy": "mixed"}, "MIG_STRATEGY", "mixed"),
        ({"failOnInitError": False}, "FAIL_ON_INIT_ERROR", "false"),
        ({"failOnInitError": True}, "FAIL_ON_INIT_ERROR", "true"),
        ({"deviceListStrategy": "volume-mounts"}, "DEVICE_LIST_STRATEGY", "volume-mounts"),
        ({"deviceListStrategy": ["envvar", "volume-mounts"]}, "DEVICE_LIST_STRATEGY", "envvar,volume-mounts"),
        ({"deviceIDStrategy": "index"}, "DEVICE_ID_STRATEGY", "index"),
        ({"gdsEnabled": True}, "GDS_ENABLED", "true"),
        ({"gdrcopyEnabled": False}, "GDRCOPY_ENABLED", "false"),
        ({"mofedEnabled": True}, "MOFED_ENABLED", "true"),
        ({"nvidiaDriverRoot": "/run/nvidia/driver"}, "NVIDIA_DRIVER_ROOT", "/run/nvidia/driver"),
        ({"nvidiaDevRoot": "/"}, "NVIDIA_DEV_ROOT", "/"),
        ({"mps": {"enabled": True, "root": "/srv/mps"}}, "MPS_ROOT", "/srv/mps"),
        ({"metrics": {"port": 9500}}, "METRICS_ADDRESS", ":9500"),
        ({"metrics": {"enabled": False}, "probes": {"enabled": False}}, "METRICS_ADDRESS", ""),
        ({"logFormat": "json"}, "LOG_FORMAT", "json"),
        ({"logLevel": "debug"}, "LOG_LEVEL", "debug"),
        ({"extraEnv": [{"name": "KUBELET_SOCKET", "value": "/k/kubelet.sock"}]}, "KUBELET_SOCKET", "/k/kubelet.sock"),
    ],
)
def test_each_value_sets_its_env(render, values, name, value):
    assert render(values).env[name] == value


def test_driver_and_dev_roots_are_mounted_read_only_at_the_same_path(render):
    r = render({"nvidiaDriverRoot": "/run/nvidia/driver", "nvidiaDevRoot": "/run/nvidia/dev"})
    for root in ("/run/nvidia/driver", "/run/nvidia/dev"):
        mount, volume = r.mount(root)
        assert mount["readOnly"] is True
        assert volume["hostPath"] == {"path": root, "type": "Directory"}
    assert "/" not in render({"nvidiaDriverRoot": "/"}).mount_paths(), "the host's / is never mounted"


def test_probes_and_port_follow_the_metrics_values(render):
    r = render({"metrics": {"port": 9500}, "probes": {"readiness": {"periodSeconds": 2}}})
    assert r.env["METRICS_ADDRESS"] == ":9500"
    assert r.container["ports"] == [{"name": "metrics", "containerPort": 9500, "protocol": "TCP"}]
    assert r.container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert r.container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert r.container["readinessProbe"]["periodSeconds"] == 2
    off = render({"metrics": {"enabled": False}, "probes": {"enabled": False}})
    assert off.env["METRICS_ADDRESS"] == ""
    assert "ports" not in off.container
    assert "livenessProbe" not in off.container and "readinessProbe" not in off.container
    assert "probes are off" in off.notes
    no_probes = render({"probes": {"enabled": False}})
    assert "livenessProbe" not in no_probes.container and no_probes.container["ports"][0]["containerPort"] == 9400


def test_scrape_annotations(render):
    r = render({"metrics": {"port": 9500, "scrapeAnnotations": True}, "podAnnotations": {"a": "b"}})
    assert r.daemonset["spec"]["template"]["metadata"]["annotations"] == {
        "a": "b",
        "prometheus.io/scrape": "true",
        "prometheus.io/port": "9500",
        "prometheus.io/path": "/metrics",
    }
    mine = render({"metrics": {"scrapeAnnotations": True}, "podAnnotations": {"prometheus.io/path": "/other"}})
    assert mine.daemonset["spec"]["template"]["metadata"]["annotations"]["prometheus.io/path"] == "/other"


def test_events_alone_give_only_event_rights(render):
    r = render({"events": {"enabled": True}})
    assert r.pod["serviceAccountName"] == "nvdp"
    assert "CONFIG_FILE_SRCDIR" not in r.env
    assert_events_rbac(r, "nvdp", "nvdp")
    assert [o["metadata"]["namespace"] for o in r.of_kind("Role")] == ["default"], "nothing in the release namespace"
    assert "default" in r.notes


def test_no_api_access_no_events_rbac(render):
    assert not render().of_kind("Role") and not render().of_kind("RoleBinding")


def test_bare_metal_rbac_writes_events_in_default():
    objects = [o for o in yaml.safe_load_all((ROOT / "deploy/systemd/node-rbac.yaml").read_text()) if o]
    by_kind = {}
    for o in objects:
        by_kind.setdefault(o["kind"], []).append(o)
    (role,) = by_kind["Role"]
    (binding,) = by_kind["RoleBinding"]
    assert role["metadata"]["namespace"] == binding["metadata"]["namespace"] == "default"
    assert role["rules"] == [{"apiGroups": [""], "resources": ["events"], "verbs": ["create"]}]
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "nvdp-node", "namespace": "kube-system"}]
    (sa,) = by_kind["ServiceAccount"]
    assert sa["metadata"] == {"name": "nvdp-node", "namespace": "kube-system"}
    assert by_kind["ClusterRole"][0]["rules"] == [
        {"apiGroups": [""], "resources": ["nodes"], "verbs": ["list", "watch"]}
    ]


def test_pod_placement_values_pass_through(render):
    values = {
        "nodeSelector": {"nvidia.com/gpu.present": "true"},
        "affinity": {
            "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {
                    "nodeSelectorTerms": [
                        {
                            "matchExpressions": [
                                {
                                    "key": "feature.node.kubernetes.io/pci-10de.present",
                                    "operator": "In",
                                    "values": ["true"],
                                }
                            ]
                        }
                    ]
                }
            }
        },
        "tolerations": [{"operator": "Exists"}],
        "podAnnotations": {"a": "b"},
        "podSecurityContext": {"runAsUser": 0},
        "resources": {"limits": {"memory": "128Mi"}},
        "runtimeClassName": "nvidia",
        "priorityClassName": "",
        "imagePullSecrets": [{"name": "regcred"}],
        "image": {"repository": "registry.example/nvdp", "tag": "dev", "pullPolicy": "Always"},
        "updateStrategy": {"type": "OnDelete"},
        "fullnameOverride": "gpu-plugin",
        "namespaceOverride": "gpu",
        "securityContext": {"privileged": True},
    }
    r = render(values)
    pod = r.pod
    assert pod["nodeSelector"] == values["nodeSelector"]
    assert pod["affinity"] == values["affinity"]
    assert pod["tolerations"] == values["tolerations"]
    assert r.daemonset["spec"]["template"]["metadata"]["annotations"] == {"a": "b"}
    assert pod["securityContext"] == {"runAsUser": 0}
    assert r.container["resources"] == values["resources"]
    assert pod["runtimeClassName"] == "nvidia"
    assert "priorityClassName" not in pod
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    assert r.container["image"] == "registry.example/nvdp:dev"
    assert r.container["imagePullPolicy"] == "Always"
    assert r.daemonset["spec"]["updateStrategy"] == {"type": "OnDelete"}
    assert r.daemonset["metadata"]["name"] == "gpu-plugin"
    assert r.daemonset["metadata"]["namespace"] == "gpu"
    assert r.security_context == {"privileged": True}, "a given securityContext is used verbatim"


def test_upstream_values_file_keeps_its_meaning(render, render_error, values_file):
    values = values_file("upstream-values.yaml")
    # nfd.enabled asks for upstream's NFD subchart, which is not bundled: refused, naming the value and what to do.
    assert "nfd.enabled=true" in render_error(values) and "install NFD from its own chart" in render_error(values)
    del values["nfd"]["enabled"]
    r = render(values)
    env = r.env
    assert env["MIG_STRATEGY"] == "mixed"
    assert env["FAIL_ON_INIT_ERROR"] == "false"
    assert env["PASS_DEVICE_SPECS"] == "false"
    assert env["DEVICE_LIST_STRATEGY"] == "envvar"
    assert env["DEVICE_ID_STRATEGY"] == "uuid"
    assert env["NVIDIA_DRIVER_ROOT"] == "/run/nvidia/driver"
    assert env["DEFAULT_CONFIG"] == "default"
    assert env["FALLBACK_STRATEGIES"] == "named,single"
    assert "MPS_ROOT" not in env, "upstream's mps.root alone does not turn MPS on"
    assert r.mount("/run/nvidia/driver")[0]["readOnly"] is True
    assert set(r.one("ConfigMap")["data"]) == {"default", "ts4"}
    assert r.security_context["capabilities"]["add"] == ["SYS_ADMIN"], "mixed MIG"
    assert r.pod["runtimeClassName"] == "nvidia"
    assert r.pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert r.container["resources"] == {"limits": {"memory": "256Mi"}}
    assert len(r.of_kind("DaemonSet")) == 1, "no GFD, NFD or MPS DaemonSet"
    assert env["LABEL_SINK"] == "node-feature-api", "gfd.enabled: nvdp publishes GFD's labels itself"
    assert "nfd.*" in r.notes
    assert "cdi.*" not in r.notes, "upstream's cdi values are honoured, not ignored"


def test_fork_values_file_keeps_its_meaning(render, values_file):
    r = render(values_file("fork-values.yaml"))
    cm = r.one("ConfigMap")
    assert cm["metadata"]["name"] == "nos-device-plugin-configs"
    assert "default" in cm["data"], "an empty ConfigMap is seeded with a default config"
    assert r.mount("/config/named")[1]["configMap"] == {"name": "nos-device-plugin-configs"}
    assert r.env["MPS_ROOT"] == "/run/nvidia/mps"
    assert r.pod["nodeSelector"] == {"nos.nebuly.com/gpu-partitioning": "mps"}
    assert "hostIPC" not in r.pod
    assert "mps.userID" in r.notes and "mps.image" in r.notes


def test_fork_values_without_mps_enabled_ask_for_it(render_error, values_file):
    values = values_file("fork-values.yaml")
    del values["mps"]["enabled"]
    assert "set mps.enabled=true" in render_error(values)


def test_upstream_0_14_style_values_install(render):
    values = {
        "legacyDaemonsetAPI": False,
        "migStrategy": "none",
        "failOnInitError": True,
        "compatWithCPUManager": None,
        "nvidiaDriverRoot": "/",
        "runtimeClassName": None,
        "config": {"map": {}, "name": "", "default": "", "fallbackStrategies": ["named", "single"]},
        "gfd": {"enabled": False},
        "nfd": {"nameOverride": "node-feature-discovery"},
        "affinity": {},
    }
    r = render(values)
    assert r.env["MIG_STRATEGY"] == "none" and r.env["FAIL_ON_INIT_ERROR"] == "true"
    assert r.env["NVIDIA_DRIVER_ROOT"] == "/"
    assert "PASS_DEVICE_SPECS" not in r.env and "CONFIG_FILE_SRCDIR" not in r.env
    assert r.security_context == DROP_ALL


def test_default_resources_are_the_measured_budget_and_a_users_map_replaces_them(render):
    """docs/security.md and values.yaml: 64Mi requested, 256Mi limit, no CPU limit, unless `resources` is set, which
    is used as it is (never merged: a user's lower limit must not meet our higher request)."""
    assert render({}).container["resources"] == {"requests": {"cpu": "10m", "memory": "64Mi"},
                                                 "limits": {"memory": "256Mi"}}
    mine = {"limits": {"memory": "48Mi"}}
    assert render({"resources": mine}).container["resources"] == mine


GPU_NODE_TERMS = [
    {"matchExpressions": [{"key": "feature.node.kubernetes.io/pci-10de.present", "operator": "In",
                           "values": ["true"]}]},
    {"matchExpressions": [{"key": "feature.node.kubernetes.io/cpu-model.vendor_id", "operator": "In",
                           "values": ["NVIDIA"]}]},
    {"matchExpressions": [{"key": "nvidia.com/gpu.present", "operator": "In", "values": ["true"]}]},
]


def _required_terms(pod: dict) -> list[dict]:
    return pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]


@pytest.mark.parametrize("values", [{}, {"affinity": {}}, {"mps": {"enabled": True}}])
def test_default_affinity_is_gpu_nodes_only_as_upstream(render, values):
    """Upstream's default: any of three labels (one term each, so ORed). An empty map (v0.14's default) keeps it, as
    Helm merges maps; the MPS host DaemonSet is placed the same way."""
    r = render(values)
    for daemonset in r.of_kind("DaemonSet"):
        pod = daemonset["spec"]["template"]["spec"]
        assert _required_terms(pod) == GPU_NODE_TERMS, daemonset["metadata"]["name"]
        assert set(pod["affinity"]) == {"nodeAffinity"}
    if values.get("mps"):
        assert r.mps_host is not None


def test_affinity_overrides_as_upstream(render):
    mine = [{"matchExpressions": [{"key": "example.com/gpu", "operator": "Exists"}]}]
    override = {"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": mine}}}, "mps": {"enabled": True}}
    r = render(override)
    for daemonset in r.of_kind("DaemonSet"):
        assert _required_terms(daemonset["spec"]["template"]["spec"]) == mine, "lists are replaced, not appended"
    # Other affinity kinds are merged with the default (Helm's rule for maps, so upstream's too).
    anti = {"requiredDuringSchedulingIgnoredDuringExecution": [{"topologyKey": "kubernetes.io/hostname"}]}
    pod = render({"affinity": {"podAntiAffinity": anti}}).pod
    assert pod["affinity"]["podAntiAffinity"] == anti and _required_terms(pod) == GPU_NODE_TERMS
    # null removes it: every node that tolerates the pod.
    r = render({"affinity": None, "mps": {"enabled": True}})
    assert all("affinity" not in d["spec"]["template"]["spec"] for d in r.of_kind("DaemonSet"))


def test_static_manifest_runs_on_gpu_nodes_only():
    static = [o for o in yaml.safe_load_all((ROOT / "deploy/static/nvdp.yaml").read_text()) if o]
    assert _required_terms(static[0]["spec"]["template"]["spec"]) == GPU_NODE_TERMS


def test_values_comments_match_the_events_role(render):
    """values.yaml and the templates' comments say what the Events Role grants: create, nothing else."""
    role = next(o for o in render({"events": {"enabled": True}}).of_kind("Role") if o["metadata"]["name"].endswith(
        "-events"))
    assert role["rules"] == [{"apiGroups": [""], "resources": ["events"], "verbs": ["create"]}]
    for path in ("deploy/helm/nvdp/values.yaml", "deploy/helm/nvdp/templates/rbac.yaml",
                 "deploy/helm/nvdp/templates/_helpers.tpl", "docs/deployment.md"):
        text = (ROOT / path).read_text().lower()
        for claim in ("create and patch", "create/patch", "patch events", "create, patch"):
            assert claim not in text, f"{path} says the Events role has patch"


NVDP_IMAGE = "ghcr.io/nvdp/nvdp:0.1.0"


@pytest.mark.parametrize(
    "image",
    [
        {"repository": "nvcr.io/nvidia/k8s-device-plugin"},
        {"repository": "nvcr.io/nvidia/k8s-device-plugin", "tag": "v0.17.0"},
        {"repository": "ghcr.io/nebuly-ai/k8s-device-plugin", "tag": "v0.13.0"},
        {"repository": "registry.example/mirror/nvidia/k8s-device-plugin", "tag": "v0.14.5-ubi8"},
        {"tag": "v0.14.5"},
        {"repository": "ghcr.io/nvdp/nvdp", "tag": "v0.15.0"},
    ],
)
def test_upstream_image_values_run_nvdps_image_and_say_so(render, image):
    r = render({"image": image, "mps": {"enabled": True}})
    assert r.container["image"] == NVDP_IMAGE
    assert r.mps_host["spec"]["template"]["spec"]["containers"][0]["image"] == NVDP_IMAGE
    assert f"the pods run nvdp's image {NVDP_IMAGE} instead" in r.notes
    assert image.get("repository", image.get("tag")) in r.notes


@pytest.mark.parametrize(
    ("image", "reference"),
    [
        ({}, NVDP_IMAGE),
        ({"tag": "0.2.0"}, "ghcr.io/nvdp/nvdp:0.2.0"),
        ({"repository": "registry.example/nvdp", "tag": "v2"}, "registry.example/nvdp:v2"),
        ({"repository": "registry.example/nvdp"}, "registry.example/nvdp:0.1.0"),
    ],
)
def test_nvdp_image_values_are_used_as_given(render, image, reference):
    r = render({"image": image})
    assert r.container["image"] == reference
    assert "nvdp's image" not in r.notes


def test_default_repository_is_the_one_values_name():
    values = yaml.safe_load((ROOT / "deploy/helm/nvdp/values.yaml").read_text())
    helpers = (ROOT / "deploy/helm/nvdp/templates/_helpers.tpl").read_text()
    assert '{{- define "nvdp.defaultRepository" -}}' + values["image"]["repository"] + "{{- end -}}" in helpers


def _schema() -> dict:
    import json

    return json.loads((ROOT / "deploy/helm/nvdp/values.schema.json").read_text())


@pytest.mark.parametrize("typo", ["migStrategyy", "tolerration", "nodeselector", "Image", "mig"])
def test_unknown_top_level_keys_are_refused(render_error, typo):
    message = render_error({typo: "x"})
    assert "additional properties" in message and typo in message


# Every top-level key of upstream's values.yaml (0.14 to 0.20 and its main branch) and of the fork's.
UPSTREAM_TOP_LEVEL = {
    "config", "compatWithCPUManager", "migStrategy", "failOnInitError", "deviceListStrategy", "deviceIDStrategy",
    "nvidiaDriverRoot", "nvidiaDevRoot", "gdrcopyEnabled", "gdsEnabled", "mofedEnabled", "deviceDiscoveryStrategy",
    "nameOverride", "fullnameOverride", "namespaceOverride", "selectorLabelsOverride", "componentSelectorLabels",
    "allowDefaultNamespace", "imagePullSecrets", "image", "updateStrategy", "podAnnotations", "podSecurityContext",
    "securityContext", "resources", "nodeSelector", "affinity", "tolerations", "priorityClassName",
    "runtimeClassName", "devicePlugin", "gfd", "nfd", "mps", "cdi", "legacyDaemonsetAPI", "noTimestamp",
    "sleepInterval",
}


def test_schema_lists_every_nvdp_and_upstream_key_and_nothing_else_passes():
    schema = _schema()
    assert schema["additionalProperties"] is False
    listed = set(schema["properties"])
    values = yaml.safe_load((ROOT / "deploy/helm/nvdp/values.yaml").read_text())
    assert set(values) <= listed, "every key of values.yaml is in the schema"
    assert listed >= UPSTREAM_TOP_LEVEL
    # What is listed but not nvdp's own is documented as accepted for compatibility.
    compat = {k for k, v in schema["properties"].items() if "x-compatibility" in v}
    assert listed - set(values) == compat
    for key in compat - {"global", "legacyDaemonsetAPI", "namespace"}:
        assert key in (ROOT / "docs/deployment.md").read_text(), key


def test_upstream_only_keys_install_and_are_listed_as_ignored(render):
    r = render({"componentSelectorLabels": {"enabled": False}, "noTimestamp": None, "sleepInterval": "60s",
                "global": {"imageRegistry": "r.example"}, "gfd": {"enabled": False}, "cdi": {"featureFlags": None}})
    assert "componentSelectorLabels" in r.notes and "sleepInterval" in r.notes


@pytest.mark.parametrize("name", ["upstream-values.yaml", "fork-values.yaml"])
def test_upstream_and_fork_values_files_pass_the_schema(render, values_file, name):
    values = values_file(name)
    assert set(values) <= set(_schema()["properties"])
    values.get("nfd", {}).pop("enabled", None)  # refused by the templates, not the schema (see above)
    assert render(values).daemonset


def test_upstream_chart_defaults_copied_verbatim_install_nvdp_on_gpu_nodes(render, values_file):
    values = values_file("upstream-0.20-defaults.yaml")
    assert set(values) <= set(_schema()["properties"])
    r = render(values)
    assert [o["kind"] for o in r.objects] == ["DaemonSet"]
    assert r.container["image"] == NVDP_IMAGE
    assert _required_terms(r.pod) == GPU_NODE_TERMS
    assert r.security_context == DROP_ALL
    for ignored in ("nfd.*", "componentSelectorLabels", "devicePlugin.containers"):
        assert ignored in r.notes, ignored
    assert "is another plugin's image" in r.notes


def test_notes_say_where_the_pods_go(render):
    assert "GPU nodes only" in render().notes and "nvidia.com/gpu.present=true" in render().notes
    assert "GPU nodes only" not in render({"affinity": None}).notes


def test_config_strict_sets_strict_config(render):
    assert "STRICT_CONFIG" not in render({}).env
    assert render({"config": {"strict": True}}).env["STRICT_CONFIG"] == "true"


# -- GPU Feature Discovery's labels (docs/labels.md) -------------------------------------------------------------------


def test_gfd_enabled_publishes_node_features_from_the_plugin_pod(render):
    r = render({"gfd": {"enabled": True, "noTimestamp": True}})
    assert len(r.of_kind("DaemonSet")) == 1, "no second DaemonSet"
    env = r.env
    assert env["LABEL_SINK"] == "node-feature-api"
    assert env["GFD_NO_TIMESTAMP"] == "true"
    assert env["POD_NAME"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert env["POD_NAMESPACE"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    assert r.pod["serviceAccountName"] == "nvdp" and "automountServiceAccountToken" not in r.pod
    roles = {o["metadata"]["name"]: o for o in r.of_kind("Role")}
    labels_role = roles["nvdp-labels"]
    assert labels_role["metadata"]["namespace"] == "nvdp"
    assert labels_role["rules"] == [
        {"apiGroups": ["nfd.k8s-sigs.io"], "resources": ["nodefeatures"], "verbs": ["get", "create", "update"]},
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["get"]}]
    assert r.one("ClusterRole")["rules"] == [{"apiGroups": [""], "resources": ["nodes"], "verbs": ["list", "watch"]}]
    assert not r.of_kind("ValidatingAdmissionPolicy")
    assert "NodeFeature objects nvdp/nvidia-features-for-<node>" in r.notes


def test_labels_direct_patches_only_its_own_node(render):
    r = render({"labels": {"direct": True}, "noTimestamp": False})
    assert r.env["LABEL_SINK"] == "node"
    assert r.env["GFD_NO_TIMESTAMP"] == "false", "upstream's top-level noTimestamp is read too"
    node_rules = [rule for rule in r.one("ClusterRole")["rules"] if "patch" in rule["verbs"]]
    assert node_rules == [{"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "patch"]}]
    assert "nvdp-labels" not in {o["metadata"]["name"] for o in r.of_kind("Role")}, "no NodeFeature rights"
    policy = r.one("ValidatingAdmissionPolicy")
    assert policy["spec"]["matchConditions"][0]["expression"] == \
        'request.userInfo.username == "system:serviceaccount:nvdp:nvdp"'
    validations = " ".join(v["expression"] for v in policy["spec"]["validations"])
    assert "authentication.kubernetes.io/node-name" in " ".join(v["expression"] for v in policy["spec"]["variables"])
    assert "variables.podNode == object.metadata.name" in validations
    assert "startsWith('nvidia.com/')" in validations and "nvdp/gfd-labels" in validations
    binding = r.one("ValidatingAdmissionPolicyBinding")
    assert binding["spec"] == {"policyName": policy["metadata"]["name"], "validationActions": ["Deny"]}
    assert not render({"labels": {"direct": True, "admissionPolicy": False}}).of_kind("ValidatingAdmissionPolicy")


def test_the_annotation_the_policy_allows_is_the_one_nvdp_writes():
    from nvdp.k8s.nodefeatures import OWNED_ANNOTATION

    assert f"k == '{OWNED_ANNOTATION}'" in (ROOT / "deploy/helm/nvdp/templates/rbac.yaml").read_text()


def test_without_gfd_no_label_sink_and_no_api_access(render):
    r = render({"noTimestamp": True})
    assert "LABEL_SINK" not in r.env and "GFD_NO_TIMESTAMP" not in r.env
    assert not r.of_kind("ClusterRole")
    assert "noTimestamp (used with gfd.enabled or labels.direct only)" in r.notes


@pytest.mark.parametrize("values", [
    {"nfd": {"enabled": True}},
    {"gfd": {"enabled": True}, "nfd": {"enabled": True}},
])
def test_nfd_enabled_is_refused_with_what_to_do(render_error, values):
    message = render_error(values)
    assert "nfd.enabled=true" in message and "labels.direct=true" in message


def test_schema_refuses_unknown_labels_keys(render_error):
    assert "additional properties" in render_error({"labels": {"directly": True}})
