"""The chart's DRA part (dra.enabled), rendered by Helm's own engine: DeviceClasses, RBAC exactly, the admission
policy restricting the service account to its own node's ResourceSlices, env and host mounts."""

from __future__ import annotations

DRA = {"dra": {"enabled": True}}


def test_dra_is_off_by_default(render):
    r = render()
    kinds = {o["kind"] for o in r.objects}
    assert not kinds & {"DeviceClass", "ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"}
    assert "DRA_ENABLED" not in r.env
    assert not r.mount_paths() & {"/var/lib/kubelet/plugins", "/var/lib/kubelet/plugins_registry", "/var/run/cdi"}


def test_device_classes_select_as_nvidias_driver(render):
    classes = {o["metadata"]["name"]: o for o in render(DRA).of_kind("DeviceClass")}
    assert sorted(classes) == ["gpu.nvidia.com", "mig.nvidia.com"]
    for kind in ("gpu", "mig"):
        c = classes[f"{kind}.nvidia.com"]
        assert c["apiVersion"] == "resource.k8s.io/v1"
        assert c["spec"]["selectors"] == [{"cel": {"expression": (
            f"device.driver == 'gpu.nvidia.com' && device.attributes['gpu.nvidia.com'].type == '{kind}'")}}]


def test_another_driver_name_gets_its_own_classes(render):
    r = render({"dra": {"enabled": True, "driverName": "gpu.example.com"}})
    classes = {o["metadata"]["name"]: o for o in r.of_kind("DeviceClass")}
    assert sorted(classes) == ["gpu.gpu.example.com", "mig.gpu.example.com"]
    assert "device.driver == 'gpu.example.com'" in classes["mig.gpu.example.com"]["spec"]["selectors"][0]["cel"][
        "expression"]
    assert r.env["DRA_DRIVER_NAME"] == "gpu.example.com"
    assert not render({"dra": {"enabled": True, "deviceClasses": False}}).of_kind("DeviceClass")


def test_rbac_is_exactly_what_dra_needs(render):
    r = render(DRA)
    role = next(o for o in r.of_kind("ClusterRole") if o["metadata"]["name"] == "nvdp-dra")
    assert role["rules"] == [
        {"apiGroups": ["resource.k8s.io"], "resources": ["resourceslices"],
         "verbs": ["get", "list", "watch", "create", "update", "patch", "delete"]},
        {"apiGroups": ["resource.k8s.io"], "resources": ["resourceclaims"], "verbs": ["get"]},
        {"apiGroups": [""], "resources": ["nodes"], "verbs": ["get"]},
    ]
    binding = next(o for o in r.of_kind("ClusterRoleBinding") if o["metadata"]["name"] == "nvdp-dra")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "nvdp", "namespace": "nvdp"}]
    assert binding["roleRef"]["name"] == "nvdp-dra"
    # The pod runs as that service account, with a token.
    assert r.pod["serviceAccountName"] == "nvdp"
    assert "automountServiceAccountToken" not in r.pod
    assert r.one("ServiceAccount")["metadata"]["name"] == "nvdp"


def test_admission_policy_limits_writes_to_the_own_node(render):
    r = render(DRA, namespace="gpu")
    policy = r.one("ValidatingAdmissionPolicy")["spec"]
    assert policy["failurePolicy"] == "Fail"
    rules = policy["matchConstraints"]["resourceRules"]
    assert rules == [{"apiGroups": ["resource.k8s.io"], "apiVersions": ["*"],
                      "operations": ["CREATE", "UPDATE", "DELETE"], "resources": ["resourceslices"]}]
    assert policy["matchConditions"][0]["expression"] == (
        "request.userInfo.username == 'system:serviceaccount:gpu:nvdp'")
    variables = {v["name"]: v["expression"] for v in policy["variables"]}
    assert "'authentication.kubernetes.io/node-name'" in variables["tokenNode"]
    assert "request.userInfo.extra" in variables["tokenNode"]
    assert "oldObject" in variables["sliceNode"] and "nodeName" in variables["sliceNode"]
    assert [v["expression"] for v in policy["validations"]] == [
        "variables.tokenNode != ''", "variables.tokenNode == variables.sliceNode"]
    binding = r.one("ValidatingAdmissionPolicyBinding")["spec"]
    assert binding == {"policyName": "nvdp-resourceslices", "validationActions": ["Deny"]}
    assert not render({"dra": {"enabled": True, "admissionPolicy": False}}).of_kind("ValidatingAdmissionPolicy")


def test_env_and_host_mounts(render):
    r = render(DRA)
    env = r.env
    assert env["DRA_ENABLED"] == "true"
    assert env["DRA_DRIVER_NAME"] == "gpu.nvidia.com"
    assert env["KUBELET_PLUGINS_DIR"] == "/var/lib/kubelet/plugins"
    assert env["KUBELET_REGISTRY_DIR"] == "/var/lib/kubelet/plugins_registry"
    assert env["CDI_ROOT"] == "/var/run/cdi"
    for path, kind in (("/var/lib/kubelet/plugins", "Directory"), ("/var/lib/kubelet/plugins_registry", "Directory"),
                       ("/var/run/cdi", "DirectoryOrCreate")):
        mount, volume = r.mount(path)
        assert not mount.get("readOnly")
        assert volume["hostPath"] == {"path": path, "type": kind}
    # DRA adds no privilege: the container keeps the least-privilege context.
    assert r.security_context["capabilities"] == {"drop": ["ALL"]}


def test_bad_driver_name_is_refused(render_error):
    assert "driverName" in render_error({"dra": {"enabled": True, "driverName": "Not_A_Name"}})


def test_lint_is_clean_with_dra(helm):
    import pathlib

    chart = pathlib.Path(__file__).resolve().parents[2] / "deploy/helm/nvdp"
    report = helm.lint(str(chart), strict=True, namespace="nvdp", values={"dra": {"enabled": True}})
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert not problems and not report["errors"], report
