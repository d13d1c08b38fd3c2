"""Pure rendering of the Kubernetes objects the operator creates for one task of the plan.

Why this module exists: what a Job looks like (names, labels, security, environment, distribution)
is decided here and nowhere else, as plain dicts, so it is unit-tested without a cluster and the
handlers only ``create`` what this returns. Nothing here talks to the API or reads the clock.

* :func:`job_name` is deterministic in (search, task, attempt), a DNS-1123 label of at most
  :data:`MAX_JOB_NAME` characters (a hash suffix keeps truncated names unique). The limit leaves
  room for the ``-<index>`` suffix of Indexed Job pod hostnames (a hostname is at most 63).
* :func:`render_job` renders a ``batch/v1`` Job: ``backoffLimit: 0`` (the operator owns retries and
  classifies failures), a hardened pod (non-root, read-only root file system, no capabilities,
  seccomp RuntimeDefault; writable emptyDirs at /tmp, /cache and /dev/shm), the job entrypoint
  ``python -m darwinlm_jobs.<kind>``, the resolved spec in ``DARWINLM_SPEC`` and S3 credentials only
  as ``secretKeyRef`` (their values never pass through the operator or the object). The image is
  ``spec.image``, else the operator's default job image (:class:`~.kspec.JobDefaults`, passed in by
  the caller: nothing here reads the environment).
* A generation task with ``workers`` W > 1 becomes an Indexed Job (completions = parallelism = W)
  whose pods find rank 0 at ``<job>-0.<service>`` through the headless Service of
  :func:`render_service` (one per search); ``JOB_COMPLETION_INDEX`` is the rank.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from typing import Any

from darwinlm.core.plan import Task, generation_block
from darwinlm.errors import EXIT_PERMANENT
from darwinlm.spec import API_VERSION, KIND, spec_to_dict

from .kspec import JobDefaults, generations_per_job, job_image

__all__ = [
    "MANAGED_BY", "LABEL_MANAGED_BY", "LABEL_SEARCH", "LABEL_SEARCH_UID", "LABEL_TASK",
    "LABEL_TASK_KIND", "LABEL_ATTEMPT", "LABEL_JOB", "LABEL_QUEUE", "MAX_JOB_NAME", "MASTER_PORT",
    "job_name", "service_name", "render_job", "render_service", "owner_reference", "dns_label",
    "job_labels", "gpus_per_pod", "pods_per_job", "LABEL_LAST_GENERATION", "generations_of", "job_generations",
]

MANAGED_BY = "darwinlm-operator"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_SEARCH = "darwinlm.io/search"
LABEL_SEARCH_UID = "darwinlm.io/search-uid"
LABEL_TASK = "darwinlm.io/task"
LABEL_TASK_KIND = "darwinlm.io/task-kind"
LABEL_ATTEMPT = "darwinlm.io/attempt"
LABEL_JOB = "darwinlm.io/job"
LABEL_ROLE = "darwinlm.io/role"
LABEL_QUEUE = "kueue.x-k8s.io/queue-name"
LABEL_LAST_GENERATION = "darwinlm.io/last-generation"  # generation Jobs: the last generation they run

MAX_JOB_NAME = 52  # 63 (label value / hostname) minus room for "-<index>" of Indexed Job pods
MASTER_PORT = 29500  # torch.distributed rendezvous port on rank 0
RUN_AS = 1000  # uid/gid of the job image's non-root user (the Dockerfile's `job` target)
GPU = "nvidia.com/gpu"

_NOT_DNS = re.compile(r"[^a-z0-9-]+")
# Our variables win over podTemplate.env (the spec forbids the credential names there anyway).
_PROTECTED_ENV = frozenset({"DARWINLM_SPEC", "DARWINLM_SEARCH_UID", "AWS_ACCESS_KEY_ID",
                            "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "MASTER_ADDR", "MASTER_PORT",
                            "WORLD_SIZE", "RANK", "JOB_COMPLETION_INDEX"})


# ---------------------------------------------------------------------------------------- names

def dns_label(text: str, limit: int = 63) -> str:
    """``text`` as a DNS-1123 label of at most ``limit`` characters.

    Lower-cased, other characters become '-'; when it had to be shortened (or changed) an 8-hex
    sha256 suffix of the original keeps distinct inputs distinct. Deterministic.
    """
    clean = _NOT_DNS.sub("-", text.lower()).strip("-") or "x"
    if clean == text and len(clean) <= limit:
        return clean
    digest = hashlib.sha256(text.encode()).hexdigest()[:8]
    head = clean[: limit - 9].rstrip("-") or "x"
    return f"{head}-{digest}"


def job_name(search: str, task: Task, attempt: int) -> str:
    """``<search>-<task>-a<attempt>``, e.g. ``tiny-generation-3-a0``; hashed when longer than 52."""
    if attempt < 0:
        raise ValueError(f"attempt must be >= 0, got {attempt}")
    return dns_label(f"{search}-{task.name}-a{attempt}", MAX_JOB_NAME)


def service_name(search: str) -> str:
    """The headless Service of a search's distributed Jobs (a DNS-1035 label: starts with a letter)."""
    name = dns_label(f"{search}-workers", 63)
    return name if name[0].isalpha() else dns_label(f"w-{search}-workers", 63)


# ---------------------------------------------------------------------------------------- labels

def owner_reference(cr: Mapping[str, Any]) -> dict[str, Any]:
    """A controller ownerReference to the PruningSearch: its Jobs are garbage-collected with it."""
    meta = cr["metadata"]
    return {"apiVersion": cr.get("apiVersion", API_VERSION), "kind": cr.get("kind", KIND),
            "name": meta["name"], "uid": meta["uid"], "controller": True, "blockOwnerDeletion": True}


def search_labels(cr: Mapping[str, Any]) -> dict[str, str]:
    meta = cr["metadata"]
    return {LABEL_MANAGED_BY: MANAGED_BY, LABEL_SEARCH: meta["name"], LABEL_SEARCH_UID: meta["uid"]}


def job_labels(cr: Mapping[str, Any], task: Task, attempt: int, kspec) -> dict[str, str]:
    labels = {**search_labels(cr), LABEL_TASK: task.name, LABEL_TASK_KIND: task.kind,
              LABEL_ATTEMPT: str(attempt), LABEL_JOB: job_name(cr["metadata"]["name"], task, attempt)}
    if kspec.queueName:
        labels[LABEL_QUEUE] = kspec.queueName
    return labels


def generations_of(kspec, spec, task: Task, defaults: JobDefaults | None = None) -> list[int]:
    """The generations a generation task's Job runs (``generationsPerJob`` from ``task.index``)."""
    return [t.index for t in generation_block(spec, task.index, generations_per_job(kspec, defaults))]


def job_generations(job: Mapping[str, Any]) -> range | None:
    """The generations a generation Job of the operator runs (from its labels); None for other Jobs."""
    labels = (job.get("metadata") or {}).get("labels") or {}
    try:
        task = Task.parse(labels.get(LABEL_TASK, ""))
    except ValueError:
        return None
    if task.kind != "generation":
        return None
    last = labels.get(LABEL_LAST_GENERATION, "")
    return range(task.index, (int(last) if last.isdigit() else task.index) + 1)


# ---------------------------------------------------------------------------------------- sizes

def pods_per_job(kspec, task: Task) -> int:
    """Pods a task's Job runs: ``workers`` for generations, 1 otherwise."""
    return kspec.workers if task.kind == "generation" else 1


def gpus_per_pod(kspec) -> int:
    """Whole GPUs each job pod requests (``nvidia.com/gpu``, limits first); 0 without GPUs."""
    res = kspec.resources
    value = res.limits.get(GPU, res.requests.get(GPU, "0"))
    try:
        return int(str(value))
    except ValueError:
        return 0


# ---------------------------------------------------------------------------------------- the Job

def _command(task: Task, per_job: int = 1) -> list[str]:
    gen = ["--index", str(task.index)] + (["--count", str(per_job)] if per_job != 1 else [])
    args = {"database": ["--shard", str(task.index), "--shards", str(task.count)],
            "sensitivity": ["--shard", str(task.index), "--shards", str(task.count)],
            "generation": gen,
            "posttrain": ["--variant", task.variant]}.get(task.kind, [])
    return ["python", "-m", f"darwinlm_jobs.{task.kind}", *args]


def _plain(value: Any) -> Any:
    """FrozenMaps/tuples of the KubeSpec as JSON-ready dicts/lists."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "__dataclass_fields__"):
        return {k: _plain(getattr(value, k)) for k in value.__dataclass_fields__
                if getattr(value, k) is not None}
    return value


def _env(cr: Mapping[str, Any], kspec, spec, task: Task, job: str) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [
        # The resolved library spec (every default filled in, Kubernetes fields left out): the job
        # validates it again and refuses a store whose spec.json differs.
        {"name": "DARWINLM_SPEC", "value": json.dumps(spec_to_dict(spec), sort_keys=True, separators=(",", ":"))},
        {"name": "DARWINLM_SEARCH_UID", "value": cr["metadata"]["uid"]},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
        {"name": "HOME", "value": "/tmp"},
        {"name": "XDG_CACHE_HOME", "value": "/cache"},
        {"name": "HF_HOME", "value": "/cache/huggingface"},
        {"name": "TORCHINDUCTOR_CACHE_DIR", "value": "/cache/torchinductor"},
        {"name": "TRITON_CACHE_DIR", "value": "/cache/triton"},
        {"name": "MPLCONFIGDIR", "value": "/tmp/matplotlib"},
    ]
    s3 = kspec.s3
    if s3 is not None and s3.secretRef is not None:
        ref = s3.secretRef
        env += [{"name": "AWS_ACCESS_KEY_ID",
                 "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.accessKeyIdKey}}},
                {"name": "AWS_SECRET_ACCESS_KEY",
                 "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.secretAccessKeyKey}}}]
    if s3 is not None and s3.endpoint:
        env.append({"name": "AWS_ENDPOINT_URL", "value": s3.endpoint})
    if s3 is not None and s3.region:
        env.append({"name": "AWS_DEFAULT_REGION", "value": s3.region})
    workers = pods_per_job(kspec, task)
    if workers > 1:
        env += [{"name": "MASTER_ADDR", "value": f"{job}-0.{service_name(cr['metadata']['name'])}"},
                {"name": "MASTER_PORT", "value": str(MASTER_PORT)},
                {"name": "WORLD_SIZE", "value": str(workers)}]
    ours = {e["name"] for e in env}
    user = [{"name": e.name, "value": e.value} for e in kspec.podTemplate.env if e.name not in _PROTECTED_ENV]
    clash = {e["name"] for e in user} & ours
    return [e for e in env if e["name"] not in clash] + user


def _security() -> tuple[dict[str, Any], dict[str, Any]]:
    pod = {"runAsNonRoot": True, "runAsUser": RUN_AS, "runAsGroup": RUN_AS, "fsGroup": RUN_AS,
           "seccompProfile": {"type": "RuntimeDefault"}}
    container = {"runAsNonRoot": True, "runAsUser": RUN_AS, "allowPrivilegeEscalation": False,
                 "readOnlyRootFilesystem": True, "privileged": False,
                 "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}}
    return pod, container


def _volumes(kspec) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Writable scratch space (the root file system is read-only) plus the user's volumes."""
    volumes = [{"name": "tmp", "emptyDir": {}},
               {"name": "cache", "emptyDir": {}},
               {"name": "dshm", "emptyDir": {"medium": "Memory"}}]  # torch/NCCL shared memory
    mounts = [{"name": "tmp", "mountPath": "/tmp"},
              {"name": "cache", "mountPath": "/cache"},
              {"name": "dshm", "mountPath": "/dev/shm"}]
    taken = {v["name"] for v in volumes}
    volumes += [_plain(v) for v in kspec.podTemplate.volumes if v["name"] not in taken]
    paths = {m["mountPath"] for m in mounts}
    mounts += [_plain(m) for m in kspec.podTemplate.volumeMounts if m["mountPath"] not in paths]
    return volumes, mounts


def _pod_spec(cr, kspec, spec, task: Task, job: str, defaults: JobDefaults | None) -> dict[str, Any]:
    image, pull_policy = job_image(kspec, defaults)
    pod_sec, ctr_sec = _security()
    volumes, mounts = _volumes(kspec)
    resources = {k: _plain(v) for k, v in (("requests", kspec.resources.requests),
                                           ("limits", kspec.resources.limits)) if v}
    container = {
        "name": "task",
        "image": image,
        "imagePullPolicy": pull_policy,
        "command": _command(task, generations_per_job(kspec, defaults)),
        "env": _env(cr, kspec, spec, task, job),
        "resources": resources,
        "securityContext": ctr_sec,
        "volumeMounts": mounts,
        # On a crash the kubelet copies the log tail into the termination message: the operator
        # puts its first error line into the Failed condition without reading logs.
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    pt = kspec.podTemplate
    pod: dict[str, Any] = {
        "restartPolicy": "Never",
        "enableServiceLinks": False,
        "automountServiceAccountToken": False,  # the jobs never talk to the Kubernetes API
        "securityContext": pod_sec,
        "containers": [container],
        "volumes": volumes,
    }
    optional = {"nodeSelector": _plain(pt.nodeSelector) or None,
                "tolerations": _plain(pt.tolerations) or None,
                "affinity": _plain(pt.affinity) if pt.affinity else None,
                "priorityClassName": pt.priorityClassName,
                "serviceAccountName": pt.serviceAccountName,
                "imagePullSecrets": _plain(pt.imagePullSecrets) or None}
    pod.update({k: v for k, v in optional.items() if v is not None})
    if pods_per_job(kspec, task) > 1:
        pod["subdomain"] = service_name(cr["metadata"]["name"])
    return pod


def render_job(cr: Mapping[str, Any], kspec, spec, task: Task, attempt: int, *,
               active_deadline_seconds: int | None = None,
               defaults: JobDefaults | None = None) -> dict[str, Any]:
    """The ``batch/v1`` Job running ``task`` (attempt ``attempt``) of the PruningSearch ``cr``.

    ``cr`` is the resource body (metadata.name/namespace/uid are used), ``kspec``/``spec`` its two
    validated halves. ``active_deadline_seconds`` (the time left of the search's deadline) bounds
    the Job too, so the kubelet stops it even when the operator is down. ``defaults``: the
    operator's job image and pull policy, used where the spec sets none (``kspec.job_image``;
    ``SpecError`` at ``image`` when neither names an image).
    """
    meta = cr["metadata"]
    name = job_name(meta["name"], task, attempt)
    labels = job_labels(cr, task, attempt, kspec)
    if task.kind == "generation":
        labels[LABEL_LAST_GENERATION] = str(generations_of(kspec, spec, task, defaults)[-1])
    workers = pods_per_job(kspec, task)
    pod_labels = {k: v for k, v in labels.items() if k != LABEL_QUEUE}
    if workers > 1:
        pod_labels[LABEL_ROLE] = "worker"
    job_spec: dict[str, Any] = {
        "backoffLimit": 0,  # the operator retries (with a new attempt) and classifies failures
        "completions": workers,
        "parallelism": workers,
        "podFailurePolicy": {"rules": [
            # exit code 2 = permanent (bad spec, infeasible target): fail at once, never retry
            {"action": "FailJob",
             "onExitCodes": {"containerName": "task", "operator": "In", "values": [EXIT_PERMANENT]}},
            # evictions/preemptions: Kubernetes replaces the pod without counting a failure
            {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
        ]},
        "template": {"metadata": {"labels": pod_labels},
                     "spec": _pod_spec(cr, kspec, spec, task, name, defaults)},
    }
    if workers > 1:
        job_spec["completionMode"] = "Indexed"
    if active_deadline_seconds is not None:
        job_spec["activeDeadlineSeconds"] = max(1, int(active_deadline_seconds))
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "namespace": meta.get("namespace"), "labels": labels,
                     "ownerReferences": [owner_reference(cr)]},
        "spec": job_spec,
    }


def render_service(cr: Mapping[str, Any]) -> dict[str, Any]:
    """The headless Service giving distributed job pods stable DNS names (``<job>-<i>.<service>``)."""
    meta = cr["metadata"]
    selector = {**search_labels(cr), LABEL_ROLE: "worker"}
    selector.pop(LABEL_MANAGED_BY)
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": service_name(meta["name"]), "namespace": meta.get("namespace"),
                     "labels": search_labels(cr), "ownerReferences": [owner_reference(cr)]},
        "spec": {"clusterIP": "None", "selector": selector,
                 "publishNotReadyAddresses": True,  # ranks must resolve rank 0 before it is Ready
                 "ports": [{"name": "dist", "port": MASTER_PORT, "targetPort": MASTER_PORT}]},
    }
