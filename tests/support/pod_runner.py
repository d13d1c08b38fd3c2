"""Plays the Job controller and the kubelet against the API emulator: Job pods run as local subprocesses.

    runner = PodRunner(kubeconfig, namespace="t1", log_dir=tmp_path / "pods", extra_env=s3.env())
    runner.start()
    ...  # the operator (or the test) creates batch/v1 Jobs; the runner creates Pods and runs their containers
    job = runner.wait_for_job("ps1-gen-0", timeout=30)      # the Job once it is Complete or Failed
    runner.logs("ps1-gen-0")                                # the pods' stdout+stderr (files under log_dir)
    runner.stop()                                           # kills whatever still runs

Job controller part (polling the API every ``poll_interval`` seconds through the ``kubernetes`` client):
  * Pods for each unsuspended Job: NonIndexed (``completions``/``parallelism``, work-queue when completions is
    unset) and Indexed (one pod per index, ``batch.kubernetes.io/job-completion-index`` annotation + label,
    ``JOB_COMPLETION_INDEX`` env, hostname ``<job>-<index>``); labels from the template + job-name/controller-uid;
    an ownerReference to the Job (controller); ``spec.nodeName`` = the emulator's node
  * Job status: ``active``, ``ready``, ``succeeded``, ``failed``, ``terminating``, ``startTime``,
    ``completionTime``, ``completedIndexes``/``failedIndexes``, conditions ``SuccessCriteriaMet`` + ``Complete``,
    ``FailureTarget`` + ``Failed`` with reason ``BackoffLimitExceeded``, ``PodFailurePolicy``,
    ``DeadlineExceeded``, ``FailedIndexes``, ``MaxFailedIndexesExceeded``; ``Suspended``
  * ``backoffLimit`` (failed pods are replaced until exceeded, after ``retry_delay`` s), ``backoffLimitPerIndex``,
    ``maxFailedIndexes``, ``podFailurePolicy`` (FailJob / Ignore / Count / FailIndex on exit codes and pod
    conditions such as DisruptionTarget), ``activeDeadlineSeconds``, ``suspend`` (kills + deletes active pods;
    resumes), ``ttlSecondsAfterFinished`` (deletes the Job with Background propagation)
  * Events: SuccessfulCreate, Completed, BackoffLimitExceeded/DeadlineExceeded/..., Suspended/Resumed (job-controller)
    and Started/Killing/Evicted/Failed/FailedScheduling (kubelet, scheduler)
  * a deleted Job: its processes are killed; Pods that survive it (orphaned: deleted without
    ``propagationPolicy: Background|Foreground``) are recorded in ``runner.orphaned`` and marked Failed
  * a Pod deleted while it runs: the process is killed and the pod counts as failed (then replaced)

Kubelet part: each pod's single (first) container runs as a local subprocess:
  * argv = ``command + args`` with ``$(VAR)`` expansion; ``python``/``python3``/``python3.X`` -> ``sys.executable``,
    ``torchrun`` -> ``python -m torch.distributed.run``; no command and no args = the image entrypoint, which is
    not emulated: the container exits 0 at once; args only = run the args
  * env = base env (PATH with this venv first, HOME, LANG, HOSTNAME, HF_HUB_OFFLINE=1, PYTHONUNBUFFERED=1,
    PYTHONPATH = repo root [+ jobs/, operator/ when present] + ``pythonpath``) < ``extra_env`` < the container's
    ``envFrom``/``env`` (``value``, ``secretKeyRef``, ``configMapKeyRef``, ``fieldRef`` metadata.name/namespace/
    uid/labels/annotations (the completion index) / spec.nodeName / status.podIP, ``resourceFieldRef``) <
    ``override_env``. A missing Secret/ConfigMap (not optional) keeps the pod Pending with
    ``CreateContainerConfigError`` and is retried, like the kubelet
  * ``MASTER_ADDR`` values that are not IPs -> 127.0.0.1, ``MASTER_PORT`` -> one free port per Job; the Job's pod
    DNS names (``<job>-<i>[.<subdomain>...]``) in env values and args -> 127.0.0.1 (``host:<old port>`` ->
    the new port; ``--master-port``/``--master_port`` flags too)
  * volumes: emptyDir -> a per-pod dir, persistentVolumeClaim -> a per-claim dir shared by all pods, secret /
    configMap -> materialised files; the mount paths are rewritten to those dirs in argv/env values;
    ``path_map`` adds explicit container-path -> local-path rewrites. cwd = repo root (or a mapped workingDir)
  * stdout+stderr go to ``<log_dir>/<namespace>/<pod>.log`` (the emulator serves it as ``pods/<name>/log``)
  * pod status Pending -> Running -> Succeeded/Failed with ``containerStatuses[0].state.terminated.exitCode``
    and ``reason`` (Completed / Error / OOMKilled / StartError), ``terminationMessagePolicy:
    FallbackToLogsOnError`` honoured
  * the process runs in its own process group; kills are SIGTERM then SIGKILL after ``kill_grace`` s

Failure injection (``prefix`` matches the Job name, or the pod name, by prefix):
  * ``fail_next(prefix, exit_code=1, run=False, reason="Error")`` - the next pod fails with that exit code
    (``run=True`` runs the command first and replaces its exit code; ``reason="OOMKilled"`` for OOM)
  * ``evict_next(prefix, after=0.5)`` - the next pod is killed ``after`` s into its run and becomes
    ``phase: Failed, reason: Evicted`` with a ``DisruptionTarget`` condition; ``evict(pod_name)`` evicts a running pod
  * ``hold(prefix, reason="Unschedulable"|"ImagePullBackOff"|"ErrImagePull"|..., message=None)`` - matching pods
    stay Pending (unschedulable: ``PodScheduled=False/Unschedulable``; image errors: a waiting container state)
    until ``release(prefix)``
"""

from __future__ import annotations

import base64
import collections
import dataclasses
import datetime
import json
import os
import pathlib
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
from typing import Any, Callable

from tests.support.procs import free_port

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
LOG_PATH_ANNOTATION = "kmock-emulator/log-path"
INDEX_KEY = "batch.kubernetes.io/job-completion-index"
NODE_NAME = "emulator-node"
_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _ranges(idx: set[int]) -> str:
    """{0,1,2,4} -> '0-2,4' (the apiserver's completedIndexes format)."""
    out, items = [], sorted(idx)
    i = 0
    while i < len(items):
        j = i
        while j + 1 < len(items) and items[j + 1] == items[j] + 1:
            j += 1
        out.append(str(items[i]) if i == j else f"{items[i]}-{items[j]}")
        i = j + 1
    return ",".join(out)


class _ConfigError(Exception):
    pass


@dataclasses.dataclass
class Rule:
    kind: str                       # fail | evict | hold
    prefix: str
    count: int | None = 1           # None = every matching pod
    exit_code: int = 1
    reason: str = "Error"
    message: str | None = None
    after: float = 0.5
    run: bool = False


@dataclasses.dataclass
class PodRun:
    """One pod the runner created; ``state``: pending | held | running | succeeded | failed | deleted."""
    namespace: str
    name: str
    job: str
    job_uid: str
    index: int | None
    log_path: pathlib.Path
    uid: str = ""
    state: str = "pending"
    argv: list[str] | None = None
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    cwd: str = ""
    exit_code: int | None = None
    reason: str | None = None
    message: str | None = None
    started: str | None = None
    finished: str | None = None
    created_mono: float = 0.0
    proc: subprocess.Popen | None = dataclasses.field(default=None, repr=False)
    hold: Rule | None = None
    fail: Rule | None = None
    evict_at: float | None = None
    evict_rule: Rule | None = None
    evicting: bool = False
    kill_deadline: float | None = None
    deleted: bool = False
    counted: bool = False
    conditions: list[dict] = dataclasses.field(default_factory=list)
    waiting: tuple[str, str] | None = None

    @property
    def active(self) -> bool:
        return self.state in ("pending", "held", "running")

    def read_log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""


@dataclasses.dataclass
class _JobState:
    uid: str
    namespace: str
    name: str
    obj: dict
    pods: list[PodRun] = dataclasses.field(default_factory=list)
    succeeded: int = 0
    failed: int = 0
    succeeded_idx: set = dataclasses.field(default_factory=set)
    failed_idx: set = dataclasses.field(default_factory=set)
    index_failures: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    start_time: str | None = None
    start_mono: float | None = None
    completion_time: str | None = None
    finished: str | None = None        # Complete | Failed
    finished_mono: float | None = None
    conditions: list[dict] = dataclasses.field(default_factory=list)
    suspended: bool = False
    last_failure_mono: float = 0.0
    master_port: int = 0
    written: str = ""
    ttl_done: bool = False
    orig_port: str | None = None

    def set_condition(self, ctype: str, status: str, reason: str, message: str) -> None:
        now = _now()
        for c in self.conditions:
            if c["type"] == ctype:
                if c["status"] != status:
                    c["lastTransitionTime"] = now
                c.update(status=status, reason=reason, message=message, lastProbeTime=now)
                return
        self.conditions.append({"type": ctype, "status": status, "reason": reason, "message": message,
                                "lastProbeTime": now, "lastTransitionTime": now})


class PodRunner:
    """The Job controller + kubelet for tests (see the module docstring)."""

    def __init__(self, kubeconfig: str | os.PathLike | None = None, *, api_client: Any = None,
                 namespace: str | None = None, log_dir: str | os.PathLike, work_dir: str | os.PathLike | None = None,
                 extra_env: dict[str, str] | None = None, override_env: dict[str, str] | None = None,
                 pythonpath: list[str] | tuple[str, ...] = (), path_map: dict[str, str] | None = None,
                 repo_root: str | os.PathLike = REPO_ROOT, poll_interval: float = 0.1, kill_grace: float = 3.0,
                 retry_delay: float = 0.0, job_label_selector: str | None = None, post_events: bool = True) -> None:
        import kubernetes
        if api_client is None:
            api_client = kubernetes.config.new_client_from_config(config_file=str(kubeconfig) if kubeconfig else None)
        self.api_client = api_client
        self.core = kubernetes.client.CoreV1Api(api_client)
        self.batch = kubernetes.client.BatchV1Api(api_client)
        self.ApiException = kubernetes.client.ApiException
        self.namespace = namespace
        self.log_dir = pathlib.Path(log_dir)
        self.work_dir = pathlib.Path(work_dir) if work_dir else self.log_dir.parent / (self.log_dir.name + "-work")
        self.extra_env = dict(extra_env or {})
        self.override_env = dict(override_env or {})
        self.pythonpath = list(pythonpath)
        self.path_map = dict(path_map or {})
        self.repo_root = pathlib.Path(repo_root)
        self.poll_interval = poll_interval
        self.kill_grace = kill_grace
        self.retry_delay = retry_delay
        self.job_label_selector = job_label_selector
        self.post_events = post_events
        self.runs: list[PodRun] = []            # every pod created, in order
        self.orphaned: list[str] = []           # "ns/pod" of pods that survived their Job's deletion
        self.errors: list[str] = []             # tracebacks from the control loop (tests can assert it is empty)
        self._jobs: dict[str, _JobState] = {}
        self._rules: list[Rule] = []
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pod_status_written: dict[str, str] = {}
        self.ticks = 0

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> "PodRunner":
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="pod-runner", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)
        with self._lock:
            for pr in self.runs:
                if pr.proc is not None and pr.proc.poll() is None:
                    self._signal(pr, signal.SIGTERM)
            deadline = time.monotonic() + min(self.kill_grace, 2.0)
            for pr in self.runs:
                if pr.proc is not None:
                    try:
                        pr.proc.wait(max(0.0, deadline - time.monotonic()))
                    except subprocess.TimeoutExpired:
                        self._signal(pr, signal.SIGKILL)
                        pr.proc.wait(5)

    def __enter__(self) -> "PodRunner":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # ---------------------------------------------------------------- failure injection

    def fail_next(self, prefix: str, exit_code: int = 1, *, count: int | None = 1, run: bool = False,
                  reason: str | None = None, message: str | None = None) -> Rule:
        rule = Rule("fail", prefix, count, exit_code=exit_code, reason=reason or "Error", message=message, run=run)
        with self._lock:
            self._rules.append(rule)
        return rule

    def evict_next(self, prefix: str, *, after: float = 0.5, count: int | None = 1,
                   message: str = "The node was low on resource: memory. Threshold quantity: 100Mi, "
                                  "available: 12Mi.") -> Rule:
        rule = Rule("evict", prefix, count, after=after, reason="Evicted", message=message)
        with self._lock:
            self._rules.append(rule)
        return rule

    def hold(self, prefix: str, reason: str = "Unschedulable", message: str | None = None) -> Rule:
        if message is None:
            message = {
                "Unschedulable": "0/1 nodes are available: 1 Insufficient nvidia.com/gpu. preemption: 0/1 nodes "
                                 "are available: 1 No preemption victims found for incoming pod.",
                "ImagePullBackOff": 'Back-off pulling image "registry.invalid/darwinlm:missing"',
                "ErrImagePull": 'failed to pull and unpack image "registry.invalid/darwinlm:missing": not found',
            }.get(reason, reason)
        rule = Rule("hold", prefix, None, reason=reason, message=message)
        with self._lock:
            self._rules.append(rule)
        return rule

    def release(self, prefix: str | None = None) -> None:
        """Lift ``hold`` rules (all, or those with this prefix); held pods then start."""
        with self._lock:
            self._rules = [r for r in self._rules if not (r.kind == "hold" and (prefix is None or r.prefix == prefix))]

    def clear_rules(self) -> None:
        with self._lock:
            self._rules.clear()

    def evict(self, pod_name: str, namespace: str | None = None,
              message: str = "The node was low on resource: memory.") -> None:
        """Evict a running pod now (asynchronously: the loop kills it on its next tick)."""
        with self._lock:
            for pr in self.runs:
                if pr.name == pod_name and (namespace is None or pr.namespace == namespace) and pr.state == "running":
                    pr.evict_at = time.monotonic()
                    pr.evict_rule = Rule("evict", pod_name, 1, reason="Evicted", message=message)
                    return
        raise KeyError(f"no running pod {pod_name}")

    def _take_rule(self, kind: str, job: str, pod: str) -> Rule | None:
        with self._lock:
            for r in self._rules:
                if r.kind == kind and (job.startswith(r.prefix) or pod.startswith(r.prefix)):
                    if r.count is not None:
                        r.count -= 1
                        if r.count <= 0:
                            self._rules.remove(r)
                    return r
        return None

    def _hold_rule(self, pr: PodRun) -> Rule | None:
        with self._lock:
            for r in self._rules:
                if r.kind == "hold" and (pr.job.startswith(r.prefix) or pr.name.startswith(r.prefix)):
                    return r
        return None

    # ---------------------------------------------------------------- inspection

    def pods(self, job: str | None = None, namespace: str | None = None) -> list[PodRun]:
        with self._lock:
            return [p for p in self.runs if (job is None or p.job == job) and (namespace is None or p.namespace ==
                                                                                  namespace)]

    def logs(self, prefix: str) -> str:
        """Concatenated logs of the pods whose job or pod name starts with ``prefix``."""
        return "".join(p.read_log() for p in self.runs if p.job.startswith(prefix) or p.name.startswith(prefix))

    def read_job(self, name: str, namespace: str | None = None) -> dict | None:
        ns = namespace or self.namespace or "default"
        try:
            return json.loads(self.batch.read_namespaced_job(name, ns, _preload_content=False).data)
        except self.ApiException as e:
            if e.status == 404:
                return None
            raise

    def wait_for_job(self, name: str, namespace: str | None = None, timeout: float = 30.0) -> dict:
        """Wait until the Job has a ``Complete`` or ``Failed`` condition (True) and return it."""
        def done():
            job = self.read_job(name, namespace)
            conds = ((job or {}).get("status") or {}).get("conditions") or []
            if any(c["type"] in ("Complete", "Failed") and c["status"] == "True" for c in conds):
                return job
            return None
        return self.wait_for(done, timeout, f"job {name} to finish")

    def wait_for(self, pred: Callable[[], Any], timeout: float = 30.0, what: str = "condition") -> Any:
        end = time.monotonic() + timeout
        while True:
            v = pred()
            if v:
                return v
            if time.monotonic() > end:
                raise TimeoutError(f"timed out after {timeout} s waiting for {what}; runner errors: "
                                   f"{self.errors[-3:]}; pods: {[(p.name, p.state, p.exit_code) for p in self.runs]}")
            time.sleep(0.05)

    # ---------------------------------------------------------------- API helpers

    def _list(self, kind: str) -> list[dict]:
        if kind == "jobs":
            if self.namespace:
                r = self.batch.list_namespaced_job(self.namespace, label_selector=self.job_label_selector or "",
                                                   _preload_content=False)
            else:
                r = self.batch.list_job_for_all_namespaces(label_selector=self.job_label_selector or "",
                                                           _preload_content=False)
        else:
            r = (self.core.list_namespaced_pod(self.namespace, _preload_content=False) if self.namespace
                 else self.core.list_pod_for_all_namespaces(_preload_content=False))
        return json.loads(r.data)["items"]

    def _get_data(self, kind: str, ns: str, name: str) -> dict[str, str] | None:
        try:
            if kind == "secret":
                obj = json.loads(self.core.read_namespaced_secret(name, ns, _preload_content=False).data)
                return {k: base64.b64decode(v).decode("utf-8", "replace") for k, v in (obj.get("data") or {}).items()}
            obj = json.loads(self.core.read_namespaced_config_map(name, ns, _preload_content=False).data)
            return dict(obj.get("data") or {})
        except self.ApiException as e:
            if e.status == 404:
                return None
            raise

    def _put_pod_status(self, pr: PodRun, status: dict, extra_meta_patch: dict | None = None) -> None:
        key = f"{pr.namespace}/{pr.name}"
        text = json.dumps(status, sort_keys=True)
        if self._pod_status_written.get(key) == text or pr.deleted:
            return
        try:
            body = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": pr.name, "namespace": pr.namespace},
                    "status": status}
            self.core.patch_namespaced_pod_status(pr.name, pr.namespace, body, _preload_content=False,
                                                  _content_type="application/merge-patch+json")
            self._pod_status_written[key] = text
        except self.ApiException as e:
            if e.status != 404:
                raise
            pr.deleted = True

    def _write_job_status(self, st: _JobState) -> None:
        active = [p for p in st.pods if p.active]
        spec = st.obj.get("spec") or {}
        status: dict[str, Any] = {
            "active": len(active) or None,
            "ready": sum(1 for p in active if p.state == "running"),
            "terminating": 0,
            "succeeded": st.succeeded or None,
            "failed": st.failed or None,
            "startTime": st.start_time,
            "completionTime": st.completion_time,
            "conditions": st.conditions or None,
            "uncountedTerminatedPods": {},
        }
        if spec.get("completionMode") == "Indexed":
            status["completedIndexes"] = _ranges(st.succeeded_idx) or None
            if spec.get("backoffLimitPerIndex") is not None:
                status["failedIndexes"] = _ranges(st.failed_idx)
        text = json.dumps(status, sort_keys=True)
        if text == st.written:
            return
        try:
            self.batch.patch_namespaced_job_status(st.name, st.namespace, {"status": status},
                                                   _preload_content=False,
                                                   _content_type="application/merge-patch+json")
            st.written = text
        except self.ApiException as e:
            if e.status != 404:
                raise

    def _event(self, obj: dict, reason: str, message: str, etype: str = "Normal",
               component: str = "job-controller") -> None:
        if not self.post_events:
            return
        md = obj.get("metadata") or {}
        now = _now()
        body = {"apiVersion": "v1", "kind": "Event",
                "metadata": {"name": f"{md.get('name')}.{random.getrandbits(64):016x}", "namespace": md.get("namespace")},
                "involvedObject": {"apiVersion": obj.get("apiVersion"), "kind": obj.get("kind"), "name": md.get("name"),
                                   "namespace": md.get("namespace"), "uid": md.get("uid"),
                                   "resourceVersion": md.get("resourceVersion")},
                "reason": reason, "message": message, "type": etype, "count": 1,
                "source": {"component": component}, "reportingComponent": component,
                "firstTimestamp": now, "lastTimestamp": now}
        try:
            self.core.create_namespaced_event(md.get("namespace"), body, _preload_content=False)
        except self.ApiException:
            pass

    # ---------------------------------------------------------------- the loop

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                with self._lock:
                    self._tick()
            except Exception:                               # noqa: BLE001 - recorded, the loop keeps going
                tb = traceback.format_exc()
                if not self.errors or self.errors[-1] != tb:
                    self.errors.append(tb)
            self.ticks += 1
            self._stop.wait(self.poll_interval)

    def _tick(self) -> None:
        jobs = self._list("jobs")
        pods = {(p["metadata"]["namespace"], p["metadata"]["name"]): p for p in self._list("pods")}
        seen = set()
        for job in jobs:
            md = job["metadata"]
            uid = md["uid"]
            seen.add(uid)
            st = self._jobs.get(uid)
            if st is None:
                conds = (job.get("status") or {}).get("conditions") or []
                st = _JobState(uid=uid, namespace=md["namespace"], name=md["name"], obj=job)
                if any(c.get("type") in ("Complete", "Failed") and c.get("status") == "True" for c in conds):
                    st.finished = "seen-finished"             # finished before we saw it: leave it alone
                self._jobs[uid] = st
            st.obj = job
            if st.finished != "seen-finished":
                self._reconcile(st, pods)
        for uid, st in list(self._jobs.items()):
            if uid not in seen:
                self._job_gone(st, pods)
                del self._jobs[uid]

    # ---------------------------------------------------------------- job controller

    def _reconcile(self, st: _JobState, pods: dict) -> None:
        job, spec = st.obj, st.obj.get("spec") or {}
        for pr in st.pods:
            self._observe(st, pr, pods)
        if st.finished:
            ttl = spec.get("ttlSecondsAfterFinished")
            if ttl is not None and not st.ttl_done and time.monotonic() - (st.finished_mono or 0) >= ttl:
                st.ttl_done = True
                try:
                    self.batch.delete_namespaced_job(st.name, st.namespace, propagation_policy="Background",
                                                     _preload_content=False)
                except self.ApiException:
                    pass
            self._write_job_status(st)
            return
        if spec.get("suspend"):
            if not st.suspended:
                st.suspended = True
                self._terminate_active(st, delete=True)
                st.start_time = st.start_mono = None
                st.set_condition("Suspended", "True", "JobSuspended", "Job suspended")
                self._event(job, "Suspended", "Job suspended")
            self._write_job_status(st)
            return
        if st.suspended:
            st.suspended = False
            st.set_condition("Suspended", "False", "JobResumed", "Job resumed")
            self._event(job, "Resumed", "Job resumed")
        if st.start_time is None:
            st.start_time, st.start_mono = _now(), time.monotonic()
        ads = spec.get("activeDeadlineSeconds")
        if ads and time.monotonic() - st.start_mono >= ads:
            self._finish(st, "Failed", "DeadlineExceeded", "Job was active longer than specified deadline")
            return
        if st.finished:
            self._write_job_status(st)
            return
        backoff = spec.get("backoffLimit", 6)
        per_index = spec.get("backoffLimitPerIndex")
        if per_index is None and st.failed > backoff:
            self._finish(st, "Failed", "BackoffLimitExceeded", "Job has reached the specified backoff limit")
            return
        max_failed = spec.get("maxFailedIndexes")
        if per_index is not None and max_failed is not None and len(st.failed_idx) > max_failed:
            self._finish(st, "Failed", "MaxFailedIndexesExceeded",
                         "Job has exceeded the specified maximal number of failed indexes")
            return
        active = [p for p in st.pods if p.active]
        parallelism = spec.get("parallelism", 1)
        completions = spec.get("completions")
        ready_to_retry = time.monotonic() - st.last_failure_mono >= self.retry_delay
        if spec.get("completionMode") == "Indexed":
            done = st.succeeded_idx | st.failed_idx
            if len(done) >= completions:
                if active:
                    self._terminate_active(st, delete=True)
                if st.failed_idx:
                    self._finish(st, "Failed", "FailedIndexes", "Job has failed indexes")
                else:
                    self._finish(st, "Complete", "CompletionsReached", "Reached expected number of succeeded pods")
                return
            running_idx = {p.index for p in active}
            todo = [i for i in range(completions) if i not in done and i not in running_idx]
            for i in todo[: max(0, parallelism - len(active))]:
                if st.index_failures[i] and not ready_to_retry:
                    continue
                self._create_pod(st, i)
        else:
            if completions is None:
                if st.succeeded >= 1 and not active:
                    self._finish(st, "Complete", "CompletionsReached", "Reached expected number of succeeded pods")
                    return
                need = parallelism - len(active) if st.succeeded == 0 else 0
            else:
                if st.succeeded >= completions:
                    if active:
                        self._terminate_active(st, delete=True)
                    self._finish(st, "Complete", "CompletionsReached", "Reached expected number of succeeded pods")
                    return
                need = min(parallelism, completions - st.succeeded) - len(active)
            if need > 0 and (st.failed == 0 or ready_to_retry):
                for _ in range(need):
                    self._create_pod(st, None)
        self._write_job_status(st)

    def _finish(self, st: _JobState, outcome: str, reason: str, message: str) -> None:
        if st.finished:
            return
        self._terminate_active(st, delete=True)
        st.finished, st.finished_mono = outcome, time.monotonic()
        if outcome == "Complete":
            st.completion_time = _now()
            st.set_condition("SuccessCriteriaMet", "True", reason, message)
            st.set_condition("Complete", "True", reason, message)
            self._event(st.obj, "Completed", "Job completed")
        else:
            st.set_condition("FailureTarget", "True", reason, message)
            st.set_condition("Failed", "True", reason, message)
            self._event(st.obj, reason, message, "Warning")
        self._write_job_status(st)

    def _terminate_active(self, st: _JobState, delete: bool) -> None:
        for pr in st.pods:
            if pr.active:
                if pr.proc is not None and pr.proc.poll() is None:
                    self._signal(pr, signal.SIGTERM)
                    try:
                        pr.proc.wait(self.kill_grace)
                    except subprocess.TimeoutExpired:
                        self._signal(pr, signal.SIGKILL)
                        pr.proc.wait(5)
                pr.state = "deleted"
                pr.finished = _now()
                if delete and not pr.deleted:
                    try:
                        self.core.delete_namespaced_pod(pr.name, pr.namespace, _preload_content=False)
                    except self.ApiException:
                        pass
                    pr.deleted = True

    def _job_gone(self, st: _JobState, pods: dict) -> None:
        for pr in st.pods:
            if pr.proc is not None and pr.proc.poll() is None:
                self._signal(pr, signal.SIGKILL)
                pr.proc.wait(5)
            if pr.active:
                pr.state = "deleted"
                pr.finished = _now()
            if (pr.namespace, pr.name) in pods and not pr.deleted:
                self.orphaned.append(f"{pr.namespace}/{pr.name}")
                pod = pods[(pr.namespace, pr.name)]
                if (pod.get("status") or {}).get("phase") not in ("Succeeded", "Failed"):
                    self._put_pod_status(pr, {
                        "phase": "Failed", "reason": "OwnerDeleted",
                        "message": "emulator: the owning Job was deleted without propagationPolicy "
                                   "Background/Foreground; a real cluster would keep this Pod running"})

    # ---------------------------------------------------------------- pods

    def _create_pod(self, st: _JobState, index: int | None) -> PodRun:
        job = st.obj
        spec = job["spec"]
        tmpl = json.loads(json.dumps(spec["template"]))
        tmd = tmpl.get("metadata") or {}
        suffix = "".join(random.choice(_ALPHABET) for _ in range(5))
        name = f"{st.name}-{index}-{suffix}" if index is not None else f"{st.name}-{suffix}"
        labels = dict(tmd.get("labels") or {})
        labels.setdefault("batch.kubernetes.io/job-name", st.name)
        labels.setdefault("job-name", st.name)
        labels.setdefault("batch.kubernetes.io/controller-uid", st.uid)
        labels.setdefault("controller-uid", st.uid)
        ann = dict(tmd.get("annotations") or {})
        log_path = self.log_dir / st.namespace / f"{name}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        ann[LOG_PATH_ANNOTATION] = str(log_path)
        pspec = tmpl["spec"]
        if index is not None:
            labels[INDEX_KEY] = str(index)
            ann[INDEX_KEY] = str(index)
            pspec["hostname"] = f"{st.name}-{index}"
            for c in pspec.get("containers") or []:
                env = c.setdefault("env", [])
                if not any(e.get("name") == "JOB_COMPLETION_INDEX" for e in env):
                    env.append({"name": "JOB_COMPLETION_INDEX", "valueFrom": {"fieldRef": {
                        "apiVersion": "v1", "fieldPath": f"metadata.annotations['{INDEX_KEY}']"}}})
        pr = PodRun(namespace=st.namespace, name=name, job=st.name, job_uid=st.uid, index=index, log_path=log_path,
                    created_mono=time.monotonic())
        pr.hold = self._hold_rule(pr)
        if pr.hold is None or pr.hold.reason != "Unschedulable":
            pspec["nodeName"] = NODE_NAME
        body = {"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": name, "namespace": st.namespace, "labels": labels, "annotations": ann,
                             "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": st.name,
                                                  "uid": st.uid, "controller": True, "blockOwnerDeletion": True}]},
                "spec": pspec}
        created = json.loads(self.core.create_namespaced_pod(st.namespace, body, _preload_content=False).data)
        pr.uid = created["metadata"]["uid"]
        self.runs.append(pr)
        st.pods.append(pr)
        self._event(job, "SuccessfulCreate", f"Created pod: {name}")
        if pr.hold is not None:
            pr.state = "held"
            self._write_held_status(pr, created)
        else:
            self._launch(st, pr, created)
        return pr

    def _write_held_status(self, pr: PodRun, pod: dict) -> None:
        rule = pr.hold
        assert rule is not None
        now = _now()
        if rule.reason == "Unschedulable":
            status = {"phase": "Pending", "qosClass": "BestEffort", "conditions": [
                {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": rule.message,
                 "lastProbeTime": None, "lastTransitionTime": now}]}
            self._event(pod, "FailedScheduling", rule.message or "", "Warning", "default-scheduler")
        else:
            c = (pod["spec"].get("containers") or [{}])[0]
            status = {"phase": "Pending", "qosClass": "BestEffort", "hostIP": "127.0.0.1", "podIP": "127.0.0.1",
                      "startTime": now,
                      "conditions": [{"type": "PodScheduled", "status": "True", "lastTransitionTime": now},
                                     {"type": "Initialized", "status": "True", "lastTransitionTime": now},
                                     {"type": "Ready", "status": "False", "reason": "ContainersNotReady",
                                      "lastTransitionTime": now},
                                     {"type": "ContainersReady", "status": "False", "reason": "ContainersNotReady",
                                      "lastTransitionTime": now}],
                      "containerStatuses": [{"name": c.get("name"), "image": c.get("image"), "imageID": "",
                                             "ready": False, "started": False, "restartCount": 0,
                                             "state": {"waiting": {"reason": rule.reason, "message": rule.message}},
                                             "lastState": {}}]}
            self._event(pod, "Failed", f"Error: {rule.reason}", "Warning", "kubelet")
        self._put_pod_status(pr, status)

    def _observe(self, st: _JobState, pr: PodRun, pods: dict) -> None:
        if not pr.active:
            return
        pod = pods.get((pr.namespace, pr.name))
        if pod is None or (pod["metadata"].get("uid") and pr.uid and pod["metadata"]["uid"] != pr.uid):
            # deleted from outside while it ran (or before it started): the controller counts it as failed
            pr.deleted = True
            if pr.proc is not None and pr.proc.poll() is None:
                self._signal(pr, signal.SIGKILL)
                pr.proc.wait(5)
            pr.state, pr.finished, pr.reason = "failed", _now(), "Deleted"
            if pr.exit_code is None:
                pr.exit_code = 137
            if not st.finished:
                self._pod_failed(st, pr)
            return
        if pr.state == "held":
            pr.hold = self._hold_rule(pr)
            if pr.hold is None:
                if not pod["spec"].get("nodeName"):
                    try:
                        self.core.patch_namespaced_pod(pr.name, pr.namespace, {"spec": {"nodeName": NODE_NAME}},
                                                       _preload_content=False,
                                                       _content_type="application/merge-patch+json")
                    except self.ApiException:
                        pass
                self._launch(st, pr, pod)
            return
        if pr.state == "pending":
            self._launch(st, pr, pod)                         # e.g. a Secret that was missing
            return
        if pr.state == "running":
            now = time.monotonic()
            if pr.evict_at is not None and now >= pr.evict_at and not pr.evicting:
                pr.evicting = True
                self._event(pod, "Evicted", (pr.evict_rule.message if pr.evict_rule else "") or "Evicted",
                            "Warning", "kubelet")
                self._event(pod, "Killing", f"Stopping container {self._container(pod).get('name')}", "Normal",
                            "kubelet")
                if pr.proc is not None and pr.proc.poll() is None:
                    self._signal(pr, signal.SIGTERM)
                    pr.kill_deadline = now + min(self.kill_grace, 2.0)
            if pr.kill_deadline is not None and now >= pr.kill_deadline and pr.proc and pr.proc.poll() is None:
                self._signal(pr, signal.SIGKILL)
            if pr.proc is not None and pr.proc.poll() is not None:
                self._finished(st, pr, pod, pr.proc.returncode)

    @staticmethod
    def _container(pod: dict) -> dict:
        return (pod["spec"].get("containers") or [{}])[0]

    def _launch(self, st: _JobState, pr: PodRun, pod: dict) -> None:
        c = self._container(pod)
        now = _now()
        try:
            env = self._resolve_env(st, pr, pod, c)
        except _ConfigError as e:
            pr.state = "pending"
            if pr.waiting != ("CreateContainerConfigError", str(e)):
                pr.waiting = ("CreateContainerConfigError", str(e))
                self._event(pod, "Failed", f"Error: {e}", "Warning", "kubelet")
            self._put_pod_status(pr, {
                "phase": "Pending", "hostIP": "127.0.0.1", "podIP": "127.0.0.1", "startTime": now,
                "qosClass": "BestEffort",
                "conditions": [{"type": "PodScheduled", "status": "True"}, {"type": "Initialized", "status": "True"},
                               {"type": "Ready", "status": "False", "reason": "ContainersNotReady"},
                               {"type": "ContainersReady", "status": "False", "reason": "ContainersNotReady"}],
                "containerStatuses": [{"name": c.get("name"), "image": c.get("image"), "imageID": "", "ready": False,
                                       "started": False, "restartCount": 0,
                                       "state": {"waiting": {"reason": "CreateContainerConfigError",
                                                             "message": str(e)}}}]})
            return
        pr.waiting = None
        mounts = self._mounts(st, pr, pod, c)
        argv = list(c.get("command") or []) + list(c.get("args") or [])
        argv = self._rewrite_argv([_expand(a, env) for a in argv], st, mounts)
        env = {k: self._rewrite(v, st, mounts) for k, v in env.items()}
        cwd = str(self.repo_root)
        wd = c.get("workingDir")
        if wd:
            mapped = self._rewrite(wd, st, mounts)
            if mapped != wd:
                pathlib.Path(mapped).mkdir(parents=True, exist_ok=True)
                cwd = mapped
        pr.argv, pr.env, pr.cwd = self._map_argv(argv), env, cwd
        pr.started = now
        pr.state = "running"
        base_status = {"phase": "Running", "hostIP": "127.0.0.1", "podIP": "127.0.0.1",
                       "podIPs": [{"ip": "127.0.0.1"}], "startTime": now, "qosClass": "BestEffort",
                       "conditions": [{"type": t, "status": "True", "lastTransitionTime": now} for t in
                                      ("PodReadyToStartContainers", "Initialized", "Ready", "ContainersReady",
                                       "PodScheduled")]}
        fail = self._take_rule("fail", pr.job, pr.name)
        pr.fail = fail
        if fail is not None and not fail.run:
            pr.log_path.write_text(f"emulator: injected failure (exit code {fail.exit_code})\n")
            self._finished(st, pr, pod, fail.exit_code)
            return
        if not argv:
            pr.log_path.write_text("emulator: no command/args (the image entrypoint is not emulated): exit 0\n")
            self._finished(st, pr, pod, 0)
            return
        try:
            with open(pr.log_path, "ab") as log:
                pr.proc = subprocess.Popen(pr.argv, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                           stdin=subprocess.DEVNULL, start_new_session=True)
        except OSError as e:
            pr.log_path.write_text(f"emulator: failed to start {pr.argv!r}: {e}\n")
            pr.message = f'failed to create containerd task: exec: "{argv[0]}": {e.strerror}'
            self._finished(st, pr, pod, 128, reason="StartError")
            return
        evict = self._take_rule("evict", pr.job, pr.name)
        if evict is not None:
            pr.evict_rule = evict
            pr.evict_at = time.monotonic() + evict.after
        cs = {"name": c.get("name"), "image": c.get("image"), "imageID": f"emulated://{c.get('image')}",
              "containerID": f"emulated://{pr.proc.pid}", "ready": True, "started": True, "restartCount": 0,
              "state": {"running": {"startedAt": now}}, "lastState": {}}
        self._put_pod_status(pr, dict(base_status, containerStatuses=[cs]))
        self._event(pod, "Started", f"Started container {c.get('name')}", "Normal", "kubelet")

    def _finished(self, st: _JobState, pr: PodRun, pod: dict, rc: int, reason: str | None = None) -> None:
        if rc < 0:
            rc = 128 - rc                                   # killed by signal N -> 128 + N
        if pr.fail is not None and pr.fail.run:
            rc = pr.fail.exit_code
        pr.exit_code = rc
        pr.finished = _now()
        c = self._container(pod)
        if reason is None:
            reason = "Completed" if rc == 0 else ((pr.fail.reason if pr.fail else None) or "Error")
        pr.reason = reason
        term = {"exitCode": rc, "reason": reason, "startedAt": pr.started or pr.finished, "finishedAt": pr.finished,
                "containerID": f"emulated://{pr.proc.pid if pr.proc else 0}"}
        msg = pr.message or (pr.fail.message if pr.fail else None)
        if rc != 0 and not msg and c.get("terminationMessagePolicy") == "FallbackToLogsOnError":
            lines = pr.read_log().splitlines()[-80:]
            msg = "\n".join(lines)[-2048:]
        if msg:
            term["message"] = msg
        now = pr.finished
        ok = rc == 0 and not pr.evicting
        conds = [{"type": "PodReadyToStartContainers", "status": "False", "lastTransitionTime": now},
                 {"type": "Initialized", "status": "True", "reason": "PodCompleted" if ok else None,
                  "lastTransitionTime": now},
                 {"type": "Ready", "status": "False", "reason": "PodCompleted" if ok else "PodFailed",
                  "lastTransitionTime": now},
                 {"type": "ContainersReady", "status": "False", "reason": "PodCompleted" if ok else "PodFailed",
                  "lastTransitionTime": now},
                 {"type": "PodScheduled", "status": "True", "lastTransitionTime": now}]
        status: dict[str, Any] = {
            "phase": "Succeeded" if ok else "Failed", "hostIP": "127.0.0.1", "podIP": "127.0.0.1",
            "startTime": pr.started, "qosClass": "BestEffort",
            "containerStatuses": [{"name": c.get("name"), "image": c.get("image"),
                                   "imageID": f"emulated://{c.get('image')}", "containerID": term["containerID"],
                                   "ready": False, "started": False, "restartCount": 0,
                                   "state": {"terminated": term}, "lastState": {}}]}
        if pr.evicting:
            rule = pr.evict_rule
            status["reason"] = "Evicted"
            status["message"] = (rule.message if rule else None) or "Evicted"
            conds.insert(0, {"type": "DisruptionTarget", "status": "True", "reason": "TerminationByKubelet",
                             "message": status["message"], "lastTransitionTime": now})
            pr.reason = "Evicted"
            pr.message = status["message"]
        status["conditions"] = conds
        pr.conditions = conds
        pr.state = "succeeded" if ok else "failed"
        self._put_pod_status(pr, status)
        if ok:
            if pr.index is not None:
                st.succeeded_idx.add(pr.index)
                st.succeeded = len(st.succeeded_idx)
            else:
                st.succeeded += 1
        else:
            self._pod_failed(st, pr)

    def _pod_failed(self, st: _JobState, pr: PodRun) -> None:
        spec = st.obj.get("spec") or {}
        action, message = "Count", None
        for i, rule in enumerate((spec.get("podFailurePolicy") or {}).get("rules") or []):
            oec = rule.get("onExitCodes")
            if oec:
                code = pr.exit_code or 0
                vals = set(oec.get("values") or [])
                hit = code != 0 and ((code in vals) if oec.get("operator") == "In" else (code not in vals))
                if hit:
                    action = rule.get("action")
                    cname = (st.obj["spec"]["template"]["spec"].get("containers") or [{}])[0].get("name")
                    message = (f"Container {cname} for pod {pr.namespace}/{pr.name} failed with exit code {code} "
                               f"matching {action} rule at index {i}")
                    break
            for pat in rule.get("onPodConditions") or []:
                if any(c.get("type") == pat.get("type") and c.get("status") == pat.get("status", "True")
                       for c in pr.conditions):
                    action = rule.get("action")
                    message = (f"Pod {pr.namespace}/{pr.name} has condition {pat.get('type')} matching {action} "
                               f"rule at index {i}")
                    break
            else:
                continue
            break
        st.last_failure_mono = time.monotonic()
        if action == "Ignore":
            return
        st.failed += 1
        pr.counted = True
        if action == "FailJob":
            self._finish(st, "Failed", "PodFailurePolicy", message or "")
            return
        if pr.index is not None:
            per_index = spec.get("backoffLimitPerIndex")
            st.index_failures[pr.index] += 1
            if action == "FailIndex" or (per_index is not None and st.index_failures[pr.index] > per_index):
                st.failed_idx.add(pr.index)

    def _signal(self, pr: PodRun, sig: int) -> None:
        if pr.proc is None:
            return
        try:
            os.killpg(pr.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            try:
                pr.proc.send_signal(sig)
            except ProcessLookupError:
                pass

    # ---------------------------------------------------------------- env, volumes, argv

    def _resolve_env(self, st: _JobState, pr: PodRun, pod: dict, c: dict) -> dict[str, str]:
        ns = pr.namespace
        venv_bin = str(pathlib.Path(sys.executable).parent)
        pp = [str(self.repo_root)] + [str(self.repo_root / d) for d in ("jobs", "operator")
                                      if (self.repo_root / d).is_dir()] + self.pythonpath
        env: dict[str, str] = {
            "PATH": venv_bin + os.pathsep + os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
            "HOME": os.environ.get("HOME", "/root"),
            "LANG": "C.UTF-8",
            "HOSTNAME": pod["spec"].get("hostname") or pr.name,
            "HF_HUB_OFFLINE": "1",
            "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": os.pathsep.join(pp),
        }
        env.update(self.extra_env)
        for ef in c.get("envFrom") or []:
            prefix = ef.get("prefix", "")
            for kind, ref in (("secret", ef.get("secretRef")), ("configmap", ef.get("configMapRef"))):
                if ref:
                    data = self._get_data(kind, ns, ref.get("name"))
                    if data is None:
                        if ref.get("optional"):
                            continue
                        raise _ConfigError(f'{kind} "{ref.get("name")}" not found')
                    for k, v in data.items():
                        env[prefix + k] = v
        for e in c.get("env") or []:
            name = e["name"]
            if "value" in e:
                env[name] = _expand(e.get("value") or "", env)
                continue
            vf = e.get("valueFrom")
            if not vf:
                env[name] = ""
                continue
            for kind, ref in (("secret", vf.get("secretKeyRef")), ("configmap", vf.get("configMapKeyRef"))):
                if ref:
                    data = self._get_data(kind, ns, ref.get("name"))
                    if data is None or ref.get("key") not in data:
                        if ref.get("optional"):
                            break
                        if data is None:
                            raise _ConfigError(f'{kind} "{ref.get("name")}" not found')
                        raise _ConfigError(f"couldn't find key {ref.get('key')} in "
                                           f"{'Secret' if kind == 'secret' else 'ConfigMap'} {ns}/{ref.get('name')}")
                    env[name] = data[ref["key"]]
            if vf.get("fieldRef"):
                env[name] = _field(pod, vf["fieldRef"].get("fieldPath", ""))
            if vf.get("resourceFieldRef"):
                env[name] = _resource_field(c, vf["resourceFieldRef"])
        env.update(self.override_env)
        if "MASTER_ADDR" in env or "MASTER_PORT" in env:
            if not st.master_port:
                st.master_port = free_port()
            addr = env.get("MASTER_ADDR")
            if addr is not None and not re.match(r"^(\d+\.\d+\.\d+\.\d+|localhost|\[?[0-9a-fA-F:]+\]?)$", addr):
                env["MASTER_ADDR"] = "127.0.0.1"
            if st.orig_port is None:
                st.orig_port = env.get("MASTER_PORT") or ""
            env["MASTER_PORT"] = str(st.master_port)
        return env

    def _mounts(self, st: _JobState, pr: PodRun, pod: dict, c: dict) -> list[tuple[str, str]]:
        vols = {v.get("name"): v for v in pod["spec"].get("volumes") or []}
        out: list[tuple[str, str]] = [(k, v) for k, v in self.path_map.items()]
        for m in c.get("volumeMounts") or []:
            v = vols.get(m.get("name")) or {}
            base = self.work_dir / pr.namespace
            if "persistentVolumeClaim" in v:
                local = base / "pvc" / v["persistentVolumeClaim"].get("claimName", m["name"])
            elif "hostPath" in v:
                continue
            else:
                local = base / "pods" / pr.name / "volumes" / m["name"]
            local.mkdir(parents=True, exist_ok=True)
            for kind, key in (("secret", "secret"), ("configmap", "configMap")):
                src = v.get(key)
                if src:
                    data = self._get_data(kind, pr.namespace, src.get("secretName") or src.get("name")) or {}
                    items = src.get("items")
                    files = {it["path"]: data.get(it["key"], "") for it in items} if items else data
                    for rel, content in files.items():
                        p = local / rel
                        p.parent.mkdir(parents=True, exist_ok=True)
                        p.write_text(content)
            if m.get("subPath"):
                local = local / m["subPath"]
            out.append((m["mountPath"].rstrip("/") or "/", str(local)))
        out.sort(key=lambda kv: -len(kv[0]))
        return out

    def _rewrite(self, s: str, st: _JobState, mounts: list[tuple[str, str]]) -> str:
        if not isinstance(s, str):
            return s
        # One pass over all mount paths (longest first), so a rewritten path is never rewritten again: the
        # local dirs usually live under /tmp, itself a mount path (emptyDir), and a path_map entry may map a
        # path under /tmp to itself.
        table: dict[str, str] = {}
        for cpath, local in mounts:
            if cpath != "/":
                table.setdefault(cpath, local)
        if table:
            alts = "|".join(re.escape(c) for c in sorted(table, key=len, reverse=True))
            s = re.sub(r"(?<![\w./-])(" + alts + r")(?=/|$|[\s:=,;\"'])", lambda m: table[m.group(1)], s)
        # "<job>-<i>.<subdomain>[...]" or "<job>-<i>:<port>" at the start, after "//", "=", "@", "," or a space
        dns = re.compile(r"(?:^|(?<=//)|(?<==)|(?<=@)|(?<=,)|(?<=\s))" + re.escape(st.name)
                         + r"-\d+(?:\.[A-Za-z0-9-]+)*(?=:\d|$|/|\s|,)")
        s = dns.sub(lambda m: "127.0.0.1" if ("." in m.group(0)[len(st.name):] or
                                              s[m.end():m.end() + 1] == ":") else m.group(0), s)
        orig = st.orig_port
        if orig and st.master_port:
            s = re.sub(r"127\.0\.0\.1:" + re.escape(orig) + r"\b", f"127.0.0.1:{st.master_port}", s)
            s = re.sub(r"^(--master[-_]port=)" + re.escape(orig) + r"$", rf"\g<1>{st.master_port}", s)
        return s

    def _rewrite_argv(self, argv: list[str], st: _JobState, mounts: list[tuple[str, str]]) -> list[str]:
        out = [self._rewrite(a, st, mounts) for a in argv]
        if st.orig_port and st.master_port:
            for i in range(1, len(out)):
                if re.match(r"^--master[-_]port$", out[i - 1]) and out[i] == st.orig_port:
                    out[i] = str(st.master_port)
        return out

    @staticmethod
    def _map_argv(argv: list[str]) -> list[str]:
        if not argv:
            return argv
        head = os.path.basename(argv[0])
        if re.match(r"^python(3(\.\d+)?)?$", head):
            return [sys.executable] + argv[1:]
        if head == "torchrun":
            return [sys.executable, "-m", "torch.distributed.run"] + argv[1:]
        if head in ("pip", "pip3"):
            return [sys.executable, "-m", "pip"] + argv[1:]
        if "/" not in argv[0]:
            venv_tool = pathlib.Path(sys.executable).parent / argv[0]
            if venv_tool.exists():
                return [str(venv_tool)] + argv[1:]
            found = shutil.which(argv[0])
            if found:
                return [found] + argv[1:]
        return argv


def _expand(s: str, env: dict[str, str]) -> str:
    """Kubernetes ``$(VAR)`` expansion: defined variables are replaced, ``$$`` escapes, unknown refs stay."""
    def rep(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1)
        return env[name] if name in env else m.group(0)
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)", rep, s)


def _field(pod: dict, path: str) -> str:
    md = pod.get("metadata") or {}
    m = re.match(r"^metadata\.(labels|annotations)\['(.+)'\]$", path)
    if m:
        return str((md.get(m.group(1)) or {}).get(m.group(2), ""))
    return str({
        "metadata.name": md.get("name"), "metadata.namespace": md.get("namespace"), "metadata.uid": md.get("uid"),
        "spec.nodeName": (pod.get("spec") or {}).get("nodeName") or NODE_NAME,
        "spec.serviceAccountName": (pod.get("spec") or {}).get("serviceAccountName") or "default",
        "status.podIP": "127.0.0.1", "status.podIPs": "127.0.0.1", "status.hostIP": "127.0.0.1",
        "status.hostIPs": "127.0.0.1",
    }.get(path) or "")


def _resource_field(c: dict, ref: dict) -> str:
    res = ref.get("resource", "")
    section, _, what = res.partition(".")
    val = ((c.get("resources") or {}).get(section) or {}).get(what)
    if val is None:
        val = {"cpu": "16", "memory": str(128 * 2 ** 30), "ephemeral-storage": str(64 * 2 ** 30)}.get(what, "0")
    if what == "cpu":
        v = str(val)
        cores = float(v[:-1]) / 1000 if v.endswith("m") else float(v)
        div = ref.get("divisor", "1")
        d = float(div[:-1]) / 1000 if str(div).endswith("m") else float(div)
        import math
        return str(math.ceil(cores / d))
    if what in ("memory", "ephemeral-storage"):
        units = {"Ki": 2 ** 10, "Mi": 2 ** 20, "Gi": 2 ** 30, "Ti": 2 ** 40, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
        v = str(val)
        for u, mul in units.items():
            if v.endswith(u):
                return str(int(float(v[: -len(u)]) * mul))
        return v
    return str(val)
