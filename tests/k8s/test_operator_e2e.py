"""The operator end to end: CRD + PruningSearch applied with kubectl, Jobs run by the pod runner, S3 by moto.

The real operator (``darwinlm_operator.handlers`` under ``kopf run``) drives the tiny search to Succeeded; every
Job runs the real ``darwinlm_jobs`` entrypoint on the tiny model. The result must equal an embedded ``darwinlm
run`` of the same spec (only the store prefix differs: ``searches/<name>-<uid>`` vs ``searches/<name>``).
On the same stack: an evicted Job is retried without counting, a permanent error (exit code 2) fails the
search naming the task, ``suspend`` deletes the running Job and resuming continues; a SIGKILLed operator adopts
the running Job after its restart; ``artifactRetention: Delete`` cleans the store prefix through the finalizer;
``workers: 2`` runs a generation as an Indexed Job whose state equals a one-process run's; ``kubectl get``
shows the printer columns (xfail while the API emulator cannot answer with server-side Tables).
"""

from __future__ import annotations

import base64
import json
import pathlib
import shutil
import socket
import tempfile
import time
import urllib.request

import pytest

from tests.conftest import tiny_spec_dict
from tests.support.cluster import REPO_ROOT, wait_for

CRD = REPO_ROOT / "manifests" / "crd.yaml"
G, V, P = "darwinlm.io", "v1alpha1", "pruningsearches"
SECRET_NAME = "darwinlm-s3"
PREFIX = "runs"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def pod_assets(tiny_assets):
    """The tiny model and text where a job pod can see them: not under /tmp, which is the pods' emptyDir.

    (In a real pod an emptyDir at /tmp hides whatever the image has there, and the pod runner maps the mount
    path /tmp to a per-pod directory, rewriting "/tmp/..." in the pod's arguments and environment too.)
    """
    root = pathlib.Path(tempfile.mkdtemp(prefix="darwinlm-e2e-", dir="/var/tmp"))
    shutil.copytree(tiny_assets, root / "tiny")
    yield root / "tiny"
    shutil.rmtree(root, ignore_errors=True)


def manifest(name: str, assets, s3, **over) -> dict:
    spec = tiny_spec_dict(assets, f"s3://{s3.bucket}/{PREFIX}")
    spec.pop("name")
    spec.update(image="darwinlm-job:dev", backoffLimit=1, podStartTimeoutSeconds=60,
                s3={"secretRef": {"name": SECRET_NAME}, "endpoint": s3.endpoint_url, "region": s3.region})
    spec.update(over)
    return {"apiVersion": f"{G}/{V}", "kind": "PruningSearch", "metadata": {"name": name}, "spec": spec}


@pytest.fixture
def cluster(kubectl, k8s, namespace, s3, pod_runner, run_operator):
    """CRD + S3 Secret + the operator watching ``namespace``; yields (operator, metrics port)."""
    kubectl("apply", "-f", str(CRD))
    k8s.core.create_namespaced_secret(namespace, {
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": SECRET_NAME},
        "data": {"AWS_ACCESS_KEY_ID": base64.b64encode(s3.access_key.encode()).decode(),
                 "AWS_SECRET_ACCESS_KEY": base64.b64encode(s3.secret_key.encode()).decode()}})
    port = _free_port()
    # The operator's own AWS_* variables are wrong on purpose: it must reach the store with the Secret's
    # credentials and spec.s3.endpoint, never with its process environment.
    wrong = {"AWS_ACCESS_KEY_ID": "wrong", "AWS_SECRET_ACCESS_KEY": "wrong", "AWS_ENDPOINT_URL": "http://127.0.0.1:9",
             "AWS_ENDPOINT_URL_S3": "http://127.0.0.1:9"}
    op = run_operator("darwinlm_operator.handlers", env={
        "DARWINLM_METRICS_PORT": str(port), "DARWINLM_RECONCILE_INTERVAL": "1", **wrong}, wait_resource=P)
    yield op, port


def _draft7_bounds(node):
    """OpenAPI 3.0 ``minimum: x, exclusiveMinimum: true`` -> JSON Schema draft 7 ``exclusiveMinimum: x``."""
    if isinstance(node, dict):
        for key, bound in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
            if node.get(key) is True and bound in node:
                node[key] = node.pop(bound)
        for value in node.values():
            _draft7_bounds(value)
    elif isinstance(node, list):
        for value in node:
            _draft7_bounds(value)
    return node


def apply_search(kubectl, manifest: dict, namespace: str) -> None:
    """``kubectl apply`` a PruningSearch. WORKAROUND, remove when fixed: tests/support/kmock_server.py
    validates custom resources with jsonschema Draft 7, which reads the CRD's OpenAPI 3.0 boolean
    ``exclusiveMinimum: true`` as the number 1 ("0.5 is less than or equal to the minimum of True"); then the
    CRD is re-applied with draft-7 bounds (the same constraints) and the PruningSearch applied again."""
    r = kubectl.apply(manifest, namespace=namespace, check=False)
    if r.returncode and "minimum of True" in r.stderr:
        import yaml

        crd = _draft7_bounds(yaml.safe_load(CRD.read_text()))
        kubectl.apply(crd)
        r = kubectl.apply(manifest, namespace=namespace, check=False)
    assert r.returncode == 0, r.stderr


def get_ps(k8s, namespace, name) -> dict:
    return k8s.custom_object(G, V, P, name, namespace) or {}


def wait_phase(k8s, namespace, name, phases, op, pod_runner, timeout=600.0) -> dict:
    try:
        return wait_for(lambda: (lambda ps: ps if (ps.get("status") or {}).get("phase") in phases else None)(
            get_ps(k8s, namespace, name)), timeout, f"{name} in {phases}", interval=0.2)
    except TimeoutError:
        ps = get_ps(k8s, namespace, name)
        raise AssertionError(f"status: {json.dumps(ps.get('status'), indent=1)[-3000:]}\n"
                             f"operator:\n{op.current_output[-3000:]}\n"
                             f"pods: {[(p.name, p.state, p.exit_code) for p in pod_runner.runs]}") from None


def cond(ps: dict, ctype: str) -> dict:
    return next((c for c in (ps.get("status") or {}).get("conditions") or [] if c["type"] == ctype), {})


def s3_json(s3, key: str):
    return json.loads(s3.client().get_object(Bucket=s3.bucket, Key=key)["Body"].read())


def test_tiny_search_succeeds_and_matches_the_embedded_run(cluster, kubectl, k8s, namespace, s3, pod_runner,
                                                            tiny_assets, pod_assets, tmp_path):
    op, port = cluster
    t0 = time.monotonic()
    apply_search(kubectl, manifest("tiny", pod_assets, s3), namespace)
    ps = wait_phase(k8s, namespace, "tiny", ("Succeeded", "Failed"), op, pod_runner)
    elapsed = time.monotonic() - t0
    st = ps["status"]
    print(f"\n[e2e] operator run: {elapsed:.1f} s; Job seconds: "
          f"{ {a['task']: a['seconds'] for a in (st.get('attempts') or {}).values()} }")
    assert st["phase"] == "Succeeded", json.dumps(st, indent=1)
    uid = ps["metadata"]["uid"]
    root = f"s3://{s3.bucket}/{PREFIX}/searches/tiny-{uid}"
    assert st["resultURI"] == f"{root}/result"
    assert st["generation"] == "3/3" and st["generationsDone"] == st["generationsTotal"] == 3
    assert isinstance(st["bestFitness"], float) and st["offspringEvaluated"] > 0
    assert st["checkpointURI"] == f"{root}/generations/00002/state.json"
    assert cond(ps, "Succeeded")["status"] == "True" and cond(ps, "Failed")["status"] == "False"
    assert st["observedGeneration"] == ps["metadata"]["generation"] and st["retries"] == {}
    assert all(a["outcome"] == "Succeeded" for a in st["attempts"].values())

    # the same spec run embedded gives the same model configuration
    from darwinlm.runner import run_search
    from darwinlm.spec import load_spec
    from darwinlm.store import open_store

    embedded = load_spec(tiny_spec_dict(tiny_assets, f"file://{tmp_path / 'embedded'}"))
    run_search(embedded)
    want = open_store(f"file://{tmp_path / 'embedded'}").child("searches/tiny").get_json("result/config.json")
    got = s3_json(s3, f"{PREFIX}/searches/tiny-{uid}/result/config.json")
    assert got == want

    # Jobs: deterministic names, labels, owner; one attempt each
    jobs = k8s.jobs(namespace)
    names = sorted(j["metadata"]["name"] for j in jobs)
    assert names == sorted(["tiny-database-0-of-1-a0", "tiny-generation-0-a0", "tiny-generation-1-a0",
                            "tiny-generation-2-a0", *[f"tiny-posttrain-{v}-a0" for v in _variants(embedded)],
                            "tiny-export-a0", "tiny-evaluate-a0"])
    for j in jobs:
        assert j["metadata"]["ownerReferences"][0]["uid"] == uid
        assert j["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "darwinlm-operator"
    gaps = _handoff_gaps(jobs)
    print(f"[e2e] {len(jobs)} Jobs; Job-to-next-Job gaps (s, 1 s timestamp resolution): {gaps}")
    assert max(gaps) <= 2, gaps  # the Job watch pokes the reconcile: no waiting for the timer

    # events tell the story; no credential anywhere the operator writes
    reasons = {e["reason"] for e in k8s.events(namespace, "tiny")}
    assert {"JobCreated", "GenerationComplete", "Succeeded"} <= reasons, reasons
    leaks = [op.output, json.dumps(ps), json.dumps(k8s.events(namespace))]
    assert not [t for t in leaks if s3.secret_key in t]

    # metrics
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    label = f'name="tiny",namespace="{namespace}"'
    assert f"darwinlm_search_generation{{{label}}} 3.0" in text
    assert f'darwinlm_searches{{namespace="{namespace}",phase="Succeeded"}} 1.0' in text
    assert "darwinlm_job_duration_seconds_count{kind=\"generation\"} 3.0" in text


def test_kubectl_get_shows_the_printer_columns(cluster, kubectl, k8s, namespace, s3, pod_assets):
    """A suspended search (no Jobs): the operator still fills in phase and generation i/N."""
    op, _ = cluster
    apply_search(kubectl, manifest("shown", pod_assets, s3, suspend=True), namespace)
    wait_for(lambda: (get_ps(k8s, namespace, "shown").get("status") or {}).get("phase") == "Suspended", 30,
             "phase Suspended")
    crd = kubectl.json("get", "crd", f"{P}.{G}")
    columns = crd["spec"]["versions"][0]["additionalPrinterColumns"]
    # what the API server prints, evaluated by kubectl's own JSONPath engine
    spec = ",".join(f"{c['name'].upper()}:{c['jsonPath']}" for c in columns if c["name"] != "Age")
    rows = kubectl("get", "psearch", "shown", "-n", namespace, "-o", f"custom-columns={spec}").stdout.splitlines()
    assert not get_ps(k8s, namespace, "shown")["metadata"].get("finalizers")  # Retain: nothing blocks deletion
    assert rows[0].split()[:2] == ["PHASE", "GENERATION"] and rows[1].split()[:2] == ["Suspended", "0/3"], rows
    out = kubectl("get", "psearch", "-n", namespace).stdout
    header = out.splitlines()[0].split()
    if header == ["NAME", "AGE"]:
        pytest.xfail("the API emulator answers `kubectl get` without a server-side Table, so kubectl cannot show "
                     "additionalPrinterColumns (a real API server does)")
    assert header[:4] == ["NAME", "PHASE", "GENERATION", "BEST"], out
    assert "Suspended" in out and "0/3" in out


def _variants(spec) -> list[str]:
    from darwinlm.plan import posttrain_variants

    return posttrain_variants(spec)


def _handoff_gaps(jobs: list[dict]) -> list[int]:
    """Seconds from each Job's completion to the creation of the next Job (Jobs in creation order; a next
    Job may even start before the previous Job object is Complete: its completion marker comes first)."""
    from darwinlm_operator.conditions import parse_timestamp

    seq = sorted(jobs, key=lambda j: (j["metadata"]["creationTimestamp"], j["metadata"]["name"]))
    gaps = []
    for prev, nxt in zip(seq, seq[1:], strict=False):
        end = (prev.get("status") or {}).get("completionTime")
        if end and nxt["metadata"]["creationTimestamp"] != prev["metadata"]["creationTimestamp"]:
            gaps.append(int((parse_timestamp(nxt["metadata"]["creationTimestamp"])
                             - parse_timestamp(end)).total_seconds()))
    return gaps


def test_failures_retries_and_suspend(cluster, kubectl, k8s, namespace, s3, pod_runner, pod_assets):
    """Eviction: retried, not counted. Exit code 2: Failed naming the task and the error. Suspend: Jobs deleted."""
    op, _ = cluster
    small = {"search": {**tiny_spec_dict(pod_assets, "x")["search"], "generations": 1}}

    # 1. the database Job is evicted once: a new attempt, no retry counted (backoffLimit would allow 1 anyway)
    pod_runner.evict_next("evict-database-0-of-1-a0", after=0.5)
    apply_search(kubectl, manifest("evict", pod_assets, s3, backoffLimit=0, **small), namespace)
    ps = wait_for(lambda: (lambda p: p if (p.get("status") or {}).get("generationsDone") == 0 and any(
        j["metadata"]["name"].startswith("evict-generation-0") for j in k8s.jobs(namespace)) else None)(
        get_ps(k8s, namespace, "evict")), 300, "the search past its database", interval=0.2)
    attempts = ps["status"]["attempts"]
    evicted = [a for a in attempts.values() if a["reason"] == "Evicted"]
    # the Job's podFailurePolicy (Ignore on DisruptionTarget) may replace the pod itself: either way nothing counts
    assert all(not a["counted"] for a in evicted) and ps["status"]["retries"] == {}
    assert ps["status"]["phase"] == "Running"

    # 2. suspend: the running Job goes, the phase says so; resume continues
    kubectl("patch", "psearch", "evict", "--type=merge", "-p", '{"spec":{"suspend":true}}', "-n", namespace)
    ps = wait_phase(k8s, namespace, "evict", ("Suspended",), op, pod_runner, timeout=60)
    wait_for(lambda: not [j for j in k8s.jobs(namespace) if j["metadata"]["name"].startswith("evict-")
                          and not _finished(j)], 30, "active Jobs deleted")
    assert cond(ps, "Suspended")["status"] == "True"
    kubectl("patch", "psearch", "evict", "--type=merge", "-p", '{"spec":{"suspend":false}}', "-n", namespace)
    ps = wait_phase(k8s, namespace, "evict", ("Running", "Succeeded"), op, pod_runner, timeout=60)
    assert cond(ps, "Suspended")["reason"] == "Resumed"
    wait_for(lambda: [j for j in k8s.jobs(namespace) if j["metadata"]["name"].startswith("evict-")
                      and not _finished(j)], 30, "a new Job after resuming")
    kubectl("patch", "psearch", "evict", "--type=merge", "-p", '{"spec":{"suspend":true}}', "-n", namespace)

    # 3. a permanent error (exit code 2) in a generation fails the search at once, naming task and error
    pod_runner.fail_next("perm-generation-0", exit_code=2, message="permanent error: invalid spec:\n  x: bad")
    apply_search(kubectl, manifest("perm", pod_assets, s3, backoffLimit=3, **small), namespace)
    ps = wait_phase(k8s, namespace, "perm", ("Failed", "Succeeded"), op, pod_runner)
    failed = cond(ps, "Failed")
    assert ps["status"]["phase"] == "Failed" and failed["reason"] == "TaskFailedPermanently", ps["status"]
    assert "generation-0" in failed["message"] and "permanent error" in failed["message"]
    assert not [j for j in k8s.jobs(namespace) if j["metadata"]["name"].startswith("perm-generation-0-a1")]


def _finished(job: dict) -> bool:
    return any(c["type"] in ("Complete", "Failed") and c["status"] == "True"
               for c in (job.get("status") or {}).get("conditions") or [])


def test_operator_restart_resumes_and_delete_policy_cleans_s3(cluster, kubectl, k8s, namespace, s3, pod_runner,
                                                               pod_assets):
    """SIGKILL the operator while a Job runs: after the restart it adopts the running Job (no duplicate
    attempt) and carries on. artifactRetention: Delete puts the finalizer on, and deleting the search then
    removes its store prefix but keeps the shared layer database."""
    op, _ = cluster
    small = {"search": {**tiny_spec_dict(pod_assets, "x")["search"], "generations": 1}}
    apply_search(kubectl, manifest("keep", pod_assets, s3, artifactRetention="Delete", **small), namespace)
    wait_for(lambda: any(j["metadata"]["name"] == "keep-generation-0-a0" for j in k8s.jobs(namespace)), 180,
             "the generation Job")
    ps = get_ps(k8s, namespace, "keep")
    assert "darwinlm.io/s3-cleanup" in ps["metadata"].get("finalizers", [])
    op.kill()
    op.start()
    op.wait_ready(P)
    ps = wait_for(lambda: (lambda p: p if (p.get("status") or {}).get("generationsDone") == 1 and any(
        j["metadata"]["name"].startswith("keep-posttrain") for j in k8s.jobs(namespace)) else None)(
        get_ps(k8s, namespace, "keep")), 180, "generation 0 done after the restart", interval=0.2)
    names = [j["metadata"]["name"] for j in k8s.jobs(namespace)]
    assert not [n for n in names if n.endswith("-a1")], names  # the running Job was adopted, not repeated
    assert ps["status"]["retries"] == {} and ps["status"]["phase"] == "Running"

    uid = ps["metadata"]["uid"]
    prefix = f"{PREFIX}/searches/keep-{uid}/"
    assert s3.list_keys(s3.bucket, prefix)
    kubectl("delete", "psearch", "keep", "-n", namespace, "--wait=false")
    wait_for(lambda: get_ps(k8s, namespace, "keep") == {}, 60, "the PruningSearch to go")
    assert s3.list_keys(s3.bucket, prefix) == []
    assert s3.list_keys(s3.bucket, f"{PREFIX}/databases/")  # shared by other searches: kept
    assert "ArtifactsDeleted" in {e["reason"] for e in k8s.events(namespace, "keep")}


def test_distributed_generation_matches_a_single_process(cluster, kubectl, k8s, namespace, s3, pod_runner,
                                                         tiny_assets, pod_assets, tmp_path):
    """workers: 2 -> the generation runs as an Indexed Job of 2 ranks (torch.distributed, gloo) that find
    rank 0 through the headless Service name; its generation state equals a one-process run's."""
    op, _ = cluster
    search = {**tiny_spec_dict(pod_assets, "x")["search"], "generations": 1}
    apply_search(kubectl, manifest("dist", pod_assets, s3, workers=2, search=search), namespace)
    ps = wait_for(lambda: (lambda p: p if (p.get("status") or {}).get("generationsDone") == 1 else None)(
        get_ps(k8s, namespace, "dist")), 300, "generation 0 on 2 workers", interval=0.2)
    kubectl("patch", "psearch", "dist", "--type=merge", "-p", '{"spec":{"suspend":true}}', "-n", namespace)
    job = next(j for j in k8s.jobs(namespace) if j["metadata"]["name"] == "dist-generation-0-a0")
    assert job["spec"]["completionMode"] == "Indexed" and job["spec"]["completions"] == 2
    assert len([p for p in pod_runner.runs if p.job == "dist-generation-0-a0"]) == 2
    svc = k8s.core.read_namespaced_service("dist-workers", namespace)
    assert svc.spec.cluster_ip == "None"
    got = s3_json(s3, f"{PREFIX}/searches/dist-{ps['metadata']['uid']}/generations/00000/state.json")

    from darwinlm.runner import run_search
    from darwinlm.spec import load_spec

    spec = load_spec(tiny_spec_dict(tiny_assets, f"file://{tmp_path / 'one'}", **{"search.generations": 1}))
    ws = run_search(spec, until=lambda t: t.kind != "database" and t.kind != "generation")
    want = ws.store.get_json("generations/00000/state.json")
    assert got["winner"] == want["winner"] and got["best_fitness"] == want["best_fitness"]
