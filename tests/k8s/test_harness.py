"""The Kubernetes test harness works end to end, without the real operator.

Emulator semantics (CRD/CR validation, selectors, status subresource, conflicts, watch replay, GC), the pod runner
(Job controller + kubelet: Secret env, exit codes, Indexed Jobs, eviction/failure/hold injection, deadlines), a kopf
operator driving Jobs, and S3 (moto round trip, outages with state surviving).
"""

from __future__ import annotations

import json
import time

import pytest
import yaml

from tests.support.cluster import SUPPORT_DIR, K8s, KubectlError, wait_for
from tests.support.kmock_server import EmulatorThread

CRD = SUPPORT_DIR / "example_crd.yaml"
G, V, P = "darwinlm.io", "v1alpha1", "pruningsearches"


def job_manifest(name: str, code: str = "print('hi')", *, env: list | None = None, **spec) -> dict:
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name, "labels": {"app": "harness"}},
            "spec": {"backoffLimit": 0, **spec, "template": {"spec": {
                "restartPolicy": "Never",
                "containers": [{"name": "main", "image": "darwinlm-jobs:dev", "command": ["python", "-c", code],
                                "env": env or []}]}}}}


def create_job(k8s: K8s, ns: str, manifest: dict) -> dict:
    return k8s.raw("POST", f"/apis/batch/v1/namespaces/{ns}/jobs", manifest)


def cond(obj: dict, ctype: str) -> dict | None:
    return K8s.condition(obj, ctype)


def api_error(fn) -> "object":
    with pytest.raises(Exception) as ei:
        fn()
    return ei.value


# ------------------------------------------------------------------------------------------------ emulator

def test_kubectl_crd_and_custom_resource_validation(kubectl, k8s, namespace):
    kubectl("apply", "-f", str(CRD))
    crd = kubectl.json("get", "crd", "pruningsearches.darwinlm.io")
    assert {c["type"]: c["status"] for c in crd["status"]["conditions"]}["Established"] == "True"
    kubectl.apply({"apiVersion": f"{G}/{V}", "kind": "PruningSearch", "metadata": {"name": "ps1"},
                   "spec": {"generations": 2, "notInSchema": True}, "status": {"phase": "Fake"}}, namespace=namespace)
    ps = kubectl.json("get", "ps", "ps1", namespace=namespace)
    assert ps["spec"] == {"generations": 2}                   # unknown field pruned
    assert "status" not in ps                                 # status subresource: ignored on create
    assert ps["metadata"]["generation"] == 1 and ps["metadata"]["uid"]
    with pytest.raises(KubectlError, match="spec.generations.*Invalid value: 0"):
        kubectl.apply({"apiVersion": f"{G}/{V}", "kind": "PruningSearch", "metadata": {"name": "ps2"},
                       "spec": {"generations": 0}}, namespace=namespace)
    with pytest.raises(KubectlError, match="spec.generations: Required value"):
        kubectl.apply({"apiVersion": f"{G}/{V}", "kind": "PruningSearch", "metadata": {"name": "ps3"},
                       "spec": {}}, namespace=namespace)
    kubectl("patch", "ps", "ps1", "--type=merge", "-p", '{"spec":{"generations":5}}', namespace=namespace)
    assert kubectl.json("get", "ps", "ps1", namespace=namespace)["metadata"]["generation"] == 2
    kubectl("delete", "ps", "ps1", namespace=namespace)      # --wait (a watch) works against the emulator
    assert "ps1" not in kubectl("get", "ps", namespace=namespace).stdout
    # an updated CRD takes effect at once: schema defaults are applied, enums enforced
    crd_doc = yaml.safe_load(CRD.read_text())
    props = crd_doc["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    props["populationSize"]["default"] = 16
    props["mode"] = {"type": "string", "enum": ["fast", "full"]}
    try:
        kubectl.apply(crd_doc)
        ps = k8s.custom.create_namespaced_custom_object(G, V, namespace, P, {
            "apiVersion": f"{G}/{V}", "kind": "PruningSearch", "metadata": {"name": "d"}, "spec": {"generations": 1}})
        assert ps["spec"] == {"generations": 1, "populationSize": 16}
        e = api_error(lambda: k8s.custom.create_namespaced_custom_object(G, V, namespace, P, {
            "apiVersion": f"{G}/{V}", "kind": "PruningSearch", "metadata": {"name": "e"},
            "spec": {"generations": 1, "mode": "slow"}}))
        assert e.status == 422 and "spec.mode" in json.loads(e.body)["message"]
    finally:
        kubectl("apply", "-f", str(CRD))
    with pytest.raises(KubectlError, match="protobuf"):          # typed generators send protobuf: unsupported
        kubectl("create", "configmap", "typed", "--from-literal=a=b", namespace=namespace)


def test_label_and_field_selectors(k8s, namespace):
    for name, labels in [("a", {"app": "x", "tier": "gpu"}), ("b", {"app": "x"}), ("c", {"app": "y"}), ("d", {})]:
        k8s.core.create_namespaced_pod(namespace, {"metadata": {"name": name, "labels": labels}, "spec": {
            "containers": [{"name": "c", "image": "busybox"}]}})

    def names(**kw):
        return sorted(p.metadata.name for p in k8s.core.list_namespaced_pod(namespace, **kw).items)

    assert names() == ["a", "b", "c", "d"]
    assert names(label_selector="app=x") == ["a", "b"]
    assert names(label_selector="app=x,tier=gpu") == ["a"]
    assert names(label_selector="app==x,tier") == ["a"]
    assert names(label_selector="tier") == ["a"]
    assert names(label_selector="!tier") == ["b", "c", "d"]
    assert names(label_selector="app!=x") == ["c", "d"]
    assert names(label_selector="app in (x, y)") == ["a", "b", "c"]
    assert names(label_selector="app notin (x)") == ["c", "d"]
    assert names(label_selector="app=nomatch") == []
    assert names(field_selector="metadata.name=c") == ["c"]
    assert names(field_selector="metadata.name!=c,status.phase=Pending") == ["a", "b", "d"]
    # a watch with a selector: objects entering/leaving the selection become ADDED/DELETED
    rv = k8s.core.list_namespaced_pod(namespace).metadata.resource_version
    k8s.core.patch_namespaced_pod("d", namespace, {"metadata": {"labels": {"app": "x"}}})
    k8s.core.patch_namespaced_pod("b", namespace, {"metadata": {"labels": {"app": "z"}}})
    w = k8s.kubernetes.watch.Watch()
    seen = [(e["type"], e["object"].metadata.name) for e in w.stream(
        k8s.core.list_namespaced_pod, namespace, label_selector="app=x", resource_version=rv, timeout_seconds=1)]
    assert seen == [("ADDED", "d"), ("DELETED", "b")]


def test_status_subresource_conflicts_and_patch_types(kubectl, k8s, namespace):
    kubectl("apply", "-f", str(CRD))
    co = k8s.custom
    body = {"apiVersion": f"{G}/{V}", "kind": "PruningSearch", "metadata": {"name": "s1"}, "spec": {"generations": 1}}
    created = co.create_namespaced_custom_object(G, V, namespace, P, body)
    assert created["metadata"]["resourceVersion"]
    co.patch_namespaced_custom_object(G, V, namespace, P, "s1", {"status": {"phase": "Ignored"}})
    obj = co.get_namespaced_custom_object(G, V, namespace, P, "s1")
    assert "status" not in obj and obj["metadata"]["generation"] == 1
    rv = obj["metadata"]["resourceVersion"]
    co.patch_namespaced_custom_object_status(G, V, namespace, P, "s1", {"status": {"phase": "Running"},
                                                                         "spec": {"generations": 9}})
    obj = co.get_namespaced_custom_object(G, V, namespace, P, "s1")
    assert obj["status"] == {"phase": "Running"} and obj["spec"]["generations"] == 1
    assert obj["metadata"]["generation"] == 1 and obj["metadata"]["resourceVersion"] != rv
    # a no-op patch keeps the resourceVersion
    same = co.patch_namespaced_custom_object(G, V, namespace, P, "s1", {"spec": {"generations": 1}})
    assert same["metadata"]["resourceVersion"] == obj["metadata"]["resourceVersion"]
    # optimistic concurrency: a stale resourceVersion -> 409
    stale = dict(obj, spec={"generations": 3})
    stale["metadata"] = dict(obj["metadata"], resourceVersion=rv)
    e = api_error(lambda: co.replace_namespaced_custom_object(G, V, namespace, P, "s1", stale))
    assert e.status == 409 and json.loads(e.body)["reason"] == "Conflict"
    stale["metadata"]["resourceVersion"] = obj["metadata"]["resourceVersion"]
    assert co.replace_namespaced_custom_object(G, V, namespace, P, "s1", stale)["metadata"]["generation"] == 2
    # a failed JSON-patch test op -> 422; strategic merge on a custom resource -> 415
    path = f"/apis/{G}/{V}/namespaces/{namespace}/{P}/s1"
    e = api_error(lambda: k8s.raw("PATCH", path, [{"op": "test", "path": "/metadata/resourceVersion",
                                                   "value": "1"}], content_type="application/json-patch+json"))
    assert e.status == 422
    e = api_error(lambda: k8s.raw("PATCH", path, {"spec": {"generations": 4}},
                                  content_type="application/strategic-merge-patch+json"))
    assert e.status == 415
    # built-ins: Job validation, immutability, names, namespaces
    e = api_error(lambda: create_job(k8s, namespace, {**job_manifest("bad"), "spec": {
        "template": {"spec": {"containers": [{"name": "c", "image": "i"}]}}}}))
    assert e.status == 422 and "restartPolicy" in json.loads(e.body)["message"]
    e = api_error(lambda: create_job(k8s, namespace, job_manifest("x" * 64)))
    assert e.status == 422
    e = api_error(lambda: create_job(k8s, "no-such-namespace", job_manifest("j")))
    assert e.status == 404
    job = create_job(k8s, namespace, {**job_manifest("j1"), "spec": {**job_manifest("j1")["spec"], "suspend": True}})
    assert job["spec"]["template"]["metadata"]["labels"]["batch.kubernetes.io/job-name"] == "j1"
    assert job["spec"]["completions"] == 1 and job["spec"]["parallelism"] == 1
    job = k8s.raw("PATCH", f"/apis/batch/v1/namespaces/{namespace}/jobs/j1", {"spec": {"suspend": False}},
                  content_type="application/merge-patch+json")
    assert job["spec"]["suspend"] is False
    secret = k8s.core.create_namespaced_secret(namespace, {"metadata": {"name": "s"}, "stringData": {"k": "v"}})
    assert secret.data == {"k": "dg=="} and not secret.string_data


def test_watch_history_and_garbage_collection(k8s, namespace):
    rv = k8s.batch.list_namespaced_job(namespace).metadata.resource_version
    owners = {}
    for name in ("keep", "cascade"):
        job = create_job(k8s, namespace, {**job_manifest(name), "spec": {**job_manifest(name)["spec"], "suspend": True}})
        owners[name] = job
        k8s.core.create_namespaced_pod(namespace, {"metadata": {"name": f"{name}-pod", "ownerReferences": [{
            "apiVersion": "batch/v1", "kind": "Job", "name": name, "uid": job["metadata"]["uid"],
            "controller": True}]}, "spec": {"containers": [{"name": "c", "image": "busybox"}]}})
    k8s.batch.delete_namespaced_job("keep", namespace)                              # API default: Orphan
    k8s.batch.delete_namespaced_job("cascade", namespace, propagation_policy="Background")
    pods = {p["metadata"]["name"]: p for p in k8s.pods(namespace)}
    assert list(pods) == ["keep-pod"] and "ownerReferences" not in pods["keep-pod"]["metadata"]
    # a watch from the old resourceVersion replays the history, deletions included
    w = k8s.kubernetes.watch.Watch()
    events = [(e["type"], e["object"].metadata.name) for e in w.stream(
        k8s.batch.list_namespaced_job, namespace, resource_version=rv, timeout_seconds=1)]
    assert events == [("ADDED", "keep"), ("ADDED", "cascade"), ("DELETED", "keep"), ("DELETED", "cascade")]
    # finalizers: deletion waits for them
    k8s.core.create_namespaced_config_map(namespace, {"metadata": {"name": "cm", "finalizers": ["x/y"]}})
    k8s.core.delete_namespaced_config_map("cm", namespace)
    cm = k8s.core.read_namespaced_config_map("cm", namespace)
    assert cm.metadata.deletion_timestamp is not None
    k8s.core.patch_namespaced_config_map("cm", namespace, {"metadata": {"finalizers": None}})
    assert not [c for c in k8s.core.list_namespaced_config_map(namespace).items if c.metadata.name == "cm"]


def test_inprocess_emulator_thread(tmp_path):
    with EmulatorThread() as emu:
        kc = emu.write_kubeconfig(tmp_path / "config")
        k = K8s(kc, set_default=False)
        k.create_namespace("inproc")
        k.core.create_namespaced_config_map("inproc", {"metadata": {"name": "c", "labels": {"a": "b"}}})
        objs = emu.objects()
        assert objs["/v1/configmaps/inproc/c"]["metadata"]["labels"] == {"a": "b"}


# ------------------------------------------------------------------------------------------------ pod runner

def test_job_with_secret_env_completes(k8s, namespace, pod_runner):
    k8s.core.create_namespaced_secret(namespace, {"metadata": {"name": "creds"}, "stringData": {"x": "from-secret"}})
    code = "import os,sys; print(os.environ['X']); sys.exit(int(os.environ.get('CODE','0')))"
    create_job(k8s, namespace, job_manifest("ok", code, env=[
        {"name": "X", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "x"}}},
        {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}]))
    job = pod_runner.wait_for_job("ok", timeout=20)
    assert cond(job, "Complete")["reason"] == "CompletionsReached"
    assert job["status"]["succeeded"] == 1 and job["status"]["completionTime"] and "failed" not in job["status"]
    pod = k8s.pods(namespace, "batch.kubernetes.io/job-name=ok")[0]
    assert pod["status"]["phase"] == "Succeeded"
    term = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    assert (term["exitCode"], term["reason"]) == (0, "Completed")
    assert pod["metadata"]["ownerReferences"][0]["uid"] == job["metadata"]["uid"]
    assert pod_runner.logs("ok") == "from-secret\n"
    # kubernetes 36's read_namespaced_pod_log returns str(bytes) ("b'...'"): read the raw response instead
    raw = k8s.core.read_namespaced_pod_log(pod["metadata"]["name"], namespace, _preload_content=False)
    assert raw.data.decode() == "from-secret\n"
    assert pod_runner.pods("ok")[0].env["POD"] == pod["metadata"]["name"]
    assert {e["reason"] for e in k8s.events(namespace, "ok")} >= {"SuccessfulCreate", "Completed"}


def test_mount_paths_are_rewritten_once(k8s, namespace, pod_runner, tmp_path):
    """emptyDirs at /tmp and /cache map to per-pod dirs (which live under /tmp themselves) and a ``path_map``
    entry under /tmp maps to itself: every path is rewritten exactly once."""
    data = tmp_path / "assets"                           # under /tmp, like pytest's tmp_path
    data.mkdir()
    (data / "hello.txt").write_text("hi")
    pod_runner.path_map[str(data)] = str(data)
    code = ("import json, os; print(json.dumps({k: os.environ[k] for k in ('HOME', 'CACHE', 'DATA')})); "
            "print(open(os.environ['DATA']).read())")
    job = job_manifest("paths", code, env=[{"name": "HOME", "value": "/tmp"},
                                           {"name": "CACHE", "value": "/cache/huggingface"},
                                           {"name": "DATA", "value": f"{data}/hello.txt"}])
    pod_spec = job["spec"]["template"]["spec"]
    pod_spec["volumes"] = [{"name": "tmp", "emptyDir": {}}, {"name": "cache", "emptyDir": {}}]
    pod_spec["containers"][0]["volumeMounts"] = [{"name": "tmp", "mountPath": "/tmp"},
                                                 {"name": "cache", "mountPath": "/cache"}]
    create_job(k8s, namespace, job)
    assert cond(pod_runner.wait_for_job("paths", timeout=20), "Complete")
    out = pod_runner.logs("paths").splitlines()
    env = json.loads(out[0])
    vols = pod_runner.work_dir / namespace / "pods" / pod_runner.pods("paths")[0].name / "volumes"
    assert env == {"HOME": str(vols / "tmp"), "CACHE": f"{vols / 'cache'}/huggingface", "DATA": f"{data}/hello.txt"}
    assert out[1] == "hi"


def test_job_failure_exit_code_and_backoff(k8s, namespace, pod_runner):
    create_job(k8s, namespace, job_manifest("bad", "import sys; print('boom'); sys.exit(3)", backoffLimit=1))
    job = pod_runner.wait_for_job("bad", timeout=20)
    c = cond(job, "Failed")
    assert c["reason"] == "BackoffLimitExceeded" and cond(job, "FailureTarget")
    assert job["status"]["failed"] == 2 and "completionTime" not in job["status"]
    pods = k8s.pods(namespace, "job-name=bad")
    assert len(pods) == 2
    for pod in pods:
        assert pod["status"]["phase"] == "Failed"
        assert pod["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 3
    # a pod waiting for a missing Secret stays Pending (CreateContainerConfigError) until the Secret appears
    create_job(k8s, namespace, job_manifest("late", "import os; print(os.environ['S'])", env=[
        {"name": "S", "valueFrom": {"secretKeyRef": {"name": "late-secret", "key": "s"}}}]))
    wait_for(lambda: any(p["status"].get("containerStatuses", [{}])[0].get("state", {}).get("waiting", {})
                         .get("reason") == "CreateContainerConfigError" for p in k8s.pods(namespace, "job-name=late")))
    k8s.core.create_namespaced_secret(namespace, {"metadata": {"name": "late-secret"}, "stringData": {"s": "ok"}})
    assert cond(pod_runner.wait_for_job("late", timeout=20), "Complete")
    assert pod_runner.logs("late") == "ok\n"


def test_indexed_job_runs_one_process_per_index(k8s, namespace, pod_runner):
    code = ("import os; print(os.environ['JOB_COMPLETION_INDEX'], os.environ['IDX'], os.environ['MASTER_ADDR'], "
            "os.environ['MASTER_PORT'])")
    m = job_manifest("idx", code, completions=2, parallelism=2, completionMode="Indexed", env=[
        {"name": "IDX", "valueFrom": {"fieldRef": {
            "fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}},
        {"name": "MASTER_ADDR", "value": "idx-0.idx-svc"}, {"name": "MASTER_PORT", "value": "29500"}])
    m["spec"]["template"]["spec"]["subdomain"] = "idx-svc"
    create_job(k8s, namespace, m)
    job = pod_runner.wait_for_job("idx", timeout=20)
    assert cond(job, "Complete") and job["status"]["succeeded"] == 2 and job["status"]["completedIndexes"] == "0-1"
    runs = sorted(pod_runner.pods("idx"), key=lambda r: r.index)
    assert [r.index for r in runs] == [0, 1]
    port = runs[0].env["MASTER_PORT"]
    assert port != "29500" and runs[1].env["MASTER_PORT"] == port
    for r in runs:
        assert r.read_log().split() == [str(r.index), str(r.index), "127.0.0.1", port]
    pods = k8s.pods(namespace, "batch.kubernetes.io/job-completion-index=1")
    assert len(pods) == 1 and pods[0]["spec"]["hostname"] == "idx-1"


def test_eviction_failure_and_hold_injection(k8s, namespace, pod_runner):
    # eviction: DisruptionTarget + Ignore rule -> the pod is replaced without counting against backoffLimit 0
    pod_runner.evict_next("evict", after=0.3)
    m = job_manifest("evict", "import os, time; time.sleep(0.5 if os.path.exists('/nonexistent') else 1.5)",
                     podFailurePolicy={"rules": [{"action": "Ignore",
                                                  "onPodConditions": [{"type": "DisruptionTarget"}]}]})
    create_job(k8s, namespace, m)
    job = pod_runner.wait_for_job("evict", timeout=20)
    assert cond(job, "Complete") and "failed" not in job["status"]
    first = [p for p in k8s.pods(namespace, "job-name=evict") if p["status"]["phase"] == "Failed"]
    assert len(first) == 1 and first[0]["status"]["reason"] == "Evicted"
    assert any(c["type"] == "DisruptionTarget" and c["status"] == "True" for c in first[0]["status"]["conditions"])
    # injected exit code + FailJob rule -> reason PodFailurePolicy
    pod_runner.fail_next("ffail", exit_code=42)
    create_job(k8s, namespace, job_manifest("ffail", backoffLimit=3, podFailurePolicy={"rules": [
        {"action": "FailJob", "onExitCodes": {"operator": "In", "values": [42]}}]}))
    job = pod_runner.wait_for_job("ffail", timeout=20)
    assert cond(job, "Failed")["reason"] == "PodFailurePolicy"
    assert "exit code 42 matching FailJob rule at index 0" in cond(job, "Failed")["message"]
    # image pull failure held until the Job's deadline
    pod_runner.hold("pull", reason="ImagePullBackOff")
    create_job(k8s, namespace, job_manifest("pull", activeDeadlineSeconds=2))
    waiting = wait_for(lambda: [p for p in k8s.pods(namespace, "job-name=pull")
                                if p["status"].get("containerStatuses")])
    assert waiting[0]["status"]["containerStatuses"][0]["state"]["waiting"]["reason"] == "ImagePullBackOff"
    assert cond(pod_runner.wait_for_job("pull", timeout=20), "Failed")["reason"] == "DeadlineExceeded"
    # unschedulable until released
    pod_runner.hold("gpu", reason="Unschedulable")
    create_job(k8s, namespace, job_manifest("gpu"))
    pod = wait_for(lambda: k8s.pods(namespace, "job-name=gpu"))[0]
    sched = wait_for(lambda: [c for c in (k8s.pods(namespace, "job-name=gpu")[0]["status"].get("conditions") or [])
                              if c["type"] == "PodScheduled"])
    assert sched[0]["status"] == "False" and sched[0]["reason"] == "Unschedulable" and not pod["spec"].get("nodeName")
    time.sleep(0.3)
    assert k8s.job("gpu", namespace)["status"]["active"] == 1
    pod_runner.release("gpu")
    assert cond(pod_runner.wait_for_job("gpu", timeout=20), "Complete")


def test_deleted_job_kills_its_pods(k8s, namespace, pod_runner):
    create_job(k8s, namespace, job_manifest("long", "import time; time.sleep(60)"))
    run = wait_for(lambda: [r for r in pod_runner.pods("long") if r.state == "running"])[0]
    k8s.batch.delete_namespaced_job("long", namespace, propagation_policy="Background")
    wait_for(lambda: run.proc.poll() is not None, timeout=10, what="the process to be killed")
    assert k8s.pods(namespace, "job-name=long") == [] and pod_runner.orphaned == []


# ------------------------------------------------------------------------------------------------ kopf

def test_kopf_operator_drives_a_job(kubectl, k8s, namespace, pod_runner, run_operator):
    kubectl("apply", "-f", str(CRD))
    op = run_operator(SUPPORT_DIR / "example_operator.py", wait_resource="pruningsearches")
    k8s.custom.create_namespaced_custom_object(G, V, namespace, P, {
        "apiVersion": f"{G}/{V}", "kind": "PruningSearch", "metadata": {"name": "e2e"}, "spec": {"generations": 2}})
    job = pod_runner.wait_for_job("e2e-gen-0", timeout=30)
    assert cond(job, "Complete") and job["metadata"]["ownerReferences"][0]["name"] == "e2e"
    assert pod_runner.logs("e2e-gen-0") == "generation 0 of e2e\n"
    ps = wait_for(lambda: (k8s.custom_object(G, V, P, "e2e", namespace) or {}).get("status", {}).get("phase")
                  == "Succeeded" and k8s.custom_object(G, V, P, "e2e", namespace), timeout=20)
    assert ps["metadata"]["finalizers"] == ["darwinlm.io/finalizer"]
    assert ps["status"]["on_create"] == {"job": "e2e-gen-0"} and ps["status"]["targetGenerations"] == 2
    assert any(e["reason"] == "JobCreated" for e in k8s.events(namespace, "e2e"))
    op.restart()
    op.wait_ready("pruningsearches")
    k8s.custom.delete_namespaced_custom_object(G, V, namespace, P, "e2e")
    wait_for(lambda: k8s.custom_object(G, V, P, "e2e", namespace) is None, timeout=20, what="the CR to go")
    assert k8s.job("e2e-gen-0", namespace) is None                     # garbage-collected via its ownerReference
    assert op.stop() == 0
    assert "Handler 'on_create' succeeded" in op.output and "Handler 'on_delete' succeeded" in op.output
    assert "JOB-EVENT MODIFIED e2e-gen-0" in op.output


# ------------------------------------------------------------------------------------------------ S3

def test_s3_round_trip(s3):
    c = s3.client()
    c.put_object(Bucket=s3.bucket, Key="runs/ps1/summary.json", Body=b'{"ok": true}')
    c.upload_fileobj(__import__("io").BytesIO(b"x" * (6 * 2 ** 20)), s3.bucket, "runs/ps1/model.bin")
    assert s3.list_keys(s3.bucket, "runs/ps1/") == ["runs/ps1/model.bin", "runs/ps1/summary.json"]
    assert c.get_object(Bucket=s3.bucket, Key="runs/ps1/summary.json")["Body"].read() == b'{"ok": true}'
    assert s3.env()["AWS_ENDPOINT_URL"] == s3.endpoint_url


def test_s3_outage_and_recovery(s3_process):
    srv = s3_process
    srv.client().put_object(Bucket=srv.bucket, Key="state.json", Body=b"v1")
    impatient = srv.client(connect_timeout=0.5, read_timeout=0.5, max_attempts=1)
    with srv.outage("hang"):                           # SIGSTOP: requests time out
        with pytest.raises(Exception, match="(?i)timeout|timed out"):
            impatient.get_object(Bucket=srv.bucket, Key="state.json")
    assert srv.client().get_object(Bucket=srv.bucket, Key="state.json")["Body"].read() == b"v1"
    with srv.outage("refuse"):                         # process gone: connection refused
        with pytest.raises(Exception, match="(?i)connect"):
            impatient.get_object(Bucket=srv.bucket, Key="state.json")
    assert srv.client().get_object(Bucket=srv.bucket, Key="state.json")["Body"].read() == b"v1"
    # an outage that ends by itself: a patient client succeeds once the server is back
    patient = srv.client(read_timeout=10, max_attempts=3)  # made first: building a client takes time too
    t = srv.outage_for(1.0, "hang")
    assert srv.paused  # the put below meets the outage (not only a slow machine)...
    t0 = time.monotonic()
    patient.put_object(Bucket=srv.bucket, Key="after.json", Body=b"v2")
    assert time.monotonic() - t0 >= 0.8  # ...and waits for its end
    t.join()
    assert srv.list_keys(srv.bucket) == ["after.json", "state.json"]


def test_seaweedfs_real_s3(seaweed_s3):
    """Optional (DARWINLM_TEST_SEAWEEDFS=1): the same round trip against a real S3 server, which checks credentials."""
    c = seaweed_s3.client()
    c.put_object(Bucket=seaweed_s3.bucket, Key="runs/x.json", Body=b"{}")
    assert seaweed_s3.list_keys(seaweed_s3.bucket) == ["runs/x.json"]
    seaweed_s3.secret_key = "wrong"
    with pytest.raises(Exception, match="SignatureDoesNotMatch|InvalidAccessKeyId|AccessDenied"):
        seaweed_s3.client(max_attempts=1).get_object(Bucket=seaweed_s3.bucket, Key="runs/x.json")


# ---- server-side Tables (what `kubectl get` prints): the pure pieces, against the apiserver's rules ----

@pytest.mark.parametrize(("seconds", "text"), [
    (-5, "<invalid>"), (-1, "0s"), (0, "0s"), (119, "119s"), (120, "2m"), (303, "5m3s"), (600, "10m"),
    (179 * 60 + 59, "179m"), (3 * 3600 + 60 * 7, "3h7m"), (8 * 3600, "8h"), (47 * 3600, "47h"),
    (50 * 3600, "2d2h"), (9 * 86400, "9d"), (800 * 86400, "2y70d"), (9 * 365 * 86400, "9y"),
])
def test_human_duration_matches_apimachinery(seconds, text):
    from tests.support.kmock_server import human_duration

    assert human_duration(seconds) == text


def test_jsonpath_subset_and_crd_cells():
    import datetime

    from tests.support.kmock_server import crd_cell, jsonpath_first

    obj = {"metadata": {"name": "a", "creationTimestamp": "2026-01-01T00:00:00Z"},
           "status": {"phase": "Running", "bestFitness": 0.4375, "generationsDone": 2,
                      "conditions": [{"type": "Ready", "status": "False"}, {"type": "Suspended", "status": "True"}]}}
    assert jsonpath_first(obj, ".status.phase") == (True, "Running")
    assert jsonpath_first(obj, '.status.conditions[?(@.type=="Suspended")].status') == (True, "True")
    assert jsonpath_first(obj, ".status.eta") == (False, None)
    assert jsonpath_first(obj, ".status.conditions[1].type") == (True, "Suspended")
    now = datetime.datetime(2026, 1, 1, 0, 5, 3, tzinfo=datetime.UTC)
    assert crd_cell("date", True, obj["metadata"]["creationTimestamp"], now) == "5m3s"
    assert crd_cell("number", True, 0.4375) == 0.4375
    assert crd_cell("integer", True, 2.0) == 2 and crd_cell("integer", True, True) is None
    assert crd_cell("string", True, 3.0) == "3" and crd_cell("string", True, {"b": 1, "a": 2}) == '{"a":2,"b":1}'
    assert crd_cell("string", False, None) is None  # kubectl prints <none>


@pytest.mark.parametrize(("accept", "want"), [
    ("application/json;as=Table;v=v1;g=meta.k8s.io,application/json", ("Table", "v1")),
    ("application/json;as=Table;v=v1beta1;g=meta.k8s.io", ("Table", "v1beta1")),
    ("application/json;as=PartialObjectMetadataList;v=v1;g=meta.k8s.io", ("PartialObjectMetadataList", "v1")),
    ("application/json;as=Unknown;v=v1;g=example.io,application/json", None),
    ("application/json", None),
    (None, None),
])
def test_accept_negotiation(accept, want):
    from tests.support.kmock_server import negotiate_as

    assert negotiate_as(accept) == want
