"""render: Job names, hardened pods, secretKeyRef-only credentials, distribution, Kueue, overrides."""

from __future__ import annotations

import json
import re

import pytest

from darwinlm.core.plan import Task
from darwinlm.errors import SpecError
from darwinlm.spec import load_spec
from darwinlm_operator import render
from darwinlm_operator.kspec import KUBERNETES_FIELDS, JobDefaults, load_psearch

from . import UID, make_cr

DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
TASKS = [Task("database", 0, 1), Task("database", 3, 8), Task("generation", 0), Task("generation", 199),
         Task("posttrain", variant="searched"), Task("posttrain", variant="uniform"), Task("export"),
         Task("evaluate")]


def _render(task=None, attempt=0, **over):
    task = task or Task("generation", 2)
    cr = make_cr(**over)
    spec, kspec = load_psearch(cr)
    return cr, spec, kspec, render.render_job(cr, kspec, spec, task, attempt)


def _container(job):
    return job["spec"]["template"]["spec"]["containers"][0]


def _env(job):
    return {e["name"]: e for e in _container(job)["env"]}


# ------------------------------------------------------------------------------ names

def test_job_name_is_readable_deterministic_and_a_dns_label():
    assert render.job_name("tiny", Task("generation", 3), 0) == "tiny-generation-3-a0"
    assert render.job_name("tiny", Task("database", 1, 4), 2) == "tiny-database-1-of-4-a2"
    for search in ("a", "x" * 30, "y" * 63, "9lives"):
        names = {render.job_name(search, t, a) for t in TASKS for a in (0, 1, 17)}
        assert len(names) == len(TASKS) * 3  # unique per (task, attempt)
        for n in names:
            assert DNS_LABEL.match(n) and len(n) <= render.MAX_JOB_NAME
            assert len(f"{n}-1023") <= 63  # Indexed Job pod hostnames stay valid
        assert names == {render.job_name(search, t, a) for t in TASKS for a in (0, 1, 17)}


def test_truncated_names_keep_a_hash_suffix_and_differ():
    a = render.job_name("s" * 63, Task("generation", 1), 0)
    b = render.job_name("s" * 63, Task("generation", 2), 0)
    assert a != b and len(a) == len(b) == render.MAX_JOB_NAME
    assert re.search(r"-[0-9a-f]{8}$", a)
    with pytest.raises(ValueError):
        render.job_name("tiny", Task("export"), -1)


def test_service_name_starts_with_a_letter():
    assert render.service_name("tiny") == "tiny-workers"
    assert render.service_name("9lives")[0].isalpha()
    assert len(render.service_name("z" * 63)) <= 63


# ------------------------------------------------------------------------------ the Job

def test_job_metadata_labels_and_owner():
    cr, _, _, job = _render(Task("generation", 2), 1)
    meta = job["metadata"]
    assert meta["name"] == "tiny-generation-2-a1" and meta["namespace"] == "team-a"
    assert meta["labels"] == {
        "app.kubernetes.io/managed-by": "darwinlm-operator", "darwinlm.io/search": "tiny",
        "darwinlm.io/search-uid": UID, "darwinlm.io/task": "generation-2", "darwinlm.io/task-kind": "generation",
        "darwinlm.io/attempt": "1", "darwinlm.io/job": "tiny-generation-2-a1",
        "darwinlm.io/last-generation": "2"}  # generationsPerJob 1: this generation only
    assert meta["ownerReferences"] == [{"apiVersion": "darwinlm.io/v1alpha1", "kind": "PruningSearch",
                                        "name": "tiny", "uid": UID, "controller": True, "blockOwnerDeletion": True}]
    pod_labels = job["spec"]["template"]["metadata"]["labels"]
    assert pod_labels["darwinlm.io/search-uid"] == UID and pod_labels["darwinlm.io/task"] == "generation-2"


def test_the_operator_owns_retries():
    _, _, _, job = _render()
    spec = job["spec"]
    assert spec["backoffLimit"] == 0
    assert spec["template"]["spec"]["restartPolicy"] == "Never"
    rules = spec["podFailurePolicy"]["rules"]
    assert {"action": "FailJob", "onExitCodes": {"containerName": "task", "operator": "In", "values": [2]}} in rules
    assert any(r["action"] == "Ignore" and r["onPodConditions"][0]["type"] == "DisruptionTarget" for r in rules)
    assert "activeDeadlineSeconds" not in spec and "ttlSecondsAfterFinished" not in spec


def test_deadline_passthrough():
    cr = make_cr(activeDeadlineSeconds=3600)
    spec, kspec = load_psearch(cr)
    job = render.render_job(cr, kspec, spec, Task("export"), 0, active_deadline_seconds=1234)
    assert job["spec"]["activeDeadlineSeconds"] == 1234
    assert render.render_job(cr, kspec, spec, Task("export"), 0, active_deadline_seconds=-5)["spec"][
        "activeDeadlineSeconds"] == 1


def test_hardened_security_context_and_scratch_volumes():
    _, _, _, job = _render()
    pod = job["spec"]["template"]["spec"]
    assert pod["securityContext"] == {"runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 1000,
                                      "fsGroup": 1000, "seccompProfile": {"type": "RuntimeDefault"}}
    sc = _container(job)["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]} and sc["runAsNonRoot"] is True and sc["privileged"] is False
    assert pod["automountServiceAccountToken"] is False and pod["enableServiceLinks"] is False
    mounts = {m["mountPath"]: m["name"] for m in _container(job)["volumeMounts"]}
    assert mounts == {"/tmp": "tmp", "/cache": "cache", "/dev/shm": "dshm"}
    assert {v["name"] for v in pod["volumes"]} == {"tmp", "cache", "dshm"}
    env = _env(job)
    assert env["HOME"]["value"] == "/tmp" and env["HF_HOME"]["value"].startswith("/cache/")


@pytest.mark.parametrize("task, argv", [
    (Task("database", 3, 8), ["--shard", "3", "--shards", "8"]),
    (Task("generation", 7), ["--index", "7"]),
    (Task("posttrain", variant="uniform"), ["--variant", "uniform"]),
    (Task("export"), []),
    (Task("evaluate"), []),
])
def test_command_runs_the_job_entrypoint(task, argv):
    _, _, _, job = _render(task)
    assert _container(job)["command"] == ["python", "-m", f"darwinlm_jobs.{task.kind}", *argv]
    assert _container(job)["terminationMessagePolicy"] == "FallbackToLogsOnError"


def test_spec_and_uid_reach_the_job_and_load_back():
    cr, spec, _, job = _render()
    env = _env(job)
    assert env["DARWINLM_SEARCH_UID"]["value"] == UID
    data = json.loads(env["DARWINLM_SPEC"]["value"])
    assert not set(data) & KUBERNETES_FIELDS  # the pods get the library spec only
    assert load_spec(data, extra_allowed=KUBERNETES_FIELDS) == spec  # what darwinlm_jobs does
    assert data["name"] == "tiny"


def test_credentials_only_as_secret_key_refs():
    cr, _, _, job = _render(**{"s3.secretRef": {"name": "creds", "accessKeyIdKey": "id", "secretAccessKeyKey": "key"},
                               "s3.region": "eu-west-1"})
    env = _env(job)
    assert env["AWS_ACCESS_KEY_ID"] == {"name": "AWS_ACCESS_KEY_ID",
                                        "valueFrom": {"secretKeyRef": {"name": "creds", "key": "id"}}}
    assert env["AWS_SECRET_ACCESS_KEY"] == {"name": "AWS_SECRET_ACCESS_KEY",
                                            "valueFrom": {"secretKeyRef": {"name": "creds", "key": "key"}}}
    assert "value" not in env["AWS_ACCESS_KEY_ID"] and "value" not in env["AWS_SECRET_ACCESS_KEY"]
    assert env["AWS_ENDPOINT_URL"]["value"] == "http://s3.example:9000"
    assert env["AWS_DEFAULT_REGION"]["value"] == "eu-west-1"
    assert "AWS_SESSION_TOKEN" not in env


def test_no_s3_settings_no_aws_env():
    cr, _, _, job = _render(s3=None, store="file:///shared/runs")
    assert not [n for n in _env(job) if n.startswith("AWS_")]


def test_resources_are_passed_through():
    _, _, _, job = _render(resources={"requests": {"cpu": "4", "memory": "16Gi"},
                                      "limits": {"memory": "20Gi", "nvidia.com/gpu": 2}})
    assert _container(job)["resources"] == {"requests": {"cpu": "4", "memory": "16Gi"},
                                            "limits": {"memory": "20Gi", "nvidia.com/gpu": "2"}}
    cr = make_cr(resources={"limits": {"nvidia.com/gpu": 2}})
    assert render.gpus_per_pod(load_psearch(cr)[1]) == 2


# ------------------------------------------------------------------------------ distribution

def test_generation_with_workers_is_an_indexed_job_with_rendezvous():
    cr, spec, kspec, job = _render(Task("generation", 4), 0, workers=4)
    s = job["spec"]
    assert s["completionMode"] == "Indexed" and s["completions"] == s["parallelism"] == 4
    pod = s["template"]["spec"]
    assert pod["subdomain"] == "tiny-workers"
    assert s["template"]["metadata"]["labels"]["darwinlm.io/role"] == "worker"
    env = _env(job)
    assert env["MASTER_ADDR"]["value"] == "tiny-generation-4-a0-0.tiny-workers"
    assert env["MASTER_PORT"]["value"] == "29500" and env["WORLD_SIZE"]["value"] == "4"
    svc = render.render_service(cr)
    assert svc["metadata"]["name"] == pod["subdomain"] and svc["spec"]["clusterIP"] == "None"
    assert svc["spec"]["publishNotReadyAddresses"] is True
    selector = svc["spec"]["selector"]
    assert selector, "a headless Service without a selector would select nothing"
    assert all(s["template"]["metadata"]["labels"].get(k) == v for k, v in selector.items())
    assert svc["metadata"]["ownerReferences"][0]["uid"] == UID


@pytest.mark.parametrize("task", [Task("database", 0, 2), Task("posttrain", variant="searched"), Task("export")])
def test_only_generations_are_distributed(task):
    _, _, _, job = _render(task, workers=4)
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == 1
    assert "completionMode" not in job["spec"] and "subdomain" not in job["spec"]["template"]["spec"]
    assert "MASTER_ADDR" not in _env(job)


def test_single_worker_generation_is_a_plain_job():
    _, _, _, job = _render(Task("generation", 0), workers=1)
    assert "completionMode" not in job["spec"] and "WORLD_SIZE" not in _env(job)


# ------------------------------------------------------------------------------ scheduling knobs

def test_kueue_queue_label_on_the_job_only():
    _, _, _, job = _render(queueName="team-a-gpus")
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a-gpus"
    assert "kueue.x-k8s.io/queue-name" not in job["spec"]["template"]["metadata"]["labels"]
    _, _, _, plain = _render()
    assert "kueue.x-k8s.io/queue-name" not in plain["metadata"]["labels"]


def test_pod_template_overrides():
    pt = {"nodeSelector": {"nvidia.com/gpu.product": "H100"},
          "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
          "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
              {"matchExpressions": [{"key": "pool", "operator": "In", "values": ["gpu"]}]}]}}},
          "priorityClassName": "low", "serviceAccountName": "pruner",
          "imagePullSecrets": [{"name": "regcred"}],
          "env": [{"name": "HF_HUB_OFFLINE", "value": "0"}, {"name": "HOME", "value": "/home/me"},
                  {"name": "DARWINLM_SEARCH_UID", "value": "forged"}],
          "volumes": [{"name": "models", "persistentVolumeClaim": {"claimName": "models"}}],
          "volumeMounts": [{"name": "models", "mountPath": "/models", "readOnly": True}]}
    _, _, _, job = _render(podTemplate=pt, imagePullPolicy="Always")
    pod = job["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == pt["nodeSelector"]
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert pod["affinity"] == pt["affinity"]
    assert pod["priorityClassName"] == "low" and pod["serviceAccountName"] == "pruner"
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    assert {"name": "models", "persistentVolumeClaim": {"claimName": "models"}} in pod["volumes"]
    assert {"name": "models", "mountPath": "/models", "readOnly": True} in _container(job)["volumeMounts"]
    assert _container(job)["imagePullPolicy"] == "Always"
    env = _env(job)
    assert env["HF_HUB_OFFLINE"]["value"] == "0" and env["HOME"]["value"] == "/home/me"
    assert env["DARWINLM_SEARCH_UID"]["value"] == UID  # the operator's own variables win
    assert [e["name"] for e in _container(job)["env"]].count("HOME") == 1


# ------------------------------------------------------------------------------ the job image

DEFAULTS = JobDefaults(image="ghcr.io/darwinlm/darwinlm-job:0.2.0", image_pull_policy="Always")


def _without_image(**over):
    cr = make_cr(**over)
    cr["spec"].pop("image")
    spec, kspec = load_psearch(cr)
    assert kspec.image is None and kspec.imagePullPolicy == over.get("imagePullPolicy")
    return cr, spec, kspec


def test_a_search_without_image_runs_the_operators_job_image():
    cr, spec, kspec = _without_image()
    job = render.render_job(cr, kspec, spec, Task("generation", 2), 0, defaults=DEFAULTS)
    assert _container(job)["image"] == "ghcr.io/darwinlm/darwinlm-job:0.2.0"
    assert _container(job)["imagePullPolicy"] == "Always"
    # no operator pull policy: IfNotPresent
    job = render.render_job(cr, kspec, spec, Task("export"), 0, defaults=JobDefaults(image="job:1"))
    assert (_container(job)["image"], _container(job)["imagePullPolicy"]) == ("job:1", "IfNotPresent")
    # the spec's pull policy wins over the operator's
    cr, spec, kspec = _without_image(imagePullPolicy="Never")
    job = render.render_job(cr, kspec, spec, Task("export"), 0, defaults=DEFAULTS)
    assert (_container(job)["image"], _container(job)["imagePullPolicy"]) == (DEFAULTS.image, "Never")


def test_spec_image_always_wins_over_the_operators_default():
    cr, spec, kspec, job = _render()
    assert _container(job)["image"] == "registry.example/darwinlm-job:0.1.0"
    assert _container(job)["imagePullPolicy"] == "IfNotPresent"
    job = render.render_job(cr, kspec, spec, Task("generation", 2), 0, defaults=DEFAULTS)
    assert _container(job)["image"] == "registry.example/darwinlm-job:0.1.0"
    assert _container(job)["imagePullPolicy"] == "Always"  # unset in the spec: the operator's policy


def test_no_image_anywhere_is_a_spec_error_at_image():
    cr, spec, kspec = _without_image()
    for defaults in (None, JobDefaults(), JobDefaults(image_pull_policy="Always")):
        with pytest.raises(SpecError) as info:
            render.render_job(cr, kspec, spec, Task("export"), 0, defaults=defaults)
        assert [p for p, _ in info.value.errors] == ["image"]
        assert "DARWINLM_JOB_IMAGE" in str(info.value)


@pytest.mark.parametrize("kw", [{"image": "my image:1"}, {"image": ""}, {"image": "x" * 1025},
                                {"image_pull_policy": "always"}])
def test_malformed_operator_defaults_are_refused(kw):
    with pytest.raises(ValueError):
        JobDefaults(**kw)


def test_render_is_pure_and_json_serialisable():
    cr, spec, kspec, job = _render(workers=2)
    again = render.render_job(cr, kspec, spec, Task("generation", 2), 0)
    assert job == again
    json.dumps(job)
    json.dumps(render.render_service(cr))


def test_the_jobs_know_the_same_kubernetes_fields_as_the_operator():
    """``darwinlm_jobs`` may not import the operator (import-linter), so it keeps its own copy of the
    top-level PruningSearch keys it ignores in a ``--spec`` manifest: it must equal kspec's."""
    from darwinlm_jobs import _common

    assert _common._KUBERNETES_FIELDS == KUBERNETES_FIELDS  # noqa: SLF001


def test_the_jobs_and_the_estimate_command_know_every_kubernetes_field():
    """A new KubeSpec field (e.g. generationsPerJob) must be ignored by the jobs' and `darwinlm estimate`'s
    library-spec loaders, which cannot import the operator."""
    from darwinlm.cli import _ESTIMATE_K8S
    from darwinlm_jobs._common import _KUBERNETES_FIELDS

    assert KUBERNETES_FIELDS <= _KUBERNETES_FIELDS and KUBERNETES_FIELDS <= _ESTIMATE_K8S


def test_generations_per_job_the_spec_wins_over_the_operator_default_then_one():
    def command(defaults, **over):
        cr = make_cr(**{"search.generations": 5}, **over)
        spec, kspec = load_psearch(cr)
        job = render.render_job(cr, kspec, spec, Task("generation", 1), 0, defaults=defaults)
        return job["spec"]["template"]["spec"]["containers"][0]["command"][-4:], \
            job["metadata"]["labels"]["darwinlm.io/last-generation"]

    assert command(JobDefaults()) == (["-m", "darwinlm_jobs.generation", "--index", "1"], "1")
    assert command(JobDefaults(generations_per_job=0)) == (["--index", "1", "--count", "0"], "4")
    assert command(JobDefaults(generations_per_job=0), generationsPerJob=1) == (
        ["-m", "darwinlm_jobs.generation", "--index", "1"], "1")
    assert command(JobDefaults(), generationsPerJob=2) == (["--index", "1", "--count", "2"], "2")
