"""The Helm chart: lint, Kubernetes schemas, security defaults, least-privilege RBAC, each feature's objects.

Rendering and linting run Helm's own Go code in-process (helm-python-sdk); every rendered object is
checked against the Kubernetes API schemas with kubernetes-validate in strict mode (unknown fields are
errors). Each ci/*-values.yaml is one feature, as chart-testing (ct) would install it.
"""

from __future__ import annotations

import json
import re

import pytest
import yaml

from tests.packaging import (
    CHART,
    CI_VALUES,
    DASHBOARD,
    KUBE_VERSION,
    RULES,
    ci_id,
    helm,
    kubernetes_validate,
    load_values,
    notes,
    of_kind,
    operator_module,
    render,
    render_values,
    run_promtool,
)

ci = pytest.mark.parametrize("values_file", CI_VALUES, ids=ci_id)
MONITORING = CHART / "ci" / "monitoring-values.yaml"
SINGLE_NS = CHART / "ci" / "single-namespace-values.yaml"
DASHBOARDS = CHART / "ci" / "dashboards-values.yaml"
CUSTOM = CHART / "ci" / "custom-image-scheduling-values.yaml"
PROMETHEUS_OPERATOR_KINDS = {"ServiceMonitor", "PrometheusRule"}


def test_ci_values_cover_each_feature():
    assert {ci_id(p) for p in CI_VALUES} == {
        "default", "single-namespace", "monitoring", "dashboards", "custom-image-scheduling"}


# ------------------------------------------------------------------------------------------ helm lint

@ci
def test_helm_lint_strict(values_file):
    report = helm().lint(str(CHART), load_values(values_file), strict=True)
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert report["errors"] == [] and problems == [], report


def test_helm_lint_is_not_vacuous():
    report = helm().lint(str(CHART), {"image": {"tag": 5}}, strict=True)
    assert report["errors"] or any(m["severity"] >= 2 for m in report["messages"]), report


def test_kube_version_tested_is_the_chart_minimum():
    assert helm().Chart.load(str(CHART)).metadata["kubeVersion"] == f">={KUBE_VERSION}-0"


def test_template_helpers_are_prefixed():
    names = re.findall(r'define\s+"([^"]+)"', "".join(
        p.read_text() for p in (CHART / "templates").iterdir() if p.suffix in (".tpl", ".yaml")))
    assert names and all(n.startswith("darwinlm.") for n in names), names


# ------------------------------------------------------------------------------------------ schemas

@ci
def test_rendered_objects_pass_kubernetes_validate_strict(values_file):
    kv = kubernetes_validate()
    objects = render(values_file)
    assert objects
    for obj in objects:
        if obj["kind"] in PROMETHEUS_OPERATOR_KINDS:
            continue  # no schema in kubernetes-validate: checked by the tests below
        try:
            kv.validate(obj, KUBE_VERSION, strict=True)
        except kv.ValidationError as e:
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']}: {e.message} at {list(e.path)}")


def test_kubernetes_validate_catches_an_unknown_field():
    kv = kubernetes_validate()
    deployment = of_kind(render(), "Deployment")[0]
    deployment["spec"]["template"]["spec"]["containers"][0]["gpu"] = 1
    with pytest.raises(kv.ValidationError, match="gpu"):
        kv.validate(deployment, KUBE_VERSION, strict=True)


def test_crds_pass_kubernetes_validate_strict():
    chart = helm().Chart.load(str(CHART))
    if not chart.crds:
        pytest.skip("charts/darwinlm/crds/ is empty: manifests/crd.yaml not generated yet "
                    "(test_manifests fails once it exists and the copy is stale)")
    kv = kubernetes_validate()
    for c in chart.crds:
        for obj in yaml.safe_load_all(c["data"]):
            assert obj["kind"] == "CustomResourceDefinition"
            kv.validate(obj, KUBE_VERSION, strict=True)


# ------------------------------------------------------------------------------------------ security

def _pod_specs(objects):
    return [(o["metadata"]["name"], o["spec"]["template"]["spec"]) for o in objects
            if o["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job")]


@ci
def test_pods_are_hardened(values_file):
    pods = _pod_specs(render(values_file))
    assert pods
    for name, pod in pods:
        psc = pod["securityContext"]
        assert psc["runAsNonRoot"] is True and psc["seccompProfile"] == {"type": "RuntimeDefault"}, name
        assert psc.get("runAsUser", 1000) != 0, name
        for c in pod["containers"] + pod.get("initContainers", []):
            sc = c["securityContext"]
            assert sc["runAsNonRoot"] is True, name
            assert sc.get("runAsUser", 1000) != 0, name
            assert sc["readOnlyRootFilesystem"] is True, name
            assert sc["allowPrivilegeEscalation"] is False, name
            assert sc.get("privileged", False) is False, name
            assert sc["capabilities"]["drop"] == ["ALL"] and not sc["capabilities"].get("add"), name
            assert sc.get("seccompProfile", psc["seccompProfile"]) == {"type": "RuntimeDefault"}, name
            mounts = {m["mountPath"] for m in c.get("volumeMounts", [])}
            assert "/tmp" in mounts, f"{name}: read-only root needs a writable /tmp"


@ci
def test_operator_deployment_shape(values_file):
    values = load_values(values_file)
    (dep,) = of_kind(render(values_file), "Deployment")
    spec = dep["spec"]
    assert spec["replicas"] == 1 and spec["strategy"] == {"type": "Recreate"}
    (c,) = spec["template"]["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    for probe in ("livenessProbe", "readinessProbe"):
        assert c[probe]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert f"--liveness=http://0.0.0.0:{ports['health']}/healthz" in c["args"]
    metrics = values.get("metrics", {})
    env = {e["name"]: e.get("value") for e in c["env"]}
    if metrics.get("enabled", True):
        assert ports["metrics"] == metrics.get("port", 9090)
        assert env["DARWINLM_METRICS_PORT"] == str(ports["metrics"])
    assert spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()


@ci
def test_operator_accepts_rendered_args_and_env(values_file):
    """The Deployment's args parse with `python -m darwinlm_operator`'s own parser; its env is what it reads."""
    main = operator_module("__main__")
    if main is None or not hasattr(main, "_parser"):
        pytest.skip("darwinlm_operator.__main__ (with _parser) does not exist yet")
    (c,) = of_kind(render(values_file), "Deployment")[0]["spec"]["template"]["spec"]["containers"]
    args = main._parser().parse_args(c["args"])
    values = load_values(values_file)
    if values.get("singleNamespaceInstall"):
        assert not args.all_namespaces and args.namespaces == values.get("watchNamespaces", ["ops"])
    else:
        assert args.all_namespaces and not args.namespaces
    assert args.liveness.endswith("/healthz")
    handlers = operator_module("handlers")
    if handlers is not None and hasattr(handlers, "OperatorConfig"):
        env = {e["name"]: e["value"] for e in c["env"] if "value" in e}
        import unittest.mock

        with unittest.mock.patch.dict("os.environ", env):
            config = handlers.OperatorConfig.from_env()
        assert config.metrics_port == int(env["DARWINLM_METRICS_PORT"])


def test_metrics_disabled_removes_port_and_service():
    objects = render_values({"metrics": {"enabled": False, "serviceMonitor": {"enabled": True}}})
    (c,) = of_kind(objects, "Deployment")[0]["spec"]["template"]["spec"]["containers"]
    assert "metrics" not in {p["name"] for p in c["ports"]}
    assert {e["name"]: e.get("value") for e in c["env"]}["DARWINLM_METRICS_PORT"] == "0"
    assert not of_kind(objects, "Service") and not of_kind(objects, "ServiceMonitor")


# ------------------------------------------------------------------------------------------ RBAC

EXPECTED_RULES = {
    ("darwinlm.io", "pruningsearches"): {"get", "list", "watch", "patch", "update", "delete"},
    ("darwinlm.io", "pruningsearches/status"): {"get", "patch", "update"},
    ("darwinlm.io", "pruningsearches/finalizers"): {"update"},
    ("batch", "jobs"): {"get", "list", "watch", "create", "delete"},
    ("", "pods"): {"get", "list", "watch"},
    ("", "services"): {"get", "create", "delete"},
    ("", "events"): {"create", "patch"},
    ("", "secrets"): {"get"},
}


def _grants(role) -> dict[tuple[str, str], set[str]]:
    out: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        assert "nonResourceURLs" not in rule and "resourceNames" not in rule
        for group in rule["apiGroups"]:
            for res in rule["resources"]:
                out.setdefault((group, res), set()).update(rule["verbs"])
    return out


@ci
def test_rbac_least_privilege(values_file):
    objects = render(values_file)
    roles = of_kind(objects, "ClusterRole") + of_kind(objects, "Role")
    assert roles
    for role in roles:
        for rule in role["rules"]:
            for field in ("apiGroups", "resources", "verbs"):
                assert "*" not in rule[field], f"{role['metadata']['name']}: wildcard in {field}"
            assert not {"escalate", "bind", "impersonate"} & set(rule["verbs"])
        grants = _grants(role)
        assert grants == EXPECTED_RULES, grants
        assert grants[("", "secrets")] == {"get"}, "Secrets: get only (the S3 Secret of spec.s3.secretRef)"
        assert grants[("", "pods")] <= {"get", "list", "watch"}


@ci
def test_bindings_point_at_rendered_roles_and_account(values_file):
    objects = render(values_file)
    (dep,) = of_kind(objects, "Deployment")
    account = dep["spec"]["template"]["spec"]["serviceAccountName"]
    if load_values(values_file).get("serviceAccount", {}).get("create", True):
        assert [sa["metadata"]["name"] for sa in of_kind(objects, "ServiceAccount")] == [account]
    roles = {(o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"])
             for o in objects if o["kind"] in ("Role", "ClusterRole")}
    bindings = of_kind(objects, "RoleBinding") + of_kind(objects, "ClusterRoleBinding")
    assert len(bindings) == len(roles)
    for b in bindings:
        ns = b["metadata"].get("namespace") if b["roleRef"]["kind"] == "Role" else None
        assert (b["roleRef"]["kind"], ns, b["roleRef"]["name"]) in roles
        assert b["subjects"] == [{"kind": "ServiceAccount", "name": account, "namespace": "ops"}]


def test_cluster_mode_by_default():
    objects = render()
    assert len(of_kind(objects, "ClusterRole")) == 1 and not of_kind(objects, "Role")
    args = of_kind(objects, "Deployment")[0]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--all-namespaces" in args and not any(a.startswith("--namespace") for a in args)


def test_single_namespace_mode_has_nothing_cluster_wide():
    objects = render(SINGLE_NS)
    assert not of_kind(objects, "ClusterRole") and not of_kind(objects, "ClusterRoleBinding")
    assert {r["metadata"]["namespace"] for r in of_kind(objects, "Role")} == {"team-a", "team-b"}
    assert {r["metadata"]["namespace"] for r in of_kind(objects, "RoleBinding")} == {"team-a", "team-b"}
    args = of_kind(objects, "Deployment")[0]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert [a for a in args if a.startswith("--namespace")] == ["--namespace=team-a", "--namespace=team-b"]
    assert "--all-namespaces" not in args
    assert "team-a, team-b" in notes(SINGLE_NS)


def test_single_namespace_defaults_to_release_namespace():
    objects = render_values({"singleNamespaceInstall": True})
    assert [r["metadata"]["namespace"] for r in of_kind(objects, "Role")] == ["ops"]
    args = of_kind(objects, "Deployment")[0]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--namespace=ops" in args


def test_rbac_disabled_renders_no_rbac():
    for mode in (False, True):
        objects = render_values({"rbacEnable": False, "singleNamespaceInstall": mode})
        assert not [o for o in objects if o["kind"].endswith(("Role", "RoleBinding"))]


def test_existing_service_account():
    objects = render_values({"serviceAccount": {"create": False, "name": "platform-sa", "annotations": {}}})
    assert not of_kind(objects, "ServiceAccount")
    assert of_kind(objects, "Deployment")[0]["spec"]["template"]["spec"]["serviceAccountName"] == "platform-sa"
    with pytest.raises(helm().HelmError, match="serviceAccount.name is required"):
        render_values({"serviceAccount": {"create": False, "name": "", "annotations": {}}})


# ------------------------------------------------------------------------------------------ features

def test_custom_image_pull_secrets_scheduling():
    values = load_values(CUSTOM)
    objects = render(CUSTOM)
    (dep,) = of_kind(objects, "Deployment")
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["image"] == "registry.example.com/ml/darwinlm-operator:0.1.0" and c["imagePullPolicy"] == "Always"
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["DARWINLM_JOB_IMAGE"] == "registry.example.com/ml/darwinlm-job@" + values["jobImage"]["tag"]
    assert env["DARWINLM_LOG_LEVEL"] == "DEBUG" and "--verbose" in c["args"]
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    for key in ("nodeSelector", "affinity", "tolerations", "priorityClassName"):
        assert pod[key] == values[key]
    assert c["resources"] == values["resources"]
    assert pod["serviceAccountName"] == "darwinlm-operator"
    assert of_kind(objects, "ServiceAccount")[0]["metadata"]["annotations"] == values["serviceAccount"]["annotations"]
    assert dep["spec"]["template"]["metadata"]["annotations"] == values["podAnnotations"]
    assert dep["spec"]["template"]["metadata"]["labels"]["example.com/tier"] == "control"
    for o in objects:
        assert o["metadata"]["labels"]["team"] == "ml-platform", o["kind"]
        assert o["metadata"]["labels"]["app.kubernetes.io/name"] == "pruner"
        assert o["metadata"]["name"].startswith("rel-pruner") or o["kind"] == "ServiceAccount"


def test_default_images_follow_app_version():
    chart = helm().Chart.load(str(CHART))
    app = chart.metadata["appVersion"]
    (c,) = of_kind(render(), "Deployment")[0]["spec"]["template"]["spec"]["containers"]
    assert c["image"] == f"ghcr.io/darwinlm/darwinlm-operator:{app}"
    assert {e["name"]: e.get("value") for e in c["env"]}["DARWINLM_JOB_IMAGE"] == f"ghcr.io/darwinlm/darwinlm-job:{app}"
    # warm generation Jobs by default (bench/README.md: warm Jobs)
    assert {e["name"]: e.get("value") for e in c["env"]}["DARWINLM_GENERATIONS_PER_JOB"] == "0"


def test_service_monitor_scrapes_the_metrics_service():
    objects = render(MONITORING)
    (svc,) = of_kind(objects, "Service")
    (sm,) = of_kind(objects, "ServiceMonitor")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert sm["spec"]["namespaceSelector"] == {"matchNames": ["ops"]}
    assert sm["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    (ep,) = sm["spec"]["endpoints"]
    assert ep["port"] in {p["name"] for p in svc["spec"]["ports"]}
    assert ep["interval"] == "15s" and ep["honorLabels"] is True
    job = svc["metadata"]["labels"][sm["spec"]["jobLabel"]]
    assert re.fullmatch(".*darwinlm.*", job), "the DarwinLMOperatorDown alert matches up{job=~\".*darwinlm.*\"}"
    assert svc["spec"]["ports"][0]["port"] == 9108


def test_prometheus_rule_is_rules_file(tmp_path):
    (rule,) = of_kind(render(MONITORING), "PrometheusRule")
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert rule["spec"] == yaml.safe_load(RULES.read_text()), "stale charts/darwinlm/files/prometheus-rules.yml"
    path = tmp_path / "from-chart.yml"
    path.write_text(yaml.safe_dump(rule["spec"]))
    r = run_promtool("check", "rules", str(path))
    assert r.returncode == 0, r.stdout + r.stderr


def test_dashboard_configmap_for_grafana_sidecar():
    objects = render(DASHBOARDS)
    (cm,) = of_kind(objects, "ConfigMap")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["metadata"]["namespace"] == "monitoring"
    assert cm["metadata"]["annotations"] == {"grafana_folder": "ML"}
    assert json.loads(cm["data"]["darwinlm.json"]) == json.loads(DASHBOARD.read_text())
    assert not of_kind(render(), "ConfigMap"), "off by default"


def test_optional_objects_off_by_default():
    kinds = {o["kind"] for o in render()}
    assert kinds == {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Service", "Deployment"}


# ------------------------------------------------------------------------------------------ values

def _resolve(schema: dict, node: dict) -> dict:
    while "$ref" in node:
        node = schema["definitions"][node["$ref"].rsplit("/", 1)[1]]
    return node


def test_schema_is_strict_at_every_level():
    schema = json.loads((CHART / "values.schema.json").read_text())

    def walk(node, path):
        if node.get("properties"):
            assert node.get("additionalProperties") is False, f"{path}: additionalProperties must be false"
            for k, v in node["properties"].items():
                walk(v, f"{path}.{k}")
        for key in ("items", "additionalProperties"):
            if isinstance(node.get(key), dict):
                walk(node[key], f"{path}[]")
    walk(schema, "$")
    for name, node in schema["definitions"].items():
        walk(node, f"#/definitions/{name}")
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert set(schema["properties"]) == set(values), "schema and values.yaml name the same top-level keys"


def _chart_keys(schema, node, data, path=()):
    """Paths of values.yaml keys the chart defines (not the Kubernetes objects passed through)."""
    node = _resolve(schema, node)
    for key, value in data.items():
        sub = node.get("properties", {}).get(key)
        if sub is None:
            continue
        yield path + (key,)
        sub_resolved = _resolve(schema, sub)
        chart_owned = "$ref" not in sub or sub["$ref"].endswith(("/image", "/probe"))
        if isinstance(value, dict) and chart_owned and sub_resolved.get("properties"):
            yield from _chart_keys(schema, sub_resolved, value, path + (key,))


def test_every_values_key_has_a_comment():
    text = (CHART / "values.yaml").read_text()
    lines = text.splitlines()
    schema = json.loads((CHART / "values.schema.json").read_text())
    node_lines: dict[tuple, int] = {}

    def index(node, path=()):
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                node_lines[path + (k.value,)] = k.start_mark.line
                index(v, path + (k.value,))
    index(yaml.compose(text))
    keys = list(_chart_keys(schema, schema, yaml.safe_load(text)))
    assert len(keys) > 40
    for path in keys:
        n = node_lines[path]
        above = lines[n - 1].strip() if n else ""
        assert above.startswith("#") or "#" in lines[n], f"values.yaml: {'.'.join(path)} has no comment"


BAD_VALUES = {
    # wrong types
    "type-image-tag": ({"image": {"tag": 5}}, "/image/tag"),
    "type-rbacEnable": ({"rbacEnable": "yes"}, "/rbacEnable"),
    "type-metrics-port": ({"metrics": {"port": "9090"}}, "/metrics/port"),
    "type-watchNamespaces": ({"watchNamespaces": "team-a"}, "/watchNamespaces"),
    "type-imagePullSecrets": ({"imagePullSecrets": ["regcred"]}, "/imagePullSecrets/0"),
    "type-serviceMonitor-enabled": ({"metrics": {"serviceMonitor": {"enabled": "true"}}},
                                    "/metrics/serviceMonitor/enabled"),
    "range-probe-period": ({"livenessProbe": {"periodSeconds": 0}}, "/livenessProbe/periodSeconds"),
    "range-port": ({"healthPort": 70000}, "/healthPort"),
    # unknown keys, at each level
    "unknown-top": ({"replicaCount": 2}, "replicaCount"),
    "unknown-image": ({"image": {"name": "x"}}, "name"),
    "unknown-serviceMonitor": ({"metrics": {"serviceMonitor": {"labels": {}}}}, "labels"),
    "unknown-securityContext-typo": ({"securityContext": {"readOnlyRootFileSystem": True}},
                                     "readOnlyRootFileSystem"),
    "unknown-serviceAccount": ({"serviceAccount": {"annotation": {}}}, "annotation"),
    "unknown-dashboards": ({"dashboards": {"folder": "ML"}}, "folder"),
    "unknown-toleration": ({"tolerations": [{"key": "a", "operator": "Exists", "effects": "NoSchedule"}]},
                           "effects"),
    # bad enums
    "enum-pullPolicy": ({"image": {"pullPolicy": "Sometimes"}}, "/image/pullPolicy"),
    "enum-jobImage-pullPolicy": ({"jobImage": {"pullPolicy": "always"}}, "/jobImage/pullPolicy"),
    "enum-toleration-operator": ({"tolerations": [{"key": "a", "operator": "Maybe"}]}, "/tolerations/0/operator"),
    "enum-seccomp": ({"securityContext": {"seccompProfile": {"type": "Default"}}},
                     "/securityContext/seccompProfile/type"),
    # bad formats
    "pattern-namespace": ({"singleNamespaceInstall": True, "watchNamespaces": ["Team_A"]}, "/watchNamespaces/0"),
    "pattern-interval": ({"metrics": {"serviceMonitor": {"interval": "30"}}}, "/metrics/serviceMonitor/interval"),
    "pattern-quantity": ({"resources": {"limits": {"memory": "lots"}}}, "/resources/limits/memory"),
    "pattern-label": ({"commonLabels": {"team": "a b"}}, "/commonLabels/team"),
    "pattern-nameOverride": ({"nameOverride": "Bad_Name"}, "/nameOverride"),
    "unique-watchNamespaces": ({"watchNamespaces": ["a", "a"]}, "/watchNamespaces"),
}


@pytest.mark.parametrize("values,where", list(BAD_VALUES.values()), ids=list(BAD_VALUES))
def test_values_schema_rejects(values, where):
    h = helm()
    chart = h.Chart.load(str(CHART))
    with pytest.raises(h.HelmValuesError) as err:
        chart.validate_schema(values)
    assert where in str(err.value), str(err.value)


@ci
def test_values_schema_accepts_ci_values(values_file):
    helm().Chart.load(str(CHART)).validate_schema(load_values(values_file))
