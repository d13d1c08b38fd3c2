"""Helpers shared by the operator end-to-end tests (tests/k8s/test_operator_*.py).

The fixtures built on them (``cluster``, ``pod_assets``, ``embedded_tiny``) live in tests/k8s/conftest.py.
"""

from __future__ import annotations

import base64
import json

from tests.conftest import tiny_spec_dict
from tests.support.cluster import REPO_ROOT, wait_for
from tests.support.procs import free_port

CRD = REPO_ROOT / "manifests" / "crd.yaml"
G, V, P = "darwinlm.io", "v1alpha1", "pruningsearches"
SECRET_NAME = "darwinlm-s3"
PREFIX = "runs"


def manifest(name: str, assets, s3, **over) -> dict:
    spec = tiny_spec_dict(assets, f"s3://{s3.bucket}/{PREFIX}")
    spec.pop("name")
    spec.update(image="darwinlm-job:dev", backoffLimit=1, podStartTimeoutSeconds=60,
                s3={"secretRef": {"name": SECRET_NAME}, "endpoint": s3.endpoint_url, "region": s3.region})
    spec.update(over)
    return {"apiVersion": f"{G}/{V}", "kind": "PruningSearch", "metadata": {"name": name}, "spec": spec}


def start_operator(kubectl, k8s, namespace: str, s3, run_operator, interval: float = 1.0) -> tuple:
    """CRD + S3 Secret + the operator (``kopf run``) watching ``namespace``; returns (operator, metrics port).

    ``interval``: seconds between two reconciles of a search that nothing pokes (a test of the Job watch
    sets it far above the hand-off time it asserts, so that the timer alone cannot pass it)."""
    kubectl("apply", "-f", str(CRD))
    k8s.core.create_namespaced_secret(namespace, {
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": SECRET_NAME},
        "data": {"AWS_ACCESS_KEY_ID": base64.b64encode(s3.access_key.encode()).decode(),
                 "AWS_SECRET_ACCESS_KEY": base64.b64encode(s3.secret_key.encode()).decode()}})
    port = free_port()
    # The operator's own AWS_* variables are wrong on purpose: it must reach the store with the Secret's
    # credentials and spec.s3.endpoint, never with its process environment.
    wrong = {"AWS_ACCESS_KEY_ID": "wrong", "AWS_SECRET_ACCESS_KEY": "wrong", "AWS_ENDPOINT_URL": "http://127.0.0.1:9",
             "AWS_ENDPOINT_URL_S3": "http://127.0.0.1:9"}
    op = run_operator("darwinlm_operator.handlers", env={
        "DARWINLM_METRICS_PORT": str(port), "DARWINLM_RECONCILE_INTERVAL": str(interval), **wrong}, wait_resource=P)
    return op, port


def apply_search(kubectl, manifest: dict, namespace: str) -> None:
    """``kubectl apply`` a PruningSearch (the emulator validates it against the CRD's schema)."""
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


def variants(spec) -> list[str]:
    from darwinlm.core.plan import posttrain_variants

    return posttrain_variants(spec)


def finished(job: dict) -> bool:
    return any(c["type"] in ("Complete", "Failed") and c["status"] == "True"
               for c in (job.get("status") or {}).get("conditions") or [])


def all_job_names(spec, name: str) -> list[str]:
    """The first-attempt Job of every task of a search, sorted."""
    from darwinlm.core.plan import all_tasks

    return sorted(f"{name}-{t.name}-a0" for phase in all_tasks(spec) for t in phase)
