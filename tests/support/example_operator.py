"""A minimal kopf operator for harness tests (derived from /work/shared/reference/k8s-emulator/ps_operator.py).

PruningSearch (darwinlm.io/v1alpha1) -> one batch/v1 Job ``<name>-gen-0`` whose container runs Python (so the pod
runner really executes it) -> the CR's ``status.phase`` follows the Job (Running -> Succeeded/Failed).
Not the real operator: that one lives in operator/darwinlm_operator/.
"""
import kopf
import kubernetes

GROUP, VERSION, PLURAL = "darwinlm.io", "v1alpha1", "pruningsearches"


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_):
    settings.persistence.finalizer = "darwinlm.io/finalizer"
    settings.posting.level = 20
    settings.watching.server_timeout = 60
    kubernetes.config.load_kube_config()


@kopf.on.create(GROUP, VERSION, PLURAL)
def on_create(spec, name, namespace, body, patch, logger, **_):
    job = {
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": f"{name}-gen-0", "namespace": namespace,
                     "labels": {"darwinlm.io/search": name, "darwinlm.io/generation": "0"}},
        "spec": {"backoffLimit": 0, "template": {
            "metadata": {"labels": {"darwinlm.io/search": name}},
            "spec": {"restartPolicy": "Never", "containers": [{
                "name": "worker", "image": "darwinlm-jobs:dev",
                "command": ["python", "-c",
                            "import os; print('generation', os.environ['GENERATION'], 'of', os.environ['SEARCH'])"],
                "env": [{"name": "SEARCH", "value": name},
                        {"name": "GENERATION", "value": "0"}],
                "resources": {"limits": {"nvidia.com/gpu": 1}}}]}}},
    }
    kopf.adopt(job, owner=body)
    created = kubernetes.client.BatchV1Api().create_namespaced_job(namespace=namespace, body=job)
    logger.info(f"created job {created.metadata.name}")
    kopf.info(body, reason="JobCreated", message=f"generation 0 job {created.metadata.name}")
    patch.status["phase"] = "Running"
    patch.status["generation"] = 0
    return {"job": created.metadata.name}


@kopf.on.field(GROUP, VERSION, PLURAL, field="spec.generations")
def on_gen_change(old, new, patch, **_):
    patch.status["targetGenerations"] = new


@kopf.on.event("batch", "v1", "jobs", labels={"darwinlm.io/search": kopf.PRESENT})
def job_event(event, name, namespace, labels, status, **_):
    print(f"JOB-EVENT {event['type']} {name}", flush=True)
    conds = {c["type"]: c["status"] for c in (status or {}).get("conditions") or []}
    phase = "Succeeded" if conds.get("Complete") == "True" else "Failed" if conds.get("Failed") == "True" else None
    if phase and event["type"] != "DELETED":
        try:
            kubernetes.client.CustomObjectsApi().patch_namespaced_custom_object_status(
                GROUP, VERSION, namespace, PLURAL, labels["darwinlm.io/search"], {"status": {"phase": phase}})
        except kubernetes.client.ApiException as e:
            if e.status != 404:
                raise


@kopf.on.delete(GROUP, VERSION, PLURAL)
def on_delete(name, logger, **_):
    logger.info(f"cleanup for {name}")
